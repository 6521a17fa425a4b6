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
    - from here on a refusal goes back sealed (:class:`~llmrouter.protocol.SealedRefusal`): the
      status and code inside a sealed final error chunk, so what the request contained does not
      show on the wire
10. per-device rate limit (429 ``device_rate_limited``); the device is known from now on
11. route: backends that serve the request's model and implement its fields (404
    ``model_unknown``, 400 ``unsupported_field``, 503 ``overloaded``/``no_backend``)
12. open streams: global (503 ``overloaded``) and per device (429 ``device_streams``)
13. privacy budget per device (429 ``budget_exhausted``), charged only here, once the stream
    has its slot, so a refused request spends nothing

Protocol v2 (:meth:`Admission.admit_outer`) runs the same checks on what the router can open, the
outer layer: the model, the device key (proven to the router by the request's device proof) and
the outer ``enc``. The device is inside that layer, so the layer is opened first (one X25519 and
an AEAD pass, plus one for the proof) and the store's gate asked after, still once per request:
a request that fails before (body shape, ``bad_pow_header``, ``key_unknown``, ``decrypt_failed``
and, once opened, ``bad_payload`` and ``device_proof_failed``) is counted against its address
as junk is. Refusals made before the layer is open are plain JSON, as are ``rate_limited``
(it depends on the address alone); every other one is a :class:`SealedRefusal` the relay seals
under the request's router secret, so a TLS-terminating hop learns nothing about the device
from it (not even whether it is new: proof-of-work refusals are sealed too).

Everything remembered between requests is in a store (:mod:`llmrouter.router.interfaces`): this
process's memory, or Redis shared by several routers. Admission asks it twice, each one round
trip to a shared store: the gate (steps 1, 4, 5 and whether ``enc`` was seen for step 8) before
decryption, the commit (steps 8, 10, the per-device part of 12, and 13) after it. A store that
cannot answer fails the request closed: 503 ``overloaded``, never a bypass of a check.
Every rejection is a :class:`~llmrouter.protocol.ProtocolError` counted by reason; the
security-relevant ones are also written to the security log with keyed-hash identifiers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from llmrouter import pow
from llmrouter.protocol import (
    ChatRequest,
    Envelope,
    ProtocolError,
    SealedRefusal,
    check_timestamp,
    open_request,
    parse_envelope,
)
from llmrouter.router.addresses import bucket
from llmrouter.router.interfaces import (
    Commit,
    Committed,
    Gate,
    IAdmissionStore,
    Verdict,
)
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Settings
from llmrouter.router.slots import StreamSlots
from llmrouter.terminate.backends import Route
from llmrouter.v2.request import OuterRequest, open_outer, parse_outer_header

__all__ = [
    "UNAVAILABLE_RETRY",
    "Admission",
    "Admitted",
    "AdmittedOuter",
    "KeySource",
    "RequestRate",
    "Routes",
]

T = TypeVar("T")
R = TypeVar("R")
# Retry-After of a request refused because the store cannot answer (a shared store is
# reconnecting): about the first reconnection attempts' backoff.
UNAVAILABLE_RETRY = 2


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


async def _settle(value: T | Deferred[T]) -> T:
    """A store's answer, whether it came at once (memory) or later (a shared store)."""
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

    def rate(self, pending: int = 0) -> float:
        """Requests per second, counting ``pending`` more that are not recorded yet."""
        now = int(self._clock.seconds())
        total = sum(
            count
            for count, stamp in zip(self._buckets, self._stamps, strict=True)
            if 0 <= now - stamp < self._window
        )
        return (total + pending) / self._window


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


@dataclass(frozen=True, repr=False)
class AdmittedOuter(Generic[R]):
    """A v2 request that passed every check: its outer layer, its candidate nodes, its client's
    address bucket (to charge it for what the node refuses); ``release`` frees its slots."""

    outer: OuterRequest
    candidates: R
    address: str
    release: Callable[[], None] = field(compare=False)

    def __repr__(self) -> str:
        return "AdmittedOuter(<redacted>)"


_SECURITY_EVENTS = {
    "rate_limited": "rate_limited",
    "device_rate_limited": "device_rate_limited",
    "pow_invalid": "pow_failed",
    "stale": "stale",
    "replay": "replay",
    "decrypt_failed": "auth_failed",
    "device_proof_failed": "auth_failed",
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
        store: IAdmissionStore,
        routes: Routes,
        metrics: RouterMetrics,
        events: Events | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys = keys
        self.store = store
        self.slots = StreamSlots(settings.max_streams)
        self._routes = routes
        self._metrics = metrics
        self._events = events
        self.rate = RequestRate(clock)
        # The replay cache may start empty: a request sealed before now may have been accepted
        # by the previous process, so only timestamps from this second on are accepted.
        self.started = int(clock.seconds())

    def stressed(self, pending: int = 0) -> bool:
        """Under stress: many open streams, or many requests per second (``pending`` more)."""
        s = self._settings
        if s.pow_threshold_streams and self.slots.open >= s.pow_threshold_streams:
            return True
        return bool(s.pow_threshold_rps and self.rate.rate(pending) >= s.pow_threshold_rps)

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

    async def _ask(self, answer: T | Deferred[T]) -> T:
        """A store's answer; a store that cannot answer fails the request closed."""
        try:
            return await _settle(answer)
        except ProtocolError:
            raise
        except Exception:
            raise self.reject(_unavailable()) from None

    async def admit(self, body: bytes, client_ip: str, pow_header: bytes | None) -> Admitted:
        """All checks, in order; raises the first rejection as a ProtocolError."""
        s, store = self._settings, self.store
        if not store.available:
            raise self.reject(_unavailable())
        ip = bucket(client_ip, s.rate_limit_ipv6_prefix)
        try:
            envelope = parse_envelope(body, s.max_body_bytes)
            if s.device_auth == "required" and envelope.mode != "auth":
                raise ProtocolError("device_auth_required", "this router requires mode auth")
            header = _pow_header(pow_header)
        except ProtocolError as e:
            verdict = await self._ask(store.gate(Gate(ip)))  # junk counts toward the limit
            if verdict.refusal is None:
                self.rate.hit()
            raise self.reject(verdict_error(verdict) or e, ip) from None

        device = envelope.device_pubkey
        gate, difficulties = self._gate(device, envelope.enc, header, ip)
        verdict = await self._ask(store.gate(gate))
        if verdict.refusal != "rate_limited":
            self.rate.hit()
        if verdict.refusal in ("pow_required", "pow_invalid"):
            raise self._pow_refused(verdict, difficulties[verdict.new], ip)
        error = verdict_error(verdict)
        if error is not None:
            raise self.reject(error, ip)

        now = self._clock.seconds()
        try:
            check_timestamp(envelope.ts, now)
        except ProtocolError as e:
            raise self.reject(e, ip) from None
        if envelope.ts < max(self.started, verdict.since):
            raise self.reject(
                ProtocolError("stale", "the request predates the router's start: seal it again"),
                ip,
            )

        secret_key = self._keys.private_key_for(envelope.kid)
        if secret_key is None:
            raise self.reject(ProtocolError("key_unknown", "unknown key id"))
        if verdict.seen:
            raise self.reject(_replay(), ip)
        try:
            request, secret = open_request(envelope, secret_key)
        except ProtocolError as e:  # bad_payload comes sealed (SealedRefusal)
            raise self.reject(e, ip) from None

        def sealed(error: ProtocolError) -> SealedRefusal:
            """From here on every refusal goes back sealed: the request was decrypted."""
            return SealedRefusal(error, secret, envelope.enc)

        route, release = await self._commit(
            lambda: self._routes.route(request.model, request.features()),
            envelope.enc,
            device,
            verdict.new,
            ip,
            sealed,
        )
        return Admitted(envelope, request, secret, route, release)

    async def admit_outer(
        self,
        body: bytes,
        client_ip: str,
        pow_header: bytes | None,
        route: Callable[[OuterRequest], R],
    ) -> AdmittedOuter[R]:
        """Protocol v2's checks (see the module docstring); raises the first rejection: a
        plain :class:`ProtocolError` before the outer layer is open (and ``rate_limited``, which
        only depends on the address), a :class:`SealedRefusal` after. ``route`` finds the
        request's candidate nodes (``model_unknown``, ``no_backend``)."""
        s, store = self._settings, self.store
        if not store.available:
            raise self.reject(_unavailable())
        ip = bucket(client_ip, s.rate_limit_ipv6_prefix)
        try:
            kid, _ = parse_outer_header(body, s.max_body_bytes)
            header = _pow_header(pow_header)
            secret_key = self._keys.private_key_for(kid)
            if secret_key is None:
                raise ProtocolError("key_unknown", "unknown key id")
            outer = open_outer(body, secret_key)
        except ProtocolError as e:  # SealedRefusal too: bad_payload, device_proof_failed
            verdict = await self._ask(store.gate(Gate(ip)))  # it counts toward the limit
            if verdict.refusal is None:
                self.rate.hit()
            culprit = ip if e.code != "key_unknown" else None
            raise self.reject(verdict_error(verdict) or e, culprit) from None

        def sealed(error: ProtocolError) -> SealedRefusal:
            """From here on every refusal goes back sealed: the outer layer was opened."""
            return SealedRefusal(error, outer.router_secret, outer.enc)

        device = outer.device_pk
        if s.device_auth == "required" and device is None:
            raise self.reject(
                sealed(ProtocolError("device_auth_required", "this router requires a device key"))
            )
        gate, difficulties = self._gate(device, outer.enc, header, ip)
        verdict = await self._ask(store.gate(gate))
        if verdict.refusal == "rate_limited":
            error = verdict_error(verdict)
            assert error is not None
            raise self.reject(error, ip)
        self.rate.hit()
        if verdict.refusal in ("pow_required", "pow_invalid"):
            raise sealed(self._pow_refused(verdict, difficulties[verdict.new], ip))
        error = verdict_error(verdict)
        if error is not None:
            raise self.reject(sealed(error), ip)
        try:
            check_timestamp(outer.ts, self._clock.seconds())
            if outer.ts < max(self.started, verdict.since):
                raise ProtocolError(
                    "stale", "the request predates the router's start: seal it again"
                )
            if verdict.seen:
                raise _replay()
        except ProtocolError as e:
            raise self.reject(sealed(e), ip) from None
        found, release = await self._commit(
            lambda: route(outer), outer.enc, device, verdict.new, ip, sealed
        )
        return AdmittedOuter(outer, found, ip, release)

    def charge(self, client_bucket: str, error: ProtocolError) -> Deferred[None]:
        """Count one more request against an address (a node could not open what it sent:
        issue 22, "a request whose proof fails at the node costs its address")."""
        self.reject(error, client_bucket)
        return Deferred.fromCoroutine(self._charge(client_bucket))

    async def _charge(self, client_bucket: str) -> None:
        try:
            await _settle(self.store.gate(Gate(client_bucket)))
        except Exception:  # the store is down: nothing to count against
            return

    async def _commit(
        self,
        route: Callable[[], R],
        enc: bytes,
        device: bytes | None,
        new: bool,
        ip: str,
        sealed: Callable[[ProtocolError], SealedRefusal],
    ) -> tuple[R, Callable[[], None]]:
        """Steps 11 to 13: the route, a stream slot, then the store's commit (replay, the
        per-device limit, the device's streams and budget); returns the route and the release
        of everything the request holds. Every refusal is raised ``sealed``: the request (v1.1)
        or its outer layer (v2) was opened before."""
        # Routing and this router's capacity are local: found now, refused in their turn
        # (after the per-device limit), and a refused request opens no stream and spends nothing.
        release_slot: Callable[[], None] | None = None
        found: R | None = None
        try:
            found = route()
            release_slot = self.slots.acquire()
            local_error = None
        except ProtocolError as e:
            local_error = e
        try:
            committed = await self._ask(
                self.store.commit(Commit(enc, device, new, release_slot is not None))
            )
        except BaseException as e:
            if release_slot is not None:
                release_slot()
            if isinstance(e, ProtocolError):
                raise sealed(e) from None
            raise
        error = verdict_error(committed) or local_error
        if error is not None:
            if release_slot is not None:
                release_slot()
            if error.code == "replay":
                raise sealed(self.reject(error, ip))
            raise sealed(self.reject(error, device=device))
        assert release_slot is not None and found is not None
        return found, _both(release_slot, committed.release)

    def _gate(
        self, device: bytes | None, enc: bytes, header: str | None, ip: str
    ) -> tuple[Gate, tuple[int, int]]:
        """The gate question, with the proof of work verified here (one HMAC and one hash per
        difficulty that may apply) and only its outcome sent to the store; and the
        difficulties for a known and for a new device."""
        s = self._settings
        known_difficulty = s.pow_difficulty if self.stressed(pending=1) else 0
        new_difficulty = max(known_difficulty, s.new_device_pow_difficulty)
        if device is None:
            new_difficulty = 0
        solution = None if header is None else pow.solution_id(header, enc)
        now = self._clock.seconds()

        def valid(difficulty: int) -> bool:
            return bool(
                difficulty
                and header is not None
                and pow.verify(self._keys.pow_key, header, enc, now, difficulty)
            )

        gate = Gate(
            ip,
            device,
            enc,
            pow_if_known=known_difficulty > 0,
            pow_if_new=new_difficulty > 0,
            solution=solution,
            valid_if_known=valid(known_difficulty),
            valid_if_new=valid(new_difficulty),
        )
        return gate, (known_difficulty, new_difficulty)

    def _pow_refused(self, verdict: Verdict, difficulty: int, ip: str) -> ProtocolError:
        if verdict.refusal == "pow_required":
            code, message, culprit = "pow_required", "solve the proof of work and retry", None
        else:
            code, message, culprit = "pow_invalid", "the proof of work was not accepted", ip
        challenge = pow.issue_challenge(self._keys.pow_key, difficulty, self._clock.seconds())
        return self.reject(
            ProtocolError(code, message, challenge=challenge, difficulty=difficulty), culprit
        )


def verdict_error(answer: Verdict | Committed) -> ProtocolError | None:
    """The error a store's refusal stands for (None: no refusal)."""
    code = answer.refusal
    if code is None:
        return None
    if code == "replay":
        return _replay()
    if code == "overloaded":
        return _unavailable()
    if code == "device_streams":
        return ProtocolError("device_streams", "too many open streams for this device")
    if code == "budget_exhausted":
        return ProtocolError(
            "budget_exhausted",
            "the privacy budget of this device is exhausted",
            retry_after=max(1, math.ceil(answer.retry_after)),
        )
    return _limited(code, answer.retry_after)


def _replay() -> ProtocolError:
    return ProtocolError("replay", "this request was already received")


def _unavailable() -> ProtocolError:
    return ProtocolError(
        "overloaded", "the router is at capacity, retry later", retry_after=UNAVAILABLE_RETRY
    )


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def release() -> None:
        first()
        second()

    return release


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
