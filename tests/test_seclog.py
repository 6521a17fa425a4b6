"""SecurityLog: JSON lines, keyed-hash identifiers, no raw identifier can get through."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest

from llmrouter.daykey import DayKey
from llmrouter.router import seclog
from llmrouter.router.seclog import Ident, SecurityLog
from llmrouter.terminate.cachekey import HEADER, CacheKeys

HASH_KEY = bytes(range(32))


class SecurityLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.lines: list[str] = []
        self.clock = Clock()
        self.clock.advance(1_700_000_000.12345)
        self.registry = CollectorRegistry()
        self.counter = Counter("llmrouter_security_events", "x", ["event"], registry=self.registry)
        self.log = SecurityLog(
            emit=self.lines.append, clock=self.clock, counter=self.counter, new_key=lambda: HASH_KEY
        )

    def test_one_json_line_per_event(self) -> None:
        self.log.event("replay", ip=self.log.ident("198.51.100.4"), kid="0a", count=3, ok=False)
        self.log.event("key_rotated", kid="0b", previous="0a", age=86400.5)
        self.assertEqual(len(self.lines), 2)
        self.assertNotIn("\n", self.lines[0])
        first = json.loads(self.lines[0])
        self.assertEqual(
            first,
            {
                "ts": 1700000000.123,
                "event": "replay",
                "count": 3,
                "ip": self.log.ident("198.51.100.4"),
                "kid": "0a",
                "ok": False,
            },
        )
        self.assertEqual(list(first)[:2], ["ts", "event"])

    def test_ident_is_truncated_hmac_sha256(self) -> None:
        device = os.urandom(32)
        expected = hmac.new(HASH_KEY, device, hashlib.sha256).hexdigest()[:16]
        self.assertEqual(self.log.ident(device), expected)
        self.assertEqual(self.log.ident("10.0.0.1"), self.log.ident(b"10.0.0.1"))
        self.assertIsInstance(self.log.ident(device), Ident)
        other = SecurityLog(emit=self.lines.append, new_key=lambda: b"\x01" * 32)
        self.assertNotEqual(other.ident(device), self.log.ident(device))

    def test_hash_key_is_random_in_memory_and_changes_every_day(self) -> None:
        """A long-lived key on disk let its holder reverse IPv4 hashes by trying all 2^32
        addresses (issue 8): the key is made in memory and replaced at every UTC midnight."""
        log = SecurityLog(emit=self.lines.append, clock=self.clock)
        again = SecurityLog(emit=self.lines.append, clock=self.clock)
        first = log.ident("198.51.100.4")
        self.assertNotEqual(again.ident("198.51.100.4"), first)  # no key to share or recover
        midnight = (int(self.clock.seconds()) // 86400 + 1) * 86400
        self.clock.advance(midnight - 0.001 - self.clock.seconds())
        self.assertEqual(log.ident("198.51.100.4"), first)
        self.clock.advance(0.001)
        self.assertNotEqual(log.ident("198.51.100.4"), first)

    def test_counts_events_by_name(self) -> None:
        self.log.event("replay")
        self.log.event("replay")
        self.log.event("stale")
        value = self.registry.get_sample_value
        self.assertEqual(value("llmrouter_security_events_total", {"event": "replay"}), 2.0)
        self.assertEqual(value("llmrouter_security_events_total", {"event": "stale"}), 1.0)

    def test_default_counter_is_the_module_counter(self) -> None:
        log = SecurityLog(emit=self.lines.append)
        labels = {"event": "pow_failed"}
        before = REGISTRY.get_sample_value("llmrouter_security_events_total", labels) or 0.0
        log.event("pow_failed")
        after = REGISTRY.get_sample_value("llmrouter_security_events_total", labels)
        self.assertEqual(after, before + 1)
        self.assertIs(seclog.SECURITY_EVENTS, log._counter)

    def test_default_emitter_is_twisted_logger(self) -> None:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        SecurityLog(clock=self.clock, counter=self.counter).event(
            "auth_failed", reason="decrypt_failed"
        )
        mine = [e for e in events if e.get("log_namespace") == "llmrouter.security"]
        self.assertEqual(len(mine), 1)
        line = formatEvent(mine[0])
        self.assertEqual(json.loads(line)["reason"], "decrypt_failed")
        self.assertEqual(json.loads(mine[0]["security_event"])["event"], "auth_failed")

    def test_bad_names_rejected(self) -> None:
        for name in ("", "Replay", "re play", "x" * 65, "rate-limited"):
            self.assertRaises(ValueError, self.log.event, name)
        for field in ("Bad", "ts", "event", "a-b"):
            self.assertRaises(ValueError, self.log.event, "replay", **{field: 1})
        self.assertRaises(ValueError, self.log.event, "replay", n=float("nan"))
        self.assertRaises(ValueError, self.log.event, "replay", n=float("inf"))
        self.assertEqual(self.lines, [])

    def test_repr_hides_the_hash_key(self) -> None:
        self.assertNotIn(HASH_KEY.hex(), repr(self.log))
        self.assertNotIn(repr(HASH_KEY), repr(self.log))
        self.assertRaises(ValueError, SecurityLog(new_key=lambda: b"short").ident, "x")


class CanaryTests(unittest.TestCase):
    """Raw identifiers in every shape a caller might have them: none may reach the output."""

    def test_no_raw_identifier_ever_emitted(self) -> None:
        lines: list[str] = []
        log = SecurityLog(emit=lines.append, counter=Counter("c", "c", ["event"], registry=None))
        device = b"CANARY-DEVICE-KEY-0123456789abcd"
        ip4, ip6 = "192.0.2.233", "2001:db8::c0ff:ee"
        canaries: list[object] = [
            device,
            bytearray(device),
            memoryview(device),
            device.hex(),
            device.hex()[:24],
            base64.urlsafe_b64encode(device).decode().rstrip("="),
            base64.b64encode(device).decode(),
            device.decode(),
            ip4,
            ip6,
            f"{ip4}:443",
            "canary prompt text",
            "CanaryPrompt",
            "canary-prompt-text-that-is-long-enough-to-exceed",
            ["192.0.2.233"],
            {"ip": ip4},
            None,
            object(),
        ]
        for value in canaries:
            with self.assertRaises((TypeError, ValueError)) as caught:
                log.event("rate_limited", ip=value)  # type: ignore[arg-type]
            message = str(caught.exception)
            self.assertNotIn(ip4, message)
            self.assertNotIn("CANARY", message)
            self.assertNotIn("anary", message)
        # The sanctioned way: hash first.
        for value in (device, ip4, ip6):
            log.event("rate_limited", ip=log.ident(value))
        output = "\n".join(lines)
        self.assertEqual(len(lines), 3)
        for needle in (ip4, ip6, "CANARY", device.hex()[:12], "192.0.2", "2001:db8"):
            self.assertNotIn(needle, output)
        b64 = base64.urlsafe_b64encode(device).decode().rstrip("=")
        self.assertNotIn(b64[:12], output)


class CacheKeyTests(unittest.TestCase):
    """The backend's prompt-cache key: per device, keyed, unrelated to the log's identifier,
    under a key of its own that is replaced at every UTC midnight."""

    def test_keyed_per_device(self) -> None:
        secret = b"k" * 32
        keys = CacheKeys(DayKey(new_key=lambda: secret))
        device, other = b"\x01" * 32, b"\x02" * 32
        (value,) = keys.headers(device)[HEADER]
        self.assertEqual(keys.headers(device), {HEADER: [value]})
        self.assertNotEqual(keys.headers(other)[HEADER], [value])
        self.assertNotEqual(
            CacheKeys(DayKey(new_key=lambda: b"j" * 32)).headers(device)[HEADER], [value]
        )
        self.assertEqual(keys.headers(None), {})
        self.assertRegex(value, rb"^[A-Za-z0-9_-]{43}$")
        log = SecurityLog(emit=lambda line: None, new_key=lambda: secret)
        self.assertNotIn(log.ident(device).encode(), value)
        self.assertNotIn(secret[:8].hex(), repr(keys))

    def test_random_and_replaced_every_day(self) -> None:
        clock = Clock()
        clock.advance(86400 - 10)
        device = b"\x01" * 32
        keys = CacheKeys(DayKey(clock))
        today = keys.headers(device)[HEADER]
        self.assertEqual(keys.headers(device)[HEADER], today)
        other_router = CacheKeys(DayKey(clock))  # random: each router has its own
        self.assertNotEqual(other_router.headers(device)[HEADER], today)
        clock.advance(10)  # UTC midnight
        self.assertNotEqual(keys.headers(device)[HEADER], today)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_routers_sharing_state_derive_the_same_key(self) -> None:
        """Behind one balancer a device's next turn may reach another router: with ``STATE_URL``
        every router derives the day's cache key from the shared ``state-hash.key``."""
        from types import SimpleNamespace

        from llmrouter.router.settings import load
        from llmrouter.router.tap import cache_keys

        clock = Clock()
        clock.advance(86400 - 10)
        device = b"\x01" * 32
        shared = load({"STATE_URL": "unix:///run/redis/redis.sock"})
        directory = SimpleNamespace(state_key=b"s" * 32)
        a, b = cache_keys(shared, clock, directory), cache_keys(shared, clock, directory)
        today = a.headers(device)[HEADER]
        self.assertEqual(b.headers(device)[HEADER], today)
        other = cache_keys(shared, clock, SimpleNamespace(state_key=b"t" * 32))
        self.assertNotEqual(other.headers(device)[HEADER], today)
        # not the Redis names' day key, and not the same as a lone router's random key
        self.assertNotEqual(cache_keys(load({}), clock, directory).headers(device)[HEADER], today)
        clock.advance(10)  # UTC midnight: both move to the next day's key together
        tomorrow = a.headers(device)[HEADER]
        self.assertNotEqual(tomorrow, today)
        self.assertEqual(b.headers(device)[HEADER], tomorrow)
        self.assertEqual(clock.getDelayedCalls(), [])
