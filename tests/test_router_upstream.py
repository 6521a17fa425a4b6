"""Upstreams: circuit breaker, health probes, round-robin, retries and failover, timeouts.

Backends here are the fault-injecting fake of ``router_support`` on real UNIX sockets (they die
mid-stream, answer 500 or hang on demand); the real inference daemon's failover is covered in
``test_router_e2e``.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from llmrouter.chat import ChatRequest
from llmrouter.router.metrics import RouterMetrics
from llmrouter.terminate.backends import BackendPool
from llmrouter.terminate.breaker import CircuitBreaker
from llmrouter.terminate.upstream import ChatCall
from tests.router_support import Script, short_tempdir, start_fault_backend, test_settings


class BreakerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.states: list[int] = []
        self.breaker = CircuitBreaker(self.clock, 3, 10.0, self.states.append)

    def test_opens_after_threshold_consecutive_failures(self) -> None:
        b = self.breaker
        b.failure()
        b.failure()
        b.success()  # resets the count
        b.failure()
        b.failure()
        self.assertTrue(b.acquire())
        b.failure()
        self.assertEqual(b.state, CircuitBreaker.OPEN)
        self.assertFalse(b.acquire())
        self.assertEqual(self.states, [CircuitBreaker.OPEN])

    def test_half_open_allows_one_trial(self) -> None:
        b = self.breaker
        for _ in range(3):
            b.failure()
        self.clock.advance(9.9)
        self.assertFalse(b.available())
        self.clock.advance(0.1)
        self.assertTrue(b.acquire())
        self.assertEqual(b.state, CircuitBreaker.HALF_OPEN)
        self.assertFalse(b.acquire())  # only one trial at a time
        b.success()
        self.assertEqual(b.state, CircuitBreaker.CLOSED)
        self.assertEqual(
            self.states, [CircuitBreaker.OPEN, CircuitBreaker.HALF_OPEN, CircuitBreaker.CLOSED]
        )

    def test_failed_trial_reopens(self) -> None:
        b = self.breaker
        for _ in range(3):
            b.failure()
        self.clock.advance(10)
        self.assertTrue(b.acquire())
        b.failure()
        self.assertEqual(b.state, CircuitBreaker.OPEN)
        self.assertFalse(b.acquire())
        self.clock.advance(10)
        self.assertTrue(b.acquire())

    def test_released_trial_can_be_retaken(self) -> None:
        b = self.breaker
        for _ in range(3):
            b.failure()
        self.clock.advance(10)
        self.assertTrue(b.acquire())
        b.release()
        self.assertTrue(b.acquire())


class Sink:
    """Records what a ChatCall delivers."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.items: list[tuple[Any, ...]] = []  # everything, in order
        self.detail: Any = None
        self.result: defer.Deferred[tuple[str, Any]] = defer.Deferred()

    def token(self, text: str, logprobs: Any = None) -> None:
        self.tokens.append(text)
        self.items.append(("token", text, logprobs))

    def reasoning(self, text: str, logprobs: Any = None) -> None:
        self.items.append(("reasoning", text, logprobs))

    def tool_call(self, index: int, id: str | None, name: str | None, arguments: str) -> None:
        self.items.append(("tool_call", index, id, name, arguments))

    def progress(self) -> None:
        self.items.append(("progress",))

    # Fired on the next reactor turn, so the HTTP client finishes its bookkeeping (returning the
    # connection to the keep-alive pool) before the test ends and closes the pool.

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        result = ("done", (finish_reason, prompt_tokens, completion_tokens))
        reactor.callLater(0, self.result.callback, result)

    def failed(self, code: str, message: str, status: int, detail: Any = None) -> None:
        self.detail = detail
        reactor.callLater(0, self.result.callback, ("failed", (code, status)))


BODY = ChatRequest.from_prompt("hi")


class CallTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def pool(self, scripts: list[Script], **changes: Any) -> Any:
        backends, urls = [], []
        for script in scripts:
            backend, url = yield start_fault_backend(self, script)
            backends.append(backend)
            urls.append(url)
        settings = test_settings(short_tempdir(self), urls, **changes)
        metrics = RouterMetrics()
        pool = BackendPool.from_settings(reactor, reactor, settings, metrics)
        self.addCleanup(pool.stop)
        for b in pool.backends:
            healthy = yield pool.probe(b)
            self.assertTrue(healthy)
        return backends, pool, settings, metrics

    def call(
        self, pool: BackendPool, settings: Any, metrics: RouterMetrics
    ) -> tuple[ChatCall, Sink]:
        sink = Sink()
        call = ChatCall(
            reactor,
            pool,
            settings,
            metrics,
            BODY,
            sink,
            deadline=reactor.seconds() + settings.request_ttl_seconds,
            rng=random.Random(1),
        )
        call.start()
        return call, sink

    @defer.inlineCallbacks
    def test_streams_tokens_and_usage(self) -> Any:
        (fake,), pool, settings, metrics = yield self.pool([Script(tokens=4)])
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual(kind, "done")
        self.assertEqual(args, ("stop", 3, 4))
        self.assertEqual(sink.tokens, ["tok0 ", "tok1 ", "tok2 ", "tok3 "])
        self.assertEqual(fake.log.bodies, [BODY.to_openai()])

    @defer.inlineCallbacks
    def test_round_robin(self) -> Any:
        (a, b), pool, settings, metrics = yield self.pool([Script(tokens=1), Script(tokens=1)])
        for _ in range(4):
            _, sink = self.call(pool, settings, metrics)
            yield sink.result
        self.assertEqual((a.log.requests, b.log.requests), (2, 2))

    @defer.inlineCallbacks
    def test_retry_on_other_backend_before_first_token(self) -> Any:
        (bad, good), pool, settings, metrics = yield self.pool(
            [Script(die_after=0), Script(tokens=3)]
        )
        _, sink = self.call(pool, settings, metrics)
        kind, _args = yield sink.result
        self.assertEqual(kind, "done")
        self.assertEqual(len(sink.tokens), 3)
        self.assertEqual((bad.log.requests, good.log.requests), (1, 1))
        self.assertEqual(metrics.upstream_retries.labels("backend-0")._value.get(), 1)

    @defer.inlineCallbacks
    def test_500_is_retried(self) -> Any:
        (bad, good), pool, settings, metrics = yield self.pool(
            [Script(status=500), Script(tokens=2)]
        )
        _, sink = self.call(pool, settings, metrics)
        kind, _ = yield sink.result
        self.assertEqual(kind, "done")
        self.assertEqual((bad.log.requests, good.log.requests), (1, 1))

    @defer.inlineCallbacks
    def test_400_is_not_retried(self) -> Any:
        (bad, good), pool, settings, metrics = yield self.pool(
            [
                Script(status=400, error_body=b'{"error": {"code": "bad_schema", "message": "q"}}'),
                Script(tokens=2),
            ]
        )
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        # the backend's refusal, by its error code (never its message, which may quote the request)
        self.assertEqual((kind, args), ("failed", ("upstream_refused", 400)))
        self.assertEqual(sink.detail, {"upstream_status": 400, "upstream_code": "bad_schema"})
        self.assertEqual((bad.log.requests, good.log.requests), (1, 0))
        self.assertEqual(pool.backends[0].breaker.state, CircuitBreaker.CLOSED)

    @defer.inlineCallbacks
    def test_no_retry_after_first_token(self) -> Any:
        (first, second), pool, settings, metrics = yield self.pool(
            [Script(tokens=10, die_after=2), Script(tokens=3)]
        )
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual((kind, args), ("failed", ("upstream_failed", 502)))
        self.assertEqual(sink.tokens, ["tok0 ", "tok1 "])
        self.assertEqual((first.log.requests, second.log.requests), (1, 0))

    @defer.inlineCallbacks
    def test_retries_exhausted(self) -> Any:
        (a, b), pool, settings, metrics = yield self.pool(
            [Script(status=500), Script(status=500)], retry_max=2
        )
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual((kind, args), ("failed", ("upstream_failed", 502)))
        self.assertEqual(a.log.requests + b.log.requests, 3)

    @defer.inlineCallbacks
    def test_breaker_opens_and_traffic_moves(self) -> Any:
        (bad, good), pool, settings, metrics = yield self.pool(
            [Script(status=500), Script(tokens=1)],
            circuit_breaker_threshold=2,
            circuit_reset_seconds=3600,
        )
        for _ in range(6):
            _, sink = self.call(pool, settings, metrics)
            kind, _ = yield sink.result
            self.assertEqual(kind, "done")
        self.assertEqual(bad.log.requests, 2)  # then its circuit is open
        self.assertEqual(pool.backends[0].breaker.state, CircuitBreaker.OPEN)
        self.assertEqual(metrics.circuit_state.labels("backend-0")._value.get(), 2)
        self.assertEqual(good.log.requests, 6)

    @defer.inlineCallbacks
    def test_first_token_timeout_then_failover(self) -> Any:
        (hung, _good), pool, settings, metrics = yield self.pool(
            [Script(hang=True), Script(tokens=2)], first_token_timeout_seconds=0.2
        )
        _, sink = self.call(pool, settings, metrics)
        kind, _ = yield sink.result
        self.assertEqual(kind, "done")
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(hung.log.cancelled, 1)  # the hung attempt's connection was closed

    @defer.inlineCallbacks
    def test_idle_timeout_after_first_token(self) -> Any:
        (slow,), pool, settings, metrics = yield self.pool(
            [Script(tokens=3, token_delay=1.0)], idle_timeout_seconds=0.2
        )
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual((kind, args), ("failed", ("timeout", 504)))
        self.assertEqual(len(sink.tokens), 1)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(slow.log.cancelled, 1)

    @defer.inlineCallbacks
    def test_total_budget(self) -> Any:
        (slow,), pool, settings, metrics = yield self.pool(
            [Script(tokens=50, token_delay=0.05)], request_ttl_seconds=0.3
        )
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual((kind, args), ("failed", ("timeout", 504)))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(slow.log.cancelled, 1)

    @defer.inlineCallbacks
    def test_cancel_closes_upstream(self) -> Any:
        (slow,), pool, settings, metrics = yield self.pool([Script(tokens=50, token_delay=0.05)])
        call, sink = self.call(pool, settings, metrics)
        while not sink.tokens:
            yield deferLater(reactor, 0.01, lambda: None)
        call.cancel()
        while not slow.log.cancelled:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(sink.result.called)  # the client is gone: nothing more to tell it
        self.assertEqual(slow.log.completed, 0)

    @defer.inlineCallbacks
    def test_no_backend(self) -> Any:
        (fake,), pool, settings, metrics = yield self.pool([Script()])
        fake.healthy = False
        healthy = yield pool.probe(pool.backends[0])
        self.assertFalse(healthy)
        self.assertFalse(pool.ready())
        self.assertEqual(metrics.backend_healthy.labels("backend-0")._value.get(), 0)
        _, sink = self.call(pool, settings, metrics)
        kind, args = yield sink.result
        self.assertEqual((kind, args), ("failed", ("no_backend", 503)))
        fake.healthy = True
        healthy = yield pool.probe(pool.backends[0])
        self.assertTrue(healthy)
        self.assertTrue(pool.ready())

    @defer.inlineCallbacks
    def test_periodic_probes_use_the_clock(self) -> Any:
        backend, url = yield start_fault_backend(self, Script())
        settings = test_settings(short_tempdir(self), [url], health_interval_seconds=5)
        clock = Clock()
        pool = BackendPool.from_settings(reactor, clock, settings, RouterMetrics())
        pool.start()
        self.addCleanup(pool.stop)
        while not pool.ready():
            yield deferLater(reactor, 0.01, lambda: None)
        backend.healthy = False
        clock.advance(5)
        while pool.ready():
            yield deferLater(reactor, 0.01, lambda: None)
        backend.healthy = True
        clock.advance(5)
        while not pool.ready():
            yield deferLater(reactor, 0.01, lambda: None)


class ProbeAndBackoffTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_models_route_is_the_health_fallback(self) -> Any:
        backend, url = yield start_fault_backend(self, Script())
        backend.has_health_route = False
        settings = test_settings(short_tempdir(self), [url])
        pool = BackendPool.from_settings(reactor, reactor, settings, RouterMetrics())
        self.addCleanup(pool.stop)
        healthy = yield pool.probe(pool.backends[0])
        self.assertTrue(healthy)
        backend.healthy = False
        healthy = yield pool.probe(pool.backends[0])
        self.assertFalse(healthy)

    @defer.inlineCallbacks
    def test_retry_waits_for_the_jittered_backoff(self) -> Any:
        first, url0 = yield start_fault_backend(self, Script(status=500))
        second, url1 = yield start_fault_backend(self, Script(tokens=1))
        settings = test_settings(
            short_tempdir(self),
            [url0, url1],
            retry_backoff_seconds=1.0,
            retry_backoff_max_seconds=8.0,
        )
        clock = Clock()
        metrics = RouterMetrics()
        pool = BackendPool.from_settings(reactor, clock, settings, metrics)
        self.addCleanup(pool.stop)
        for b in pool.backends:
            yield pool.probe(b)
        sink = Sink()
        call = ChatCall(clock, pool, settings, metrics, BODY, sink, deadline=100.0)
        call.start()
        while first.log.requests < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(second.log.requests, 0)  # not before the backoff...
        clock.advance(0.49)  # jitter keeps the first delay within [0.5, 1.0] s
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(second.log.requests, 0)
        clock.advance(0.51)  # ...and no later than its cap
        kind, _ = yield sink.result
        self.assertEqual(kind, "done")
        self.assertEqual(second.log.requests, 1)
