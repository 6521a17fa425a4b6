"""Admission's state in Redis, shared by several routers (``STATE_URL``; issue 10).

Every router behind one name must refuse a request another router accepted (replay) and share
every limit, or each limit is multiplied by the number of routers. This store keeps the same
tables as :class:`~llmrouter.router.memory.MemoryStore` in one Redis (or Valkey), through
txredisapi (Twisted-native: the reactor never blocks), and answers each of admission's two
questions with one server-side Lua script, so one round trip each (:data:`GATE`, :data:`COMMIT`;
EVALSHA, EVAL when the server does not have the script yet).

What Redis sees (``tests/test_state_redis.py`` scans every key and value after traffic):

* key names ``llmr:T:HASH``: a table letter and HMAC-SHA256 of the identifier (an address
  bucket, a device key, an ``enc``, a proof-of-work solution) under the day's key, truncated to
  128 bits; never the identifier itself;
* values: expiry times, GCRA arrival times, budget counters and random stream-lease ids.

The day's key is HMAC-SHA256 of the shared secret ``state-hash.key`` in the key directory (so
every router with the directory derives the same one) and the UTC date: hashes of one
identifier are unrelated from one day to the next, and Redis holds each only for its entry's
TTL. Entries live across midnight through the previous day's name: each script reads today's
name, else yesterday's, and writes today's (deleting yesterday's).

Times are the routers' clock (passed to each script; entries hold their expiry time), so all
routers judge alike and tests can drive the clock; Redis TTLs only reclaim memory. Every key has
one. Per-device open streams are leases (sorted sets scored by expiry) renewed every third of
``STATE_LEASE_SECONDS`` while the stream runs, so a router that dies holds its slots only until
they expire.

When Redis cannot answer (not connected, a reply slower than :data:`REPLY_TIMEOUT`, an error),
the question fails and admission refuses the request (503 ``overloaded``): a store that cannot
check replay must not let requests through. txredisapi reconnects with capped exponential
backoff (also when no reply came for :data:`REPLY_TIMEOUT`: Redis hangs);
``llmrouter_state_up`` says whether the router is connected, ``/health`` says degraded.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmrouter import pow
from llmrouter.daykey import derived_key
from llmrouter.router.interfaces import Commit, Committed, Gate, IAdmissionStore, Verdict
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Settings

__all__ = ["COMMIT", "GATE", "KNOWN_SECONDS", "REPLY_TIMEOUT", "RedisStore", "StateNames"]

_log = Logger(namespace="llmrouter.router.redisstore")

PREFIX = "llmr:"
# A reply slower than this fails the request. It is measured on the router's own event loop, so
# it allows for a router busy relaying many streams (each admission waits a few loop iterations
# for its two replies; bench/scale_out_bench.py saw 2.5 s at full load); when no reply at all
# came meanwhile, Redis hangs: the connection is dropped and made again.
REPLY_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2
# Reconnection backoff: 0.1 s, doubling, at most 5 s (with txredisapi's jitter).
BACKOFF_INITIAL, BACKOFF_FACTOR, BACKOFF_MAX = 0.1, 2.0, 5.0
# How long a device stays known: the day's name is found on that day and the next, and each
# request moves it to the current day, so a device idle for longer solves one more proof of work.
KNOWN_SECONDS = 2 * 86400
_SHA: dict[str, str] = {}  # script -> SHA-1, the name EVALSHA calls it by
SINCE = PREFIX + "since"  # when Redis's memory began (the only name that is not a hash)
_UNUSED = PREFIX + "-"  # a key a script is handed but does not touch (base mode, junk)

# Shared by the scripts: the routers' clock, expiry-valued entries and GCRA.
_LUA_COMMON = """
local now = tonumber(ARGV[1])
local function ttl_ms(expiry)
  return math.max(1, math.ceil((expiry - now) * 1000))
end
local function live(key)
  local v = redis.call('GET', key)
  return v ~= false and tonumber(v) > now
end
local function mark(key, expiry)
  redis.call('SET', key, string.format('%.3f', expiry), 'PX', ttl_ms(expiry))
end
-- GCRA: the theoretical arrival time of the key (today's name, else yesterday's); 0 when the
-- request is allowed (and counted, under today's name), else the seconds until it would be.
local function gcra(cur, prev, interval, tolerance)
  local tat = tonumber(redis.call('GET', cur) or redis.call('GET', prev) or now)
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait > 1e-6 then return wait end
  tat = tat + interval
  redis.call('SET', cur, string.format('%.6f', tat), 'PX', ttl_ms(tat))
  redis.call('DEL', prev)
  return 0
end
"""

# KEYS: address (2), known (2), spent solution (2), new devices (2), replay (2), today's
# name then yesterday's; the marker of when Redis's memory began (its TTL, a day, is renewed).
# ARGV: now, address interval and tolerance, full (0: junk, count the address only), device,
# pow if known, pow if new, solution, valid if known, valid if new, solution ttl, new-device
# interval and tolerance, known seconds.
# Returns {refusal or '', retry after, new, seen[, since]}.
GATE = (
    _LUA_COMMON
    + """
local wait = gcra(KEYS[1], KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))
if wait > 0 then return {'rate_limited', tostring(wait), 0, 0} end
if ARGV[4] == '0' then return {'', '0', 0, 0} end
local new = 0
if ARGV[5] == '1' then
  if live(KEYS[3]) or live(KEYS[4]) then
    mark(KEYS[3], now + tonumber(ARGV[14]))
    redis.call('DEL', KEYS[4])
  else
    new = 1
  end
end
local due, valid = ARGV[6], ARGV[9]
if new == 1 then due, valid = ARGV[7], ARGV[10] end
if due == '1' then
  if ARGV[8] == '0' then return {'pow_required', '0', new, 0} end
  if valid == '0' or live(KEYS[5]) or live(KEYS[6]) then return {'pow_invalid', '0', new, 0} end
  mark(KEYS[5], now + tonumber(ARGV[11]))
end
if new == 1 then
  wait = gcra(KEYS[7], KEYS[8], tonumber(ARGV[12]), tonumber(ARGV[13]))
  if wait > 0 then return {'new_device_rate_limited', tostring(wait), 1, 0} end
end
local seen = 0
if live(KEYS[9]) or live(KEYS[10]) then seen = 1 end
-- When this memory began: a Redis that restarted has forgotten every enc it held.
local since = redis.call('GET', KEYS[11])
if since == false then
  since = string.format('%d', math.floor(now))
  redis.call('SET', KEYS[11], since, 'PX', 86400000)
elseif redis.call('PTTL', KEYS[11]) < 43200000 then
  redis.call('PEXPIRE', KEYS[11], 86400000)
end
return {'', '0', new, seen, since}
"""
)

# KEYS: replay (2), device (2), known (2), device streams (2), budget (2). ARGV: now, replay
# window, device, new, device interval and tolerance, known seconds, stream, streams per device,
# lease seconds, lease id, epsilon total, epsilon per query, budget period.
# Returns {refusal or '', retry after}.
COMMIT = (
    _LUA_COMMON
    + """
if live(KEYS[1]) or live(KEYS[2]) then return {'replay', '0'} end
mark(KEYS[1], now + tonumber(ARGV[2]))
if ARGV[3] == '0' then return {'', '0'} end
local wait = gcra(KEYS[3], KEYS[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
if wait > 0 then return {'device_rate_limited', tostring(wait)} end
if ARGV[4] == '1' then mark(KEYS[5], now + tonumber(ARGV[7])) end
if ARGV[8] == '0' then return {'', '0'} end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now)
if redis.call('ZCARD', KEYS[7]) + redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[9]) then
  return {'device_streams', '0'}
end
if redis.call('EXISTS', KEYS[9]) == 0 and redis.call('EXISTS', KEYS[10]) == 1 then
  redis.call('RENAME', KEYS[10], KEYS[9])
end
local period, total, cost = tonumber(ARGV[14]), tonumber(ARGV[12]), tonumber(ARGV[13])
local started = tonumber(redis.call('HGET', KEYS[9], 's'))
local spent = tonumber(redis.call('HGET', KEYS[9], 'e'))
if started == nil or spent == nil or started + period <= now then
  started, spent = now, 0
end
if spent + cost > total + 1e-9 then
  return {'budget_exhausted', tostring(started + period - now)}
end
redis.call('HSET', KEYS[9], 's', string.format('%.3f', started), 'e', tostring(spent + cost))
redis.call('PEXPIRE', KEYS[9], ttl_ms(started + period))
local expiry = now + tonumber(ARGV[10])
redis.call('ZADD', KEYS[7], string.format('%.3f', expiry), ARGV[11])
redis.call('PEXPIRE', KEYS[7], ttl_ms(expiry))
return {'', '0'}
"""
)

# KEYS: stream sets; ARGV: now, expiry, then one lease id per key. Moves each lease's expiry.
RENEW = (
    _LUA_COMMON
    + """
local expiry = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, string.format('%.3f', expiry), ARGV[2 + i])
  redis.call('PEXPIRE', key, ttl_ms(expiry))
end
return #KEYS
"""
)


STATE_LABEL = b"llmrouter/state/v1/"


class StateUnavailable(Exception):
    """Redis could not answer (the message never names a key or a URL)."""


class StateNames:
    """Redis key names: a table letter and a keyed hash of the identifier, per UTC day.

    ``secret`` reads the shared secret (the key directory's ``state-hash.key``); the day keys
    derived from it are cached for today and yesterday only.
    """

    def __init__(self, clock: IReactorTime, secret: Callable[[], bytes]) -> None:
        self._clock = clock
        self._secret = secret
        self._days: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return "StateNames(<keys redacted>)"

    def _day_key(self, day: int) -> bytes:
        key = self._days.get(day)
        if key is None:
            key = derived_key(self._secret(), STATE_LABEL, datetime.date.fromordinal(day))
            self._days = {d: k for d, k in self._days.items() if d >= day - 1}
            self._days[day] = key
        return key

    def both(self, table: str, value: bytes | str) -> tuple[str, str]:
        """(today's name, yesterday's name) of ``value`` in ``table``."""
        data = table.encode("ascii") + b"\0" + (value.encode() if isinstance(value, str) else value)
        today = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC).toordinal()
        return (self._name(today, table, data), self._name(today - 1, table, data))

    def _name(self, day: int, table: str, data: bytes) -> str:
        digest = hmac.new(self._day_key(day), data, hashlib.sha256).hexdigest()
        return f"{PREFIX}{table}:{digest[:32]}"


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _gcra(per_minute: float, burst: int) -> tuple[str, str]:
    """The interval and tolerance of a limit (as ``llmrouter.router.ratelimit`` keeps it)."""
    interval = 60.0 / per_minute
    return repr(interval), repr(interval * (burst - 1))


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """txredisapi's connection factory, telling us when the connection comes and goes."""

    def __init__(self, on_change: Callable[[bool], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_change = on_change
        self.initialDelay, self.factor, self.maxDelay = BACKOFF_INITIAL, BACKOFF_FACTOR, BACKOFF_MAX

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        self._on_change(self.size > 0)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self._on_change(self.size > 0)


def endpoint_for(reactor: Any, url: str, tls_ca: Path | None) -> IStreamClientEndpoint:
    """The client endpoint of a ``STATE_URL`` (validated by the settings)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return UNIXClientEndpoint(reactor, parts.path, timeout=CONNECT_TIMEOUT)
    host = parts.hostname or "localhost"
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, host, parts.port or 6379, timeout=CONNECT_TIMEOUT
    )
    if parts.scheme == "rediss":
        trust = platformTrust() if tls_ca is None else Certificate.loadPEM(tls_ca.read_bytes())
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
    return endpoint


def _database(url: str) -> tuple[int | None, str | None, str | None]:
    """(database, user, password) of a ``STATE_URL``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parts.query.removeprefix("db=") or None
    else:
        db = parts.path.strip("/") or None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return (None if db is None else int(db)), user, password


@implementer(IAdmissionStore)
class RedisStore:
    """See the module docstring. ``secret`` returns the shared hashing secret."""

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        clock: IReactorTime,
        secret: Callable[[], bytes],
        metrics: RouterMetrics,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._names = StateNames(clock, secret)
        self._metrics = metrics
        self._factory: _Factory | None = None
        self._leases: dict[str, str] = {}  # lease id -> its stream set's name
        self._renewer: LoopingCall | None = None
        self._was_up = False
        self._replied_at = 0.0  # time.perf_counter() of the last reply
        self.available = False
        s = settings
        self._address = _gcra(s.rate_limit_per_minute, s.rate_limit_burst)
        self._device = _gcra(s.device_rate_limit_per_minute, s.device_rate_limit_burst)
        self._new = _gcra(s.new_devices_per_hour / 60.0, s.new_device_burst)
        metrics.watch_state(lambda: self.available)

    def __repr__(self) -> str:
        return f"RedisStore({'up' if self.available else 'down'}, {len(self._leases)} leases)"

    # Lifecycle.

    def start(self) -> None:
        s = self._settings
        db, user, password = _database(s.state_url)
        self._factory = _Factory(
            self._changed,
            uuid="llmrouter-state",
            dbid=db,
            poolsize=1,
            isLazy=True,
            password=password,
            username=user,
        )
        # fires once: connected, or refused at AUTH/SELECT (a wrong password or database)
        self._factory.deferred.addErrback(self._refused)
        self._factory.startConnecting(endpoint_for(self._reactor, s.state_url, s.state_tls_ca))
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = self._clock
        self._renewer.start(s.state_lease_seconds / 3, now=False)

    def stop(self) -> Deferred[None] | None:
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        factory, self._factory = self._factory, None
        self.available = False
        if factory is None:
            return None
        stopped: Deferred[None] = factory.disconnect()
        return stopped.addErrback(lambda _: None)

    def _refused(self, failure: Failure) -> None:
        # txredisapi's message quotes Redis's reply, never the password
        _log.error("shared state (Redis) refused the connection: {why}", why=str(failure.value))

    def _changed(self, up: bool) -> None:
        self.available = up and self._factory is not None
        if self.available != self._was_up:
            self._was_up = self.available
            if self.available:
                _log.info("shared state (Redis) connected")
                self._mark_since()
            else:
                _log.warn("shared state (Redis) unreachable: admission refuses requests")

    def _mark_since(self) -> None:
        """Record when Redis's memory began, unless it was (first on each new connection, so
        before any gate on it): a Redis that restarted empty makes older requests stale."""
        assert self._factory is not None
        since = str(int(self._clock.seconds()))  # whole seconds, as request timestamps are
        d = self._factory.handler.set(SINCE, since, only_if_not_exists=True, pexpire=86400000)
        d.addErrback(lambda _: self._metrics.state_errors.labels("since").inc())

    # One script call.

    def _call(self, operation: str, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if not self.available or self._factory is None:
            self._metrics.state_errors.labels(operation).inc()
            return defer.fail(StateUnavailable("not connected"))
        started = time.perf_counter()
        answer: Deferred[Any] = Deferred()

        def late() -> None:
            self._metrics.state_errors.labels(operation).inc()
            answer.errback(StateUnavailable("timeout"))
            if self._replied_at < started and self._factory is not None:
                for connection in list(self._factory.pool):  # nothing came back: it hangs
                    connection.transport.abortConnection()

        timer = self._reactor.callLater(REPLY_TIMEOUT, late)

        def done(reply: Any) -> None:
            self._replied_at = time.perf_counter()
            if not timer.active():
                return  # answered too late: the request was refused already
            timer.cancel()
            if isinstance(reply, Failure):
                self._metrics.state_errors.labels(operation).inc()
                answer.errback(StateUnavailable(type(reply.value).__name__))
            else:
                self._metrics.state_seconds.labels(operation).observe(time.perf_counter() - started)
                answer.callback(reply)

        self._evalsha(script, [k.encode() for k in keys], [a.encode() for a in args]).addBoth(done)
        return answer

    def _evalsha(self, script: str, keys: list[bytes], args: list[bytes]) -> Deferred[Any]:
        """EVALSHA, and EVAL when the server does not have the script (after its restart)."""
        assert self._factory is not None
        handler = self._factory.handler
        sha = _SHA.get(script)
        if sha is None:
            sha = _SHA[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324

        def missing(failure: Failure) -> Deferred[Any]:
            failure.trap(txredisapi.ScriptDoesNotExist)
            return handler.eval(script, keys, args)  # type: ignore[no-any-return]

        d: Deferred[Any] = handler.evalsha(sha, keys, args)
        return d.addErrback(missing)

    # The two questions.

    def gate(self, query: Gate) -> Deferred[Verdict]:
        n, now = self._names, self._clock.seconds()
        full = query.enc is not None
        device = query.device is not None and full
        unused = (_UNUSED, _UNUSED)
        keys = [
            *n.both("a", query.address),
            *(n.both("k", query.device) if device and query.device else unused),
            *(n.both("p", query.solution) if full and query.solution else unused),
            *(n.both("n", query.address) if device else unused),
            *(n.both("r", query.enc) if query.enc is not None else unused),
            SINCE,
        ]
        args = [
            repr(now),
            *self._address,
            _flag(full),
            _flag(device),
            _flag(query.pow_if_known),
            _flag(query.pow_if_new),
            _flag(query.solution is not None),
            _flag(query.valid_if_known),
            _flag(query.valid_if_new),
            repr(float(pow.CHALLENGE_TTL)),
            *self._new,
            repr(float(KNOWN_SECONDS)),
        ]

        def verdict(reply: list[Any]) -> Verdict:
            refusal, retry, new, seen, *since = reply
            return Verdict(
                refusal or None,
                float(retry),
                bool(int(new)),
                bool(int(seen)),
                float(since[0]) if since else 0.0,
            )

        return self._call("gate", GATE, keys, args).addCallback(verdict)

    def commit(self, query: Commit) -> Deferred[Committed]:
        s, n, now = self._settings, self._names, self._clock.seconds()
        unused = (_UNUSED, _UNUSED)
        device = query.device
        keys = [
            *n.both("r", query.enc),
            *(n.both("d", device) if device is not None else unused),
            *(n.both("k", device) if device is not None else unused),
            *(n.both("s", device) if device is not None else unused),
            *(n.both("b", device) if device is not None else unused),
        ]
        lease = secrets.token_hex(16)
        stream = device is not None and query.stream
        args = [
            repr(now),
            repr(s.replay_window_seconds),
            _flag(device is not None),
            _flag(query.new),
            *self._device,
            repr(float(KNOWN_SECONDS)),
            _flag(stream),
            str(s.max_streams_per_device),
            repr(s.state_lease_seconds),
            lease,
            repr(s.epsilon_total),
            repr(s.epsilon_per_query),
            repr(s.budget_period_seconds),
        ]

        def committed(reply: list[Any]) -> Committed:
            refusal, retry = reply
            if refusal or not stream:
                return Committed(refusal or None, float(retry))
            self._leases[lease] = keys[6]
            return Committed(release=lambda: self._release(lease))

        return self._call("commit", COMMIT, keys, args).addCallback(committed)

    # Stream leases.

    def _release(self, lease: str) -> None:
        key = self._leases.pop(lease, None)
        if key is None or self._factory is None or not self.available:
            return  # the lease expires by itself
        d = self._factory.handler.zrem(key, lease)
        d.addErrback(lambda _: self._metrics.state_errors.labels("release").inc())

    def _renew(self) -> None:
        if not self._leases or not self.available:
            return
        leases = list(self._leases.items())
        now = self._clock.seconds()
        expiry = now + self._settings.state_lease_seconds
        keys = [key for _, key in leases]
        args = [repr(now), repr(expiry), *(lease for lease, _ in leases)]
        self._call("renew", RENEW, keys, args).addErrback(lambda _: None)
