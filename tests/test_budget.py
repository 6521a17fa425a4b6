"""PrivacyBudget: epsilon accounting per device, replenishment per period, bounded memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmrouter.router.budget import PrivacyBudget

DEVICE = b"\x11" * 32
OTHER = b"\x22" * 32


class PrivacyBudgetTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def test_defaults_allow_exactly_one_hundred_queries(self) -> None:
        budget = PrivacyBudget(self.clock)  # 10.0 total, 0.1 per query
        for i in range(100):
            self.assertTrue(budget.charge(DEVICE), f"query {i} refused")
        self.assertFalse(budget.charge(DEVICE))
        self.assertEqual(budget.remaining(DEVICE), 0.0)
        self.assertEqual(budget.remaining(OTHER), 10.0)
        self.assertTrue(budget.charge(OTHER))

    def test_refused_charge_spends_nothing(self) -> None:
        budget = PrivacyBudget(self.clock, epsilon_total=1.0, epsilon_per_query=0.4)
        self.assertTrue(budget.charge(DEVICE))
        self.assertTrue(budget.charge(DEVICE))
        self.assertAlmostEqual(budget.remaining(DEVICE), 0.2)
        self.assertFalse(budget.charge(DEVICE))
        self.assertAlmostEqual(budget.remaining(DEVICE), 0.2)
        self.assertTrue(budget.charge(DEVICE, epsilon=0.2))
        self.assertEqual(budget.remaining(DEVICE), 0.0)

    def test_replenished_after_the_period(self) -> None:
        budget = PrivacyBudget(
            self.clock, epsilon_total=0.3, epsilon_per_query=0.1, period_seconds=3600
        )
        for _ in range(3):
            self.assertTrue(budget.charge(DEVICE))
        self.assertFalse(budget.charge(DEVICE))
        self.clock.advance(1800)
        self.assertFalse(budget.charge(DEVICE))
        self.assertAlmostEqual(budget.replenishes_in(DEVICE), 1800)
        self.clock.advance(1799.9)
        self.assertFalse(budget.charge(DEVICE))
        self.clock.advance(0.1)
        self.assertAlmostEqual(budget.remaining(DEVICE), 0.3)
        self.assertEqual(budget.replenishes_in(DEVICE), 0.0)
        self.assertTrue(budget.charge(DEVICE))
        # A new period began with that charge.
        self.assertAlmostEqual(budget.replenishes_in(DEVICE), 3600)

    def test_full_table_never_refuses_a_new_device(self) -> None:
        """A full table refused every new device for a whole period: fresh keys at a dozen
        requests per second locked everyone new out for a day (issue 8). Now the account
        closest to replenishing (the oldest period) makes room, and that is counted."""
        budget = PrivacyBudget(
            self.clock, epsilon_total=1.0, epsilon_per_query=1.0, period_seconds=100, max_devices=2
        )
        self.assertTrue(budget.charge(b"a"))
        self.clock.advance(10)
        self.assertTrue(budget.charge(b"b"))
        self.assertTrue(budget.charge(b"c"))  # a (period started first) is forgotten
        self.assertEqual((budget.evicted_live, len(budget)), (1, 2))
        self.assertFalse(budget.charge(b"b"), "b's spent budget was forgotten instead of a's")
        self.assertFalse(budget.charge(b"c"))
        self.clock.advance(100)  # b's and c's periods are over: room without evicting
        self.assertTrue(budget.charge(b"d"))
        self.assertEqual((budget.evicted_live, len(budget)), (1, 1))

    def test_memory_bounded_under_device_churn(self) -> None:
        budget = PrivacyBudget(self.clock, period_seconds=10, max_devices=50)
        accepted = 0
        for i in range(1000):
            accepted += budget.charge(i.to_bytes(32, "big"))
            self.assertLessEqual(len(budget), 50)
            self.clock.advance(0.2)  # 50 new devices per period: exactly fits
        self.assertEqual(accepted, 1000)

    def test_rejects_bad_settings(self) -> None:
        self.assertRaises(ValueError, PrivacyBudget, self.clock, epsilon_total=0)
        self.assertRaises(ValueError, PrivacyBudget, self.clock, epsilon_per_query=-1)
        self.assertRaises(ValueError, PrivacyBudget, self.clock, period_seconds=0)
        self.assertRaises(ValueError, PrivacyBudget, self.clock, max_devices=0)
        budget = PrivacyBudget(self.clock)
        self.assertRaises(ValueError, budget.charge, DEVICE, -0.1)


class PrivacyBudgetModelTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        ops=st.lists(
            st.tuples(st.integers(min_value=0, max_value=3), st.floats(min_value=0, max_value=60)),
            max_size=150,
        )
    )
    def test_never_more_than_the_budget_per_period(self, ops: list[tuple[int, float]]) -> None:
        clock = Clock()
        period = 100.0
        budget = PrivacyBudget(
            clock, epsilon_total=1.0, epsilon_per_query=0.25, period_seconds=period, max_devices=4
        )
        charged: dict[int, list[float]] = {}
        for device, wait in ops:
            clock.advance(wait)
            if budget.charge(bytes([device])):
                charged.setdefault(device, []).append(clock.seconds())
            self.assertLessEqual(len(budget), 4)
        for times in charged.values():
            # A period starts at the first charge after the previous one ended; each allows
            # 1.0 / 0.25 = 4 charges.
            anchor = None
            count = 0
            for t in times:
                if anchor is None or t >= anchor + period:
                    anchor, count = t, 0
                count += 1
                self.assertLessEqual(count, 4)
