"""ReplayCache: expiry on the injected clock, bounded memory, never evicting a live entry."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmrouter.replay import ReplayCache


class ReplayCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def test_seen_after_record_until_the_window_ends(self) -> None:
        cache = ReplayCache(self.clock, window_seconds=150)
        enc = os.urandom(32)
        self.assertFalse(cache.seen(enc))
        self.assertTrue(cache.record(enc))
        self.assertTrue(cache.seen(enc))
        self.assertFalse(cache.seen(os.urandom(32)))
        self.clock.advance(149.9)
        self.assertTrue(cache.seen(enc))
        self.clock.advance(0.1)
        self.assertFalse(cache.seen(enc))
        self.assertEqual(len(cache), 0)

    def test_checking_does_not_record(self) -> None:
        cache = ReplayCache(self.clock)
        enc = os.urandom(32)
        cache.seen(enc)
        self.assertEqual(len(cache), 0)

    def test_full_cache_refuses_and_keeps_every_live_entry(self) -> None:
        cache = ReplayCache(self.clock, window_seconds=100, max_entries=3)
        live = [os.urandom(32) for _ in range(3)]
        for i, enc in enumerate(live):
            self.assertTrue(cache.record(enc))
            self.clock.advance(10 * (i + 1))
        newcomer = os.urandom(32)
        self.assertFalse(cache.record(newcomer))
        self.assertEqual(cache.refused, 1)
        self.assertFalse(cache.seen(newcomer))
        for enc in live:
            self.assertTrue(cache.seen(enc), "a live entry was evicted")
        # The first entry (recorded at t0) expires at t0 + 100; clock is at t0 + 60.
        self.clock.advance(40)
        self.assertFalse(cache.seen(live[0]))
        self.assertTrue(cache.record(newcomer))
        self.assertTrue(cache.seen(newcomer))
        self.assertTrue(cache.seen(live[1]))
        self.assertEqual(len(cache), 3)

    def test_memory_stays_bounded_under_a_flood(self) -> None:
        cache = ReplayCache(self.clock, window_seconds=10, max_entries=1000)
        accepted = 0
        for _ in range(50):
            for _ in range(100):
                accepted += cache.record(os.urandom(32))
                self.assertLessEqual(len(cache), 1000)
            self.clock.advance(1)
        # 100 per second over a 10 s window fits exactly: nothing is refused.
        self.assertEqual(accepted, 5000)
        self.assertEqual(len(cache), 1000)
        self.clock.advance(10)
        self.assertFalse(cache.seen(b"x" * 32))
        self.assertEqual(len(cache), 0)

    def test_recording_twice_keeps_the_first_expiry(self) -> None:
        cache = ReplayCache(self.clock, window_seconds=100)
        enc = os.urandom(32)
        cache.record(enc)
        self.clock.advance(60)
        self.assertTrue(cache.record(enc))
        self.clock.advance(40)
        self.assertFalse(cache.seen(enc))

    def test_accepts_buffers(self) -> None:
        cache = ReplayCache(self.clock)
        enc = os.urandom(32)
        cache.record(bytearray(enc))
        self.assertTrue(cache.seen(memoryview(enc)))

    def test_rejects_bad_settings(self) -> None:
        self.assertRaises(ValueError, ReplayCache, self.clock, window_seconds=0)
        self.assertRaises(ValueError, ReplayCache, self.clock, max_entries=0)


class ReplayCacheModelTests(unittest.TestCase):
    """Against a naive model: a dict of every recorded enc and when it was recorded."""

    @settings(max_examples=200, deadline=None)
    @given(
        max_entries=st.integers(min_value=1, max_value=8),
        ops=st.lists(
            st.tuples(
                st.sampled_from(["seen", "record", "wait"]),
                st.integers(min_value=0, max_value=11),
                st.floats(min_value=0, max_value=40),
            ),
            max_size=120,
        ),
    )
    def test_matches_model(self, max_entries: int, ops: list[tuple[str, int, float]]) -> None:
        clock = Clock()
        window = 30.0
        cache = ReplayCache(clock, window_seconds=window, max_entries=max_entries)
        recorded: dict[bytes, float] = {}

        def live() -> dict[bytes, float]:
            now = clock.seconds()
            return {e: t for e, t in recorded.items() if t + window > now}

        for op, n, wait in ops:
            enc = n.to_bytes(32, "big")
            if op == "wait":
                clock.advance(wait)
            elif op == "seen":
                self.assertEqual(cache.seen(enc), enc in live())
            else:
                current = live()
                ok = cache.record(enc)
                if enc in current:
                    self.assertTrue(ok)
                elif len(current) >= max_entries:
                    self.assertFalse(ok)  # full: refused, nothing live evicted
                else:
                    self.assertTrue(ok)
                    recorded[enc] = clock.seconds()
            self.assertLessEqual(len(cache), max_entries)
            for enc in live():
                self.assertTrue(cache.seen(enc), "a live entry was lost")
