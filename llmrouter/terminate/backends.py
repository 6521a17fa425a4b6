"""Inference backends: health probes, the models each serves, round robin over a model's pool.

Backends speak the OpenAI streaming chat API (``POST /v1/chat/completions`` with ``stream: true``):
our inference daemon, ``llama-server``, vLLM and Ollama, each spelled in its own dialect
(:mod:`llmrouter.terminate.dialects`). Each backend serves one or more models, pinned in its
:class:`Endpoint` or discovered from its ``GET /v1/models`` on every health probe; a request's
``model`` selects the pool of backends serving it (:meth:`BackendPool.route`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent, IResponse

from llmrouter.httpclient import ClientTLS, PinnedPolicy, agent_for
from llmrouter.probing import Probing
from llmrouter.protocol import ProtocolError
from llmrouter.terminate.bodies import MAX_PROBE_BODY, BodyReader, QuietClientFactory
from llmrouter.terminate.breaker import CircuitBreaker
from llmrouter.terminate.config import Endpoint, PoolSettings, TerminateMetrics
from llmrouter.terminate.dialects import DIALECTS, Dialect, models_from, template_limits

__all__ = ["Backend", "BackendPool", "Route"]

log = Logger()

_MAX_PROPS_BODY = 1 << 18  # llama-server's /props carries its chat templates
_MAX_CURSORS = 1024


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
        self.slots_exposed = False  # llama-server whose GET /slots answers (it shows prompts)
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


class BackendPool:
    """Round-robin over healthy backends whose breaker lets requests through; health probes."""

    def __init__(
        self,
        clock: IReactorTime,
        backends: Sequence[Backend],
        metrics: TerminateMetrics,
        interval: float,
        probe_timeout: float,
        default_model: str | None = None,
    ) -> None:
        self._clock = clock
        self.backends = list(backends)
        self._metrics = metrics
        self._interval = interval
        self._probing = Probing(
            clock, interval, probe_timeout, lambda: [self.probe(b) for b in self.backends]
        )
        self.default_model = default_model
        self._next: dict[str | None, int] = {}  # round-robin cursor per model (served names only)
        self.connection_pools: list[HTTPConnectionPool] = []
        self.tls: PinnedPolicy | None = None
        # Production: a llama-server whose /slots answers is never used (it hands anyone on the
        # link the prompts in its slots), and the router refuses to start against one.
        self.refuse_slots = False
        self.refused: set[str] = set()
        self.first_round = self._probing.first_round  # the first probe of every backend is done
        for backend in self.backends:
            metrics.backend_healthy.labels(backend.name).set(0)
            metrics.circuit_state.labels(backend.name).set(0)

    @classmethod
    def from_settings(
        cls, reactor: Any, clock: IReactorTime, settings: PoolSettings, metrics: TerminateMetrics
    ) -> BackendPool:
        tls = None
        if settings.upstream_tls_ca is not None:
            tls = PinnedPolicy(
                ClientTLS(
                    ca=settings.upstream_tls_ca,
                    cert=settings.upstream_tls_cert,
                    key=settings.upstream_tls_key,
                    server_name=settings.upstream_tls_server_name,
                )
            )
        backends = []
        pools = []
        for index, endpoint in enumerate(settings.endpoints()):
            url = endpoint.url
            name = f"backend-{index}"
            # Keep-alive connections save a connect and a handshake per request; a cancelled
            # stream aborts its connection, so it never goes back to the pool.
            connections = HTTPConnectionPool(reactor, persistent=True)
            connections._factory = QuietClientFactory
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
        pool.tls = tls
        pool.refuse_slots = settings.production
        return pool

    def reload_tls(self) -> bool:
        """Read the client certificate, key and CA of https:// backends again (SIGHUP after a
        renewal) and drop idle keep-alive connections, so that every new connection presents
        the renewed certificate. False when there is none; raises (keeping the old ones) when
        the files cannot be loaded."""
        if self.tls is None:
            return False
        self.tls.reload()
        for connections in self.connection_pools:
            connections.closeCachedConnections()
        return True

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
                    raise model_unknown()
                raise ProtocolError(
                    "no_backend", "no inference backend is available", 503, retry_after=self._wait()
                )
        capable = tuple(b for b in candidates if features <= b.features)
        if not capable:
            missing = sorted(features - frozenset().union(*(b.features for b in candidates)))
            field = (missing or sorted(features))[0]
            raise unsupported_field(field)
        if model is not None and not any(b.healthy for b in capable):
            raise model_unavailable(self._wait())
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
        self._probing.start()

    def stop(self) -> Deferred[object]:
        """Stop probing and close idle keep-alive connections (fires when they are closed)."""
        self._probing.stop()  # the probes' answers are not waited for: only the connections
        closing = [p.closeCachedConnections() for p in self.connection_pools]
        return gatherResults(closing).addCallback(lambda _: None)

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
            if backend.slots_exposed and self.refuse_slots:
                return self._refuse(backend)
            self.refused.discard(backend.name)
            return health == 200 or code == 200

        d: Deferred[bool] = self._probing.timed(Deferred.fromCoroutine(run()))

        def done(result: bool | Failure) -> bool:
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
        llama_server = (
            kind if backend.endpoint.kind == "auto" else backend.endpoint.kind
        ) == "llama-server"
        if llama_server:
            code, props = await self._get(backend, "/props", _MAX_PROPS_BODY)
            if code == 200:
                unsupported = template_limits(props)
            # only the status: the body has the prompts in its slots, which we never read
            code, _ = await self._get(backend, "/slots", 0)
            exposed = code == 200
            if exposed and not backend.slots_exposed:
                log.warn(
                    "backend {name} is a llama-server whose GET /slots answers: anyone who"
                    " reaches it can read the prompts in its slots; start it with --no-slots",
                    name=backend.name,
                )
            backend.slots_exposed = exposed
        backend.discovered(names, kind, unsupported)

    def _refuse(self, backend: Backend) -> bool:
        """Production never sends a prompt to a llama-server that shows prompts in /slots."""
        if backend.name not in self.refused:
            self.refused.add(backend.name)
            log.error(
                "backend {name} refused: llama-server with GET /slots answering (it returns"
                " the prompts in its slots); restart it with --no-slots",
                name=backend.name,
            )
        return False

    async def _get(
        self, backend: Backend, path: str, limit: int = MAX_PROBE_BODY
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
        reader = BodyReader(limit)
        response.deliverBody(reader)
        body = await reader.done
        return int(response.code), body


# The refusals of routing, shared by every IModelServer so that a client reads the same code and
# words whichever kind of model server its node runs.


def model_unknown() -> ProtocolError:
    return ProtocolError("model_unknown", "no backend serves that model", 404)


def unsupported_field(field: str) -> ProtocolError:
    return ProtocolError("unsupported_field", f"the model's backends do not support {field}", 400)


def model_unavailable(retry_after: int) -> ProtocolError:
    return ProtocolError(
        "overloaded", "no backend of that model is available", 503, retry_after=retry_after
    )
