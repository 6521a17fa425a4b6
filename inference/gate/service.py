"""Building the gate into ``twistd inference``, and running its timers.

With a model, the gate feeds our engine in process (:class:`inference.gate.engine.LocalEngine`):
the same generation core as the daemon's HTTP API, with no HTTP hop, SSE framing or parsing in
between (docs/benchmarks.md, "router + gate vs the model server"). In front mode it reaches the
fronted model server over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet.interfaces import IReactorTime

from inference.config import Settings
from inference.gate.chat import Gate
from inference.gate.config import GateSettings
from inference.gate.engine import FrontedServer, IModelServer, LocalEngine
from inference.gate.keys import NodeKeys
from inference.gate.metrics import GateMetrics
from inference.generate import Generator
from llmrouter import secmem
from llmrouter.daykey import DayKey
from llmrouter.terminate.backends import BackendPool
from llmrouter.terminate.cachekey import CacheKeys

__all__ = ["IN_PROCESS", "GateService", "build_gate"]

IN_PROCESS = "in-process"  # GateSettings.upstream of our own engine (no address)


def build_gate(
    settings: Settings,
    reactor: Any,
    clock: IReactorTime,
    registry: CollectorRegistry,
    busy: Callable[[], bool] = lambda: False,
    *,
    engine: tuple[Generator, str] | None = None,
) -> tuple[Gate, GateService]:
    """The gate for ``settings.keys_dir``, in front of ``engine`` (our generation core and its
    model's name) or else the fronted server ``settings.front`` (of ``settings.dialect``)."""
    assert settings.keys_dir is not None
    pinned = (settings.model_name,) if settings.front and settings.model_name else ()
    if engine is None:
        assert settings.front is not None
        upstream, dialect = settings.front, settings.dialect
    else:
        upstream, dialect = IN_PROCESS, "llmrouter"
    gate_settings = GateSettings(
        upstream,
        dialect,
        pinned,
        pad_bytes=settings.pad_bytes,
        stream_cadence_ms=settings.stream_cadence_ms,
        max_streams=settings.max_streams,
        request_ttl_seconds=max(settings.time_budget + 30.0, 60.0),
        max_body_bytes=min(settings.max_body, 1 << 20),
    )
    metrics = GateMetrics(registry)
    secmem.harden_process()  # no core dumps, not ptrace-able: the node holds secret keys now
    keys = NodeKeys.open(settings.keys_dir, clock)
    server: IModelServer
    if engine is None:
        pool = BackendPool.from_settings(reactor, clock, gate_settings, metrics)
        server = FrontedServer(clock, pool, gate_settings, metrics)
    else:
        generator, model_name = engine
        server = LocalEngine(
            generator, clock, metrics, model_name=model_name, max_tokens=settings.max_tokens
        )
    gate = Gate(keys, server, gate_settings, clock, metrics, CacheKeys(DayKey(clock)), busy)
    return gate, GateService(gate, keys, server)


class GateService(service.Service):
    """Starts key rotation and the model server's health probes; on stop, ends open streams
    with a sealed error and wipes the keys."""

    def __init__(self, gate: Gate, keys: NodeKeys, server: IModelServer) -> None:
        self._gate = gate
        self._keys = keys
        self._server = server

    def startService(self) -> None:
        super().startService()
        self._keys.start()
        self._server.start()

    def stopService(self) -> Any:
        super().stopService()
        self._gate.stop()
        stopped = self._server.stop()
        self._keys.close()
        return stopped
