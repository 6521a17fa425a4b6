"""A synthetic OpenAI-style streaming backend for the router benchmark.

It streams ``--tokens`` chat completion chunks per request as fast as the connection takes them
(or one every ``--interval`` seconds), honouring TCP backpressure through a push producer. Each
token's text carries the backend's CLOCK_MONOTONIC send time, so the load generator can measure
the delay each chunk spent in the router (the clock is system-wide on Linux).

    python bench/router_synthetic_backend.py --listen unix:/tmp/synth.sock --tokens 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

# --static: the same bytes for every token (no send stamp), so the backend spends as little CPU
# as it can on a machine whose cores it shares with the routers under test
_STATIC = (
    b'data: {"choices": [{"delta": {"content": "1700000000.000000 "}, "finish_reason": null}]}\n\n'
)
_FINAL = b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n'


@implementer(IPushProducer)
class _Stream:
    def __init__(
        self, request: server.Request, tokens: int, interval: float, static: bool = False
    ) -> None:
        self.request = request
        self.static = static
        self.left = tokens
        self.total = tokens
        self.interval = interval
        self.paused = False
        self.done = False
        self.timer: Any = None
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def pump(self) -> None:
        self.timer = None
        burst = 1 if self.interval else 64
        while not self.paused and not self.done and self.left and burst:
            if self.static:
                self.request.write(_STATIC)
            else:
                text = f"{time.monotonic():.6f} "
                chunk = {"choices": [{"delta": {"content": text}, "finish_reason": None}]}
                self.request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.left -= 1
            burst -= 1
        if self.done:
            return
        if not self.left:
            usage = {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": self.total}}
            self.request.write(_FINAL + b"data: " + json.dumps(usage).encode() + b"\n\n")
            self.request.write(b"data: [DONE]\n\n")
            self.request.unregisterProducer()
            self.request.finish()
            self.done = True
            return
        if not self.paused:
            self.timer = reactor.callLater(self.interval, self.pump)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused and not self.done:
            self.paused = False
            if self.timer is None:
                self.pump()

    def stopProducing(self) -> None:
        self._finished(None)


class Backend(resource.Resource):
    isLeaf = True

    def __init__(self, tokens: int, interval: float, hold: int = 0, static: bool = False) -> None:
        super().__init__()
        self.static = static
        self.tokens = tokens
        self.interval = interval
        self.hold = hold
        self.held: list[_Stream] = []

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.path == b"/health":
            return b'{"status":"ok"}'
        if request.path == b"/v1/models":  # what a fronting node (protocol v2) discovers
            return b'{"object":"list","data":[{"id":"synthetic","object":"model"}]}'
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: server.Request) -> Any:
        assert request.content is not None
        body = json.loads(request.content.read())
        tokens = int(body.get("max_tokens") or self.tokens)
        request.setHeader(b"Content-Type", b"text/event-stream")
        stream = _Stream(request, tokens, self.interval, self.static)
        if not self.hold:
            reactor.callLater(0, stream.pump)  # type: ignore[attr-defined]
            return server.NOT_DONE_YET
        # --hold N: the first N requests wait for each other, then all stream at once (a burst
        # measured in steady state, not while the router still admits the others); later ones
        # (a new burst) wait for the next N
        self.held.append(stream)
        if len(self.held) >= self.hold:
            for waiting in self.held:
                reactor.callLater(0, waiting.pump)  # type: ignore[attr-defined]
            self.held = []
        return server.NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="Twisted endpoint, e.g. unix:/tmp/s.sock")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--hold", type=int, default=0, help="start streaming N requests at once")
    parser.add_argument("--static", action="store_true", help="the same bytes for every token")
    args = parser.parse_args()
    site = server.Site(Backend(args.tokens, args.interval, args.hold, args.static))
    site.log = lambda request: None  # type: ignore[method-assign]
    endpoint = endpoints.serverFromString(reactor, args.listen)
    endpoint.listen(site).addCallback(lambda _: print("ready", flush=True))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
