"""RateLimiter: sliding window with burst on the injected clock, exact Retry-After, bounded keys."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmrouter.router.ratelimit import RateLimiter


class RateLimiterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def test_burst_then_retry_after(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=60, burst=5)
        for _ in range(5):
            self.assertIsNone(limiter.check("203.0.113.7"))
        retry = limiter.check("203.0.113.7")
        self.assertIsNotNone(retry)
        self.assertAlmostEqual(retry or 0.0, 1.0)
        # A denied request is not counted: waiting exactly Retry-After lets the next one in.
        self.clock.advance(0.5)
        self.assertAlmostEqual(limiter.check("203.0.113.7") or 0.0, 0.5)
        self.clock.advance(0.5)
        self.assertIsNone(limiter.check("203.0.113.7"))
        self.assertIsNotNone(limiter.check("203.0.113.7"))

    def test_keys_are_independent(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=6, burst=1)
        self.assertIsNone(limiter.check("a"))
        self.assertAlmostEqual(limiter.check("a") or 0.0, 10.0)
        self.assertIsNone(limiter.check(b"a"))  # bytes and str keys are distinct keys
        self.assertIsNone(limiter.check(b"\x01" * 32))
        self.assertIsNotNone(limiter.check(bytearray(b"\x01" * 32)))

    def test_sustained_rate_over_any_window(self) -> None:
        # Over any trailing interval t at most burst + rate * t requests get through.
        limiter = RateLimiter(self.clock, per_minute=120, burst=10)
        allowed_at: list[float] = []
        for _ in range(6000):  # hammer every 0.05 s for 300 s
            if limiter.check("k") is None:
                allowed_at.append(self.clock.seconds())
            self.clock.advance(0.05)
        self.assertEqual(len(allowed_at), 10 + 2 * 300 - 1)
        for window in (1.0, 10.0, 60.0):
            j = 0
            for i, start in enumerate(allowed_at):
                while j < len(allowed_at) and allowed_at[j] < start + window:
                    j += 1
                self.assertLessEqual(j - i, 10 + 2 * window + 1e-9)

    def test_idle_key_recovers_its_full_burst(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=60, burst=3)
        for _ in range(3):
            limiter.check("k")
        self.assertIsNotNone(limiter.check("k"))
        self.clock.advance(3)
        for _ in range(3):
            self.assertIsNone(limiter.check("k"))
        self.assertIsNotNone(limiter.check("k"))

    def test_bounded_keys_evict_idle_before_active(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=6, burst=2, max_keys=3)  # one per 10 s
        limiter.check("active-old")
        limiter.check("active-old")  # limited until +10 s, full again at +20 s; least recent
        self.clock.advance(1)
        limiter.check("idle")  # full again at +11 s
        self.clock.advance(11)
        limiter.check("fresh")
        self.assertEqual(len(limiter), 3)
        limiter.check("newcomer")
        self.assertEqual(len(limiter), 3)
        self.assertEqual((limiter.evicted_idle, limiter.evicted_active), (1, 0))
        self.assertNotIn("idle", limiter._tat)
        # "active-old" kept its state: one request recovered since, the second is limited.
        self.assertIsNone(limiter.check("active-old"))
        self.assertIsNotNone(limiter.check("active-old"))

    def test_evicts_least_recent_active_key_when_none_is_idle(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=1, burst=1, max_keys=2)
        limiter.check("a")
        limiter.check("b")
        limiter.check("c")
        self.assertEqual((limiter.evicted_idle, limiter.evicted_active), (0, 1))
        self.assertEqual(sorted(limiter._tat), ["b", "c"])

    def test_memory_bounded_under_address_rotation(self) -> None:
        limiter = RateLimiter(self.clock, per_minute=60, burst=1, max_keys=100)
        for i in range(5000):
            self.assertIsNone(limiter.check(f"10.0.{i // 256}.{i % 256}"))
            self.assertLessEqual(len(limiter), 100)
        self.assertEqual(limiter.evicted_idle + limiter.evicted_active, 4900)

    def test_rejects_bad_settings(self) -> None:
        self.assertRaises(ValueError, RateLimiter, self.clock, 0, 1)
        self.assertRaises(ValueError, RateLimiter, self.clock, 60, 0)
        self.assertRaises(ValueError, RateLimiter, self.clock, 60, 1, max_keys=0)


class RateLimiterPropertyTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        per_minute=st.floats(min_value=1, max_value=600),
        burst=st.integers(min_value=1, max_value=20),
        gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=200),
    )
    def test_never_more_than_burst_plus_rate_in_any_window(
        self, per_minute: float, burst: int, gaps: list[float]
    ) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, per_minute=per_minute, burst=burst)
        allowed: list[float] = []
        for gap in gaps:
            clock.advance(gap)
            retry = limiter.check("k")
            if retry is None:
                allowed.append(clock.seconds())
                continue
            self.assertGreater(retry, 0)
        rate = per_minute / 60
        for i in range(len(allowed)):
            for j in range(i, len(allowed)):
                span = allowed[j] - allowed[i]
                self.assertLessEqual(j - i + 1, burst + rate * (span + 1e-6) + 1e-9)

    @settings(max_examples=200, deadline=None)
    @given(
        burst=st.integers(min_value=1, max_value=10),
        extra=st.integers(min_value=1, max_value=5),
    )
    def test_retry_after_is_exact(self, burst: int, extra: int) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, per_minute=60, burst=burst)
        for _ in range(burst):
            self.assertIsNone(limiter.check("k"))
        for _ in range(extra):
            retry = limiter.check("k")
            assert retry is not None
            clock.advance(retry - 1e-3)
            self.assertIsNotNone(limiter.check("k"))
            clock.advance(1e-3)
            self.assertIsNone(limiter.check("k"))
