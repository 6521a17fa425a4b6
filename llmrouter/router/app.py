"""The public HTTP surface of the router (Klein), and the Site that serves it.

Routes: ``POST /api/chat``, ``GET /api/pubkey`` (protocol v1/v1.1), ``POST /api/v2/chat``,
``GET /api/v2/keys`` (protocol v2, :mod:`llmrouter.router.relay`), ``GET /api/models``,
``GET /.well-known/jwks.json``, ``GET /.well-known/ohttp-keys``, ``GET /health`` (readiness) and
``GET /health/live`` (liveness).
Every error, including 404, 405 and bugs, is ``{"error": {"code", "message"}}`` JSON; nothing a
client sent (path, headers, body) is logged or echoed, and Twisted's access log is off.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol, cast
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from llmrouter import pow
from llmrouter.bodies import InMemoryRequest
from llmrouter.protocol import ProtocolError, ResponseSealer, SealedRefusal
from llmrouter.router.addresses import LOCAL, TrustedProxies
from llmrouter.router.admission import Admission
from llmrouter.router.connections import ConnectionGuard
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.relay import Relay
from llmrouter.router.settings import Settings
from llmrouter.terminate.backends import BackendPool
from llmrouter.terminate.cachekey import CacheKeys
from llmrouter.terminate.chats import Chats, http_calls
from llmrouter.terminate.stream import EncryptedStream

__all__ = ["RouterApp", "RouterSite"]

log = Logger()

IDLE_SECONDS = 60  # a kept-alive connection with no request in flight


class PublishedKeys(Protocol):
    """The part of the key store the HTTP surface needs."""

    def key_document(self) -> bytes: ...

    def jwks(self) -> bytes: ...

    def ohttp_configs(self) -> bytes: ...


class RouterApp:
    """Routes of the public listener. Dependencies are passed in so tests can use a Clock."""

    app = Klein()

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        keys: PublishedKeys,
        keys_ready: Callable[[], bool],
        pool: BackendPool,
        admission: Admission,
        metrics: RouterMetrics,
        cache_keys: CacheKeys | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.settings = settings
        self.relay = relay
        self._cache_keys = cache_keys
        self._clock = clock
        self._keys = keys
        self._keys_ready = keys_ready
        self._pool = pool
        self.admission = admission
        self._metrics = metrics
        self._proxies = TrustedProxies.parse(settings.trusted_proxies)
        self._chats = Chats(clock, settings, metrics, http_calls(clock, pool, settings, metrics))

    @property
    def streams(self) -> set[EncryptedStream]:
        """The open protocol 1.1 streams."""
        return self._chats.streams

    def shutdown(self) -> None:
        """End every open protocol 1.1 stream with a sealed error (the router is stopping)."""
        self._chats.shutdown()

    def resource(self) -> IResource:
        inner: IResource = _Utf8Guard(self.app.resource(), self._reply)
        if self.settings.cors_origins:
            inner = _Cors(inner, frozenset(self.settings.cors_origins), self._reply)
        return inner

    # Helpers.

    def _reply(
        self, request: server.Request, status: int, content_type: bytes, body: bytes
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        self._metrics.http_responses.labels(str(status)).inc()
        return body

    def _error(self, request: server.Request, error: ProtocolError) -> bytes:
        retry_after = error.extra.get("retry_after")
        if isinstance(retry_after, int):
            request.setHeader(b"Retry-After", str(retry_after).encode("ascii"))
        return self._reply(request, error.status, b"application/json", error.to_json())

    def _sealed_error(self, request: server.Request, error: SealedRefusal) -> bytes:
        """A refusal of a decrypted request: a stream whose only chunk is the sealed error."""
        sealer = ResponseSealer(error.secret, error.enc, pad=self.settings.pad_bytes)
        body = sealer.init_event() + sealer.error(
            error.code, error.message, error.status, **error.extra
        )
        return self._reply(request, 200, b"text/event-stream", body)

    # Routes.

    @app.route("/api/chat", methods=["POST"])
    async def chat(self, request: server.Request) -> Any:
        started = self._clock.seconds()
        if self.settings.router_terminated == "off":
            error = ProtocolError(
                "v1_unavailable", "this router serves protocol v2 only: use /api/v2/chat", 404
            )
            return self._error(request, self.admission.reject(error))
        content_type = request.getHeader(b"content-type") or b""
        if content_type.split(b";")[0].strip().lower() != b"application/json":
            error = self.admission.reject(
                ProtocolError("unsupported_media_type", "Content-Type must be application/json")
            )
            return self._error(request, error)
        assert request.content is not None
        body = request.content.read()
        request.content = BytesIO()  # the ciphertext is not needed past admission
        gone = _departure(request)
        # Raw bytes: a str lookup decodes as UTF-8 and raised on anything else (issue 8).
        pow_header = request.requestHeaders.getRawHeaders(pow.HEADER.encode("ascii"), [None])[-1]
        try:
            admitted = await self.admission.admit(
                body, self._proxies.client_address(request), pow_header
            )
        except SealedRefusal as e:
            return self._sealed_error(request, e)
        except ProtocolError as e:
            return self._error(request, e)
        if gone():  # left while a shared table answered
            admitted.release()
            return b""
        sealer = ResponseSealer(admitted.secret, admitted.envelope.enc, pad=self.settings.pad_bytes)
        stream = self._chats.answer(
            request,
            sealer,
            admitted.request,
            started,
            route=admitted.route,
            # auth mode: our daemon may reuse this device's earlier conversation
            headers=(
                self._cache_keys.headers(admitted.envelope.device_pubkey)
                if self._cache_keys is not None
                else None
            ),
            release=admitted.release,
        )
        await stream.response.done  # cancelled by Klein when the client goes: the stream cleans up
        return None

    @app.route("/api/v2/chat", methods=["POST"])
    async def chat_v2(self, request: server.Request) -> Any:
        if self.relay is None or not self.relay.available():
            return self._error(request, _v2_unavailable())
        gone = _departure(request)
        client = self._proxies.client_address(request)
        error = await self.relay.chat(request, client, gone)
        if error is not None:
            return self._error(request, error)
        return None

    @app.route("/api/v2/keys", methods=["GET"])
    def keys_v2(self, request: server.Request) -> bytes:
        body = None
        if self.relay is not None and self._keys_ready():
            body = self.relay.key_document()
        if body is None:
            return self._error(request, _v2_unavailable())
        reply = self._reply(request, 200, b"application/json", body)
        request.setHeader(b"Cache-Control", b"public, max-age=60")
        return reply

    @app.route("/api/pubkey", methods=["GET"])
    def pubkey(self, request: server.Request) -> bytes:
        return self._keys_reply(request, b"application/json", self._keys.key_document)

    @app.route("/api/models", methods=["GET"])
    def models(self, request: server.Request) -> bytes:
        """The public model list: names only (what the backends serve, not where)."""
        data = [{"id": name, "object": "model"} for name in self._pool.models()]
        protocols = [] if self.settings.router_terminated == "off" else ["1", "1.1"]
        if self.relay is not None and self.relay.available():
            protocols.append("2")
        doc = {
            "object": "list",
            "protocol": "1.1",
            "protocols": protocols,
            "default": self._pool.default_model,
        }
        body = self._reply(
            request, 200, b"application/json", json.dumps({**doc, "data": data}).encode()
        )
        request.setHeader(b"Cache-Control", b"public, max-age=30")
        return body

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request: server.Request) -> bytes:
        return self._keys_reply(request, b"application/jwk-set+json", self._keys.jwks)

    @app.route("/.well-known/ohttp-keys", methods=["GET"])
    def ohttp_keys(self, request: server.Request) -> bytes:
        return self._keys_reply(request, b"application/ohttp-keys", self._keys.ohttp_configs)

    def _keys_reply(
        self, request: server.Request, content_type: bytes, build: Callable[[], bytes]
    ) -> bytes:
        if not self._keys_ready():
            return self._error(request, ProtocolError("unavailable", "not ready", 503))
        body = self._reply(request, 200, content_type, build())
        request.setHeader(b"Cache-Control", b"public, max-age=60")
        return body

    @app.route("/health", methods=["GET"])
    def health(self, request: server.Request) -> bytes:
        if not self.admission.store.available:  # admission fails closed until it reconnects
            body = b'{"status": "degraded", "reason": "state_unreachable"}'
            return self._reply(request, 503, b"application/json", body)
        if self._keys_ready() and self._pool.ready():
            return self._reply(request, 200, b"application/json", b'{"status": "ok"}')
        return self._reply(request, 503, b"application/json", b'{"status": "unavailable"}')

    @app.route("/health/live", methods=["GET"])
    def live(self, request: server.Request) -> bytes:
        return self._reply(request, 200, b"application/json", b'{"status": "ok"}')

    # Errors.

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        request = cast(server.Request, request)
        return self._error(request, ProtocolError("not_found", "no such resource"))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        request = cast(server.Request, request)
        error = failure.value
        allowed = getattr(error, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
        return self._error(request, ProtocolError("method_not_allowed", "method not allowed"))

    @app.handle_errors(Exception)
    def internal(self, request: IRequest, failure: Failure) -> bytes:
        request = cast(server.Request, request)
        # Frames only: an exception's message may quote request data.
        where = "; ".join(f"{f[1]}:{f[2]} in {f[0]}" for f in failure.frames[-8:])
        log.error(
            "unhandled {kind} at {where}", kind=getattr(failure.type, "__name__", "?"), where=where
        )
        return self._error(request, ProtocolError("internal", "internal error"))


def _v2_unavailable() -> ProtocolError:
    return ProtocolError("v2_unavailable", "protocol v2 is not configured on this router", 503)


def _departure(request: server.Request) -> Callable[[], bool]:
    """Whether the client has gone since now (a request learns it only through notifyFinish)."""
    left: list[Failure] = []
    request.notifyFinish().addErrback(left.append)
    return lambda: bool(left)


class _Utf8Guard(Resource):
    """Answers non-UTF-8 URLs with JSON itself: Klein would log a traceback and answer in text."""

    isLeaf = True

    def __init__(
        self, inner: IResource, reply: Callable[[server.Request, int, bytes, bytes], bytes]
    ) -> None:
        super().__init__()
        self._inner = inner
        self._reply = reply

    def render(self, request: server.Request) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            error = ProtocolError("bad_url", "the URL is not valid UTF-8")
            return self._reply(request, error.status, b"application/json", error.to_json())
        return self._inner.render(request)


class _Cors(Resource):
    """Lets browser pages from the listed origins (``CORS_ORIGINS``) call the API.

    A request from a listed origin gets ``Access-Control-Allow-Origin`` (and may read
    ``Retry-After``); its preflight ``OPTIONS`` is answered here. Every other request is served as
    without CORS: no CORS headers, and ``OPTIONS`` stays a 405. Nothing here is logged.
    """

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        origins: frozenset[str],
        reply: Callable[[server.Request, int, bytes, bytes], bytes],
    ) -> None:
        super().__init__()
        self._inner = inner
        self._origins = origins
        self._reply = reply

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"Vary", b"Origin")  # answers differ by origin: keep caches apart
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        if origin not in self._origins:
            return self._inner.render(request)
        request.setHeader(b"Access-Control-Allow-Origin", origin.encode("latin-1"))
        if request.method != b"OPTIONS":
            # Date: the SDK corrects a skewed clock from it after `stale` (pages cannot see it else)
            request.setHeader(b"Access-Control-Expose-Headers", b"Retry-After, Date")
            return self._inner.render(request)
        request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST")
        request.setHeader(b"Access-Control-Allow-Headers", b"Content-Type, " + pow.HEADER.encode())
        request.setHeader(b"Access-Control-Max-Age", b"600")
        return self._reply(request, 204, b"application/json", b"")


@implementer(ILogObserver)
class _Drop:
    def __call__(self, event: Any) -> None:
        pass


class _QuietChannel(http.HTTPChannel):
    """HTTPChannel whose own log lines (which name the peer address) are dropped, and which
    reports to its site's :class:`~llmrouter.router.connections.ConnectionGuard`, if any."""

    _log = Logger(observer=_Drop())

    def _guard(self) -> ConnectionGuard | None:
        return getattr(getattr(self, "site", None), "guard", None)

    def connectionMade(self) -> None:
        super().connectionMade()
        # Every sealed chunk is a small write that should leave now: without this, Nagle's
        # algorithm holds it until the previous one is acknowledged (up to a delayed-ACK timeout).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        guard = self._guard()
        if guard is not None and self.transport is not None:
            host = getattr(self.transport.getPeer(), "host", None)
            guard.opened(self.transport, host if isinstance(host, str) else LOCAL)

    def dataReceived(self, data: bytes) -> None:
        guard = self._guard()
        if guard is not None and not self._handlingRequest and self.transport is not None:
            guard.reading(self.transport)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        guard = self._guard()
        if guard is not None and self.transport is not None:
            guard.dispatched(self.transport)
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        guard = self._guard()
        if (
            guard is not None
            and self.transport is not None
            and self.persistent
            and len(self.requests) == 1  # no pipelined request behind this one
        ):
            guard.idle(self.transport)  # buffered bytes of a next request call reading()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        guard = self._guard()
        if guard is not None and self.transport is not None:
            guard.closed(self.transport)
        super().connectionLost(reason)


class RouterSite(server.Site):
    """A Site without an access log (it would record paths, user agents, addresses).

    ``guard`` (set by the router for its public listeners) bounds connections; connections idle
    between requests are closed after a minute (Twisted's default is twelve hours).
    """

    requestFactory = InMemoryRequest
    protocol = _QuietChannel  # type: ignore[assignment]  # HTTP/1.1 only: no h2 via ALPN

    def __init__(
        self,
        resource: IResource,
        max_body: int,
        on_too_large: Callable[[ProtocolError], object] = lambda error: None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", IDLE_SECONDS)
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.on_too_large = on_too_large
        self.displayTracebacks = False
        self.guard: ConnectionGuard | None = None

    def too_large_body(self) -> bytes:
        error = ProtocolError("body_too_large", "request body exceeds the size limit")
        self.on_too_large(error)
        return error.to_json()

    def log(self, request: Any) -> None:
        pass

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: HTTP/1.1 only, even with ``h2`` installed (see :mod:`llmrouter.listen`)."""
        return [b"http/1.1"]
