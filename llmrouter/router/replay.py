"""The replay cache: which request ``enc`` values were accepted inside the replay window.

Why bounded and never evicting: evicting a live entry would let that request be replayed, so when
the cache is full :meth:`ReplayCache.record` refuses instead and the router sheds the request (503
``overloaded``). Only requests that decrypted are recorded, so junk cannot fill it.

The window must cover the timestamp skew on both sides (2 x 60 s): a request is replayable for as
long as its ``ts`` is still accepted. The default of 150 s leaves a margin on top of that.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

__all__ = ["ReplayCache"]


class ReplayCache:
    """Expiring set of ``enc`` values, oldest first; memory bounded by ``max_entries``.

    Entries are kept in insertion order, which is expiry order while the clock does not go back,
    so expiring is popping from the front: O(1) amortised per request.
    """

    def __init__(
        self, clock: IReactorTime, window_seconds: float = 150.0, max_entries: int = 1_000_000
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self.window_seconds = float(window_seconds)
        self.max_entries = max_entries
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def __repr__(self) -> str:
        return f"ReplayCache({len(self._expiry)}/{self.max_entries} entries)"

    def _expire(self, now: float) -> None:
        entries = self._expiry
        while entries:
            enc, expiry = next(iter(entries.items()))
            if expiry > now:
                return
            del entries[enc]

    def seen(self, enc: bytes) -> bool:
        """Whether ``enc`` was recorded less than ``window_seconds`` ago."""
        now = self._clock.seconds()
        self._expire(now)
        expiry = self._expiry.get(bytes(enc))
        return expiry is not None and expiry > now

    def record(self, enc: bytes) -> bool:
        """Remember ``enc`` for the window. False (nothing recorded) when the cache is full.

        Recording an ``enc`` that is already live keeps its original expiry and returns True.
        """
        now = self._clock.seconds()
        self._expire(now)
        key = bytes(enc)
        if key in self._expiry:
            return True
        if len(self._expiry) >= self.max_entries:
            self.refused += 1
            return False
        self._expiry[key] = now + self.window_seconds
        return True
