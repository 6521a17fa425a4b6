"""Admission: the ordered checks a chat request passes before it may use a backend.

Cheapest first, so hostile traffic costs as little as possible (issue 4), and nothing a request
can do before it passes the per-address limit counts toward anyone else's (issue 8):

 1. per-address rate limit (429 ``rate_limited`` + Retry-After); IPv6 by prefix
 2. (counted toward the "under stress" signal only from here on)
 3. strict envelope (400), device auth policy (400 ``device_auth_required``), proof-of-work
    header syntax (400 ``bad_pow_header``)
 4. proof of work (401 ``pow_required`` with a challenge, ``pow_invalid``): under stress, and for
    a device key seen for the first time; each solution is spent when it is checked
 5. new devices per address bucket (429 ``new_device_rate_limited``)
 6. timestamp (401 ``stale``), also for a timestamp from before the router started
 7. key id (400 ``key_unknown``)
 8. replay: ``enc`` seen inside the window (409 ``replay``) - recorded only after step 9
 9. decryption (400 ``decrypt_failed``, one code whatever failed; ``bad_payload`` for bad JSON)
10. per-device rate limit (429 ``device_rate_limited``); the device is known from now on
11. route: backends that serve the request's model and implement its fields (404
    ``model_unknown``, 400 ``unsupported_field``, 503 ``overloaded``/``no_backend``)
12. open streams: global (503 ``overloaded``) and per device (429 ``device_streams``)
13. privacy budget per device (429 ``budget_exhausted``), charged only here, once the stream
    has its slot, so a refused request spends nothing

Every table (steps 1, 4, 5, 8, 10, 12, 13) is reached through an interface of
:mod:`llmrouter.router.interfaces` and awaited, so a shared store can stand in for memory.
Every rejection is a :class:`~llmrouter.protocol.ProtocolError` counted by reason; the
security-relevant ones are also written to the security log with keyed-hash identifiers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred
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
from llmrouter.router.addresses import bucket
from llmrouter.router.interfaces import (
    IKnownDevices,
    IPrivacyBudget,
    IRateLimiter,
    IReplayCache,
    ISpentSolutions,
    IStreamSlots,
)
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Settings
from llmrouter.router.upstream import Route

__all__ = ["Admission", "Admitted", "KeySource", "RequestRate", "Routes", "Tables"]

T = TypeVar("T")


class KeySource(Protocol):
    """The part of the key store admission needs."""

    pow_key: bytes

    def private_key_for(self, kid: str) -> bytes | None: ...


class Routes(Protocol):
    """The part of the backend pool admission needs: where a request may go."""

    def route(self, model: str | None, features: frozenset[str] = ...) -> Route: ...


class Events(Protocol):
    def ident(self, value: bytes | str) -> str: ...

    def event(self, name: str, **fields: str | int | float | bool) -> None: ...


@dataclass(frozen=True)
class Tables:
    """Everything admission remembers between requests (see :mod:`.interfaces`)."""

    addresses: IRateLimiter
    devices: IRateLimiter
    new_devices: IRateLimiter
    replay: IReplayCache
    spent: ISpentSolutions
    known: IKnownDevices
    slots: IStreamSlots
    budget: IPrivacyBudget


async def _settle(value: T | Deferred[T]) -> T:
    """A table's answer, whether it came at once (memory) or later (a shared store)."""
    if isinstance(value, Deferred):
        return await value
    return value


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


@dataclass(frozen=True, repr=False)
class Admitted:
    """A request that passed every check; ``release`` frees its stream slot (idempotent)."""

    envelope: Envelope
    request: ChatRequest
    secret: bytes
    route: Route
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
    "new_device_rate_limited": "new_device_rate_limited",
}


class Admission:
    """Runs the checks in order; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        keys: KeySource,
        tables: Tables,
        routes: Routes,
        metrics: RouterMetrics,
        events: Events | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys = keys
        self.tables = tables
        self._routes = routes
        self._metrics = metrics
        self._events = events
        self.rate = RequestRate(clock)
        # The replay cache starts empty: a request sealed before now may have been accepted by
        # the previous process, so only timestamps from this second on are accepted.
        self.started = int(clock.seconds())

    @property
    def slots(self) -> IStreamSlots:
        return self.tables.slots

    @property
    def budget(self) -> IPrivacyBudget:
        return self.tables.budget

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

    async def admit(self, body: bytes, client_ip: str, pow_header: bytes | None) -> Admitted:
        """All checks, in order; raises the first rejection as a ProtocolError."""
        s, t = self._settings, self.tables
        ip = bucket(client_ip, s.rate_limit_ipv6_prefix)
        retry = await _settle(t.addresses.check(ip))
        if retry is not None:
            raise self.reject(_limited("rate_limited", retry), ip)
        self.rate.hit()

        try:
            envelope = parse_envelope(body, s.max_body_bytes)
            if s.device_auth == "required" and envelope.mode != "auth":
                raise ProtocolError("device_auth_required", "this router requires mode auth")
            header = _pow_header(pow_header)
        except ProtocolError as e:
            raise self.reject(e) from None

        device = envelope.device_pubkey
        new = device is not None and not await _settle(t.known.known(device))
        difficulty = max(
            s.pow_difficulty if self.stressed() else 0,
            s.new_device_pow_difficulty if new else 0,
        )
        if difficulty:
            await self._check_pow(envelope, header, difficulty, ip)
        if new:
            retry = await _settle(t.new_devices.check(ip))
            if retry is not None:
                raise self.reject(_limited("new_device_rate_limited", retry), ip)

        now = self._clock.seconds()
        try:
            check_timestamp(envelope.ts, now)
        except ProtocolError as e:
            raise self.reject(e, ip) from None
        if envelope.ts < self.started:
            raise self.reject(
                ProtocolError("stale", "the request predates the router's start: seal it again"),
                ip,
            )

        secret_key = self._keys.private_key_for(envelope.kid)
        if secret_key is None:
            raise self.reject(ProtocolError("key_unknown", "unknown key id"))

        if await _settle(t.replay.seen(envelope.enc)):
            raise self.reject(ProtocolError("replay", "this request was already received"), ip)

        try:
            request, secret = open_request(envelope, secret_key)
        except ProtocolError as e:
            raise self.reject(e, ip) from None
        if not await _settle(t.replay.record(envelope.enc)):
            raise self.reject(ProtocolError("overloaded", "the router is at capacity"))

        if device is not None:
            retry = await _settle(t.devices.check(device))
            if retry is not None:
                raise self.reject(_limited("device_rate_limited", retry), device=device)
            if new:
                await _settle(t.known.remember(device))
        try:
            route = self._routes.route(request.model, request.features())
            release = await _settle(t.slots.acquire(device))
        except ProtocolError as e:
            raise self.reject(e) from None
        try:
            charged = device is None or await _settle(t.budget.charge(device))
        except BaseException:  # a shared store failed: the slot must not leak
            release()
            raise
        if not charged:
            assert device is not None
            release()
            retry = await _settle(t.budget.replenishes_in(device))
            raise self.reject(
                ProtocolError(
                    "budget_exhausted",
                    "the privacy budget of this device is exhausted",
                    retry_after=max(1, math.ceil(retry)),
                ),
                device=device,
            )
        return Admitted(envelope, request, secret, route, release)

    async def _check_pow(
        self, envelope: Envelope, header: str | None, difficulty: int, ip: str
    ) -> None:
        now = self._clock.seconds()
        key = self._keys.pow_key
        if header is None:
            code, message, culprit = (
                "pow_required",
                "solve the proof of work and retry",
                None,
            )
        elif not pow.verify(key, header, envelope.enc, now, difficulty) or not await _settle(
            self.tables.spent.spend(pow.solution_id(header, envelope.enc))
        ):
            code, message, culprit = "pow_invalid", "the proof of work was not accepted", ip
        else:
            return
        challenge = pow.issue_challenge(key, difficulty, now)
        raise self.reject(
            ProtocolError(code, message, challenge=challenge, difficulty=difficulty), culprit
        )


def _pow_header(raw: bytes | None) -> str | None:
    """The proof-of-work header as text: printable ASCII only, refused before any work."""
    if raw is None:
        return None
    if len(raw) > pow.MAX_HEADER or not all(0x21 <= b <= 0x7E for b in raw):
        raise ProtocolError("bad_pow_header", f"the {pow.HEADER} header is not a valid solution")
    return raw.decode("ascii")


def _limited(code: str, retry_after: float) -> ProtocolError:
    message = {
        "device_rate_limited": "too many requests from this device, retry later",
        "new_device_rate_limited": "too many new devices from this address, retry later",
    }.get(code, "too many requests, retry later")
    return ProtocolError(code, message, retry_after=max(1, math.ceil(retry_after)))
