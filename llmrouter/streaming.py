"""The HTTP side of one streaming response: its headers, its flow control and its two limits.

What is written differs by side of the wire (the router's v1.1 stream and the node's v2 stream
seal chunks, :class:`llmrouter.terminate.stream.EncryptedStream`; the router's v2 relay passes
on a node's sealed bytes, :class:`llmrouter.router.relay.RelayStream`), but how the response
lives is the same, so it is written once here and each of them owns one.

:class:`StreamingResponse` is the push producer registered on the request: when the reader
(the client, or the router in front of a node) stops taking bytes Twisted pauses it and it pauses
the upstream, so bytes wait in the upstream's socket rather than in our memory. A reader that
stays paused for ``write_stall`` seconds is dropped, and every response ends at its
``deadline``: through the owner's ``on_timeout`` (a sealed ``timeout`` error) while the reader
still reads, by closing the connection under it when it does not. Either frees the request's
slot at once. When the reader leaves the upstream is cancelled, so nothing goes on generating.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

__all__ = ["StreamMetrics", "StreamingResponse", "UpstreamControl"]


class UpstreamControl(Protocol):
    """What a response needs from the call that feeds it."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def cancel(self) -> None: ...


class StreamMetrics(Protocol):
    """The Prometheus metrics a streaming response updates (labels: a status code or a drop
    reason, never request data)."""

    request_duration: Any
    ttft: Any
    active_streams: Any
    http_responses: Any
    streams_dropped: Any


@implementer(IPushProducer)
class StreamingResponse:
    """One streaming response's lifetime (see the module docstring).

    ``on_timeout`` runs when the deadline passes while the reader still reads: the owner ends
    the response with its own last word (and :meth:`close`). ``on_close`` runs once, whichever
    way the response ends; ``done`` fires after it, and cancelling ``done`` is the reader
    leaving."""

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        metrics: StreamMetrics,
        started: float,
        *,
        deadline: float,
        write_stall: float,
        on_timeout: Callable[[], None],
        on_close: Callable[[], None],
    ) -> None:
        self._request = request
        self._clock = clock
        self._metrics = metrics
        self._started = started
        self._write_stall = write_stall
        self._on_timeout = on_timeout
        self._on_close = on_close
        self._upstream: UpstreamControl | None = None
        self._opened = False
        self._closed = False
        self._paused = False
        self._left = False
        self._stall: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = clock.callLater(
            max(0.0, deadline - clock.seconds()), self._out_of_time
        )
        self.done: Deferred[None] = Deferred(lambda d: self._reader_left())
        metrics.active_streams.inc()
        request.notifyFinish().addErrback(lambda failure: self._reader_left())

    def attach(self, upstream: UpstreamControl) -> None:
        self._upstream = upstream

    @property
    def upstream(self) -> UpstreamControl | None:
        """The call attached to feed the response."""
        return self._upstream

    @property
    def opened(self) -> bool:
        """The ``200`` and its headers went out."""
        return self._opened

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> bool:
        """The reader takes nothing now."""
        return self._paused

    @property
    def left(self) -> bool:
        """The reader left, or was dropped, before the response ended."""
        return self._left

    def open(self, first_output: bool = False) -> None:
        """Send the ``200`` and the event-stream headers (once; never after the end).
        ``first_output``: this is the first token, for the time-to-first-token metric."""
        if self._opened or self._closed:
            return
        self._opened = True
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(self, True)
        self._metrics.http_responses.labels("200").inc()
        if first_output:
            self._metrics.ttft.observe(self._clock.seconds() - self._started)

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._request.write(data)

    def cancel_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.cancel()

    def close(self) -> None:
        """The response is complete: finish it."""
        self._close(finish=True)

    # Limits.

    def _out_of_time(self) -> None:
        self._deadline = None
        if self._paused:
            self._drop("deadline")
        else:
            self._on_timeout()

    def _stalled(self) -> None:
        self._stall = None
        self._drop("write_stall")

    def _drop(self, reason: str) -> None:
        """Close the connection under a reader that does not read; frees its slot now."""
        if self._closed:
            return
        self._metrics.streams_dropped.labels(reason).inc()
        channel = self._request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # type: ignore[attr-defined]
        self._reader_left()

    # IPushProducer (driven by the reader's connection)

    def pauseProducing(self) -> None:
        self._paused = True
        if self._stall is None and not self._closed:
            self._stall = self._clock.callLater(self._write_stall, self._stalled)
        if self._upstream is not None:
            self._upstream.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_stall()
        if self._upstream is not None:
            self._upstream.resume()

    def stopProducing(self) -> None:
        self._reader_left()

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    # Endings.

    def _reader_left(self) -> None:
        if self._closed:
            return
        self._left = True
        self.cancel_upstream()
        self._close(finish=False)

    def _close(self, finish: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._cancel_stall()
        self._metrics.active_streams.dec()
        self._metrics.request_duration.observe(self._clock.seconds() - self._started)
        if self._opened:
            self._request.unregisterProducer()
        if finish and not self._request.finished:
            self._request.finish()
        self._on_close()
        if not self.done.called:
            self.done.callback(None)
