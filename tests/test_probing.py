"""The probe rounds that the backend pool (health) and the node pool (v2 keys) run: on a fake
clock, with probes that answer when the test says (tests/test_router_upstream.py and
tests/test_v2_e2e.py probe real daemons)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmrouter.probing import Probing


class ProbingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rounds: list[list[Deferred[str]]] = []
        self.cancelled: list[str] = []
        self.outcomes: list[object] = []
        self.probing = Probing(self.clock, 5.0, 2.0, self.round)

    def round(self) -> list[Deferred[Any]]:
        probes = [self.probing.timed(self.probe(name)) for name in ("a", "b")]
        self.rounds.append(probes)
        for probe in probes:  # what a pool does with the answer
            probe.addBoth(self.outcomes.append)
        return probes

    def probe(self, name: str) -> Deferred[str]:
        def cancelled(d: Deferred[str]) -> None:
            self.cancelled.append(name)

        return Deferred(cancelled)

    def test_rounds_on_the_clock(self) -> None:
        self.probing.start()
        self.assertEqual(len(self.rounds), 1)
        for probe in self.rounds[0]:
            probe.callback("up")
        self.clock.advance(4.9)
        self.assertEqual(len(self.rounds), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.rounds), 2)
        self.assertEqual(self.cancelled, [])

    def test_first_round_fires_when_every_probe_answered(self) -> None:
        self.probing.start()
        first, second = self.rounds[0]
        first.callback("up")
        self.assertNoResult(self.probing.first_round)
        second.callback("up")
        self.assertIsNone(self.successResultOf(self.probing.first_round))

    def test_a_probe_that_does_not_answer_is_cancelled(self) -> None:
        self.probing.start()
        self.rounds[0][0].callback("up")
        self.clock.advance(1.9)
        self.assertEqual(self.cancelled, [])
        self.clock.advance(0.1)
        self.assertEqual(self.cancelled, ["b"])
        self.assertEqual(self.outcomes[0], "up")
        self.assertTrue(self.outcomes[1].check(CancelledError))  # type: ignore[attr-defined]
        self.assertIsNone(self.successResultOf(self.probing.first_round))

    def test_stop_leaves_no_timer_and_nothing_in_flight(self) -> None:
        self.probing.start()
        self.clock.advance(5.0)  # the second round is in flight, its timeouts armed
        stopped = self.probing.stop()
        self.assertEqual(sorted(self.cancelled), ["a", "a", "b", "b"])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(self.rounds), 2)
