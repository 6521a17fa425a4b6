"""A random key held only in memory and replaced at every UTC midnight.

Keyed hashes of identifiers (the security log's, the prompt-cache key sent to inference
backends) must not let anyone link a person across days, nor be reversible by whoever later
finds the key: an IPv4 address has only 2^32 values to try. So the key is random, never written
anywhere, and the previous day's bytes are overwritten when the next day's key is made.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["DAY_SECONDS", "DayKey", "derived_key", "random_key", "shared_day_keys"]

DAY_SECONDS = 86400


def random_key() -> bytes:
    return secrets.token_bytes(32)


def derived_key(secret: bytes, label: bytes, date: datetime.date) -> bytes:
    """The day's key that every router holding ``secret`` derives alike (several routers,
    issue 10): HMAC-SHA256 of the label and the UTC date, unrelated from one day to the next."""
    return hmac.new(secret, label + date.isoformat().encode("ascii"), hashlib.sha256).digest()


def shared_day_keys(
    clock: IReactorTime, secret: Callable[[], bytes], label: bytes
) -> Callable[[], bytes]:
    """A ``new_key`` for :class:`DayKey`: today's :func:`derived_key` on ``clock``."""

    def today() -> bytes:
        date = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).date()
        return derived_key(secret(), label, date)

    return today


class DayKey:
    """Today's key (UTC); ``new_key`` makes each one (32 random bytes unless a test hands in its
    own). Holds a secret, so its ``repr`` is redacted."""

    def __init__(
        self,
        clock: IReactorTime | None = None,
        new_key: Callable[[], bytes] = random_key,
    ) -> None:
        self._clock = clock
        self._new_key = new_key
        self._day = -1
        self._key = bytearray()

    def __repr__(self) -> str:
        return "DayKey(<redacted>)"

    def current(self) -> bytearray:
        now = self._clock.seconds() if self._clock is not None else time.time()
        day = int(now // DAY_SECONDS)
        if day != self._day:
            key = self._new_key()
            if not isinstance(key, bytes) or len(key) < 16:
                raise ValueError("a hash key must be at least 16 bytes")
            self._key[:] = bytes(len(self._key))  # yesterday's key is gone, not just unused
            self._key, self._day = bytearray(key), day
        return self._key
