"""Periodic health probes: a round every ``interval`` seconds, each probe bounded in time.

The router probes its backends for health (:class:`llmrouter.terminate.backends.BackendPool`,
which a node's gate uses too) and for their v2 keys (:class:`llmrouter.router.nodes.NodePool`);
each decides what one probe asks and what its answer means, and :class:`Probing` runs them: the
first round at :meth:`Probing.start`, the rounds after on the clock, a probe still waiting after
``timeout`` seconds cancelled, and on :meth:`Probing.stop` no timer left and nothing in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Probing"]

_T = TypeVar("_T")


class Probing:
    """Runs ``probe_round`` (which starts one probe per target and returns them) every
    ``interval`` seconds; ``first_round`` fires once every probe of the first round is done."""

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        probe_round: Callable[[], Sequence[Deferred[Any]]],
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._probe_round = probe_round
        self._timer: IDelayedCall | None = None
        self._in_flight: list[Deferred[Any]] = []
        self.first_round: Deferred[None] = Deferred()

    def start(self) -> None:
        self._tick()

    def stop(self) -> Deferred[None]:
        """No more rounds, and the probes in flight cancelled; fires when they are done."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in list(self._in_flight):
            d.cancel()
        return gatherResults(list(self._in_flight), consumeErrors=True).addBoth(lambda _: None)

    def timed(self, probe: Deferred[_T]) -> Deferred[_T]:
        """``probe``, cancelled if it has not answered within the timeout."""
        timer = self._clock.callLater(self._timeout, probe.cancel)

        def answered(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return probe.addBoth(answered)

    def _tick(self) -> None:
        self._timer = None
        probes = list(self._probe_round())
        for probe in probes:
            self._track(probe)
        if not self.first_round.called:
            gatherResults(probes, consumeErrors=True).addBoth(self._first_round_done)
        self._timer = self._clock.callLater(self._interval, self._tick)

    def _first_round_done(self, result: object) -> None:
        if not self.first_round.called:
            self.first_round.callback(None)

    def _track(self, d: Deferred[Any]) -> None:
        self._in_flight.append(d)

        def untrack(result: object) -> None:  # the probe's own callbacks handled its result
            self._in_flight.remove(d)

        d.addBoth(untrack)
