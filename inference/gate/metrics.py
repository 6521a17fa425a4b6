"""The gate's metrics (protocol v2 on the node), in the daemon's registry.

The sealed stream and its upstream call update the metrics :mod:`llmrouter.terminate` names
(:class:`~llmrouter.terminate.config.TerminateMetrics`); here they are ``inference_gate_*``. Labels
are fixed strings (a status code, a refusal code, a drop reason, ``upstream``), never request
data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GateMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GateMetrics:
    """Every gate metric, registered in ``registry`` (the daemon's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.request_duration = Histogram(
            "inference_gate_request_duration_seconds",
            "Duration of v2 requests at the gate, arrival to final chunk",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "inference_gate_upstream_duration_seconds",
            "Duration of the gate's plaintext calls to the model server",
            ["backend"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "inference_gate_time_to_first_token_seconds",
            "Time from a v2 request's arrival at the gate to its first sealed token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "inference_gate_active_streams", "Open sealed v2 streams", registry=r
        )
        self.tokens_streamed = Counter(
            "inference_gate_tokens_streamed", "Tokens sealed into v2 streams", registry=r
        )
        self.http_responses = Counter(
            "inference_gate_http_responses",
            "Responses of /v2/chat by status (200 includes sealed refusals)",
            ["status"],
            registry=r,
        )
        self.refusals = Counter(
            "inference_gate_refusals",
            "v2 requests refused by the gate, by code (plain before opening, sealed after)",
            ["reason"],
            registry=r,
        )
        self.streams_dropped = Counter(
            "inference_gate_streams_dropped",
            "v2 streams dropped under a router that stopped reading: write_stall or deadline",
            ["reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "inference_gate_circuit_state",
            "Circuit breaker state of the model server: 0 closed, 1 half-open, 2 open",
            ["backend"],
            registry=r,
        )
        self.backend_healthy = Gauge(
            "inference_gate_backend_healthy",
            "Whether the gate's last health probe of the model server succeeded",
            ["backend"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "inference_gate_upstream_retries",
            "Plaintext calls to the model server tried again",
            ["backend"],
            registry=r,
        )
