"""Inference backends: health, circuit breakers, round-robin, and one chat call with retries.

Backends speak the OpenAI streaming chat API (``POST /v1/chat/completions`` with ``stream: true``),
so our inference daemon, ``llama-server``, vLLM and Ollama are interchangeable. A :class:`ChatCall`
owns the upstream side of one client request: it picks a backend, retries elsewhere with capped
exponential backoff and jitter while nothing has reached the client yet, enforces the connect,
first-token, idle and total timeouts, and relays tokens to a :class:`TokenSink` (the client-facing
stream). After the first token it never retries: a failure becomes an error for the sink to seal.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Settings
from llmrouter.sse import SSEError, SSEParser

__all__ = [
    "Backend",
    "BackendPool",
    "ChatCall",
    "CircuitBreaker",
    "TokenSink",
    "UpstreamError",
]

log = Logger()

_MAX_SSE_LINE = 1 << 20
_MAX_PROBE_BODY = 1 << 16


class UpstreamError(Exception):
    """Why an upstream attempt failed; ``retryable`` is false when another backend won't help."""

    def __init__(self, code: str, message: str, retryable: bool = True, breaker: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.breaker = breaker  # count against the backend's circuit breaker


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures; after ``reset_seconds`` one trial
    request goes through (half-open): success closes the circuit, failure opens it again."""

    CLOSED, HALF_OPEN, OPEN = 0, 1, 2

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int,
        reset_seconds: float,
        on_change: Callable[[int], None] = lambda state: None,
    ) -> None:
        self._clock = clock
        self._threshold = threshold
        self._reset = reset_seconds
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False
        self.state = self.CLOSED

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def _refresh(self) -> None:
        if self.state == self.OPEN and self._clock.seconds() - self._opened_at >= self._reset:
            self._set(self.HALF_OPEN)
            self._trial = False

    def available(self) -> bool:
        """Could a request go through now? (Does not claim the half-open trial.)"""
        self._refresh()
        return self.state == self.CLOSED or (self.state == self.HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """Claim permission for one request (the single trial when half-open)."""
        if not self.available():
            return False
        if self.state == self.HALF_OPEN:
            self._trial = True
        return True

    def release(self) -> None:
        """The request ended without a verdict (e.g. the client left): free the trial slot."""
        self._trial = False

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        self._set(self.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        self._trial = False
        if self.state == self.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = self._clock.seconds()
            self._set(self.OPEN)


class Backend:
    """One configured inference endpoint, named by its index (``backend-0``) in metrics/logs."""

    def __init__(
        self,
        name: str,
        url: str,
        agent: IAgent,
        base_url: str,
        breaker: CircuitBreaker,
    ) -> None:
        self.name = name
        self.url = url
        self.agent = agent
        self.base_url = base_url
        self.breaker = breaker
        self.healthy = False
        self.probed = False

    def __repr__(self) -> str:
        return f"Backend({self.name})"

    def uri(self, path: str) -> bytes:
        return (self.base_url + path).encode("ascii")


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every upstream connection."""

    noisy = False


@implementer(IBodyProducer)
class _BytesProducer:
    """Writes a small in-memory body at once (no cooperator, no copy to disk)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Reads (a bounded amount of) a body we do not need, then lets the connection go."""

    def __init__(self, limit: int = _MAX_PROBE_BODY) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._data = b""
        self._limit = limit

    def connectionMade(self) -> None:
        if self._limit == 0:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if len(self._data) < self._limit:
            self._data += data[: self._limit - len(self._data)]
        else:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(self._data)


_JSON_HEADERS = {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}


class BackendPool:
    """Round-robin over healthy backends whose breaker lets requests through; health probes."""

    def __init__(
        self,
        clock: IReactorTime,
        backends: Sequence[Backend],
        metrics: RouterMetrics,
        interval: float,
        probe_timeout: float,
    ) -> None:
        self._clock = clock
        self.backends = list(backends)
        self._metrics = metrics
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._next = 0
        self._timer: IDelayedCall | None = None
        self._probing: list[Deferred[Any]] = []
        self.connection_pools: list[HTTPConnectionPool] = []
        for backend in self.backends:
            metrics.backend_healthy.labels(backend.name).set(0)
            metrics.circuit_state.labels(backend.name).set(0)

    @classmethod
    def from_settings(
        cls, reactor: Any, clock: IReactorTime, settings: Settings, metrics: RouterMetrics
    ) -> BackendPool:
        tls = None
        if settings.upstream_tls_ca is not None:
            tls = ClientTLS(
                ca=settings.upstream_tls_ca,
                cert=settings.upstream_tls_cert,
                key=settings.upstream_tls_key,
                server_name=settings.upstream_tls_server_name,
            )
        backends = []
        pools = []
        for index, url in enumerate(settings.inference_endpoints):
            name = f"backend-{index}"
            # Keep-alive connections save a connect and a handshake per request; a cancelled
            # stream aborts its connection, so it never goes back to the pool.
            connections = HTTPConnectionPool(reactor, persistent=True)
            connections._factory = _QuietClientFactory
            connections.maxPersistentPerHost = 64
            connections.cachedConnectionTimeout = 30
            connections.retryAutomatically = False
            pools.append(connections)
            agent, base = agent_for(
                reactor,
                url.rstrip("/"),
                tls if url.startswith("https:") else None,
                pool=connections,
                connect_timeout=settings.connect_timeout_seconds,
            )
            gauge = metrics.circuit_state.labels(name)
            breaker = CircuitBreaker(
                clock,
                settings.circuit_breaker_threshold,
                settings.circuit_reset_seconds,
                gauge.set,
            )
            backends.append(Backend(name, url, agent, base, breaker))
        pool = cls(
            clock,
            backends,
            metrics,
            settings.health_interval_seconds,
            settings.connect_timeout_seconds,
        )
        pool.connection_pools = pools
        return pool

    def ready(self) -> bool:
        return any(b.healthy for b in self.backends)

    def choose(self, avoid: Sequence[Backend] = ()) -> Backend | None:
        """The next usable backend, preferring ones not in ``avoid``; claims its breaker."""
        n = len(self.backends)
        for allow_avoided in (False, True):
            for step in range(n):
                backend = self.backends[(self._next + step) % n]
                if not backend.healthy or (backend in avoid and not allow_avoided):
                    continue
                if backend.breaker.acquire():
                    self._next = (self._next + step + 1) % n
                    return backend
        return None

    def set_healthy(self, backend: Backend, healthy: bool) -> None:
        if backend.healthy != healthy or not backend.probed:
            backend.probed = True
            log.info(
                "backend {name} is now {state}",
                name=backend.name,
                state="healthy" if healthy else "unhealthy",
            )
        backend.healthy = healthy
        self._metrics.backend_healthy.labels(backend.name).set(1 if healthy else 0)

    def start(self) -> None:
        self._tick()

    def stop(self) -> Deferred[object]:
        """Stop probing and close idle keep-alive connections (fires when they are closed)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in list(self._probing):
            d.cancel()
        closing = [p.closeCachedConnections() for p in self.connection_pools]
        return gatherResults(closing).addCallback(lambda _: None)

    def _tick(self) -> None:
        self._timer = None
        for backend in self.backends:
            self._track(self.probe(backend))
        self._timer = self._clock.callLater(self._interval, self._tick)

    def _track(self, d: Deferred[Any]) -> None:
        self._probing.append(d)

        def untrack(result: object) -> None:
            self._probing.remove(d)

        d.addBoth(untrack)

    def probe(self, backend: Backend) -> Deferred[bool]:
        """GET /health, falling back to /v1/models for backends without it."""

        async def run() -> bool:
            for path in ("/health", "/v1/models"):
                code = await self._get(backend, path)
                if code == 200:
                    return True
                if code != 404:
                    return False
            return False

        d: Deferred[bool] = Deferred.fromCoroutine(run())
        timer = self._clock.callLater(self._probe_timeout, d.cancel)

        def done(result: bool | Failure) -> bool:
            if timer.active():
                timer.cancel()
            healthy = result is True
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.debug("health probe of {name} failed", name=backend.name)
            self.set_healthy(backend, healthy)
            return healthy

        return d.addBoth(done)

    async def _get(self, backend: Backend, path: str) -> int:
        response: IResponse = await backend.agent.request(b"GET", backend.uri(path))
        discard = _Discard()
        response.deliverBody(discard)
        await discard.done
        return int(response.code)


class TokenSink(TypingProtocol):
    """What a ChatCall feeds: the client-facing stream."""

    def token(self, text: str) -> None: ...

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...

    def failed(self, code: str, message: str, status: int) -> None: ...


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    deltas: int = 0
    finish_reason: str | None = None


class _OpenAIStream(Protocol):
    """Parses an OpenAI chat completion event stream into token / finish callbacks."""

    def __init__(self, call: ChatCall) -> None:
        self._call = call
        self._parser = SSEParser(_MAX_SSE_LINE)
        self.usage = _Usage()
        self.saw_done = False
        self.broken: UpstreamError | None = None

    def connectionMade(self) -> None:
        self._call._attached(self)

    def dataReceived(self, data: bytes) -> None:
        if self.saw_done or self.broken is not None:
            return
        try:
            events = self._parser.feed(data)
        except SSEError:
            self._break(UpstreamError("upstream_failed", "malformed upstream event stream"))
            return
        for _, payload in events:
            if payload.strip() == "[DONE]":
                self.saw_done = True
                return
            try:
                doc = json.loads(payload)
            except ValueError:
                self._break(UpstreamError("upstream_failed", "malformed upstream event"))
                return
            if not self._handle(doc):
                return

    def _handle(self, doc: Any) -> bool:
        if not isinstance(doc, dict):
            self._break(UpstreamError("upstream_failed", "malformed upstream event"))
            return False
        if "error" in doc:
            self._break(UpstreamError("upstream_failed", "the inference backend failed"))
            return False
        usage = doc.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.usage.prompt_tokens, self.usage.completion_tokens = prompt, completion
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    self.usage.deltas += 1
                    self._call._token(text)
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.usage.finish_reason = reason
        return True

    def _break(self, error: UpstreamError) -> None:
        self.broken = error
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._call._body_ended(self, reason)


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


class ChatCall:
    """The upstream side of one client request (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: BackendPool,
        settings: Settings,
        metrics: RouterMetrics,
        body: dict[str, Any],
        sink: TokenSink,
        deadline: float,
        rng: random.Random | None = None,
        headers: Mapping[bytes, list[bytes]] | None = None,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._headers = {**_JSON_HEADERS, **(headers or {})}
        self._settings = settings
        self._metrics = metrics
        self._body = json.dumps(body).encode("utf-8")
        self._sink = sink
        self._deadline = deadline
        self._rng = rng or random.SystemRandom()
        self._attempt = 0
        self._current = 0  # id of the live attempt; callbacks of older ones are ignored
        self._tried: list[Backend] = []
        self._backend: Backend | None = None
        self._request: Deferred[IResponse] | None = None
        self._stream: _OpenAIStream | None = None
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

    def _try(self) -> None:
        backend = self._pool.choose(self._tried)
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
            Headers(self._headers),
            _BytesProducer(self._body),
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
            response.deliverBody(_Discard(limit=0))
            return
        self._request = None
        if response.code != 200:
            response.deliverBody(_Discard(limit=0))  # drop the connection, not worth reusing
            # 4xx (other than 408/429) means this request is wrong for any backend.
            client_fault = 400 <= response.code < 500 and response.code not in (408, 429)
            overloaded = response.code in (429, 503)
            self._attempt_failed(
                UpstreamError(
                    "upstream_failed",
                    "the inference backend refused the request",
                    retryable=not client_fault,
                    breaker=not (client_fault or overloaded),
                )
            )
            return
        stream = _OpenAIStream(self)
        self._stream = stream
        response.deliverBody(stream)

    def _attached(self, stream: _OpenAIStream) -> None:
        if self._paused and stream.transport is not None:
            stream.transport.pauseProducing()  # type: ignore[attr-defined]

    def _request_failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._current or self.over:
            return  # cancelled by us: a timeout or the client leaving already handled it
        self._request = None
        self._attempt_failed(UpstreamError("upstream_failed", "the inference backend failed"))

    def _token(self, text: str) -> None:
        if self.over:
            return
        self.tokens += 1
        self._arm(self._settings.idle_timeout_seconds, "idle")
        self._sink.token(text)

    def _body_ended(self, stream: _OpenAIStream, reason: Failure) -> None:
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
                _finish_reason(usage.finish_reason),
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
        status = {"no_backend": 503, "timeout": 504}.get(error.code, 502)
        self._sink.failed(error.code, error.message, status)
