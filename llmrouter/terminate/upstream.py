"""Inference backends: health, models, circuit breakers, round robin, one chat call with retries.

Backends speak the OpenAI streaming chat API (``POST /v1/chat/completions`` with ``stream: true``):
our inference daemon, ``llama-server``, vLLM and Ollama, each spelled in its own dialect
(:mod:`llmrouter.terminate.dialects`). Each backend serves one or more models, pinned in the
settings or discovered from its ``GET /v1/models`` on every health probe; a request's ``model``
selects the pool of backends serving it (:meth:`BackendPool.route`).

A :class:`ChatCall` owns the upstream side of one client request: it picks a backend of its route,
retries elsewhere with capped exponential backoff and jitter while nothing has reached the client
yet, enforces the connect, first-token, idle and total timeouts, and relays content, reasoning,
tool-call fragments and logprobs to a :class:`TokenSink` (the client-facing stream), each kind only
if the request asked for it. After the first output it never retries: a failure becomes an error for
the sink to seal.
"""

from __future__ import annotations

import json
import math
import random
import re
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

from llmrouter.chat import ChatRequest
from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.protocol import ProtocolError, logprob_entries
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Endpoint, Settings
from llmrouter.sse import SSEError, SSEParser
from llmrouter.terminate.dialects import DIALECTS, Dialect, models_from, template_limits

__all__ = [
    "Backend",
    "BackendPool",
    "ChatCall",
    "CircuitBreaker",
    "Route",
    "TokenSink",
    "UpstreamError",
]

log = Logger()

_MAX_SSE_LINE = 1 << 20
_MAX_PROBE_BODY = 1 << 16
_MAX_PROPS_BODY = 1 << 18  # llama-server's /props carries its chat templates
_MAX_ERROR_BODY = 1 << 12
_MAX_TOOL_INDEX = 63
_MAX_ID_CHARS = 256
_MAX_CURSORS = 1024
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # an enum, never a sentence or a value


class UpstreamError(Exception):
    """Why an upstream attempt failed; ``retryable`` is false when another backend won't help."""

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = True,
        breaker: bool = True,
        detail: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.breaker = breaker  # count against the backend's circuit breaker
        self.detail = detail  # extra fields of the plain JSON error (never request data)


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
    """One configured inference endpoint, named by its index (``backend-0``) in metrics/logs.

    ``models`` are the pinned names, else the ones its last ``GET /v1/models`` listed;
    ``models_known`` says whether that list has been seen at all. ``dialect`` is the pinned kind,
    else the one recognised there; ``features`` what it can do (its template may take some away).
    """

    def __init__(
        self,
        name: str,
        url: str,
        agent: IAgent,
        base_url: str,
        breaker: CircuitBreaker,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.agent = agent
        self.base_url = base_url
        self.breaker = breaker
        self.endpoint = endpoint or Endpoint(url)
        self.healthy = False
        self.probed = False
        self.models: tuple[str, ...] = self.endpoint.models
        self.models_known = bool(self.models)
        self.dialect: Dialect = DIALECTS["openai"]
        self.features = self.dialect.features
        self.discovered(None, None)

    def __repr__(self) -> str:
        return f"Backend({self.name})"

    def uri(self, path: str) -> bytes:
        return (self.base_url + path).encode("ascii")

    def discovered(
        self,
        models: tuple[str, ...] | None,
        kind: str | None,
        unsupported: frozenset[str] = frozenset(),
    ) -> None:
        """What the backend's model list (None: none seen) and template said; pins win."""
        if models is not None and not self.endpoint.models:
            self.models, self.models_known = models, True
        if self.endpoint.kind != "auto":
            kind = self.endpoint.kind
        self.dialect = DIALECTS[kind or "openai"]
        self.features = self.dialect.features - unsupported

    def upstream_model(self, model: str | None) -> str | None:
        """The ``model`` sent upstream: the one asked for, else the first this backend serves."""
        if model is not None:
            return model
        return self.models[0] if self.models else None


@dataclass(frozen=True)
class Route:
    """The backends a request may use: those serving its model that implement its features."""

    model: str | None
    backends: tuple[Backend, ...]


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
        default_model: str | None = None,
    ) -> None:
        self._clock = clock
        self.backends = list(backends)
        self._metrics = metrics
        self._interval = interval
        self._probe_timeout = probe_timeout
        self.default_model = default_model
        self._next: dict[str | None, int] = {}  # round-robin cursor per model (served names only)
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
        for index, endpoint in enumerate(settings.endpoints()):
            url = endpoint.url
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
            backends.append(Backend(name, url, agent, base, breaker, endpoint))
        pool = cls(
            clock,
            backends,
            metrics,
            settings.health_interval_seconds,
            settings.connect_timeout_seconds,
            settings.default_model,
        )
        pool.connection_pools = pools
        return pool

    def ready(self) -> bool:
        return any(b.healthy for b in self.backends)

    def models(self) -> list[str]:
        """Every model name some backend serves (pinned or last discovered), in config order."""
        names: list[str] = []
        for backend in self.backends:
            names.extend(name for name in backend.models if name not in names)
        return names

    def route(self, model: str | None, features: frozenset[str] = frozenset()) -> Route:
        """The backends for ``model`` (None: the default model, else every backend) that
        implement ``features``; a ProtocolError to answer with when there are none."""
        model = model or self.default_model
        if model is None:
            candidates = self.backends
        else:
            candidates = [b for b in self.backends if model in b.models]
            if not candidates:
                if all(b.models_known for b in self.backends):
                    raise ProtocolError("model_unknown", "no backend serves that model", 404)
                raise ProtocolError(
                    "no_backend", "no inference backend is available", 503, retry_after=self._wait()
                )
        capable = tuple(b for b in candidates if features <= b.features)
        if not capable:
            missing = sorted(features - frozenset().union(*(b.features for b in candidates)))
            field = (missing or sorted(features))[0]
            raise ProtocolError(
                "unsupported_field", f"the model's backends do not support {field}", 400
            )
        if model is not None and not any(b.healthy for b in capable):
            raise ProtocolError(
                "overloaded", "no backend of that model is available", 503, retry_after=self._wait()
            )
        return Route(model, capable)

    def _wait(self) -> int:
        return max(1, math.ceil(self._interval))

    def choose(self, avoid: Sequence[Backend] = (), route: Route | None = None) -> Backend | None:
        """The next usable backend of ``route`` (default: any), preferring ones not in ``avoid``;
        claims its breaker."""
        backends = self.backends if route is None else route.backends
        key = None if route is None else route.model
        start = self._next.get(key, 0)
        n = len(backends)
        for allow_avoided in (False, True):
            for step in range(n):
                backend = backends[(start + step) % n]
                if not backend.healthy or (backend in avoid and not allow_avoided):
                    continue
                if backend.breaker.acquire():
                    if len(self._next) > _MAX_CURSORS:  # names backends no longer list
                        self._next.clear()
                    self._next[key] = (start + step + 1) % n
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
        """GET /health (backends without it: /v1/models decides), then discover its models and
        kind from /v1/models (and llama-server's template from /props) before it takes traffic."""

        async def run() -> bool:
            health, _ = await self._get(backend, "/health")
            if health not in (200, 404):
                return False
            code, body = await self._get(backend, "/v1/models")
            if code == 200:
                await self._discover(backend, body)
            elif code == 404:
                backend.discovered((), None)  # it lists none: only the default route reaches it
            return health == 200 or code == 200

        d: Deferred[bool] = Deferred.fromCoroutine(run())
        timer = self._clock.callLater(self._probe_timeout, d.cancel)

        def done(result: bool | Failure) -> bool:
            if timer.active():
                timer.cancel()
            healthy = result is True
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.debug(
                    "health probe of {name} failed: {kind}",
                    name=backend.name,
                    kind=type(result.value).__name__,
                )
            self.set_healthy(backend, healthy)
            return healthy

        return d.addBoth(done)

    async def _discover(self, backend: Backend, models: bytes) -> None:
        names, kind = models_from(models)
        if not backend.endpoint.models and names != backend.models:
            log.info("backend {name} serves {models}", name=backend.name, models=list(names))
        unsupported: frozenset[str] = frozenset()
        if (kind if backend.endpoint.kind == "auto" else backend.endpoint.kind) == "llama-server":
            code, props = await self._get(backend, "/props", _MAX_PROPS_BODY)
            if code == 200:
                unsupported = template_limits(props)
        backend.discovered(names, kind, unsupported)

    async def _get(
        self, backend: Backend, path: str, limit: int = _MAX_PROBE_BODY
    ) -> tuple[int, bytes]:
        try:
            return await self._get_once(backend, path, limit)
        except CancelledError:
            raise
        except Exception:
            # A kept-alive connection the backend has just closed fails the request; one such
            # race must not take a healthy backend out of service until next time.
            return await self._get_once(backend, path, limit)

    async def _get_once(self, backend: Backend, path: str, limit: int) -> tuple[int, bytes]:
        response: IResponse = await backend.agent.request(b"GET", backend.uri(path))
        reader = _Discard(limit)
        response.deliverBody(reader)
        body = await reader.done
        return int(response.code), body


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
                # The common case first: a delta of text alone (every v1 token).
                if len(delta) == 1 and isinstance(text, str) and not self._call.relay_logprobs:
                    if text:
                        self.usage.deltas += 1
                        self._call._token(text)
                elif not self._delta(choice, delta):
                    return False
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.usage.finish_reason = reason
        return True

    def _delta(self, choice: dict[str, Any], delta: dict[str, Any]) -> bool:
        """Reasoning, then content, then tool calls, as the backend's event carries them;
        logprobs ride with the text they belong to. False when the event is malformed."""
        call = self._call
        logprobs = None
        if call.relay_logprobs:
            raw = choice.get("logprobs")
            if isinstance(raw, dict) and raw.get("content") is not None:
                try:
                    logprobs = logprob_entries(raw["content"])
                except ValueError:
                    self._break(UpstreamError("upstream_failed", "malformed upstream logprobs"))
                    return False
        content = delta.get("content")
        text = content if isinstance(content, str) else ""
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")  # Ollama, newer vLLM
        if isinstance(reasoning, str) and reasoning:
            self.usage.deltas += 1
            call._reasoning(reasoning, None if text else logprobs)
            if not text:
                logprobs = None
        if text or logprobs:
            if text:
                self.usage.deltas += 1
            call._token(text, logprobs)
        calls = delta.get("tool_calls")
        if calls is not None:
            fragments = _tool_fragments(calls)
            if fragments is None:
                self._break(UpstreamError("upstream_failed", "malformed upstream tool call"))
                return False
            for fragment in fragments:
                call._tool_call(*fragment)
        return True

    def _break(self, error: UpstreamError) -> None:
        self.broken = error
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._call._body_ended(self, reason)


def _tool_fragments(raw: Any) -> list[tuple[int, str | None, str | None, str]] | None:
    """OpenAI ``delta.tool_calls`` as (index, id, name, arguments) fragments; None if malformed."""
    if not isinstance(raw, list):
        return None
    fragments = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        index, call_id = item.get("index", 0), item.get("id")
        function = item.get("function") or {}
        if not isinstance(function, dict):
            return None
        name, arguments = function.get("name"), function.get("arguments") or ""
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index <= _MAX_TOOL_INDEX
            or not (call_id is None or (isinstance(call_id, str) and len(call_id) <= _MAX_ID_CHARS))
            or not (name is None or (isinstance(name, str) and len(name) <= _MAX_ID_CHARS))
            or not isinstance(arguments, str)
        ):
            return None
        fragments.append((index, call_id, name, arguments))
    return fragments


def _finish_reason(reason: str | None, tools: bool) -> str:
    if reason in ("stop", "length") or (reason == "tool_calls" and tools):
        return reason
    return "stop"


class ChatCall:
    """The upstream side of one client request (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: BackendPool,
        settings: Settings,
        metrics: RouterMetrics,
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

    def _body(self, backend: Backend) -> bytes:
        """The request in the backend's dialect (built once per dialect and model name)."""
        model = backend.upstream_model(None if self._route is None else self._route.model)
        key = (backend.dialect.kind, model)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = backend.dialect.body(self._chat, model)
        return body

    def _headers(self, backend: Backend) -> dict[bytes, list[bytes]]:
        """The extra headers (the prompt-cache key) go only to a backend of our own kind: to any
        other they would be a stable per-device tag that backend could link requests by."""
        if backend.dialect.cache_key:
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
            _BytesProducer(self._body(backend)),
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
        code = int(response.code)
        if code != 200:
            # 4xx (other than 408/429) means this request is wrong for any backend: read why.
            if 400 <= code < 500 and code not in (408, 429):
                reader = _Discard(_MAX_ERROR_BODY)
                response.deliverBody(reader)
                reader.done.addCallback(self._refused, code, attempt)
                return
            response.deliverBody(_Discard(limit=0))  # drop the connection, not worth reusing
            message = "the inference backend refused the request"
            overloaded = code in (429, 503)
            self._attempt_failed(UpstreamError("upstream_failed", message, breaker=not overloaded))
            return
        stream = _OpenAIStream(self)
        self._stream = stream
        response.deliverBody(stream)

    def _refused(self, body: bytes, status: int, attempt: int) -> None:
        """The backend refused the request itself: answer with its error code, not its message
        (a message may quote the request)."""
        if attempt != self._current or self.over:
            return
        detail: dict[str, Any] = {"upstream_status": status}
        upstream_code = _error_code(body)
        if upstream_code is not None:
            detail["upstream_code"] = upstream_code
        self._attempt_failed(
            UpstreamError(
                "upstream_refused",
                "the inference backend refused the request",
                retryable=False,
                breaker=False,
                detail=detail,
            )
        )

    def _attached(self, stream: _OpenAIStream) -> None:
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

    def _token(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        if self.over:
            return
        self.tokens += 1  # _progress(), inline on the path of every token
        self._arm(self._settings.idle_timeout_seconds, "idle")
        self._sink.token(text, logprobs)

    def _reasoning(self, text: str, logprobs: list[dict[str, Any]] | None) -> None:
        if self._progress():
            if self.relay_reasoning:
                self._sink.reasoning(text, logprobs)
            else:
                self._sink.progress()

    def _tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> None:
        if self._progress():
            if self.relay_tool_calls:
                self._sink.tool_call(index, call_id, name, arguments)
            else:
                self._sink.progress()

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
                _finish_reason(usage.finish_reason, self.relay_tool_calls),
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
        status = {"no_backend": 503, "timeout": 504, "upstream_refused": 400}.get(error.code, 502)
        self._sink.failed(error.code, error.message, status, error.detail)


def _error_code(body: bytes) -> str | None:
    """An OpenAI-style error's ``code`` (or ``type``) when it is an identifier, else None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error", doc) if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, str) and _ERROR_CODE.fullmatch(value):
            return value
    return None
