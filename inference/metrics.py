"""Prometheus metrics of the inference daemon, in a registry of its own.

Names are a contract with alerts and dashboards. The only label is ``outcome`` from a fixed set;
nothing derived from a request ever becomes a label.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "cancelled", "rejected", "invalid", "error", "timeout")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tokens = Counter(
            "inference_tokens_generated",
            "Completion tokens sampled.",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "inference_time_to_first_token_seconds",
            "From request arrival to the first completion text.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "inference_token_latency_seconds",
            "Time between successive completion texts of one stream.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth",
            "Generations waiting for a slot.",
            registry=self.registry,
        )
        self.active = Gauge(
            "inference_active_generations",
            "Generations holding a slot.",
            registry=self.registry,
        )
        self.requests = Counter(
            "inference_requests",
            "Generation requests by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.prompt_tokens = Counter(
            "inference_prompt_tokens",
            "Prompt tokens decoded (not counting those reused from the prompt cache).",
            registry=self.registry,
        )
        self.prompt_tokens_reused = Counter(
            "inference_prompt_tokens_reused",
            "Prompt tokens whose KV cache was reused from an earlier request with the same"
            " cache key.",
            registry=self.registry,
        )
        self.cached_slots = Gauge(
            "inference_cached_slots",
            "Idle slots holding a reusable prompt cache.",
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "inference_model_loaded",
            "1 once the model is loaded.",
            registry=self.registry,
        )
        self.gpu_layers_requested = Gauge(
            "inference_gpu_layers_requested",
            "Layers INFERENCE_GPU_LAYERS asks to offload to a GPU (once the model is loaded;"
            " -1 counts as every layer).",
            registry=self.registry,
        )
        self.gpu_layers_offloaded = Gauge(
            "inference_gpu_layers_offloaded",
            "Layers offloaded to a GPU; below inference_gpu_layers_requested, the model runs"
            " (partly) on the CPU.",
            registry=self.registry,
        )
        self._certificate_expiry: Gauge | None = None

    def server_certificate_expiry(self, not_after: float) -> None:
        """Export when the loaded server certificate of the ssl: listener expires (only daemons
        with one: a 0 would look like an expired certificate)."""
        if self._certificate_expiry is None:
            self._certificate_expiry = Gauge(
                "inference_server_certificate_expiry_timestamp_seconds",
                "Unix time when the loaded server certificate of the ssl: listener expires",
                registry=self.registry,
            )
        self._certificate_expiry.set(not_after)

    def watch(
        self,
        active: Callable[[], float],
        waiting: Callable[[], float],
        cached: Callable[[], float] = lambda: 0,
    ) -> None:
        """Read the gauges from the scheduler at scrape time."""
        self.active.set_function(active)
        self.queue_depth.set_function(waiting)
        self.cached_slots.set_function(cached)

    def count_prompt(self, decoded: int, reused: int) -> None:
        """Called by the engine (any thread) for each admitted generation."""
        self.prompt_tokens.inc(decoded)
        self.prompt_tokens_reused.inc(reused)

    def outcome(self, name: str) -> None:
        assert name in OUTCOMES
        self.requests.labels(outcome=name).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
