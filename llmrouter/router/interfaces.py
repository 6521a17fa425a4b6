"""The state admission keeps between requests: the store interface and its questions.

Admission asks its store two questions per request, each one round trip to a shared store
(:class:`IAdmissionStore`): :class:`Gate` before it decrypts (the per-address limit, whether the
device is known, proof of work, new devices per address, whether ``enc`` was seen) and
:class:`Commit` after (record ``enc``, the per-device limit, the device's open streams and its
privacy budget). Two, not one, because decryption sits between them: what guards it (the
address limit, spent proofs of work) must come before, and only a request that decrypted may
be recorded (junk must not fill the replay cache).

:class:`~llmrouter.router.memory.MemoryStore` answers at once from this process's tables
(rate limiters, replay cache, spent solutions, known devices, budgets, device streams);
:class:`~llmrouter.router.redisstore.RedisStore` answers
with Deferreds from Redis, shared by every router using it (issue 10). Each in-memory table
bounds its memory, and none of them turns being full into a refusal of everyone: see each
class's docstring for what it gives up instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "Commit",
    "Committed",
    "Gate",
    "IAdmissionStore",
    "Verdict",
    "pow_refusal",
]


def _nothing() -> None:
    """The release of a request that holds no device stream."""


@dataclass(frozen=True)
class Gate:
    """What admission asks before it decrypts a request.

    ``enc`` None: the request was already refused (junk); only the address is counted.
    ``pow_if_known``/``pow_if_new``: whether proof of work is due for a known (or base-mode)
    device and for a new one; ``valid_if_*``: whether the header sent (its ``solution`` id)
    passed at that difficulty. Admission verifies locally; the store knows which case holds.
    """

    address: str
    device: bytes | None = None
    enc: bytes | None = None
    pow_if_known: bool = False
    pow_if_new: bool = False
    solution: bytes | None = None
    valid_if_known: bool = False
    valid_if_new: bool = False


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: the first refusal (an error code) or None; ``new``: the device has
    not been admitted before; ``seen``: ``enc`` was recorded inside the replay window;
    ``since``: when the store's memory begins (a request sealed before may have been accepted
    and forgotten, e.g. by a Redis that restarted: it is stale)."""

    refusal: str | None = None
    retry_after: float = 0.0
    new: bool = False
    seen: bool = False
    since: float = 0.0


@dataclass(frozen=True)
class Commit:
    """After decryption: record ``enc``; for a device, its rate limit, remember it when
    ``new``, and when ``stream`` (the request has a route and a global slot) open one of its
    streams and charge its budget."""

    enc: bytes
    device: bytes | None
    new: bool
    stream: bool


@dataclass(frozen=True)
class Committed:
    """The commit's answer; ``release`` ends the device's stream (idempotent)."""

    refusal: str | None = None
    retry_after: float = 0.0
    release: Callable[[], None] = field(default=_nothing, compare=False)


def pow_refusal(gate: Gate, new: bool, spend: Callable[[bytes], bool]) -> str | None:
    """Proof of work for ``gate`` (the rule every store applies): None when none is due or the
    header passed and its solution was not spent before (``spend`` marks it)."""
    if not (gate.pow_if_new if new else gate.pow_if_known):
        return None
    if gate.solution is None:
        return "pow_required"
    if not (gate.valid_if_new if new else gate.valid_if_known) or not spend(gate.solution):
        return "pow_invalid"
    return None


class IAdmissionStore(Interface):
    """Admission's state, in this process or shared by several routers."""

    available = Attribute("Whether the store can answer now (False: admission fails closed).")

    def start() -> None:
        """Connect / start timers."""

    def stop() -> Deferred[None] | None:
        """Disconnect / stop timers."""

    def gate(query: Gate) -> Verdict | Deferred[Verdict]:
        """Checks before decryption, in admission's order; the first refusal wins."""

    def commit(query: Commit) -> Committed | Deferred[Committed]:
        """Checks and records after decryption; the first refusal wins, leaving no stream."""
