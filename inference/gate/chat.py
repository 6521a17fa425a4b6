"""Protocol v2 on the node: ``GET /v2/keys`` and ``POST /v2/chat``.

The router forwards ``{"v", "ts", "model", "device_pk", "wrap", "ct"}``: one wrap of the
request's content key, addressed to this node, and the inner ciphertext. Before anything is
opened the gate answers in plain JSON, so the router can try another candidate or charge the
client's address:

1. body size, ``Content-Type``, shape (413, 415, 400 ``bad_request``);
2. no usable ``node.cert`` (503 ``v2_unavailable``), a wrap for another node (400
   ``key_unknown``), every stream slot taken or the engine's queue full (503 ``overloaded``);
3. ``ts`` outside 60 s of the node's clock, or from before the gate started (401 ``stale``: the
   replay cache below starts empty);
4. the wrap's key id is not one of ours in use (400 ``key_unknown``);
5. the wrap's ``enc`` was seen within the replay window (409 ``replay``);
6. the wrap does not open (400 ``decrypt_failed``; in auth mode this is where the device key is
   proven to the node).

From then on every outcome is sealed under the request's response secret: the answer streamed
exactly as v1.1's (``init``, ``chunk``..., ``final``; padding, cadence and keepalives as
configured), or a stream whose only event is a ``final`` error (``bad_payload``,
``decrypt_failed`` for an inner ciphertext that does not open, ``model_unknown`` for a model the
certificate does not list, ``unsupported_field``, ``upstream_refused``, ...).

The conversation itself goes through :mod:`llmrouter.terminate` (the sealed stream the router
uses for v1.1) to the node's model server (:mod:`inference.gate.engine`): our daemon's own
engine in process, or a fronted llama-server, vLLM, Ollama or OpenAI-style server over HTTP.
The per-device prompt-cache key is computed here, from the device key the wrap just proved,
under a random key of this process replaced every UTC midnight; only our own engine receives
it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from inference.gate.config import GateSettings
from inference.gate.engine import IModelServer
from inference.gate.keys import NodeKeys
from inference.gate.metrics import GateMetrics
from llmrouter.protocol import ProtocolError, SealedRefusal, check_timestamp
from llmrouter.replay import ReplayCache
from llmrouter.terminate.cachekey import CacheKeys
from llmrouter.terminate.chats import Chats
from llmrouter.terminate.stream import EncryptedStream
from llmrouter.v2.request import NodeRequest, open_node_request, parse_node_request
from llmrouter.v2.response import node_sealer, seal_node_refusal

__all__ = ["Gate"]

log = Logger()


class Gate:
    """The node's v2 endpoints (see the module docstring). ``busy`` says whether the engine
    behind would queue no more (our daemon: its slots and queue are full)."""

    def __init__(
        self,
        keys: NodeKeys,
        server: IModelServer,
        settings: GateSettings,
        clock: IReactorTime,
        metrics: GateMetrics,
        cache_keys: CacheKeys,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._keys = keys
        self._server = server
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._cache_keys = cache_keys
        self._busy = busy
        self._replay = ReplayCache(
            clock, settings.replay_window_seconds, settings.replay_max_entries
        )
        self.started = int(clock.seconds())
        self._chats = Chats(clock, settings, metrics, server.call)

    @property
    def streams(self) -> set[EncryptedStream]:
        """The open v2 streams."""
        return self._chats.streams

    def ready(self) -> bool:
        """v2 can be served: a usable certificate and a healthy model server."""
        self._keys.refresh()
        return self._keys.certificate is not None and self._server.ready()

    def stop(self) -> None:
        """End open streams with a sealed error (the node is stopping)."""
        self._chats.shutdown()

    # GET /v2/keys

    def render_keys(self, request: server.Request) -> bytes:
        self._keys.refresh()
        body = self._keys.entry()
        if body is None or not self._server.ready():
            error = ProtocolError("v2_unavailable", "protocol v2 is not available on this node")
            return self._plain(request, ProtocolError(error.code, error.message, 503))
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    # POST /v2/chat

    def render_chat(self, request: server.Request) -> bytes | int:
        started = self._clock.seconds()
        try:
            node_request = self._parse(request)
            chat, secret = self._open(node_request, started)
        except SealedRefusal as e:
            return self._sealed(request, e.secret, e)
        except ProtocolError as e:
            return self._plain(request, e)
        certificate = self._keys.certificate
        assert certificate is not None
        try:
            if node_request.model not in certificate.models:
                raise ProtocolError("model_unknown", "this node does not serve that model", 404)
            route = self._server.route(node_request.model, chat.features())
        except ProtocolError as e:
            return self._sealed(request, secret, e)
        self._chats.answer(
            request,
            node_sealer(secret, self._settings.pad_bytes),
            chat,
            started,
            route=route,
            headers=self._cache_keys.headers(node_request.device_pk),
        )
        return server.NOT_DONE_YET

    def _parse(self, request: server.Request) -> NodeRequest:
        """Steps 1 and 2 of the module docstring."""
        content_type = request.getHeader(b"content-type") or b""
        if content_type.split(b";")[0].strip().lower() != b"application/json":
            raise ProtocolError("unsupported_media_type", "Content-Type must be application/json")
        limit = self._settings.max_body_bytes
        body = request.content.read(limit + 1) if request.content is not None else b""
        node_request = parse_node_request(body, limit)
        self._keys.refresh()
        certificate = self._keys.certificate
        if certificate is None:
            raise ProtocolError("v2_unavailable", "protocol v2 is not available on this node", 503)
        if node_request.node != certificate.name:
            raise ProtocolError("key_unknown", "the wrap is for another node")
        if len(self.streams) >= self._settings.max_streams or self._busy():
            raise ProtocolError("overloaded", "the node is at capacity", 503, retry_after=1)
        return node_request

    def _open(self, node_request: NodeRequest, now: float) -> tuple[Any, bytes]:
        """Steps 3 to 6, then the inner layer (sealed refusals from here on)."""
        check_timestamp(node_request.ts, now, self._settings.skew_seconds)
        if node_request.ts < self.started:
            raise ProtocolError("stale", "the request predates the node's start: seal it again")
        secret_key = self._keys.private_key_for(node_request.kid)
        if secret_key is None:
            raise ProtocolError("key_unknown", "unknown key id")
        if self._replay.seen(node_request.enc):
            raise ProtocolError("replay", "this request was already received")
        try:
            chat, secret = open_node_request(node_request, secret_key)
        except SealedRefusal:
            self._replay.record(node_request.enc)  # the wrap opened: its enc is spent
            raise
        if not self._replay.record(node_request.enc):
            raise SealedRefusal(
                ProtocolError("overloaded", "the node is at capacity", 503, retry_after=1),
                secret,
                b"",
            )
        return chat, secret

    # Answers.

    def _plain(self, request: server.Request, error: ProtocolError) -> bytes:
        """A refusal before anything was opened (what the router acts on)."""
        self._metrics.refusals.labels(error.code).inc()
        self._metrics.http_responses.labels(str(error.status)).inc()
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        retry_after = error.extra.get("retry_after")
        if isinstance(retry_after, int):
            request.setHeader(b"Retry-After", str(retry_after).encode("ascii"))
        return error.to_json()

    def _sealed(self, request: server.Request, secret: bytes, error: ProtocolError) -> bytes:
        """A refusal after the wrap opened: a 200 stream whose only event is a sealed final."""
        self._metrics.refusals.labels(error.code).inc()
        self._metrics.http_responses.labels("200").inc()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        return seal_node_refusal(secret, error, pad=self._settings.pad_bytes)
