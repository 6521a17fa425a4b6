"""One chat call upstream: a backend of its route, retries before the first output, timeouts.

A :class:`ChatCall` owns the upstream side of one client request: it picks a backend of its route
(:mod:`llmrouter.terminate.backends`), retries elsewhere with capped exponential backoff and
jitter while nothing has reached the client yet, enforces the connect, first-token, idle and total
timeouts, and relays content, reasoning, tool-call fragments and logprobs
(:mod:`llmrouter.terminate.completions`) to a :class:`TokenSink` (the client-facing stream). After
the first output it never retries: a failure becomes an error for the sink to seal.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections.abc import Mapping
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmrouter.chat import ChatRequest
from llmrouter.terminate.backends import Backend, BackendPool, Route
from llmrouter.terminate.bodies import BodyReader, BytesProducer
from llmrouter.terminate.cachekey import HEADER as CACHE_HEADER
from llmrouter.terminate.completions import CompletionStream, finish_reason
from llmrouter.terminate.config import CallSettings, TerminateMetrics
from llmrouter.terminate.errors import UpstreamError

__all__ = ["ChatCall", "TokenSink", "failed_status", "refused"]

log = Logger()

_MAX_ERROR_BODY = 1 << 12
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # an enum, never a sentence or a value

_JSON_HEADERS = {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}


class TokenSink(TypingProtocol):
    """What a ChatCall feeds: the client-facing stream.

    ``reasoning``, ``tool_call`` and ``logprobs`` only come for a request that asked for them;
    ``progress`` says the backend produced output the request did not ask to see (reasoning of a
    request without ``include_reasoning``), so the stream may open and keep the client waiting.
    """

    def token(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None: ...

    def reasoning(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None: ...

    def tool_call(self, index: int, id: str | None, name: str | None, arguments: str) -> None: ...

    def progress(self) -> None: ...

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...

    def failed(
        self, code: str, message: str, status: int, detail: Mapping[str, Any] | None = None
    ) -> None: ...


class ChatCall:
    """The upstream side of one client request (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: BackendPool,
        settings: CallSettings,
        metrics: TerminateMetrics,
        request: ChatRequest,
        sink: TokenSink,
        deadline: float,
        rng: random.Random | None = None,
        route: Route | None = None,
        headers: Mapping[bytes, list[bytes]] | None = None,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._extra_headers = dict(headers or {})
        self._settings = settings
        self._metrics = metrics
        self._chat = request
        self._route = route  # None: any backend, as in protocol v1
        self._bodies: dict[tuple[str, str | None], bytes] = {}
        # vLLM's cache_salt: the device's keyed cache key, as our daemon gets it; a request
        # without a device gets a salt of its own, so it shares no cache with anyone.
        key = self._extra_headers.get(CACHE_HEADER)
        self._salt = key[0].decode("ascii") if key else secrets.token_urlsafe(32)
        self.relay_reasoning = request.wants_reasoning
        self.relay_tool_calls = request.wants_tool_calls
        self.relay_logprobs = request.wants_logprobs
        self._sink = sink
        self._deadline = deadline
        self._rng = rng or random.SystemRandom()
        self._attempt = 0
        self._current = 0  # id of the live attempt; callbacks of older ones are ignored
        self._tried: list[Backend] = []
        self._backend: Backend | None = None
        self._request: Deferred[IResponse] | None = None
        self._stream: CompletionStream | None = None
        self._timer: IDelayedCall | None = None
        self._ttl: IDelayedCall | None = None
        self._backoff: IDelayedCall | None = None
        self._attempt_started = 0.0
        self._paused = False
        self.tokens = 0
        self.over = False

    # Control from the client side.

    def start(self) -> None:
        remaining = self._deadline - self._clock.seconds()
        self._ttl = self._clock.callLater(max(remaining, 0), self._expired)
        self._try()

    def cancel(self) -> None:
        """The client went away: drop the upstream connection so the backend stops generating."""
        if self.over:
            return
        self._end()
        if self._backend is not None:
            self._backend.breaker.release()
        self._abort_attempt()

    def pause(self) -> None:
        self._paused = True
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        self._paused = False
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.resumeProducing()  # type: ignore[attr-defined]

    # Attempts.

    def _body(self, backend: Backend) -> bytes:
        """The request in the backend's dialect (built once per dialect and model name)."""
        model = backend.upstream_model(None if self._route is None else self._route.model)
        key = (backend.dialect.kind, model)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = backend.dialect.body(
                self._chat, model, self._salt, self._settings.llama_server_cache_prompt
            )
        return body

    def _headers(self, backend: Backend) -> dict[bytes, list[bytes]]:
        """The extra headers (the prompt-cache key) go only to a backend configured as ours
        (``kind=llmrouter``): to any other they would be a stable per-device tag it could link
        requests by, and a backend that only claims to be ours (``owned_by`` in its model list,
        ``kind=auto``) is not trusted with it."""
        if backend.dialect.cache_key and backend.endpoint.kind == "llmrouter":
            return {**_JSON_HEADERS, **self._extra_headers}
        return _JSON_HEADERS

    def _try(self) -> None:
        backend = self._pool.choose(self._tried, self._route)
        if backend is None:
            self._fail(UpstreamError("no_backend", "no inference backend is available"))
            return
        self._backend = backend
        self._tried.append(backend)
        self._attempt_started = self._clock.seconds()
        self._current += 1
        attempt = self._current
        self._arm(self._settings.first_token_timeout_seconds, "first_token")
        request = backend.agent.request(
            b"POST",
            backend.uri("/v1/chat/completions"),
            Headers(self._headers(backend)),
            BytesProducer(self._body(backend)),
        )
        self._request = request
        request.addCallbacks(
            self._response,
            self._request_failed,
            callbackArgs=(attempt,),
            errbackArgs=(attempt,),
        )

    def _response(self, response: IResponse, attempt: int) -> None:
        if attempt != self._current or self.over:
            response.deliverBody(BodyReader(limit=0))
            return
        self._request = None
        code = int(response.code)
        if code != 200:
            if is_refusal(code):  # wrong for any backend: read why
                reader = BodyReader(_MAX_ERROR_BODY)
                response.deliverBody(reader)
                reader.done.addCallback(self._refused, code, attempt)
                return
            response.deliverBody(BodyReader(limit=0))  # drop the connection, not worth reusing
            message = "the inference backend refused the request"
            overloaded = code in (429, 503)
            self._attempt_failed(UpstreamError("upstream_failed", message, breaker=not overloaded))
            return
        stream = CompletionStream(self)
        self._stream = stream
        response.deliverBody(stream)

    def _refused(self, body: bytes, status: int, attempt: int) -> None:
        """The backend refused the request itself: answer with its error code, not its message
        (a message may quote the request)."""
        if attempt != self._current or self.over:
            return
        self._attempt_failed(refused(status, *_error_code(body)))

    def stream_attached(self, stream: CompletionStream) -> None:
        if self._paused and stream.transport is not None:
            stream.transport.pauseProducing()  # type: ignore[attr-defined]

    def _request_failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._current or self.over:
            return  # cancelled by us: a timeout or the client leaving already handled it
        self._request = None
        self._attempt_failed(UpstreamError("upstream_failed", "the inference backend failed"))

    def _progress(self) -> bool:
        """Output arrived: from now on no retry, and the idle timer restarts."""
        if self.over:
            return False
        self.tokens += 1
        self._arm(self._settings.idle_timeout_seconds, "idle")
        return True

    def content(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        if self.over:
            return
        self.tokens += 1  # _progress(), inline on the path of every token
        self._arm(self._settings.idle_timeout_seconds, "idle")
        self._sink.token(text, logprobs)

    def reasoning_content(self, text: str, logprobs: list[dict[str, Any]] | None) -> None:
        if self._progress():
            if self.relay_reasoning:
                self._sink.reasoning(text, logprobs)
            else:
                self._sink.progress()

    def tool_call_fragment(
        self, index: int, call_id: str | None, name: str | None, arguments: str
    ) -> None:
        if self._progress():
            if self.relay_tool_calls:
                self._sink.tool_call(index, call_id, name, arguments)
            else:
                self._sink.progress()

    def stream_ended(self, stream: CompletionStream, reason: Failure) -> None:
        if stream is not self._stream:
            return
        self._stream = None
        if self.over:
            return
        usage = stream.usage
        complete = stream.saw_done or (
            usage.finish_reason is not None and reason.check(ResponseDone) is not None
        )
        if stream.broken is None and complete:
            backend = self._backend
            assert backend is not None
            backend.breaker.success()
            self._observe_upstream(backend)
            self._end()
            self._sink.finished(
                finish_reason(usage.finish_reason, self.relay_tool_calls),
                usage.prompt_tokens,
                usage.completion_tokens or usage.deltas,
            )
            return
        error = stream.broken or UpstreamError(
            "upstream_failed", "the inference backend stream ended early"
        )
        self._attempt_failed(error)

    def _attempt_failed(self, error: UpstreamError) -> None:
        backend = self._backend
        self._disarm()
        if backend is not None:
            if error.breaker:
                backend.breaker.failure()
            else:
                backend.breaker.release()
            self._observe_upstream(backend)
        self._abort_attempt()
        if self.tokens or not error.retryable or self._attempt >= self._settings.retry_max:
            self._fail(error)
            return
        self._attempt += 1
        if backend is not None:
            self._metrics.upstream_retries.labels(backend.name).inc()
        cap = min(
            self._settings.retry_backoff_max_seconds,
            self._settings.retry_backoff_seconds * 2 ** (self._attempt - 1),
        )
        delay = self._rng.uniform(cap / 2, cap)
        if self._clock.seconds() + delay >= self._deadline:
            self._fail(UpstreamError("timeout", "the request took too long"))
            return
        self._backoff = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._backoff = None
        if not self.over:
            self._try()

    def _abort_attempt(self) -> None:
        self._current += 1
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            if stream.transport is not None:
                stream.transport.stopProducing()  # type: ignore[attr-defined]
        if self._backoff is not None and self._backoff.active():
            self._backoff.cancel()
        self._backoff = None

    # Timers.

    def _arm(self, seconds: float, kind: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
            return
        self._timer = self._clock.callLater(seconds, self._timed_out, kind)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, kind: str) -> None:
        self._timer = None
        if self.over:
            return
        log.info("upstream {kind} timeout on {name}", kind=kind, name=self._backend_name())
        self._attempt_failed(UpstreamError("timeout", "the inference backend timed out"))

    def _expired(self) -> None:
        self._ttl = None
        if self.over:
            return
        if self._backend is not None:
            self._backend.breaker.release()
            self._observe_upstream(self._backend)
        self._abort_attempt()
        self._fail(UpstreamError("timeout", "the request took too long"))

    # Endings.

    def _backend_name(self) -> str:
        return self._backend.name if self._backend is not None else "-"

    def _observe_upstream(self, backend: Backend) -> None:
        elapsed = self._clock.seconds() - self._attempt_started
        self._metrics.upstream_duration.labels(backend.name).observe(elapsed)

    def _end(self) -> None:
        self.over = True
        self._disarm()
        if self._ttl is not None and self._ttl.active():
            self._ttl.cancel()
        self._ttl = None
        if self._backoff is not None and self._backoff.active():
            self._backoff.cancel()
        self._backoff = None

    def _fail(self, error: UpstreamError) -> None:
        self._end()
        self._sink.failed(error.code, error.message, failed_status(error.code), error.detail)


def is_refusal(status: int) -> bool:
    """Whether a model server's error status refuses the request itself, so that no other
    backend (and no retry) would answer it: a 4xx other than 408 and 429, which are about load."""
    return 400 <= status < 500 and status not in (408, 429)


def refused(status: int, code: str | None, param: str | None) -> UpstreamError:
    """The model server refused the request itself (:func:`is_refusal`): its status,
    and its error's code and param when they are identifiers (never its message, which may
    quote the request)."""
    detail: dict[str, Any] = {"upstream_status": status}
    if code is not None and _ERROR_CODE.fullmatch(code):
        detail["upstream_code"] = code
    if param is not None and _ERROR_CODE.fullmatch(param):
        detail["upstream_param"] = param
    return UpstreamError(
        "upstream_refused",
        "the inference backend refused the request",
        retryable=False,
        breaker=False,
        detail=detail,
    )


def failed_status(code: str) -> int:
    """The HTTP status a sealed error of an upstream call carries."""
    return {"no_backend": 503, "timeout": 504, "upstream_refused": 400}.get(code, 502)


def _error_code(body: bytes) -> tuple[str | None, str | None]:
    """An OpenAI-style error's ``code`` (or ``type``) and ``param``, each only when it is an
    identifier (never a sentence or a value, which could quote the request)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, None
    error = doc.get("error", doc) if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None, None
    code = next(
        (
            value
            for value in (error.get("code"), error.get("type"))
            if isinstance(value, str) and _ERROR_CODE.fullmatch(value)
        ),
        None,
    )
    param = error.get("param")
    return code, param if isinstance(param, str) and _ERROR_CODE.fullmatch(param) else None
