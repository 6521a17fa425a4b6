"""The gate's settings: where the plaintext goes, and how the sealed stream is shaped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmrouter.terminate.config import Endpoint
from llmrouter.terminate.dialects import DIALECTS

__all__ = ["FRONT_DIALECTS", "GateSettings"]

# What --dialect names for a fronted model server (our own daemon is the "llmrouter" dialect).
FRONT_DIALECTS = tuple(kind for kind in DIALECTS if kind != "llmrouter")


@dataclass(frozen=True)
class GateSettings:
    """``upstream``: the model server the gate opens conversations with (our daemon's private
    socket, or ``--front URL``), ``dialect`` its kind and ``models`` the names it serves when
    pinned (a fronted server's own id may be no model name: llama-server lists its file path).
    The rest shape the sealed stream as the router's settings of the same names shape v1.1's
    (padding, cadence, keepalives, the write stall and the whole-stream deadline) and bound the
    gate (open streams, the replay cache, the clock skew of ``ts``). ``CallSettings`` and
    ``PoolSettings`` of :mod:`llmrouter.terminate`."""

    upstream: str
    dialect: str = "llmrouter"
    models: tuple[str, ...] = ()  # pinned (front mode's --model-name), else its /v1/models
    pad_bytes: int = 64
    stream_cadence_ms: int = 0
    keepalive_seconds: float = 15.0
    write_stall_seconds: float = 30.0
    request_ttl_seconds: float = 300.0
    max_streams: int = 256
    max_body_bytes: int = 262144
    skew_seconds: int = 60
    replay_window_seconds: float = 150.0
    replay_max_entries: int = 100_000
    first_token_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 30.0
    retry_max: int = 1  # a kept-alive connection the server just closed: once more
    retry_backoff_seconds: float = 0.05
    retry_backoff_max_seconds: float = 0.5
    connect_timeout_seconds: float = 5.0
    circuit_breaker_threshold: int = 5
    circuit_reset_seconds: float = 5.0
    health_interval_seconds: float = 1.0  # a local server: cheap, and v2 is up soon after it
    default_model: str | None = None
    # A fronted llama-server: its slots do not reuse one device's prompt for another
    # (``cache_prompt: false``), as the router asks of one (docs/inference.md, "Backends and
    # privacy"); its ``GET /slots`` is only warned about (the node has no production mode).
    llama_server_cache_prompt: bool = False
    production: bool = False
    upstream_tls_ca: Path | None = field(default=None, init=False)
    upstream_tls_cert: Path | None = field(default=None, init=False)
    upstream_tls_key: Path | None = field(default=None, init=False)
    upstream_tls_server_name: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError("the dialect is " + "|".join(DIALECTS))
        if self.replay_window_seconds < 2 * self.skew_seconds:
            raise ValueError("the replay window must cover the timestamp skew on both sides")

    def endpoints(self) -> tuple[Endpoint, ...]:
        return (Endpoint(self.upstream, self.models, self.dialect),)
