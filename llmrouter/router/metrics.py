"""Prometheus metrics of the router, in a registry of their own, served on the metrics listener.

Label values are only ever fixed strings chosen by the code (status codes, error codes, configured
backend names), never anything a client sent. Names are contracts: alerts and dashboards use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmrouter.terminate.metrics import TerminateHelp, TerminateMetricSet

__all__ = ["CONTENT_TYPE", "MetricsResource", "RouterMetrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_STATE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)

_HELP = TerminateHelp(
    request_duration="End-to-end duration of chat requests, admission to final chunk",
    upstream_duration="Duration of upstream (router to inference) requests",
    ttft="Time from request arrival to the first token sent to the client",
    active_streams="Open client response streams",
    tokens_streamed="Tokens relayed to clients",
    http_responses="HTTP responses by status",
    streams_dropped=(
        "Client connections dropped by the router: write_stall (the client took no bytes"
        " for WRITE_STALL_SECONDS) or deadline (REQUEST_TTL_SECONDS ran out while the"
        " client was not reading)"
    ),
    circuit_state="Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
    backend_healthy="Whether the last health probe of a backend succeeded",
    upstream_retries="Upstream attempts retried on another (or the same) backend",
)


class _KeyCollector(Collector):
    """Key rotation count and current key age, read from the key store at scrape time."""

    def __init__(self, rotations: Callable[[], int], age: Callable[[], float]) -> None:
        self._rotations = rotations
        self._age = age

    def collect(self) -> Iterable[Metric]:
        rotations = CounterMetricFamily(
            "llmrouter_key_rotations", "HPKE key rotations since the router started"
        )
        rotations.add_metric([], float(self._rotations()))
        age = GaugeMetricFamily(
            "llmrouter_current_key_age_seconds", "Age of the current HPKE key in seconds"
        )
        age.add_metric([], self._age())
        return [rotations, age]


class RouterMetrics(TerminateMetricSet):
    """Every router metric; one instance per router (tests build their own)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        super().__init__(r, "llmrouter", _HELP)
        self.admission_rejections = Counter(
            "llmrouter_admission_rejections",
            "Requests rejected by admission, by error code",
            ["reason"],
            registry=r,
        )
        self.open_connections = Gauge(
            "llmrouter_open_connections", "Open client connections (public listeners)", registry=r
        )
        self.connections_dropped = Counter(
            "llmrouter_connections_dropped",
            "Client connections closed by the router before a response: read_timeout (the"
            " request did not arrive in REQUEST_READ_SECONDS), per_address"
            " (MAX_CONNECTIONS_PER_ADDRESS), shed (the longest-waiting one, to make room under"
            " MAX_CONNECTIONS), full (every connection busy streaming), idle (a kept-alive"
            " connection with no new request for 5 s)",
            ["reason"],
            registry=r,
        )
        self.security_events = Counter(
            "llmrouter_security_events", "Security events by name", ["event"], registry=r
        )
        self._key_collector: _KeyCollector | None = None
        self._certificate_expiry: Gauge | None = None

    def watch_keys(self, rotations: Callable[[], int], age: Callable[[], float]) -> None:
        if self._key_collector is not None:
            self.registry.unregister(self._key_collector)
        self._key_collector = _KeyCollector(rotations, age)
        self.registry.register(self._key_collector)

    def watch_state(self, up: Callable[[], bool]) -> None:
        """Export the shared state store's health: only routers with ``STATE_URL`` have one."""
        gauge = Gauge(
            "llmrouter_state_up",
            "Whether the router is connected to its shared state (Redis); admission refuses"
            " requests while it is not",
            registry=self.registry,
        )
        gauge.set_function(lambda: 1.0 if up() else 0.0)
        self.state_errors = Counter(
            "llmrouter_state_errors",
            "Shared state calls that failed (not connected, timeout, error), by operation:"
            " gate and commit refuse a request, release and renew leave a lease to expire",
            ["operation"],
            registry=self.registry,
        )
        self.state_seconds = Histogram(
            "llmrouter_state_seconds",
            "Round-trip time of shared state calls, by operation",
            ["operation"],
            buckets=_STATE_BUCKETS,
            registry=self.registry,
        )

    def client_certificate_expiry(self, not_after: float) -> None:
        """Export when the client certificate for https:// backends expires, as loaded at start
        (so a renewal that was not followed by a restart still alerts). Only routers with one
        export it: a 0 would look like an expired certificate."""
        if self._certificate_expiry is None:
            self._certificate_expiry = Gauge(
                "llmrouter_client_certificate_expiry_timestamp_seconds",
                "Unix time when the loaded client certificate for https:// backends expires",
                registry=self.registry,
            )
        self._certificate_expiry.set(not_after)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """``GET /metrics`` for the metrics listener only; anything else there is a 404."""

    isLeaf = True

    def __init__(self, metrics: RouterMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        return self._metrics.render()
