"""A circuit breaker per backend, so a failing backend stops taking requests for a while."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures; after ``reset_seconds`` one trial
    request goes through (half-open): success closes the circuit, failure opens it again."""

    CLOSED, HALF_OPEN, OPEN = 0, 1, 2

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int,
        reset_seconds: float,
        on_change: Callable[[int], None] = lambda state: None,
    ) -> None:
        self._clock = clock
        self._threshold = threshold
        self._reset = reset_seconds
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False
        self.state = self.CLOSED

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def _refresh(self) -> None:
        if self.state == self.OPEN and self._clock.seconds() - self._opened_at >= self._reset:
            self._set(self.HALF_OPEN)
            self._trial = False

    def available(self) -> bool:
        """Could a request go through now? (Does not claim the half-open trial.)"""
        self._refresh()
        return self.state == self.CLOSED or (self.state == self.HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """Claim permission for one request (the single trial when half-open)."""
        if not self.available():
            return False
        if self.state == self.HALF_OPEN:
            self._trial = True
        return True

    def release(self) -> None:
        """The request ended without a verdict (e.g. the client left): free the trial slot."""
        self._trial = False

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        self._set(self.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        self._trial = False
        if self.state == self.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = self._clock.seconds()
            self._set(self.OPEN)
