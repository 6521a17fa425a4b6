"""The client-facing response: sealed SSE chunks, flow-controlled end to end.

:class:`EncryptedStream` is the :class:`~llmrouter.terminate.upstream.TokenSink` of a
:class:`~llmrouter.terminate.upstream.ChatCall` and the push producer registered on the client's
HTTP request. When the client reads slowly Twisted pauses us and we pause the upstream transport, so
tokens wait in the backend's socket rather than in our memory; when the client leaves we cancel the
call, which closes the upstream connection so the backend stops generating.

Nothing is sent to the client before the first output (or an early end): until then upstream
failures can still be retried. A failure is always a sealed final error chunk, even before any
output (the request was decrypted: a plain error would tell every hop on the way what the backend
made of it); it carries the HTTP status a plain refusal would have had.

With a cadence, output waits in runs (consecutive output of one kind, merged) and each slot sends
exactly one chunk: the oldest run, else the final chunk, else an empty delta.

A client that stops reading must not hold its stream slot (and the router's memory) for ever, so
two limits hold in both modes: a client whose connection stays paused (its buffers full, taking
nothing) for ``write_stall`` seconds is dropped, and every stream ends at its ``deadline``
(admission + ``REQUEST_TTL_SECONDS``): with a sealed ``timeout`` error if the client still reads,
by closing the connection if it does not. Either frees the slot at once. The response's headers,
flow control and these limits are :class:`~llmrouter.streaming.StreamingResponse`'s, as for the
v2 relay's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.server import Request

from llmrouter.protocol import KEEPALIVE, MAX_LOGPROB_ENTRIES, ResponseSealer
from llmrouter.streaming import StreamingResponse, UpstreamControl
from llmrouter.terminate.config import TerminateMetrics

__all__ = ["EncryptedStream", "UpstreamControl"]

Logprobs = list[dict[str, Any]] | None


@dataclass
class _Run:
    """Output of one kind waiting for a cadence slot; a tool call's run is one call's fragments."""

    kind: str  # delta, reasoning, tool_call
    parts: list[str]
    logprobs: Logprobs = None
    index: int = 0
    id: str | None = None
    name: str | None = None

    def takes(self, kind: str, index: int, first: bool, logprobs: Logprobs) -> bool:
        if self.kind != kind or (kind == "tool_call" and (self.index != index or first)):
            return False
        # a chunk carries at most MAX_LOGPROB_ENTRIES (a client refuses more)
        return len(self.logprobs or ()) + len(logprobs or ()) <= MAX_LOGPROB_ENTRIES

    def add(self, text: str, logprobs: Logprobs) -> None:
        self.parts.append(text)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(logprobs)


class EncryptedStream:
    """One response stream (see the module docstring); its ``response`` is the push producer on
    the client's connection, and the upstream call is attached to it."""

    def __init__(
        self,
        request: Request,
        sealer: ResponseSealer,
        clock: IReactorTime,
        metrics: TerminateMetrics,
        started: float,
        keepalive_seconds: float,
        cadence_seconds: float = 0.0,
        on_close: Callable[[], None] = lambda: None,
        *,
        deadline: float,
        write_stall: float,
    ) -> None:
        self._sealer = sealer
        self._clock = clock
        self._metrics = metrics
        self._keepalive = keepalive_seconds
        self._cadence = cadence_seconds
        self._on_close = on_close
        self._last_write = 0.0
        self._timer: IDelayedCall | None = None
        self._pending: list[_Run] = []
        self._final: tuple[str, tuple[object, ...]] | None = None
        self.response = StreamingResponse(
            request,
            clock,
            metrics,
            started,
            deadline=deadline,
            write_stall=write_stall,
            on_timeout=lambda: self._end_now("timeout", "the request took too long", 504),
            on_close=self._ended,
        )

    # TokenSink

    def token(self, text: str, logprobs: Logprobs = None) -> None:
        self._text("delta", self._sealer.delta, text, logprobs)

    def reasoning(self, text: str, logprobs: Logprobs = None) -> None:
        self._text("reasoning", self._sealer.reasoning, text, logprobs)

    def tool_call(self, index: int, id: str | None, name: str | None, arguments: str) -> None:
        if self.response.closed:
            return
        if not self.response.opened:
            self._first_output()
        if self._cadence:
            self._queue("tool_call", arguments, None, index, id, name)
        else:
            self._write(self._sealer.tool_call(index, id, name, arguments))

    def progress(self) -> None:
        """Output the client did not ask to see: open the stream (keepalives, cadence slots)."""
        if not self.response.closed and not self.response.opened:
            self._first_output()

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.response.closed:
            return
        if not self.response.opened:
            self._open()
        self._end_with("done", (finish_reason, prompt_tokens, completion_tokens))

    def failed(
        self, code: str, message: str, status: int, detail: Mapping[str, Any] | None = None
    ) -> None:
        if self.response.closed:
            return
        if not self.response.opened:
            self._open()
        self._end_with("error", (code, message, status, dict(detail or {})))

    def shutdown(self) -> None:
        """The router is stopping: cancel upstream, tell the client (sealed if streaming)."""
        self._end_now("overloaded", "the router is shutting down, retry", 503)

    def _end_now(self, code: str, message: str, status: int) -> None:
        """Cancel upstream and end the response at once with an error (sealed if streaming)."""
        if self.response.closed:
            return
        self.response.cancel_upstream()
        self._pending = []
        self.failed(code, message, status)
        if self._final is not None and not self.response.closed:
            self._emit_final()

    # Internals

    def _text(
        self, kind: str, seal: Callable[[str, Logprobs], bytes], text: str, logprobs: Logprobs
    ) -> None:
        if self.response.closed:
            return
        self._metrics.tokens_streamed.inc()
        if not self.response.opened:
            self._first_output()
        if self._cadence:
            self._queue(kind, text, logprobs)
        else:
            self._write(seal(text, logprobs))

    def _first_output(self) -> None:
        self._open(first_output=True)

    def _queue(
        self,
        kind: str,
        text: str,
        logprobs: Logprobs,
        index: int = 0,
        id: str | None = None,
        name: str | None = None,
    ) -> None:
        first = id is not None or name is not None
        if self._pending and self._pending[-1].takes(kind, index, first, logprobs):
            self._pending[-1].add(text, logprobs)
        else:
            own = None if logprobs is None else list(logprobs)
            self._pending.append(_Run(kind, [text], own, index, id, name))

    def _open(self, first_output: bool = False) -> None:
        self.response.open(first_output)
        self._write(self._sealer.init_event())
        self._schedule()

    def _write(self, data: bytes) -> None:
        self._last_write = self._clock.seconds()
        self.response.write(data)

    def _schedule(self) -> None:
        delay = self._cadence or self._keepalive
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.response.closed:
            return
        if self._cadence:
            self._slot()
        elif not self.response.paused and (
            self._clock.seconds() - self._last_write >= self._keepalive
        ):
            self._write(KEEPALIVE)
        if not self.response.closed:
            self._schedule()

    def _slot(self) -> None:
        """Exactly one padded chunk per slot: pending text, else the final, else an empty delta."""
        if self.response.paused:
            return
        if self._pending:
            run = self._pending.pop(0)
            text = "".join(run.parts)
            if run.kind == "delta":
                self._write(self._sealer.delta(text, run.logprobs))
            elif run.kind == "reasoning":
                self._write(self._sealer.reasoning(text, run.logprobs))
            else:
                self._write(self._sealer.tool_call(run.index, run.id, run.name, text))
        elif self._final is not None:
            self._emit_final()
        else:
            self._write(self._sealer.delta(""))

    def _end_with(self, kind: str, args: tuple[object, ...]) -> None:
        self._final = (kind, args)
        if not self._cadence:
            self._emit_final()

    def _emit_final(self) -> None:
        assert self._final is not None
        kind, args = self._final
        if kind == "done":
            reason, prompt, completion = args
            assert isinstance(reason, str) and isinstance(prompt, int)
            assert isinstance(completion, int)
            self._write(self._sealer.done(reason, prompt, completion))
        else:
            code, message, status, detail = args
            assert isinstance(code, str) and isinstance(message, str)
            assert isinstance(status, int) and isinstance(detail, dict)
            self._write(self._sealer.error(code, message, status, **detail))
        self.response.close()

    def _ended(self) -> None:
        """The response ended (its own way, or the client's): no more slots or keepalives."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pending = []
        self._on_close()
