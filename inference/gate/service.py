"""Building the gate into ``twistd inference``, and running its timers.

With a model, the gate reaches our engine over a private UNIX socket of the daemon itself: a
socket in a fresh 0700 directory (under ``$RUNTIME_DIRECTORY`` when systemd gives one), mode
0600, served by the same API as the public listeners. It keeps the gate on the same seam as
front mode, where the model server is another process; what the hop costs is measured in
docs/benchmarks.md ("router + gate vs the model server").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet.interfaces import IReactorTime

from inference.config import Settings
from inference.gate.chat import Gate
from inference.gate.config import GateSettings
from inference.gate.keys import NodeKeys
from inference.gate.metrics import GateMetrics
from llmrouter import secmem
from llmrouter.daykey import DayKey
from llmrouter.terminate.backends import BackendPool
from llmrouter.terminate.cachekey import CacheKeys

__all__ = ["GateService", "build_gate", "private_socket_dir"]


def private_socket_dir() -> Path:
    """A fresh 0700 directory for the engine's private socket."""
    parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return Path(tempfile.mkdtemp(prefix="engine-", dir=parent))


def build_gate(
    settings: Settings,
    reactor: Any,
    clock: IReactorTime,
    registry: CollectorRegistry,
    upstream: str,
    dialect: str,
    busy: Callable[[], bool] = lambda: False,
) -> tuple[Gate, GateService]:
    """The gate for ``settings.keys_dir``, talking plaintext to ``upstream`` (of ``dialect``)."""
    assert settings.keys_dir is not None
    pinned = (settings.model_name,) if settings.front and settings.model_name else ()
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
    pool = BackendPool.from_settings(reactor, clock, gate_settings, metrics)
    gate = Gate(keys, pool, gate_settings, clock, metrics, CacheKeys(DayKey(clock)), busy)
    return gate, GateService(gate, keys, pool)


class GateService(service.Service):
    """Starts key rotation and the model server's health probes; on stop, ends open streams
    with a sealed error, wipes the keys and removes the private socket's directory."""

    def __init__(self, gate: Gate, keys: NodeKeys, pool: BackendPool) -> None:
        self._gate = gate
        self._keys = keys
        self._pool = pool
        self.cleanup: list[Path] = []

    def startService(self) -> None:
        super().startService()
        self._keys.start()
        self._pool.start()

    def stopService(self) -> Any:
        super().stopService()
        self._gate.stop()
        stopped = self._pool.stop()
        self._keys.close()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        return stopped
