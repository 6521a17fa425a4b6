"""Privacy budget per device: each query spends ``epsilon_per_query`` of ``epsilon_total``.

A device's budget is replenished in full ``period_seconds`` after its period began (the period
starts with the first charge after the previous one ended), so a device makes at most
``epsilon_total / epsilon_per_query`` queries per period.

Why memory is bounded the way it is: forgetting a device with spent budget hands it a fresh
budget, so devices whose period is over (whose budget is full again anyway) are dropped first.
When ``max_devices`` devices all have live periods, the account whose period began first (the one
closest to replenishing anyway) is forgotten to make room, counted in ``evicted_live``. Refusing
new devices instead turned the table into a lockout: fresh device keys at a dozen requests per
second kept every new device out for a whole period (issue 8). What keeps an attacker from
churning the table is that a device key is not free: admission asks a proof of work on a
device's first sight and limits new devices per address (``llmrouter.router.admission``).
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

__all__ = ["PrivacyBudget"]

# Floating point sums of epsilon_per_query (0.1 * 100 != 10.0) must not cost a query.
_EPSILON_SLACK = 1e-9


class _Account:
    __slots__ = ("spent", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.spent = 0.0


class PrivacyBudget:
    def __init__(
        self,
        clock: IReactorTime,
        epsilon_total: float = 10.0,
        epsilon_per_query: float = 0.1,
        period_seconds: float = 86400.0,
        max_devices: int = 1_000_000,
    ) -> None:
        if epsilon_total <= 0 or epsilon_per_query <= 0:
            raise ValueError("epsilon_total and epsilon_per_query must be positive")
        if period_seconds <= 0:
            raise ValueError("period_seconds must be positive")
        if max_devices < 1:
            raise ValueError("max_devices must be at least 1")
        self._clock = clock
        self.epsilon_total = float(epsilon_total)
        self.epsilon_per_query = float(epsilon_per_query)
        self.period_seconds = float(period_seconds)
        self.max_devices = max_devices
        # Ordered by period start (an account is dropped when its period ends and a new one is
        # appended on the next charge), so the accounts whose period is over are at the front.
        self._accounts: OrderedDict[bytes, _Account] = OrderedDict()
        self.evicted_live = 0

    def __len__(self) -> int:
        return len(self._accounts)

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(epsilon {self.epsilon_total:g} per {self.period_seconds:g}s, "
            f"{len(self._accounts)}/{self.max_devices} devices)"
        )

    def _expire(self, now: float) -> None:
        accounts = self._accounts
        while accounts:
            device, account = next(iter(accounts.items()))
            if account.started + self.period_seconds > now:
                return
            del accounts[device]

    def charge(self, device: bytes, epsilon: float | None = None) -> bool:
        """Spend ``epsilon`` (default ``epsilon_per_query``); False = exhausted, nothing spent."""
        cost = self.epsilon_per_query if epsilon is None else float(epsilon)
        if cost < 0:
            raise ValueError("epsilon must not be negative")
        now = self._clock.seconds()
        self._expire(now)
        key = bytes(device)
        account = self._accounts.get(key)
        if account is None:
            if len(self._accounts) >= self.max_devices:
                self._accounts.popitem(last=False)
                self.evicted_live += 1
            account = self._accounts[key] = _Account(now)
        if account.spent + cost > self.epsilon_total + _EPSILON_SLACK:
            return False
        account.spent += cost
        return True

    def remaining(self, device: bytes) -> float:
        """Epsilon the device can still spend in its current period."""
        now = self._clock.seconds()
        self._expire(now)
        account = self._accounts.get(bytes(device))
        if account is None:
            return self.epsilon_total
        return max(0.0, round(self.epsilon_total - account.spent, 9))

    def replenishes_in(self, device: bytes) -> float:
        """Seconds until the device's budget is full again (0 if it is full now)."""
        now = self._clock.seconds()
        self._expire(now)
        account = self._accounts.get(bytes(device))
        if account is None:
            return 0.0
        return max(0.0, account.started + self.period_seconds - now)
