"""Answering opened chat requests: each one a sealed stream fed by an upstream call.

The router (protocol 1.1, :mod:`llmrouter.router.app`) and a node's gate (protocol v2,
:mod:`inference.gate.chat`) differ in how a request is admitted and opened; once they hold its
chat request, sealer and route, the answer is the same, so it starts here. :class:`Chats` also
keeps the streams that are open, for shutdown (and the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from llmrouter.chat import ChatRequest
from llmrouter.protocol import ResponseSealer
from llmrouter.terminate.backends import BackendPool, Route
from llmrouter.terminate.config import CallSettings, TerminateMetrics
from llmrouter.terminate.stream import EncryptedStream
from llmrouter.terminate.upstream import ChatCall

__all__ = ["ChatSettings", "Chats"]


class ChatSettings(CallSettings, Protocol):
    """The upstream call's settings and the sealed stream's."""

    @property
    def keepalive_seconds(self) -> float: ...

    @property
    def stream_cadence_ms(self) -> int: ...

    @property
    def request_ttl_seconds(self) -> float: ...

    @property
    def write_stall_seconds(self) -> float: ...


class Chats:
    """Starts the answer of each opened request; ``streams`` are those still open."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: BackendPool,
        settings: ChatSettings,
        metrics: TerminateMetrics,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self.streams: set[EncryptedStream] = set()

    def answer(
        self,
        request: Request,
        sealer: ResponseSealer,
        chat: ChatRequest,
        started: float,
        *,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
        release: Callable[[], None] = lambda: None,
    ) -> EncryptedStream:
        """Stream the answer to ``chat``, which arrived at ``started``; ``release`` runs once
        when the stream ends (the request's slots)."""
        settings = self._settings

        def closed() -> None:
            release()
            self.streams.discard(stream)

        stream = EncryptedStream(
            request,
            sealer,
            self._clock,
            self._metrics,
            started,
            settings.keepalive_seconds,
            settings.stream_cadence_ms / 1000.0,
            closed,
            deadline=started + settings.request_ttl_seconds,
            write_stall=settings.write_stall_seconds,
        )
        self.streams.add(stream)  # before the call starts: it may end the stream at once
        call = ChatCall(
            self._clock,
            self._pool,
            settings,
            self._metrics,
            chat,
            stream,
            deadline=started + settings.request_ttl_seconds,
            route=route,
            headers=headers,
        )
        stream.response.attach(call)
        call.start()
        return stream

    def shutdown(self) -> None:
        """End every open stream with a sealed error (the server is stopping)."""
        for stream in list(self.streams):
            stream.shutdown()
