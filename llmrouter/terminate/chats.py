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
from llmrouter.streaming import UpstreamControl
from llmrouter.terminate.backends import BackendPool, Route
from llmrouter.terminate.config import CallSettings, TerminateMetrics
from llmrouter.terminate.stream import EncryptedStream
from llmrouter.terminate.upstream import ChatCall, TokenSink

__all__ = ["Call", "CallFactory", "ChatSettings", "Chats", "http_calls"]


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


class Call(UpstreamControl, Protocol):
    """What feeds one stream: a :class:`ChatCall` to a model server over HTTP, or the v2
    gate's call into our own engine in process (:mod:`inference.gate.engine`)."""

    def start(self) -> None: ...


class CallFactory(Protocol):
    """Makes the call that answers ``chat`` into ``sink`` by ``deadline``."""

    def __call__(
        self,
        chat: ChatRequest,
        sink: TokenSink,
        deadline: float,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
    ) -> Call: ...


def http_calls(
    clock: IReactorTime, pool: BackendPool, settings: CallSettings, metrics: TerminateMetrics
) -> CallFactory:
    """Calls to ``pool``'s backends over HTTP (the router's, and a ``--front`` node's)."""

    def call(
        chat: ChatRequest,
        sink: TokenSink,
        deadline: float,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
    ) -> Call:
        return ChatCall(
            clock, pool, settings, metrics, chat, sink, deadline=deadline, route=route,
            headers=headers,
        )  # fmt: skip

    return call


class Chats:
    """Starts the answer of each opened request, fed by a call from ``calls``; ``streams`` are
    those still open."""

    def __init__(
        self,
        clock: IReactorTime,
        settings: ChatSettings,
        metrics: TerminateMetrics,
        calls: CallFactory,
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._calls = calls
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
        call = self._calls(chat, stream, started + settings.request_ttl_seconds, route, headers)
        stream.response.attach(call)
        call.start()
        return stream

    def shutdown(self) -> None:
        """End every open stream with a sealed error (the server is stopping)."""
        for stream in list(self.streams):
            stream.shutdown()
