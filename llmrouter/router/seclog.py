"""Security events as JSON lines, with identifiers only ever as keyed hashes.

One line per event: ``{"ts": 1700000000.123, "event": "replay", "ip": "3f1c9a0b7d2e4c61", ...}``.
Lines go to Twisted's logger (namespace ``llmrouter.security``, so they land in twistd's log) or
to a given ``emit`` callable, and every event is counted in
``llmrouter_security_events_total{event}``.

Why the field rules are strict: this log is read by operators and shipped to log stores, so it
must never carry an IP address, a device key or any request content. The only values accepted are

* ``int``, ``float`` (finite) and ``bool``;
* identifiers hashed by :meth:`SecurityLog.ident` (an :class:`Ident`), correlatable within one
  UTC day of one router process and meaningless outside it: the hash key is random, held only in
  memory and replaced at every UTC midnight (a key that outlived the day, or lay on disk, would
  let its holder reverse an IPv4 hash by trying all 2^32 addresses);
* short lowercase code tokens (``[a-z0-9][a-z0-9_-]{0,31}``, not a long run of hex digits), such as
  an error code, a key id or a backend name.

Everything else (``bytes``, free-form or mixed-case strings, dotted or colon-separated addresses)
raises, naming the field but never echoing the value, so a mistake shows up in tests rather than
in a log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable

from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmrouter.daykey import DayKey, random_key

__all__ = ["EVENTS", "SECURITY_EVENTS", "Ident", "SecurityLog"]

EVENTS = frozenset(
    {
        "key_rotated",
        "key_revoked",
        "key_expired",
        "signing_key_replaced",
        "replay",
        "rate_limited",
        "device_rate_limited",
        "new_device_rate_limited",
        "pow_failed",
        "auth_failed",
        "stale",
        "budget_exhausted",
    }
)

# In the default registry; the router passes the counter of its own registry instead.
SECURITY_EVENTS = Counter("llmrouter_security_events", "Security events by name", ["event"])

IDENT_CHARS = 16
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TOKEN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HEX_RUN = re.compile(r"[0-9a-f]{12,}")
_RESERVED = frozenset({"ts", "event"})

_log = Logger(namespace="llmrouter.security")


class Ident(str):
    """A keyed hash of an identifier, as made by :meth:`SecurityLog.ident`."""

    __slots__ = ()


def _twisted_emit(line: str) -> None:
    _log.info("{security_event}", security_event=line)


class SecurityLog:
    """Writes security events; holds the day's hash key, so its ``repr`` is redacted.

    ``new_key`` makes each day's key (32 random bytes unless a test hands in its own).
    """

    def __init__(
        self,
        emit: Callable[[str], None] | None = None,
        clock: IReactorTime | None = None,
        counter: Counter | None = None,
        new_key: Callable[[], bytes] = random_key,
    ) -> None:
        self._emit = emit if emit is not None else _twisted_emit
        self._clock = clock
        self._counter = counter if counter is not None else SECURITY_EVENTS
        self._key = DayKey(clock, new_key)

    def __repr__(self) -> str:
        return "SecurityLog(<hash key redacted>)"

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def ident(self, value: bytes | str) -> Ident:
        """HMAC-SHA256(the day's key, value), hex, truncated to 16 characters (64 bits)."""
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        digest = hmac.new(self._key.current(), data, hashlib.sha256).hexdigest()
        return Ident(digest[:IDENT_CHARS])

    def format(self, name: str, **fields: str | int | float | bool) -> str:
        """The JSON line for an event (validated as described in the module docstring)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError("security event names are lowercase identifiers")
        ts = self._now()
        record: dict[str, str | int | float | bool] = {"ts": round(ts, 3), "event": name}
        for key in sorted(fields):
            record[key] = _check_field(key, fields[key])
        return json.dumps(record, separators=(",", ":"), allow_nan=False)

    def event(self, name: str, **fields: str | int | float | bool) -> None:
        """Log one event. Identifiers must go through :meth:`ident` first (bytes are refused)."""
        line = self.format(name, **fields)
        self._counter.labels(event=name).inc()
        self._emit(line)


def _check_field(key: str, value: object) -> str | int | float | bool:
    if not _FIELD.fullmatch(key) or key in _RESERVED:
        raise ValueError(f"security event field {key!r} is not an allowed field name")
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"security event field {key!r} must be a finite number")
        return value
    if isinstance(value, str):
        if _TOKEN.fullmatch(value) and not _HEX_RUN.search(value):
            return value
        raise ValueError(
            f"security event field {key!r}: only short lowercase codes are logged as text; "
            "pass identifiers through SecurityLog.ident()"
        )
    raise TypeError(
        f"security event field {key!r} has a type that is never logged; "
        "pass identifiers through SecurityLog.ident()"
    )
