"""Per-key rate limiting (keys are client IPs or device public keys), in bounded memory.

The limit is a sliding window with a burst allowance: over ANY trailing interval of length ``t``
a key gets at most ``burst + per_minute * t / 60`` requests. That is the generic cell rate
algorithm (GCRA): per key one number, the "theoretical arrival time" (TAT), is kept, so memory
per key is constant however high the rate, and the Retry-After is exact.

Why an LRU bound: an attacker rotating addresses must not grow memory without limit. When
``max_keys`` is reached an idle key (TAT in the past) among the least recently seen is evicted,
which loses nothing, since an idle key is indistinguishable from a new one. Only if none is idle
is the least recently seen active key evicted; that merely gives it a fresh burst, and is counted
in ``evicted_active``.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

__all__ = ["RateLimiter"]

# How many of the least recently used keys are looked at for an idle one before evicting an
# active key: bounds the work per request when every tracked key is busy.
_EVICTION_SCAN = 16
# Float rounding of clock readings must not turn "allowed now" into "retry in 1e-16 s".
_SLACK = 1e-6


class RateLimiter:
    def __init__(
        self, clock: IReactorTime, per_minute: float, burst: int, max_keys: int = 100_000
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self.max_keys = max_keys
        self._interval = 60.0 / self.per_minute
        self._tolerance = self._interval * (self.burst - 1)
        self._tat: OrderedDict[bytes | str, float] = OrderedDict()
        self.evicted_idle = 0
        self.evicted_active = 0

    def __len__(self) -> int:
        return len(self._tat)

    def __repr__(self) -> str:
        return (
            f"RateLimiter({self.per_minute:g}/min, burst {self.burst}, "
            f"{len(self._tat)}/{self.max_keys} keys)"
        )

    def check(self, key: bytes | str) -> float | None:
        """None if the request is allowed (and counted); otherwise seconds until it would be."""
        if isinstance(key, bytearray | memoryview):
            key = bytes(key)
        now = self._clock.seconds()
        tat = self._tat.get(key)
        if tat is None:
            self._make_room(now)
            tat = now
        else:
            self._tat.move_to_end(key)
            tat = max(tat, now)
        wait = tat - self._tolerance - now
        if wait > _SLACK:
            self._tat[key] = tat
            return wait
        self._tat[key] = tat + self._interval
        return None

    def _make_room(self, now: float) -> None:
        """Evict down to ``max_keys - 1``: an idle key among the least recently used first."""
        while len(self._tat) >= self.max_keys:
            victim: bytes | str | None = None
            for position, (key, tat) in enumerate(self._tat.items()):
                if tat <= now:
                    victim = key
                    break
                if position + 1 >= _EVICTION_SCAN:
                    break
            if victim is not None:
                del self._tat[victim]
                self.evicted_idle += 1
            else:
                self._tat.popitem(last=False)
                self.evicted_active += 1
