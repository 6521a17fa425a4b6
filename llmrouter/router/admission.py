"""Admission: the ordered checks a chat request passes before it may use a backend.

Cheapest first, so hostile traffic costs as little as possible (issue 4):

 1. body size and strict envelope (413 / 400), device auth policy (400 ``device_auth_required``)
 2. per-IP rate limit (429 ``rate_limited`` + Retry-After)
 3. proof of work, only under stress (401 ``pow_required`` with a challenge, ``pow_invalid``)
 4. timestamp (401 ``stale``)
 5. key id (400 ``key_unknown``)
 6. replay: ``enc`` seen inside the window (409 ``replay``) - recorded only after step 7
 7. decryption (400 ``decrypt_failed``, one code whatever failed; ``bad_payload`` for bad JSON)
 8. per-device rate limit (429 ``device_rate_limited``)
 9. privacy budget per device (429 ``budget_exhausted``)
10. open streams: global (503 ``overloaded``) and per device (429 ``device_streams``)

Every rejection is a :class:`~llmrouter.protocol.ProtocolError` counted by reason; the
security-relevant ones are also written to the security log with keyed-hash identifiers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from llmrouter import pow
from llmrouter.protocol import (
    ChatRequest,
    Envelope,
    ProtocolError,
    check_timestamp,
    open_request,
    parse_envelope,
)
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Settings

__all__ = ["Admission", "Admitted", "KeySource", "RequestRate", "StreamSlots"]


class KeySource(Protocol):
    """The part of the key store admission needs."""

    pow_key: bytes

    def private_key_for(self, kid: str) -> bytes | None: ...


class Limiter(Protocol):
    def check(self, key: bytes | str) -> float | None: ...


class Replay(Protocol):
    def seen(self, enc: bytes) -> bool: ...

    def record(self, enc: bytes) -> bool: ...


class Budget(Protocol):
    def charge(self, device: bytes) -> bool: ...

    def replenishes_in(self, device: bytes) -> float: ...


class Events(Protocol):
    def ident(self, value: bytes | str) -> str: ...

    def event(self, name: str, **fields: str | int | float | bool) -> None: ...


class RequestRate:
    """Requests per second over the last few seconds, for the stress threshold (O(1) memory)."""

    def __init__(self, clock: IReactorTime, window: int = 5) -> None:
        self._clock = clock
        self._window = window
        self._buckets = [0] * window
        self._stamps = [-1] * window

    def hit(self) -> None:
        second = int(self._clock.seconds())
        slot = second % self._window
        if self._stamps[slot] != second:
            self._stamps[slot], self._buckets[slot] = second, 0
        self._buckets[slot] += 1

    def rate(self) -> float:
        now = int(self._clock.seconds())
        total = sum(
            count
            for count, stamp in zip(self._buckets, self._stamps, strict=True)
            if 0 <= now - stamp < self._window
        )
        return total / self._window


class StreamSlots:
    """Counts open streams globally and per device; a slot is released when its stream ends."""

    def __init__(self, max_streams: int, max_per_device: int) -> None:
        self.max_streams = max_streams
        self.max_per_device = max_per_device
        self.open = 0
        self._per_device: dict[bytes, int] = {}

    def acquire(self, device: bytes | None) -> Callable[[], None]:
        if self.open >= self.max_streams:
            raise ProtocolError("overloaded", "the router is at capacity, retry later")
        if device is not None and self._per_device.get(device, 0) >= self.max_per_device:
            raise ProtocolError("device_streams", "too many open streams for this device")
        self.open += 1
        if device is not None:
            self._per_device[device] = self._per_device.get(device, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            if device is not None:
                left = self._per_device[device] - 1
                if left:
                    self._per_device[device] = left
                else:
                    del self._per_device[device]

        return release


@dataclass(frozen=True, repr=False)
class Admitted:
    """A request that passed every check; ``release`` frees its stream slot (idempotent)."""

    envelope: Envelope
    request: ChatRequest
    secret: bytes
    release: Callable[[], None] = field(compare=False)

    def __repr__(self) -> str:
        return "Admitted(<redacted>)"


_SECURITY_EVENTS = {
    "rate_limited": "rate_limited",
    "device_rate_limited": "device_rate_limited",
    "pow_invalid": "pow_failed",
    "stale": "stale",
    "replay": "replay",
    "decrypt_failed": "auth_failed",
    "budget_exhausted": "budget_exhausted",
}


class Admission:
    """Runs the checks in order; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        keys: KeySource,
        ip_limiter: Limiter,
        device_limiter: Limiter,
        replay: Replay,
        budget: Budget,
        slots: StreamSlots,
        metrics: RouterMetrics,
        events: Events | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys = keys
        self._ip_limiter = ip_limiter
        self._device_limiter = device_limiter
        self._replay = replay
        self._budget = budget
        self.slots = slots
        self._metrics = metrics
        self._events = events
        self.rate = RequestRate(clock)

    def stressed(self) -> bool:
        s = self._settings
        if s.pow_threshold_streams and self.slots.open >= s.pow_threshold_streams:
            return True
        return bool(s.pow_threshold_rps and self.rate.rate() >= s.pow_threshold_rps)

    def reject(
        self, error: ProtocolError, ip: str | None = None, device: bytes | None = None
    ) -> ProtocolError:
        """Count (and, when security-relevant, log) a rejection; returns it for raising."""
        self._metrics.admission_rejections.labels(error.code).inc()
        event = _SECURITY_EVENTS.get(error.code)
        if event is not None and self._events is not None:
            fields: dict[str, str | int | float | bool] = {}
            if ip is not None:
                fields["ip"] = self._events.ident(ip)
            if device is not None:
                fields["device"] = self._events.ident(device)
            self._events.event(event, **fields)
        return error

    def admit(self, body: bytes, client_ip: str, pow_header: bytes | None) -> Admitted:
        """All checks, in order; raises the first rejection as a ProtocolError."""
        s = self._settings
        self.rate.hit()
        try:
            envelope = parse_envelope(body, s.max_body_bytes)
        except ProtocolError as e:
            raise self.reject(e) from None
        if s.device_auth == "required" and envelope.mode != "auth":
            raise self.reject(
                ProtocolError("device_auth_required", "this router requires mode auth")
            )

        retry = self._ip_limiter.check(client_ip)
        if retry is not None:
            raise self.reject(_limited("rate_limited", retry), client_ip)

        try:
            header = _pow_header(pow_header)
        except ProtocolError as e:
            raise self.reject(e, client_ip) from None
        if self.stressed():
            self._check_pow(envelope, header, client_ip)

        now = self._clock.seconds()
        try:
            check_timestamp(envelope.ts, now)
        except ProtocolError as e:
            raise self.reject(e, client_ip) from None

        secret_key = self._keys.private_key_for(envelope.kid)
        if secret_key is None:
            raise self.reject(ProtocolError("key_unknown", "unknown key id"))

        if self._replay.seen(envelope.enc):
            raise self.reject(
                ProtocolError("replay", "this request was already received"), client_ip
            )

        try:
            request, secret = open_request(envelope, secret_key)
        except ProtocolError as e:
            raise self.reject(e, client_ip) from None
        if not self._replay.record(envelope.enc):
            raise self.reject(ProtocolError("overloaded", "the router is at capacity"))

        device = envelope.device_pubkey
        if device is not None:
            retry = self._device_limiter.check(device)
            if retry is not None:
                raise self.reject(_limited("device_rate_limited", retry), device=device)
            if not self._budget.charge(device):
                retry = self._budget.replenishes_in(device)
                raise self.reject(
                    ProtocolError(
                        "budget_exhausted",
                        "the privacy budget of this device is exhausted",
                        retry_after=max(1, math.ceil(retry)),
                    ),
                    device=device,
                )
        try:
            release = self.slots.acquire(device)
        except ProtocolError as e:
            raise self.reject(e) from None
        return Admitted(envelope, request, secret, release)

    def _check_pow(self, envelope: Envelope, header: str | None, client_ip: str) -> None:
        s = self._settings
        now = self._clock.seconds()
        if header is None:
            code, message, ip = (
                "pow_required",
                "the router is under load: solve the proof of work and retry",
                None,
            )
        elif not pow.verify(self._keys.pow_key, header, envelope.enc, now):
            code, message, ip = "pow_invalid", "the proof of work was not accepted", client_ip
        else:
            return
        challenge = pow.issue_challenge(self._keys.pow_key, s.pow_difficulty, now)
        raise self.reject(
            ProtocolError(code, message, challenge=challenge, difficulty=s.pow_difficulty), ip
        )


def _pow_header(raw: bytes | None) -> str | None:
    """The proof-of-work header as text: printable ASCII only, refused before any work."""
    if raw is None:
        return None
    if len(raw) > pow.MAX_HEADER or not all(0x21 <= b <= 0x7E for b in raw):
        raise ProtocolError("bad_pow_header", f"the {pow.HEADER} header is not a valid solution")
    return raw.decode("ascii")


def _limited(code: str, retry_after: float) -> ProtocolError:
    message = "too many requests, retry later"
    if code == "device_rate_limited":
        message = "too many requests from this device, retry later"
    return ProtocolError(code, message, retry_after=max(1, math.ceil(retry_after)))
