"""Router test support: an in-process router on real sockets, a fault-injecting backend, helpers.

The fault backend exists only to inject faults the real inference daemon cannot be asked for
(dying after N tokens, answering 500, hanging); everything else in the router tests runs against
the real ``twistd inference`` daemon on the tiny model.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.web import resource, server
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from llmrouter.client import Client
from llmrouter.httpclient import agent_for
from llmrouter.protocol import ChatRequest
from llmrouter.router.settings import Settings
from llmrouter.router.tap import Router
from llmrouter.sse import SSEParser


def short_tempdir(testcase: Any) -> Path:
    """A short temp dir (UNIX socket paths must stay under 108 bytes), removed on cleanup."""
    directory = Path(tempfile.mkdtemp(prefix="llmr-"))
    testcase.addCleanup(shutil.rmtree, directory, True)
    return directory


@dataclass
class Script:
    """What the fault backend does with the next chat requests."""

    tokens: int = 5
    die_after: int | None = None  # abort the connection after this many tokens
    status: int = 200
    hang: bool = False  # accept the request, never answer
    token_delay: float = 0.0  # seconds between tokens (real reactor time)
    stall_after: int | None = None  # stop sending (connection stays open) after this many
    text: str = "tok"
    # Whole chat completion chunks to send instead of the numbered tokens (reasoning, tool calls,
    # logprobs, ...), then the usual final chunk with ``finish_reason``.
    events: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    error_body: bytes = b'{"error": {"message": "scripted failure"}}'


@dataclass
class BackendLog:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0  # the connection went away before the stream ended
    bodies: list[dict[str, Any]] = field(default_factory=list)
    cache_keys: list[bytes | None] = field(default_factory=list)  # X-LLMRouter-Cache-Key


class FaultBackend(resource.Resource):
    """A minimal OpenAI-style streaming backend driven by a :class:`Script`."""

    isLeaf = True

    def __init__(self, script: Script | None = None) -> None:
        super().__init__()
        self.script = script or Script()
        self.log = BackendLog()
        self.healthy = True
        self.has_health_route = True  # False: only /v1/models (like some OpenAI-style servers)
        self.models: list[str] | None = None  # served on /v1/models when set
        self.owned_by = "fault"
        self.props: dict[str, Any] | None = None  # served on /props when set (llama-server)
        self.open_requests: list[server.Request] = []
        self.paused = 0

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/health" and self.has_health_route:
            request.setResponseCode(200 if self.healthy else 503)
            return b'{"status": "ok"}'
        if request.path == b"/v1/models" and (self.models is not None or not self.has_health_route):
            request.setResponseCode(200 if self.healthy else 503)
            data = [
                {"id": m, "object": "model", "owned_by": self.owned_by} for m in self.models or []
            ]
            return json.dumps({"object": "list", "data": data}).encode()
        if request.path == b"/props" and self.props is not None:
            return json.dumps(self.props).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: server.Request) -> Any:
        assert request.content is not None
        self.log.requests += 1
        self.log.bodies.append(json.loads(request.content.read()))
        self.log.cache_keys.append(request.getHeader(b"x-llmrouter-cache-key"))
        script = self.script
        if script.status != 200:
            request.setResponseCode(script.status)
            return script.error_body
        self.open_requests.append(request)
        state: dict[str, Any] = {"sent": 0, "over": False, "timer": None}

        def lost(_: object) -> None:
            if not state["over"]:
                self.log.cancelled += 1
            state["over"] = True
            if state["timer"] is not None and state["timer"].active():
                state["timer"].cancel()

        request.notifyFinish().addErrback(lost)
        if script.hang:
            return server.NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/event-stream")

        def step() -> None:
            if state["over"]:
                return
            if script.die_after is not None and state["sent"] >= script.die_after:
                state["over"] = True
                assert request.channel is not None and request.channel.transport is not None
                request.channel.transport.abortConnection()
                return
            if script.stall_after is not None and state["sent"] >= script.stall_after:
                return
            events = script.events
            if state["sent"] >= (script.tokens if events is None else len(events)):
                final = {"choices": [{"delta": {}, "finish_reason": script.finish_reason}]}
                usage = {
                    "choices": [],
                    "usage": {"prompt_tokens": 3, "completion_tokens": state["sent"]},
                }
                request.write(_event(final) + _event(usage) + b"data: [DONE]\n\n")
                state["over"] = True
                self.log.completed += 1
                request.finish()
                return
            chunk = {"choices": [{"delta": {"content": f"{script.text}{state['sent']} "}}]}
            request.write(_event(chunk if events is None else events[state["sent"]]))
            state["sent"] += 1
            state["timer"] = reactor.callLater(script.token_delay, step)

        state["timer"] = reactor.callLater(0, step)
        return server.NOT_DONE_YET


def _event(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


@defer.inlineCallbacks
def start_fault_backend(testcase: Any, script: Script | None = None) -> Any:
    """Listen on a UNIX socket; returns (backend, "unix:/path.sock")."""
    directory = short_tempdir(testcase)
    backend = FaultBackend(script)
    site = server.Site(backend)
    site.log = lambda request: None  # type: ignore[method-assign]
    path = directory / "fault.sock"
    port: IListeningPort = yield UNIXServerEndpoint(reactor, str(path)).listen(site)
    testcase.addCleanup(_close_backend, backend, port)
    return backend, f"unix:{path}"


def _close_backend(backend: FaultBackend, port: IListeningPort) -> defer.Deferred[Any]:
    for request in backend.open_requests:
        channel = getattr(request, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()
    d = defer.maybeDeferred(port.stopListening)
    # let aborted connections finish closing so the reactor is clean
    d.addCallback(lambda _: deferLater(reactor, 0.01, lambda: None))
    return d


def test_settings(directory: Path, backends: list[str], **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "keys_dir": directory / "keys",
        "inference_endpoints": tuple(backends),
        "listen": ("tcp:0:interface=127.0.0.1",),
        "retry_backoff_seconds": 0.01,
        "retry_backoff_max_seconds": 0.05,
        "health_interval_seconds": 3600.0,
        "connect_timeout_seconds": 5.0,
        "first_token_timeout_seconds": 30.0,
        "idle_timeout_seconds": 30.0,
        "new_device_pow_difficulty": 0,  # the new-device tests turn it on
    }
    values.update(changes)
    return Settings(**values)


@dataclass
class RunningRouter:
    router: Router
    url: str
    port: IListeningPort
    events: list[str]

    def client(self, clock: Any = None, **kwargs: Any) -> Client:
        kwargs.setdefault("pin", bytes(self.router.keys.signing_key.verify_key))
        kwargs.setdefault("protocol", 1)  # the router of these tests speaks v1.1
        return Client(reactor, self.url, clock=clock or self.router.clock, **kwargs)


@defer.inlineCallbacks
def start_router(
    testcase: Any,
    backends: list[str],
    clock: Clock | None = None,
    probe: bool = True,
    unix: bool = False,
    **changes: Any,
) -> Any:
    """An in-process router on 127.0.0.1 (real reactor I/O; ``clock`` drives its timers)."""
    directory = short_tempdir(testcase)
    settings = test_settings(directory, backends, **changes)
    events: list[str] = []
    if clock is None:
        clock = Clock()
        clock.advance(1_700_000_000)
    router = Router(settings, reactor, clock=clock, emit=events.append)
    router.start()
    testcase.addCleanup(router.stop)
    if unix:  # small kernel buffers: backpressure shows up after a few hundred KiB
        endpoint: Any = UNIXServerEndpoint(reactor, str(directory / "router.sock"))
    else:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port: IListeningPort = yield endpoint.listen(router.site)
    testcase.addCleanup(port.stopListening)
    if probe:
        for backend in router.pool.backends:
            yield router.pool.probe(backend)
    if unix:
        url = f"unix:{directory / 'router.sock'}"
    else:
        url = f"http://127.0.0.1:{port.getHost().port}"
    return RunningRouter(router, url, port, events)


@defer.inlineCallbacks
def direct_logprobs(socket: Path, request: ChatRequest, model: str) -> Any:
    """What a backend on ``socket`` streams as logprobs for ``request`` asked of it directly:
    ``(token, logprob, bytes, [(top token, logprob), ...])`` per token."""
    body = json.dumps(request.to_openai(model)).encode()
    headers = {b"Content-Type": [b"application/json"]}
    status, _, raw = yield http(f"unix:{socket}", b"POST", "/v1/chat/completions", body, headers)
    assert status == 200, status
    entries = []
    for _, payload in SSEParser().feed(raw):
        for choice in [] if payload == "[DONE]" else json.loads(payload)["choices"]:
            for entry in (choice.get("logprobs") or {}).get("content") or []:
                top = [(t["token"], t["logprob"]) for t in entry["top_logprobs"]]
                entries.append((entry["token"], entry["logprob"], tuple(entry["bytes"]), top))
    return entries


@defer.inlineCallbacks
def http(
    url: str,
    method: bytes = b"GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> Any:
    """One plain HTTP request; fires with (status, Headers, body)."""
    agent, base = agent_for(reactor, url)
    producer = None if body is None else FileBodyProducer(BytesIO(body))
    response = yield agent.request(method, (base + path).encode(), Headers(headers or {}), producer)
    data = yield readBody(response)
    return response.code, response.headers, data


def post_json(url: str, path: str, payload: object) -> Any:
    """POST ``payload`` as JSON; fires with (status, Headers, body)."""
    headers = {b"Content-Type": [b"application/json"]}
    return http(url, b"POST", path, json.dumps(payload).encode(), headers)


def daemon_pin(directory: Path) -> bytes:
    """The signing key (the pin) of a router daemon whose key directory is ``directory/keys``."""
    from llmrouter.protocol import b64u_decode

    state = json.loads((directory / "keys" / "state.json").read_text())
    return b64u_decode(state["signing_key"], "signing_key", 32)


def prompt(text: str = "Hello", **params: Any) -> ChatRequest:
    return ChatRequest.from_prompt(text, **params)


def collect() -> tuple[list[str], Callable[[str], None]]:
    tokens: list[str] = []
    return tokens, tokens.append


@defer.inlineCallbacks
def key_document(url: str, now: float | None = None) -> Any:
    """The verified key document (``now``: the router's clock when it is not the real one)."""
    from llmrouter.protocol import verify_key_document

    status, _, body = yield http(url, path="/api/pubkey")
    assert status == 200, status
    return verify_key_document(body, now=time.time() if now is None else now)


@defer.inlineCallbacks
def sealed(
    running: RunningRouter,
    request: ChatRequest | None = None,
    *,
    ts: int | None = None,
    device: Any = None,
    key: Any = None,
) -> Any:
    """A sealed envelope for the running router: fires with (body bytes, Envelope, RequestState)."""
    from llmrouter.protocol import seal_request

    if key is None:
        document = yield key_document(running.url, running.router.clock.seconds())
        key = document.current()
    now = int(running.router.clock.seconds()) if ts is None else ts
    envelope, state = seal_request(key, request or prompt(), now, device)
    body = json.dumps(envelope.to_json()).encode()
    _STATES[body] = state
    return body, envelope, state


_STATES: dict[bytes, Any] = {}  # what sealed() made, to open a sealed refusal with


def remember(body: bytes, state: Any) -> bytes:
    """A request sealed by hand: its state, for :func:`refusal`."""
    _STATES[body] = state
    return body


# Refusals after the router decrypted the request: they come back sealed (issue 19).
AFTER_DECRYPTION = frozenset(
    {
        "bad_payload",
        "device_rate_limited",
        "budget_exhausted",
        "device_streams",
        "model_unknown",
        "unsupported_field",
        "no_backend",
        "upstream_refused",
        "upstream_failed",
        "timeout",
    }
)


def refusal(sent: bytes, status: int, headers: Any, raw: bytes) -> tuple[int, dict[str, Any], bool]:
    """A refusal's status, error fields and whether it came sealed: plain JSON before the router
    decrypted the request ``sent`` (made by :func:`sealed`), after it a stream whose only chunk
    is the sealed final error, opened here with that request's state."""
    from llmrouter.protocol import ErrorChunk, ResponseOpener

    if status == 200 and headers.getRawHeaders(b"content-type") == [b"text/event-stream"]:
        opener = ResponseOpener(_STATES[sent])
        items = opener.feed(raw)
        final = opener.close()
        assert items == [final] and isinstance(final, ErrorChunk), items
        assert final.status is not None
        error = {"code": final.code, "message": final.message, **final.detail()}
        return final.status, error, True
    return status, json.loads(raw)["error"], False


def post_chat(
    url: str, body: bytes, headers: dict[bytes, list[bytes]] | None = None
) -> defer.Deferred[Any]:
    all_headers = {b"Content-Type": [b"application/json"], **(headers or {})}
    return http(url, b"POST", "/api/chat", body, all_headers)


def post_v2_chat(url: str, body: bytes) -> defer.Deferred[Any]:
    """POST a sealed v2 body (``message/ohttp-req``); fires with (status, Headers, body)."""
    return http(url, b"POST", "/api/v2/chat", body, {b"Content-Type": [b"message/ohttp-req"]})


def run_client_cli(
    args: Sequence[str], env: dict[str, str], stdin: bytes | None, scratch: Path
) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """``python -m llmrouter.client ARGS`` from the checkout, as a separate process; fires with
    (stdout, stderr, exit code). ``stdin`` goes through the file ``scratch``, as
    getProcessOutputAndValue has no stdin."""
    root = Path(__file__).resolve().parents[1]
    argv = ["-m", "llmrouter.client", *args]
    if stdin is None:
        return utils.getProcessOutputAndValue(sys.executable, argv, env=env, path=str(root))
    scratch.write_bytes(stdin)
    return utils.getProcessOutputAndValue(
        "/bin/sh",
        ["-c", f'exec "$0" "$@" < {scratch}', sys.executable, *argv],
        env=env,
        path=str(root),
    )


def outcome(sent: bytes, status: int, headers: Any, raw: bytes) -> int | tuple[int, str]:
    """200 for an answer, else (status, code) of the refusal, plain or sealed."""
    from llmrouter.protocol import Done, ResponseOpener

    if status == 200 and sent in _STATES:
        opener = ResponseOpener(_STATES[sent])
        opener.feed(raw)
        if isinstance(opener.close(), Done):
            return 200
    elif status == 200:
        return 200
    got_status, error, _ = refusal(sent, status, headers, raw)
    return got_status, error["code"]


def error_of(body: bytes) -> tuple[str, str]:
    error = json.loads(body)["error"]
    return error["code"], error["message"]


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0
