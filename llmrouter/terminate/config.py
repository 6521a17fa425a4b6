"""What the terminating side is configured with: its backends, and settings and metrics as
protocols.

The router passes its :class:`~llmrouter.router.settings.Settings` and
:class:`~llmrouter.router.metrics.RouterMetrics`; an inference node's gate passes its own. Nothing
in :mod:`llmrouter.terminate` imports either side's modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmrouter.chat import MODEL_NAME
from llmrouter.terminate.dialects import KINDS

__all__ = ["CallSettings", "Endpoint", "PoolSettings", "TerminateMetrics"]


@dataclass(frozen=True)
class Endpoint:
    """One ``INFERENCE_ENDPOINTS`` entry: where, which models it serves (pinned names, else found
    in its ``GET /v1/models``), and what kind of backend it is (``auto``: recognised there too)."""

    url: str
    models: tuple[str, ...] = ()
    kind: str = "auto"

    @classmethod
    def parse(cls, entry: str) -> Endpoint:
        url, *options = entry.split()
        models: list[str] = []
        kind = "auto"
        for option in options:
            name, _, value = option.partition("=")
            if name == "model" and MODEL_NAME.fullmatch(value) and value not in models:
                models.append(value)
            elif name == "kind" and value in KINDS:
                kind = value
            else:
                raise ValueError(
                    "INFERENCE_ENDPOINTS options are model=NAME (letters, digits, ._:/@+-) and"
                    " kind=" + "|".join(KINDS)
                )
        return cls(url, tuple(models), kind)


class CallSettings(Protocol):
    """Timeouts and retries of one chat call upstream."""

    @property
    def first_token_timeout_seconds(self) -> float: ...

    @property
    def idle_timeout_seconds(self) -> float: ...

    @property
    def retry_max(self) -> int: ...

    @property
    def retry_backoff_seconds(self) -> float: ...

    @property
    def retry_backoff_max_seconds(self) -> float: ...

    @property
    def llama_server_cache_prompt(self) -> bool:
        """Let a llama-server reuse one user's prompt cache for another (off: ``cache_prompt:
        false`` in every request to one)."""
        ...


class PoolSettings(Protocol):
    """The backends and how they are probed and reached."""

    @property
    def upstream_tls_ca(self) -> Path | None: ...

    @property
    def upstream_tls_cert(self) -> Path | None: ...

    @property
    def upstream_tls_key(self) -> Path | None: ...

    @property
    def upstream_tls_server_name(self) -> str | None: ...

    @property
    def connect_timeout_seconds(self) -> float: ...

    @property
    def circuit_breaker_threshold(self) -> int: ...

    @property
    def circuit_reset_seconds(self) -> float: ...

    @property
    def health_interval_seconds(self) -> float: ...

    @property
    def default_model(self) -> str | None: ...

    @property
    def production(self) -> bool:
        """Refuse a llama-server whose ``GET /slots`` answers (it shows the prompts)."""
        ...

    def endpoints(self) -> Sequence[Endpoint]: ...


class TerminateMetrics(Protocol):
    """The Prometheus metrics a sealed stream and its upstream call update (labels: a backend's
    configured name, a status code, a drop reason; never request data)."""

    request_duration: Any
    upstream_duration: Any
    ttft: Any
    active_streams: Any
    tokens_streamed: Any
    http_responses: Any
    streams_dropped: Any
    circuit_state: Any
    backend_healthy: Any
    upstream_retries: Any
