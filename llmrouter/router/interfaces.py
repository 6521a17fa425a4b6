"""The tables admission keeps, as interfaces: one in-memory implementation each here, others later.

Every table an outsider can grow (rate-limit buckets, the replay cache, spent proof-of-work
solutions, known devices, privacy budgets, per-device stream counts) is reached only through
these interfaces, so a shared store (several routers behind one address) can replace the
in-memory one without a second admission path. Any method may return a
:class:`~twisted.internet.defer.Deferred` instead of its value; admission awaits each call, and
the in-memory implementations answer at once.

Each implementation bounds its memory, and none of them turns being full into a refusal of
everyone: see each class's docstring for what it gives up instead.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "IKnownDevices",
    "IPrivacyBudget",
    "IRateLimiter",
    "IReplayCache",
    "ISpentSolutions",
    "IStreamSlots",
]


class IRateLimiter(Interface):
    """Requests per key over time (keys: an address bucket, a device key)."""

    def check(key: bytes | str) -> float | Deferred[float | None] | None:
        """None if a request is allowed now (and count it); else the seconds until it would be."""


class IReplayCache(Interface):
    """Which request ``enc`` values were accepted inside the replay window."""

    def seen(enc: bytes) -> bool | Deferred[bool]:
        """Whether ``enc`` was recorded inside the window."""

    def record(enc: bytes) -> bool | Deferred[bool]:
        """Remember ``enc`` for the window; False when it cannot (the request is then shed)."""


class ISpentSolutions(Interface):
    """Proof-of-work solutions already used: each buys exactly one check."""

    def spend(solution: bytes) -> bool | Deferred[bool]:
        """Mark ``solution`` spent; False if it already was."""


class IKnownDevices(Interface):
    """Device keys that have paid their admission (a proof of work on first sight)."""

    def known(device: bytes) -> bool | Deferred[bool]:
        """Whether ``device`` was admitted before (and is still remembered)."""

    def remember(device: bytes) -> Deferred[None] | None:
        """Record ``device`` as admitted."""


class IPrivacyBudget(Interface):
    """Queries per device and period."""

    def charge(device: bytes) -> bool | Deferred[bool]:
        """Spend one query's epsilon; False (nothing spent) when the budget is exhausted."""

    def replenishes_in(device: bytes) -> float | Deferred[float]:
        """Seconds until the device's budget is full again."""


class IStreamSlots(Interface):
    """Open streams, globally (this router's capacity) and per device."""

    open = Attribute("Streams open now on this router (the stress signal reads it).")

    def acquire(
        device: bytes | None,
    ) -> Callable[[], None] | Deferred[Callable[[], None]]:
        """A release callable (idempotent) for a new stream; raises (or fails with) a
        ProtocolError ``overloaded`` or ``device_streams`` when there is no room."""
