"""Several routers sharing admission's state through a real ``redis-server`` (issue 10).

Every admission test of tests/test_router_admission.py runs again against Redis; then two
routers on one Redis (the second a key follower of the first): a request accepted by one and
replayed to the other is refused, limits and budgets are shared, a device's stream held by a
router that is killed is freed when its lease expires, Redis stopped fails closed and recovers
when it comes back (without forgetting what it forgot: requests from before are stale), Redis
holds nothing but hashes and counters with a TTL, and a leader's rotation reaches the follower
within seconds, byte for byte. Last, both routers behind a real Caddy with the scale-out settings.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from llmrouter import hpke, pow
from llmrouter.protocol import b64u_encode
from llmrouter.router.redisstore import StateNames
from tests import test_router_admission
from tests.daemons import start_router_daemon
from tests.redis_server import RedisServer, start_redis
from tests.router_support import (
    Script,
    error_of,
    http,
    metric_value,
    outcome,
    post_chat,
    sealed,
    short_tempdir,
    start_fault_backend,
    start_router,
)
from tests.router_support import (
    prompt as prompt_request,
)

ROOT = Path(__file__).resolve().parent.parent


@defer.inlineCallbacks
def until(condition: Any, limit: float = 20.0, step: float = 0.02) -> Any:
    """Wait (real time) until ``condition()`` is true; fail after ``limit`` seconds."""
    for _ in range(int(limit / step)):
        if condition():
            return
        yield deferLater(reactor, step, lambda: None)
    raise AssertionError("condition not reached")


class RedisAdmissionTests(test_router_admission.AdmissionTests):
    """Every admission check, in order, with the state in Redis instead of memory."""

    @defer.inlineCallbacks
    def router(self, script: Script | None = None, **changes: Any) -> Any:
        self.redis = start_redis(self)
        running = yield super().router(script, state_url=self.redis.url, **changes)
        yield until(lambda: running.router.store.available)
        return running

    @defer.inlineCallbacks
    def test_replay_cache_full(self) -> Any:
        """Redis bounds memory with ``maxmemory`` and ``noeviction`` (docs/deployment.md), not an
        entry count: full, it refuses writes, and admission refuses the request rather than
        forget one (evicting would let it be replayed)."""
        running = yield self.router()
        body, _, _ = yield sealed(running)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        self.redis.cli("CONFIG", "SET", "maxmemory", "1")
        body, _, _ = yield sealed(running)
        yield self.rejected(running, body, 503, "overloaded")

    def remaining(self, running: Any, device: bytes) -> defer.Deferred[float]:
        names = StateNames(running.router.clock, lambda: running.router.keys.state_key)
        spent = self.redis.cli("HGET", names.both("b", device)[0], "e").strip()
        return defer.succeed(round(10.0 - float(spent or 0), 9))


class TwoRouters(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def routers(self, script: Script | None = None, clock: Any = None, **changes: Any) -> Any:
        """Routers A (key leader) and B (follower of A's key directory) on one Redis."""
        if not hasattr(self, "redis"):
            self.redis = start_redis(self)
        self.fake, url = yield start_fault_backend(self, script or Script(tokens=2))
        if clock is None:
            clock = Clock()
            clock.advance(1_700_000_000)
        changes = {"state_url": self.redis.url, **changes}
        a = yield start_router(self, [url], clock=clock, **changes)
        b = yield start_router(
            self,
            [url],
            clock=clock,
            keys_dir=a.router.settings.keys_dir,
            keys_role="follower",
            **changes,
        )
        yield until(lambda: a.router.store.available and b.router.store.available)
        return a, b

    @defer.inlineCallbacks
    def status(self, running: Any, body: bytes, headers: Any = None) -> Any:
        status, got_headers, raw = yield post_chat(running.url, body, headers)
        return outcome(body, status, got_headers, raw)


class SharedStateTests(TwoRouters):
    @defer.inlineCallbacks
    def test_replay_to_another_router_is_refused(self) -> Any:
        a, b = yield self.routers()
        body, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, body)), 200)
        self.assertEqual((yield self.status(b, body)), (409, "replay"))
        self.assertEqual((yield self.status(a, body)), (409, "replay"))

    @defer.inlineCallbacks
    def test_limits_are_shared(self) -> Any:
        a, b = yield self.routers(
            rate_limit_burst=3,
            rate_limit_per_minute=1,
            device_rate_limit_burst=2,
            device_rate_limit_per_minute=1,
        )
        device = hpke.generate_key_pair()
        found = []
        for running in (a, b, a):
            body, _, _ = yield sealed(running, device=device)
            found.append((yield self.status(running, body)))
        self.assertEqual(found, [200, 200, (429, "device_rate_limited")])
        body, _, _ = yield sealed(b)  # the address's third request: its burst is spent
        self.assertEqual((yield self.status(b, body)), (429, "rate_limited"))

    @defer.inlineCallbacks
    def test_budget_is_shared(self) -> Any:
        a, b = yield self.routers(epsilon_total=0.2, epsilon_per_query=0.1)
        device = hpke.generate_key_pair()
        found = []
        for running in (a, b, a, b):
            body, _, _ = yield sealed(running, device=device)
            found.append((yield self.status(running, body)))
        exhausted = (429, "budget_exhausted")
        self.assertEqual(found, [200, 200, exhausted, exhausted])

    @defer.inlineCallbacks
    def test_a_device_pays_its_proof_of_work_once_for_all_routers(self) -> Any:
        a, b = yield self.routers(new_device_pow_difficulty=4)
        device = hpke.generate_key_pair()
        body, envelope, _ = yield sealed(a, device=device)
        status, _, raw = yield post_chat(a.url, body)
        self.assertEqual(status, 401)
        challenge = json.loads(raw)["error"]["challenge"]
        header = {pow.HEADER.encode(): [pow.solve(challenge, envelope.enc).encode()]}
        self.assertEqual((yield self.status(a, body, header)), 200)
        body, _, _ = yield sealed(b, device=device)
        self.assertEqual((yield self.status(b, body)), 200)  # known on B too: no new work
        # the spent solution is spent everywhere
        body2, envelope2, _ = yield sealed(b, device=hpke.generate_key_pair())
        status, _, raw = yield post_chat(b.url, body2)
        challenge = json.loads(raw)["error"]["challenge"]
        header = {pow.HEADER.encode(): [pow.solve(challenge, envelope2.enc).encode()]}
        junk = json.dumps(dict(json.loads(body2), ct=b64u_encode(b"\x00" * 40))).encode()
        self.assertEqual((yield self.status(b, junk, header)), (400, "decrypt_failed"))
        self.assertEqual((yield self.status(a, body2, header)), (401, "pow_invalid"))

    @defer.inlineCallbacks
    def test_device_streams_are_shared(self) -> Any:
        a, b = yield self.routers(Script(hang=True), max_streams_per_device=1)
        device = hpke.generate_key_pair()
        body, _, _ = yield sealed(a, device=device)
        first = post_chat(a.url, body)
        yield until(lambda: a.router.admission.slots.open == 1)
        body, _, _ = yield sealed(b, device=device)
        self.assertEqual((yield self.status(b, body)), (429, "device_streams"))
        first.cancel()
        yield self.assertFailure(first, Exception)
        yield until(lambda: a.router.admission.slots.open == 0)
        # the release reached Redis: B admits the device again
        body, _, _ = yield sealed(b, device=device)
        second = post_chat(b.url, body)
        yield until(lambda: b.router.admission.slots.open == 1)
        second.cancel()
        yield self.assertFailure(second, Exception)

    @defer.inlineCallbacks
    def test_leases_of_a_killed_router_expire(self) -> Any:
        """Router A is a real process killed with SIGKILL while it holds a device's stream: the
        lease it can no longer renew expires after STATE_LEASE_SECONDS and B admits the device."""
        self.redis = start_redis(self)
        self.fake, url = yield start_fault_backend(self, Script(hang=True))
        directory = short_tempdir(self)
        env = {
            "STATE_URL": self.redis.url,
            "STATE_LEASE_SECONDS": "3",
            "MAX_STREAMS_PER_DEVICE": "1",
            "NEW_DEVICE_POW_DIFFICULTY": "0",
        }
        daemon = start_router_daemon(self, directory, [url], env=env)
        yield daemon.start()
        b = yield start_router(
            self,
            [url],
            clock=reactor,
            keys_dir=directory / "keys",
            keys_role="follower",
            state_url=self.redis.url,
            state_lease_seconds=3,
            max_streams_per_device=1,
        )
        yield until(lambda: b.router.store.available)
        device = hpke.generate_key_pair()
        body, _, _ = yield sealed(b, device=device)
        held = post_chat(f"unix:{directory / 'router.sock'}", body)
        held.addErrback(lambda _: None)
        yield until(lambda: self.fake.log.requests == 1)
        body, _, _ = yield sealed(b, device=device)
        self.assertEqual((yield self.status(b, body)), (429, "device_streams"))
        daemon.signal("KILL")
        yield daemon.wait_exit()
        found: list[Any] = []

        @defer.inlineCallbacks
        def attempt() -> Any:  # 200: a stream opened (the backend hangs: it never ends)
            body, _, _ = yield sealed(b, device=device)
            answer: list[Any] = []
            request = post_chat(b.url, body).addBoth(answer.append)
            yield until(lambda: answer or b.router.admission.slots.open == 1)
            if answer:
                found.append(answer[0][0])
            else:
                found.append(200)
                request.cancel()

        for _ in range(100):
            yield attempt()
            if found[-1] == 200:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(found[-1], 200, found)


class OutageTests(TwoRouters):
    @defer.inlineCallbacks
    def test_redis_stopped_fails_closed_then_recovers(self) -> Any:
        a, _ = yield self.routers()
        body, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, body)), 200)
        self.redis.stop()
        yield until(lambda: not a.router.store.available)
        fresh, _, _ = yield sealed(a)
        status, headers, raw = yield post_chat(a.url, fresh)
        self.assertEqual((status, error_of(raw)[0]), (503, "overloaded"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"2"])
        status, _, raw = yield http(a.url, path="/health")
        self.assertEqual((status, json.loads(raw)["status"]), (503, "degraded"))
        metrics = a.router.metrics.render().decode()
        self.assertEqual(metric_value(metrics, "llmrouter_state_up"), 0)
        self.assertGreaterEqual(
            metric_value(metrics, "llmrouter_admission_rejections_total", 'reason="overloaded"'), 1
        )

        a.router.clock.advance(1)
        self.redis.start()  # empty: no RDB, no AOF
        yield until(lambda: a.router.store.available)
        status, _, _ = yield http(a.url, path="/health")
        self.assertEqual(status, 200)
        self.assertEqual(metric_value(a.router.metrics.render().decode(), "llmrouter_state_up"), 1)
        # The request accepted before the outage is not in the new Redis; it predates its
        # memory, so it is stale rather than accepted twice.
        self.assertEqual((yield self.status(a, body)), (401, "stale"))
        fresh, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, fresh)), 200)

    @defer.inlineCallbacks
    def test_a_stalled_redis_fails_closed_within_the_reply_timeout(self) -> Any:
        a, _ = yield self.routers()
        assert self.redis.process is not None
        self.redis.process.send_signal(signal.SIGSTOP)  # connected, but never answers
        self.addCleanup(
            lambda: self.redis.process and self.redis.process.send_signal(signal.SIGCONT)
        )
        body, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, body)), (503, "overloaded"))
        self.redis.process.send_signal(signal.SIGCONT)
        yield until(lambda: a.router.store.available)
        body, _, _ = yield sealed(a)
        for _ in range(100):  # the connection the timeout dropped comes back
            status = yield self.status(a, body)
            if status == 200:
                break
            body, _, _ = yield sealed(a)
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(status, 200)


class ConnectionTests(TwoRouters):
    @defer.inlineCallbacks
    def test_password_and_database(self) -> Any:
        """``unix://:PASSWORD@/PATH?db=N``: AUTH, then SELECT; a wrong password never connects
        and every chat is refused."""
        self.redis = start_redis(self, "--requirepass", "pa:ss@word")
        url = f"unix://:pa%3Ass%40word@{self.redis.socket}?db=3"
        a, b = yield self.routers(state_url=url)
        body, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, body)), 200)
        self.assertEqual((yield self.status(b, body)), (409, "replay"))
        auth = ("--pass", "pa:ss@word", "--no-auth-warning")
        self.assertTrue(self.redis.cli("-n", "3", "--scan", options=auth).split())
        self.assertEqual(self.redis.cli("-n", "0", "--scan", options=auth).split(), [])
        _, backend = yield start_fault_backend(self, Script())
        wrong = yield start_router(
            self, [backend], state_url=f"unix://:nope@{self.redis.socket}?db=3"
        )
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(wrong.router.store.available)
        body, _, _ = yield sealed(wrong)
        self.assertEqual((yield self.status(wrong, body)), (503, "overloaded"))

    @defer.inlineCallbacks
    def test_tls(self) -> Any:
        """``rediss://`` verifies Redis's certificate against ``STATE_TLS_CA`` (and its name):
        the right CA connects, another CA never does."""
        from tests.certs import make_pki
        from tests.test_router_mtls_upstream import free_port

        certs = make_pki(short_tempdir(self))
        port = free_port()
        self.redis = start_redis(
            self,
            *("--tls-port", str(port), "--tls-auth-clients", "no"),
            *("--tls-cert-file", str(certs.server.cert), "--tls-key-file", str(certs.server.key)),
            *("--tls-ca-cert-file", str(certs.ca)),
        )
        a, _ = yield self.routers(state_url=f"rediss://localhost:{port}/0", state_tls_ca=certs.ca)
        body, _, _ = yield sealed(a)
        self.assertEqual((yield self.status(a, body)), 200)
        _, backend = yield start_fault_backend(self, Script())
        other = yield start_router(
            self, [backend], state_url=f"rediss://localhost:{port}/0", state_tls_ca=certs.other_ca
        )
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(other.router.store.available)


def _forms(value: bytes) -> list[str]:
    """How a raw identifier could appear in Redis: hex, base64, base64url, and as text."""
    forms = [value.hex(), base64.b64encode(value).decode(), b64u_encode(value)]
    return [f for f in forms if len(f) >= 8]


class PrivacyTests(TwoRouters):
    @defer.inlineCallbacks
    def test_redis_holds_only_hashes_and_counters_each_with_a_ttl(self) -> Any:
        a, b = yield self.routers(
            Script(hang=True),
            trusted_proxies=("127.0.0.1",),
            new_device_pow_difficulty=4,
            pow_threshold_rps=0.1,
            pow_difficulty=4,
        )
        addresses = ["203.0.113.77", "2001:db8:77::1"]
        secrets: list[str] = [*addresses, "2001:db8:77:"]
        held = []
        for running, address in zip((a, b), addresses, strict=True):
            device = hpke.generate_key_pair()
            secrets += _forms(device.pk)
            body, envelope, _ = yield sealed(running, device=device)
            secrets += _forms(envelope.enc)
            forwarded = {b"X-Forwarded-For": [address.encode()]}
            status, _, raw = yield post_chat(running.url, body, forwarded)
            self.assertEqual(status, 401)
            challenge = json.loads(raw)["error"]["challenge"]
            header = pow.solve(challenge, envelope.enc)
            secrets.append(header.split(":")[0])
            stream = post_chat(running.url, body, {**forwarded, pow.HEADER.encode(): [header]})
            stream.addErrback(lambda _: None)
            held.append(stream)
            # and a replay and some junk from the same address
            yield post_chat(running.url, b"junk", forwarded)
        yield until(lambda: a.router.admission.slots.open + b.router.admission.slots.open == 2)
        dump = self.redis.dump()
        tables = {key.split(":")[1] for key in dump if key != "llmr:since"}
        self.assertEqual(tables, {"a", "n", "d", "k", "p", "r", "s", "b"})
        for key, (_kind, ttl, value) in dump.items():
            self.assertTrue(key == "llmr:since" or re.fullmatch(r"llmr:[a-z]:[0-9a-f]{32}", key))
            self.assertGreater(ttl, 0, key)
            for secret in secrets:
                self.assertNotIn(secret, key)
                self.assertNotIn(secret, value, key)
            self.assertRegex(value, r"\A[0-9a-f.\nse]*\Z", key)  # numbers and lease ids only
        for stream in held:
            stream.cancel()
        # the documented configuration keeps all of it in memory: nothing on disk, even after
        # Redis stops
        config = self.redis.cli("CONFIG", "GET", "*").split("\n")
        settings = dict(zip(config[::2], config[1::2], strict=False))
        self.assertEqual((settings["save"], settings["appendonly"]), ("", "no"))
        self.assertEqual(settings["maxmemory-policy"], "noeviction")
        self.redis.stop()
        self.assertEqual(sorted(p.name for p in self.redis.directory.iterdir()), ["redis.log"])


class FollowerTests(TwoRouters):
    @defer.inlineCallbacks
    def test_leader_rotates_and_the_follower_serves_the_same_bytes(self) -> Any:
        a, b = yield self.routers()
        before_a = (yield http(a.url, path="/api/pubkey"))[2]
        before_b = (yield http(b.url, path="/api/pubkey"))[2]
        self.assertEqual(before_a, before_b)
        state = (a.router.settings.keys_dir / "state.json").read_bytes()
        a.router.keys.rotate()
        a.router.clock.advance(2)  # one poll of the follower
        after_a = (yield http(a.url, path="/api/pubkey"))[2]
        after_b = (yield http(b.url, path="/api/pubkey"))[2]
        self.assertNotEqual(after_a, before_a)
        self.assertEqual(after_a, after_b)
        self.assertNotEqual(state, (a.router.settings.keys_dir / "state.json").read_bytes())
        # a request sealed to the new current key decrypts on the follower
        body, _, _ = yield sealed(b)
        self.assertEqual((yield self.status(b, body)), 200)
        # a day later: the leader's timer rotated, the follower followed and never wrote
        a.router.clock.advance(86400)
        a.router.clock.advance(2)
        self.assertEqual(
            (yield http(a.url, path="/api/pubkey"))[2], (yield http(b.url, path="/api/pubkey"))[2]
        )
        self.assertEqual(b.router.keys.rotations, 2)


class CaddyTests(TwoRouters):
    """Both routers on UNIX sockets behind a real Caddy with the scale-out settings of
    docs/deployment.md: every replay is refused, whichever router Caddy picks."""

    @defer.inlineCallbacks
    def test_two_routers_behind_caddy_behave_as_one(self) -> Any:
        from tests.test_network_caddy import start_caddy

        self.redis = start_redis(self)
        self.fake, url = yield start_fault_backend(self, Script(tokens=2))
        clock = Clock()
        clock.advance(1_700_000_000)
        common = {"state_url": self.redis.url, "trusted_proxies": ("unix",)}
        a = yield start_router(self, [url], clock=clock, unix=True, **common)
        b = yield start_router(
            self,
            [url],
            clock=clock,
            unix=True,
            keys_dir=a.router.settings.keys_dir,
            keys_role="follower",
            **common,
        )
        yield until(lambda: a.router.store.available and b.router.store.available)
        home = Path(tempfile.mkdtemp(prefix="cad-"))
        self.addCleanup(shutil.rmtree, home, True)
        upstreams = " ".join("unix/" + r.url.removeprefix("unix:") for r in (a, b))
        port = yield start_caddy(
            self, home, LLMROUTER_UPSTREAM=upstreams, LLMROUTER_HEALTH_URI="/health"
        )
        front = type(a)(a.router, f"http://127.0.0.1:{port}", a.port, a.events)
        body, _, _ = yield sealed(front)
        self.assertEqual((yield self.status(front, body)), 200)
        found = set()
        for _ in range(12):
            found.add((yield self.status(front, body)))
        self.assertEqual(found, {(409, "replay")})
        answered = [
            metric_value(
                r.router.metrics.render().decode(), "llmrouter_http_responses_total", 'status="409"'
            )
            for r in (a, b)
        ]
        self.assertTrue(all(answered), answered)  # Caddy used both routers


class UnitsTests(TestCase):
    """Two instances of llmrouter@.service under the unit's sandbox (tests/test_systemd_sandbox.py
    reproduces it), each on the UNIX socket its llmrouter@.socket makes, with the shipped
    etc/llmrouter/router-instance.env, sharing one key directory (instance 2 follows) and a
    Redis socket reached through group redis (SupplementaryGroups=): they behave as one."""

    timeout = 180

    @defer.inlineCallbacks
    def test_two_instances_under_their_units(self) -> Any:
        import grp
        import os
        import time

        from twisted.internet.endpoints import UNIXServerEndpoint
        from twisted.web import server

        from llmrouter.protocol import seal_request
        from llmrouter.router.settings import read_env_file
        from tests.router_support import FaultBackend, key_document
        from tests.test_systemd_sandbox import SandboxedDaemon, require_sandbox, service_dir

        require_sandbox(self)
        base = service_dir(self)
        state = base / "state"  # the units' StateDirectory stand-in (the service user's)
        run = base / "redis"
        run.mkdir(mode=0o750)
        redis = RedisServer(self, "--unixsocketperm", "770", directory=run)
        redis.start()
        redis_gid = grp.getgrnam("redis").gr_gid
        os.chown(run, 0, redis_gid)
        os.chown(redis.socket, 0, redis_gid)
        front = base / "front"
        front.mkdir(mode=0o755)
        # the backend where the sandboxed routers see it (their /tmp is private)
        site = server.Site(FaultBackend(Script(tokens=2)))
        listening = yield UNIXServerEndpoint(reactor, str(front / "backend.sock")).listen(site)
        self.addCleanup(listening.stopListening)
        backend = f"unix:{front}/backend.sock"
        shipped = read_env_file(ROOT / "etc" / "llmrouter" / "router-instance.env")
        self.assertEqual(shipped["STATE_URL"], "unix:///run/redis/redis-server.sock")
        daemons = []
        for n, role in ((1, "leader"), (2, "follower")):
            env = {
                **shipped,
                "STATE_URL": f"unix://{redis.socket}",  # the shipped one is Debian's path
                "METRICS_LISTEN": f"unix:{state}/metrics-{n}.sock",
                "KEYS_ROLE": role,
                "KEYS_DIR": str(state / "keys"),
                "INFERENCE_ENDPOINTS": backend,
                "NEW_DEVICE_POW_DIFFICULTY": "0",
            }
            daemon = SandboxedDaemon.create(
                "llmrouter@.service",
                [state],
                "llmrouter",
                [],
                listen_unix=front / f"{n}.sock",
                health=f"unix:{front}/{n}.sock",
                env=env,
                directory=state,
            )
            self.addCleanup(daemon.stop)
            yield daemon.start()  # /health 200: keys, a healthy backend and Redis
            daemons.append(daemon)
        socket_unit = front / "1.sock"
        self.assertEqual(socket_unit.stat().st_mode & 0o777, 0o660)
        self.assertEqual(socket_unit.stat().st_gid, grp.getgrnam("caddy").gr_gid)
        urls = [f"unix:{front}/{n}.sock" for n in (1, 2)]
        documents = []
        for url in urls:
            status, _, body = yield http(url, path="/api/pubkey")
            documents.append(body)
        self.assertEqual(documents[0], documents[1])
        document = yield key_document(urls[1])
        envelope, _ = seal_request(document.current(), prompt_request(), int(time.time()))
        body = json.dumps(envelope.to_json()).encode()
        status, _, raw = yield post_chat(urls[0], body)
        self.assertEqual(status, 200, raw)
        status, _, raw = yield post_chat(urls[1], body)
        self.assertEqual((status, error_of(raw)[0]), (409, "replay"))
        for daemon in daemons:
            code = yield daemon.stop()
            self.assertIn(code, (0, -15), daemon.log_text()[-3000:])
            self.assertNotIn("Traceback", daemon.log_text())
