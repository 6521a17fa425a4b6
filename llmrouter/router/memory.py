"""Admission's state in this process's memory: the default, for one router.

Composes the bounded tables (rate limits, replay cache, spent proofs of work, known devices,
per-device streams, privacy budgets) into the two questions of
:class:`~llmrouter.router.interfaces.IAdmissionStore`, answered at once. Several routers need
:class:`~llmrouter.router.redisstore.RedisStore` instead (``STATE_URL``): with this one each
router keeps its own tables, so a request replayed to another router is accepted there and
every limit is multiplied by the number of routers.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from llmrouter import pow
from llmrouter.replay import ReplayCache, SpentSolutions
from llmrouter.router.budget import PrivacyBudget
from llmrouter.router.devices import KnownDevices
from llmrouter.router.interfaces import (
    Commit,
    Committed,
    Gate,
    IAdmissionStore,
    Verdict,
    pow_refusal,
)
from llmrouter.router.ratelimit import RateLimiter
from llmrouter.router.settings import Settings
from llmrouter.router.slots import DeviceStreams

__all__ = ["MemoryStore"]


@implementer(IAdmissionStore)
class MemoryStore:
    available = True

    def __init__(self, settings: Settings, clock: IReactorTime) -> None:
        s = settings
        self.addresses = RateLimiter(clock, s.rate_limit_per_minute, s.rate_limit_burst)
        self.devices = RateLimiter(clock, s.device_rate_limit_per_minute, s.device_rate_limit_burst)
        self.new_devices = RateLimiter(clock, s.new_devices_per_hour / 60.0, s.new_device_burst)
        self.replay = ReplayCache(clock, s.replay_window_seconds, s.replay_max_entries)
        self.spent = SpentSolutions(clock, pow.CHALLENGE_TTL)
        self.known = KnownDevices(s.max_known_devices)
        self.streams = DeviceStreams(s.max_streams_per_device)
        self.budget = PrivacyBudget(
            clock,
            s.epsilon_total,
            s.epsilon_per_query,
            s.budget_period_seconds,
            s.budget_max_devices,
        )

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def gate(self, query: Gate) -> Verdict:
        retry = self.addresses.check(query.address)
        if retry is not None:
            return Verdict("rate_limited", retry)
        if query.enc is None:
            return Verdict()
        new = query.device is not None and not self.known.known(query.device)
        refusal = pow_refusal(query, new, self.spent.spend)
        if refusal is not None:
            return Verdict(refusal, new=new)
        if new:
            retry = self.new_devices.check(query.address)
            if retry is not None:
                return Verdict("new_device_rate_limited", retry, new=True)
        return Verdict(new=new, seen=self.replay.seen(query.enc))

    def commit(self, query: Commit) -> Committed:
        if self.replay.seen(query.enc):
            return Committed("replay")
        if not self.replay.record(query.enc):
            return Committed("overloaded")
        device = query.device
        if device is None:
            return Committed()
        retry = self.devices.check(device)
        if retry is not None:
            return Committed("device_rate_limited", retry)
        if query.new:
            self.known.remember(device)
        if not query.stream:
            return Committed()
        release = self.streams.acquire(device)
        if release is None:
            return Committed("device_streams")
        if not self.budget.charge(device):
            release()
            return Committed("budget_exhausted", self.budget.replenishes_in(device))
        return Committed(release=release)
