"""Expiring sets of values seen recently: the replay cache and spent proof-of-work solutions.

The replay cache holds which request ``enc`` values were accepted inside the replay window. Why
bounded and never evicting: evicting a live entry would let that request be replayed, so when the
cache is full :meth:`ReplayCache.record` refuses instead and the router sheds the request (503
``overloaded``). Only requests that passed the per-address limit and decrypted are recorded, so
junk cannot fill it, and an address (an IPv6 prefix) adds at most its rate limit's worth.

The window must cover the timestamp skew on both sides (2 x 60 s, checked by the settings): a
request is replayable for as long as its ``ts`` is still accepted. The default of 150 s leaves a
margin on top of that.

Spent solutions are checked proof-of-work headers: each buys one check, whatever comes after it.
They are kept as long as a challenge lives; when the set is full the oldest is forgotten (its
solution could then be used once more: one decapsulation, not a lockout of everyone).
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

__all__ = ["ExpiringSet", "ReplayCache", "SpentSolutions"]


class ExpiringSet:
    """Values remembered for ``ttl`` seconds, oldest first; memory bounded by ``max_entries``.

    Entries are kept in insertion order, which is expiry order while the clock does not go back,
    so expiring is popping from the front: O(1) amortised per call.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int) -> None:
        if ttl <= 0:
            raise ValueError("the time to live must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def _expire(self) -> float:
        now = self._clock.seconds()
        entries = self._expiry
        while entries:
            value, expiry = next(iter(entries.items()))
            if expiry > now:
                break
            del entries[value]
        return now

    def __contains__(self, value: bytes) -> bool:
        self._expire()
        return bytes(value) in self._expiry

    def add(self, value: bytes, evict: bool) -> bool | None:
        """Remember ``value``: True if added, False if already there, None if full (and not
        ``evict``: otherwise the oldest entry makes room)."""
        now = self._expire()
        key = bytes(value)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self.max_entries:
            if not evict:
                return None
            self._expiry.popitem(last=False)
        self._expiry[key] = now + self.ttl
        return True


class ReplayCache:
    """The ``enc`` values accepted inside the window (see the module docstring)."""

    def __init__(
        self, clock: IReactorTime, window_seconds: float = 150.0, max_entries: int = 1_000_000
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._set = ExpiringSet(clock, window_seconds, max_entries)
        self.window_seconds = self._set.ttl
        self.max_entries = max_entries
        self.refused = 0

    def __len__(self) -> int:
        return len(self._set)

    def __repr__(self) -> str:
        return f"ReplayCache({len(self._set)}/{self.max_entries} entries)"

    def seen(self, enc: bytes) -> bool:
        """Whether ``enc`` was recorded less than ``window_seconds`` ago."""
        return enc in self._set

    def record(self, enc: bytes) -> bool:
        """Remember ``enc`` for the window. False (nothing recorded) when the cache is full.

        Recording an ``enc`` that is already live keeps its original expiry and returns True.
        """
        if self._set.add(enc, evict=False) is None:
            self.refused += 1
            return False
        return True


class SpentSolutions:
    """Proof-of-work solutions already checked, for as long as their challenge lives."""

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = 1_000_000) -> None:
        self._set = ExpiringSet(clock, ttl, max_entries)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._set)

    def spend(self, solution: bytes) -> bool:
        if len(self._set) >= self._set.max_entries and solution not in self._set:
            self.evicted += 1
        return bool(self._set.add(solution, evict=True))
