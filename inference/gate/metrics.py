"""The gate's metrics (protocol v2 on the node), in the daemon's registry.

The sealed stream and its upstream call update the metrics :mod:`llmrouter.terminate` declares
(:class:`~llmrouter.terminate.metrics.TerminateMetricSet`); here they are ``inference_gate_*``.
Labels are fixed strings (a status code, a refusal code, a drop reason, ``upstream``), never
request data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from llmrouter.terminate.metrics import TerminateHelp, TerminateMetricSet

__all__ = ["GateMetrics"]

_HELP = TerminateHelp(
    request_duration="Duration of v2 requests at the gate, arrival to final chunk",
    upstream_duration="Duration of the gate's plaintext calls to the model server",
    ttft="Time from a v2 request's arrival at the gate to its first sealed token",
    active_streams="Open sealed v2 streams",
    tokens_streamed="Tokens sealed into v2 streams",
    http_responses="Responses of /v2/chat by status (200 includes sealed refusals)",
    streams_dropped=(
        "v2 streams dropped under a router that stopped reading: write_stall or deadline"
    ),
    circuit_state="Circuit breaker state of the model server: 0 closed, 1 half-open, 2 open",
    backend_healthy="Whether the gate's last health probe of the model server succeeded",
    upstream_retries="Plaintext calls to the model server tried again",
)


class GateMetrics(TerminateMetricSet):
    """Every gate metric, registered in ``registry`` (the daemon's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "inference_gate", _HELP)
        self.refusals = Counter(
            "inference_gate_refusals",
            "v2 requests refused by the gate, by code (plain before opening, sealed after)",
            ["reason"],
            registry=registry,
        )
