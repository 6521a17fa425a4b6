"""Protocol v2 on the router: ``POST /api/v2/chat`` and ``GET /api/v2/keys``.

The router admits a v2 request on what its outer layer tells it (:meth:`Admission.admit_outer`),
picks one of the request's candidate nodes by health and load, forwards that node's wrap and the
inner ciphertext to the node's ``/v2/chat``, and relays the node's answer byte for byte. It holds
no key that opens the inner layer and never sees the chat request or a chunk's plaintext.

Before the node's first byte (its ``200``, sent with its first event) the router may try the next
candidate: a node that cannot be reached, answers 503 or does not know the wrap's key
(``key_unknown``: rotated away). After it, never. A node that cannot open the wrap
(``decrypt_failed``) costs the client's address, as an undecryptable request does here.

Everything the router says after it opened the outer layer is sealed: a refusal is a ``200``
stream with one ``event: router``, and when the node's stream breaks (or the deadline passes)
the router appends one, so the client gets a verified end either way. The relay forwards whole
SSE events only (it looks for the blank line that ends each one, nothing more), so an appended
event never lands inside a partial one.

Flow control is end to end, as for v1.1: the client's connection is a push producer's consumer,
and pausing it pauses the node's transport, so bytes wait in the node's socket, not here. A
client that takes nothing for ``WRITE_STALL_SECONDS`` is dropped, and every stream ends at its
deadline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmrouter import pow
from llmrouter.protocol import ProtocolError, SealedRefusal
from llmrouter.router.admission import Admission, AdmittedOuter
from llmrouter.router.keydoc import KeyDocumentV2Source
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.nodes import Node, NodePool
from llmrouter.router.settings import Settings
from llmrouter.streaming import StreamingResponse
from llmrouter.terminate.bodies import BodyReader, BytesProducer
from llmrouter.v2.request import CONTENT_TYPE, OuterRequest, node_request_body
from llmrouter.v2.response import seal_router_event

__all__ = ["Relay"]

log = Logger()

_MAX_ERROR_BODY = 1 << 12
_MAX_EVENT = 1 << 20  # a node's event longer than this is a broken stream
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NODE_HEADERS = {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}
# What a node's plain refusal (made before it opened anything) becomes for the client, sealed.
_PASSED_ON = frozenset({"stale", "replay", "decrypt_failed", "key_unknown", "overloaded"})


@dataclass(frozen=True)
class _Refused:
    """A node's plain answer other than 200: its status and error code (if an identifier)."""

    status: int
    code: str | None


class Relay:
    """The v2 endpoints of the public listener (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        admission: Admission,
        nodes: NodePool,
        document: KeyDocumentV2Source,
        metrics: RouterMetrics,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._admission = admission
        self._nodes = nodes
        self._document = document
        self._metrics = metrics
        self.streams: set[RelayStream] = set()

    def available(self) -> bool:
        return self._document.available()

    def key_document(self) -> bytes | None:
        return self._document.document()

    async def chat(
        self, request: server.Request, client_ip: str, gone: Callable[[], bool]
    ) -> ProtocolError | None:
        """Admit and relay one request; returns a plain refusal for the caller to answer."""
        started = self._clock.seconds()
        content_type = request.getHeader(b"content-type") or b""
        if content_type.split(b";")[0].strip().lower() != CONTENT_TYPE.encode("ascii"):
            return self._admission.reject(
                ProtocolError("unsupported_media_type", f"Content-Type must be {CONTENT_TYPE}")
            )
        assert request.content is not None
        body = request.content.read()
        request.content = BytesIO()
        pow_header = request.requestHeaders.getRawHeaders(pow.HEADER.encode("ascii"), [None])[-1]
        try:
            admitted = await self._admission.admit_outer(body, client_ip, pow_header, self._route)
        except SealedRefusal as e:  # the outer layer opened: e.enc is its enc
            stream = self._stream(request, started, e.enc, e.secret, lambda: None)
            stream.end(e)
            return None
        except ProtocolError as e:
            return e
        if gone():  # left while a shared table answered
            admitted.release()
            return None
        outer = admitted.outer
        stream = self._stream(request, started, outer.enc, outer.router_secret, admitted.release)
        call = NodeCall(self, admitted, stream)
        stream.response.attach(call)
        call.start()
        await stream.response.done  # cancelled by Klein when the client goes: the stream cleans up
        return None

    def _route(self, outer: OuterRequest) -> list[Node]:
        """The request's candidate nodes the router can use now, best first."""
        if not self._nodes.serves(outer.model):
            raise ProtocolError("model_unknown", "no node serves that model", 404)
        candidates = self._nodes.candidates([w.node for w in outer.wraps], outer.model)
        if not candidates:
            raise ProtocolError(
                "no_backend", "no node the request names is available", 503, retry_after=1
            )
        return candidates

    def _stream(
        self,
        request: server.Request,
        started: float,
        enc: bytes,
        secret: bytes,
        release: Callable[[], None],
    ) -> RelayStream:
        settings = self._settings

        def closed() -> None:
            release()
            self.streams.discard(stream)

        stream = RelayStream(
            request,
            self._clock,
            self._metrics,
            started,
            enc,
            secret,
            settings.pad_bytes,
            closed,
            deadline=started + settings.request_ttl_seconds,
            write_stall=settings.write_stall_seconds,
        )
        self.streams.add(stream)
        return stream

    # For NodeCall.

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def clock(self) -> IReactorTime:
        return self._clock

    @property
    def metrics(self) -> RouterMetrics:
        return self._metrics

    def charge(self, address: str, error: ProtocolError) -> None:
        self._admission.charge(address, error)


class NodeCall:
    """The node side of one relayed request: candidates in turn until one answers 200, then
    its bytes to the stream."""

    def __init__(self, relay: Relay, admitted: AdmittedOuter[list[Node]], stream: RelayStream):
        self._relay = relay
        self._admitted = admitted
        self._stream = stream
        self._candidates = list(admitted.candidates)
        self._node: Node | None = None
        self._request: Deferred[IResponse] | None = None
        self._body: _RelayBody | None = None
        self._timer: IDelayedCall | None = None
        self._attempt = 0
        self._started = 0.0  # when the current attempt began
        self._last: ProtocolError | None = None
        self._paused = False
        self.over = False

    def start(self) -> None:
        self._try()

    # Control from the client side.

    def pause(self) -> None:
        """The client is not reading: hold the node's bytes in its socket. The node is not
        idle meanwhile (it is held), so its idle timer waits too; the client's own write-stall
        limit bounds this."""
        self._paused = True
        if self._body is not None:
            self._disarm()
            if self._body.transport is not None:
                self._body.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        self._paused = False
        if self._body is not None:
            self._arm(self._relay.settings.idle_timeout_seconds)
            if self._body.transport is not None:
                self._body.transport.resumeProducing()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        """The client left (or the stream ended): drop the node's connection."""
        if self.over:
            return
        self._finish()
        self._abort()

    # Attempts.

    def _try(self) -> None:
        while self._candidates:
            node = self._candidates.pop(0)
            wrap = self._admitted.outer.wrap_for(node.name or "")
            if wrap is None or not node.usable or not node.backend.breaker.acquire():
                continue
            self._send(node, node_request_body(self._admitted.outer, wrap))
            return
        error = self._last or ProtocolError(
            "no_backend", "no node the request names is available", 503, retry_after=1
        )
        self._end(error)

    def _send(self, node: Node, body: bytes) -> None:
        self._node = node
        node.streams += 1
        self._attempt += 1
        attempt = self._attempt
        self._started = self._relay.clock.seconds()
        self._arm(self._relay.settings.first_token_timeout_seconds)
        d = node.backend.agent.request(
            b"POST", node.uri("/v2/chat"), Headers(_NODE_HEADERS), BytesProducer(body)
        )
        self._request = d
        d.addCallbacks(
            self._response, self._failed, callbackArgs=(attempt,), errbackArgs=(attempt,)
        )

    def _response(self, response: IResponse, attempt: int) -> None:
        if attempt != self._attempt or self.over:
            response.deliverBody(BodyReader(0))
            return
        self._request = None
        code = int(response.code)
        if code == 200:
            body = _RelayBody(self)
            self._body = body
            self._disarm()
            if not self._paused:
                self._arm(self._relay.settings.idle_timeout_seconds)
            self._stream.open()
            response.deliverBody(body)
            return
        reader = BodyReader(_MAX_ERROR_BODY)
        response.deliverBody(reader)
        reader.done.addCallback(
            lambda data: self._refused(_Refused(code, _error_code(data)), attempt)
        )

    def _refused(self, refused: _Refused, attempt: int) -> None:
        """A node's plain answer: try the next candidate, or end with it (sealed)."""
        if attempt != self._attempt or self.over:
            return
        node = self._node
        assert node is not None
        self._leave(node, failed=refused.status >= 500 and refused.status != 503)
        code = refused.code
        if refused.status == 503 or code == "key_unknown" or refused.status == 404:
            self._last = _node_error(code if code in _PASSED_ON else "overloaded")
            self._retry(node)
            return
        if code == "decrypt_failed":  # the wrap did not open: the client's doing
            error = _node_error(code)
            self._relay.charge(self._admitted.address, error)
            self._end(error)
            return
        if code in _PASSED_ON:
            self._end(_node_error(code))
            return
        self._end(ProtocolError("upstream_failed", "the node refused the request", 502))

    def _failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._attempt or self.over:
            return
        self._request = None
        node = self._node
        assert node is not None
        self._leave(node, failed=True)
        self._last = ProtocolError("upstream_failed", "the node failed", 502)
        self._retry(node)

    def _retry(self, node: Node) -> None:
        self._relay.metrics.upstream_retries.labels(node.backend.name).inc()
        self._disarm()
        self._try()

    # The relayed body (from _RelayBody).

    def attached(self, body: _RelayBody) -> None:
        if self._paused and body.transport is not None:
            body.transport.pauseProducing()  # type: ignore[attr-defined]

    def relayed(self, data: bytes) -> None:
        if not self._paused:
            self._arm(self._relay.settings.idle_timeout_seconds)
        self._stream.write(data)

    def body_ended(self, body: _RelayBody, clean: bool) -> None:
        if body is not self._body or self.over:
            return
        self._body = None
        node = self._node
        assert node is not None
        self._leave(node, failed=not clean)
        if clean:
            self._finish()
            self._stream.finish()
        else:
            self._end(ProtocolError("upstream_failed", "the node's stream broke", 502))

    # Timers and endings.

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
            return
        self._timer = self._relay.clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.over:
            return
        node = self._node
        if node is not None:
            log.info("v2 timeout on {name}", name=node.backend.name)
            self._leave(node, failed=True)
        self._abort()
        self._end(ProtocolError("timeout", "the node timed out", 504))

    def _leave(self, node: Node, failed: bool) -> None:
        """This attempt at ``node`` is over: its stream count and its breaker's verdict."""
        if node is not self._node:
            return
        self._node = None
        node.streams -= 1
        if failed:
            node.backend.breaker.failure()
        else:
            node.backend.breaker.success()
        elapsed = self._relay.clock.seconds() - self._started
        self._relay.metrics.upstream_duration.labels(node.backend.name).observe(elapsed)

    def _abort(self) -> None:
        self._attempt += 1
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        if self._body is not None:
            body, self._body = self._body, None
            if body.transport is not None:
                body.transport.stopProducing()  # type: ignore[attr-defined]

    def _finish(self) -> None:
        self.over = True
        self._disarm()
        node = self._node
        if node is not None:  # the client left mid-attempt: no verdict on the node
            self._node = None
            node.streams -= 1
            node.backend.breaker.release()

    def _end(self, error: ProtocolError) -> None:
        self._finish()
        self._abort()
        self._stream.end(error)


class _RelayBody(Protocol):
    """The node's response body: whole SSE events go to the client as they come.

    Only the new bytes (and the one byte before them) are searched for the blank line that ends
    an event, and the unfinished event is kept as a list of pieces joined once, when it ends:
    a node that sends a long event a byte at a time costs linear work, not quadratic (as the
    clients' SSE parsers, issue 19). ``scanned`` counts the bytes examined, for the tests."""

    def __init__(self, call: NodeCall) -> None:
        self._call = call
        self._pending: list[bytes] = []  # the start of an event that has not ended yet
        self._size = 0
        self._newline = False  # the pending bytes end with a newline
        self.scanned = 0

    def connectionMade(self) -> None:
        self._call.attached(self)

    def dataReceived(self, data: bytes) -> None:
        if not data:
            return
        self.scanned += len(data)
        end = data.rfind(b"\n\n")
        if end >= 0:
            cut = end + 2
        elif self._newline and data[:1] == b"\n":
            cut = 1  # the blank line straddles the pieces
        else:
            self._pending.append(data)
            self._size += len(data)
            self._newline = data[-1:] == b"\n"
            if self._size > _MAX_EVENT and self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._pending.append(data[:cut])
        events = b"".join(self._pending)
        rest = data[cut:]
        self._pending = [rest] if rest else []
        self._size = len(rest)
        self._newline = rest[-1:] == b"\n"
        self._call.relayed(events)
        if self._size > _MAX_EVENT and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        clean = reason.check(ResponseDone) is not None and not self._size
        self._call.body_ended(self, clean)


class RelayStream:
    """The client's side of one v2 response: the node's bytes, or the router's sealed event.

    Its ``response`` (:class:`~llmrouter.streaming.StreamingResponse`, which the node's call is
    attached to) is the push producer on the client's connection; ``on_close`` runs once when it
    ends (releasing the request's slots)."""

    def __init__(
        self,
        request: server.Request,
        clock: IReactorTime,
        metrics: RouterMetrics,
        started: float,
        enc: bytes,
        secret: bytes,
        pad: int,
        on_close: Callable[[], None],
        *,
        deadline: float,
        write_stall: float,
    ) -> None:
        self._enc = enc
        self._secret = secret
        self._pad = pad
        self.response = StreamingResponse(
            request,
            clock,
            metrics,
            started,
            deadline=deadline,
            write_stall=write_stall,
            on_timeout=self._out_of_time,
            on_close=on_close,
        )

    def open(self) -> None:
        """The node's first byte: the response starts."""
        self.response.open(first_output=True)

    def write(self, data: bytes) -> None:
        self.response.write(data)

    def finish(self) -> None:
        self.response.close()

    def shutdown(self) -> None:
        """The router is stopping: drop the node, tell the client (sealed)."""
        self.response.cancel_upstream()
        self.end(ProtocolError("overloaded", "the router is shutting down, retry", 503))

    def end(self, error: ProtocolError) -> None:
        """The router's last word, sealed: a refusal, or why the node's stream ended."""
        if self.response.closed:
            return
        self.response.open()
        self.response.write(seal_router_event(self._secret, self._enc, error, pad=self._pad))
        self.response.close()

    def _out_of_time(self) -> None:
        """The deadline passed while the client still reads."""
        self.response.cancel_upstream()
        self.end(ProtocolError("timeout", "the request took too long", 504))


def _error_code(body: bytes) -> str | None:
    """A node's plain refusal's ``error.code`` when it is an identifier, else None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and _CODE.fullmatch(code) else None


def _node_error(code: str) -> ProtocolError:
    """The client's (sealed) error for a node's plain refusal ``code``."""
    messages = {
        "stale": "the node refused the request's timestamp: seal it again",
        "replay": "this request was already received",
        "decrypt_failed": "the node could not open the request",
        "key_unknown": "the node no longer has that key: fetch the keys and seal again",
        "overloaded": "the request's nodes are at capacity, retry later",
    }
    extra: dict[str, Any] = {"retry_after": 1} if code == "overloaded" else {}
    return ProtocolError(code, messages[code], **extra)
