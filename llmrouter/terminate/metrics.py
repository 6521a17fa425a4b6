"""The metrics a sealed stream and its upstream calls update, declared once for both sides.

The router (``llmrouter_*``) and a node's gate (``inference_gate_*``) each register these in
their own registry, under their own prefix and with help texts that say what the numbers mean on
that side; the kinds, the labels and the buckets are one contract, the one
:class:`~llmrouter.terminate.config.TerminateMetrics` names and :mod:`llmrouter.terminate`
updates. Label values are fixed strings (a backend's configured name, a status code, a drop
reason), never request data.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DURATION_BUCKETS", "LATENCY_BUCKETS", "TerminateHelp", "TerminateMetricSet"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class TerminateHelp:
    """What each metric means on one side (its Prometheus help text)."""

    request_duration: str
    upstream_duration: str
    ttft: str
    active_streams: str
    tokens_streamed: str
    http_responses: str
    streams_dropped: str
    circuit_state: str
    backend_healthy: str
    upstream_retries: str


class TerminateMetricSet:
    """The metrics of :class:`~llmrouter.terminate.config.TerminateMetrics`, registered in
    ``registry`` as ``{prefix}_...``; each side's metrics class extends it with its own."""

    def __init__(self, registry: CollectorRegistry, prefix: str, help: TerminateHelp) -> None:
        r = registry
        self.request_duration = Histogram(
            f"{prefix}_request_duration_seconds",
            help.request_duration,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            f"{prefix}_upstream_duration_seconds",
            help.upstream_duration,
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            help.ttft,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(f"{prefix}_active_streams", help.active_streams, registry=r)
        self.tokens_streamed = Counter(
            f"{prefix}_tokens_streamed", help.tokens_streamed, registry=r
        )
        self.http_responses = Counter(
            f"{prefix}_http_responses", help.http_responses, ["status"], registry=r
        )
        self.streams_dropped = Counter(
            f"{prefix}_streams_dropped", help.streams_dropped, ["reason"], registry=r
        )
        self.circuit_state = Gauge(
            f"{prefix}_circuit_state", help.circuit_state, ["backend"], registry=r
        )
        self.backend_healthy = Gauge(
            f"{prefix}_backend_healthy", help.backend_healthy, ["backend"], registry=r
        )
        self.upstream_retries = Counter(
            f"{prefix}_upstream_retries", help.upstream_retries, ["backend"], registry=r
        )
