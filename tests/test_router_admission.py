"""Every admission rejection of ``POST /api/chat``, in order, with status, code and Retry-After.

The router runs in-process on a real loopback port with a fake clock for its timers (rate
limits, replay window, budgets, keys); the backend is the fault backend (only the stream-limit
tests need it to hang). Each test also checks the rejection counter and, for security events,
that the log line carries a keyed hash and not the address or device key.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llmrouter import hpke, pow
from llmrouter.client import ChatError
from llmrouter.protocol import REQUEST_INFO, RESPONSE_LABEL, RequestState, b64u_encode
from tests.router_support import (
    AFTER_DECRYPTION,
    Script,
    error_of,
    http,
    metric_value,
    post_chat,
    prompt,
    refusal,
    remember,
    sealed,
    start_fault_backend,
    start_router,
)


def _failing(challenge: str, enc: bytes, difficulty: int, solves: bytes | None = None) -> str:
    """A header with a nonce that fails for ``enc`` (and solves for ``solves`` when given)."""
    nonce = 0
    while pow._work(challenge, enc, str(nonce)) >= difficulty or (
        solves is not None and pow._work(challenge, solves, str(nonce)) < difficulty
    ):
        nonce += 1
    return f"{challenge}:{nonce}"


class AdmissionTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def router(self, script: Script | None = None, **changes: Any) -> Any:
        self.fake, url = yield start_fault_backend(self, script or Script(tokens=2))
        running = yield start_router(self, [url], **changes)
        return running

    def remaining(self, running: Any, device: bytes) -> defer.Deferred[float]:
        """Epsilon ``device`` has left in its period (read from the store the router uses)."""
        return defer.succeed(running.router.store.budget.remaining(device))

    @defer.inlineCallbacks
    def rejected(
        self,
        running: Any,
        body: bytes,
        status: int,
        code: str,
        headers: dict[bytes, list[bytes]] | None = None,
        content_type: bytes | None = b"application/json",
        sealed: bool | None = None,
    ) -> Any:
        """The refusal of ``body``: plain JSON before decryption, sealed after it (or as
        ``sealed`` says, for codes that can come either way); fires with (headers, error)."""
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers[b"Content-Type"] = [content_type]
        got_status, got_headers, got_body = yield http(
            running.url, b"POST", "/api/chat", body, all_headers
        )
        seen_status, error, was_sealed = refusal(body, got_status, got_headers, got_body)
        self.assertEqual((seen_status, error["code"]), (status, code), got_body)
        self.assertEqual(was_sealed, code in AFTER_DECRYPTION if sealed is None else sealed)
        if not was_sealed:
            self.assertEqual(got_headers.getRawHeaders(b"content-type"), [b"application/json"])
        else:  # nothing of the refusal shows outside the sealed chunk
            self.assertIsNone(got_headers.getRawHeaders(b"retry-after"))
            self.assertNotIn(code.encode(), got_body)
        metrics = running.router.metrics.render().decode()
        self.assertGreaterEqual(
            metric_value(metrics, "llmrouter_admission_rejections_total", f'reason="{code}"'), 1
        )
        return got_headers, error

    # 1. size, media type, strict envelope, device auth policy

    @defer.inlineCallbacks
    def test_body_too_large(self) -> Any:
        running = yield self.router(max_body_bytes=1024)
        yield self.rejected(running, b"{" + b" " * 2000 + b"}", 413, "body_too_large")
        metrics = running.router.metrics.render().decode()
        self.assertEqual(metric_value(metrics, "llmrouter_http_responses_total", 'status="413"'), 1)
        status, _, _ = yield http(running.url, path="/health")
        self.assertEqual(status, 200)  # the router is fine afterwards

    @defer.inlineCallbacks
    def test_unsupported_media_type(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        yield self.rejected(
            running, body, 415, "unsupported_media_type", content_type=b"text/plain"
        )
        yield self.rejected(running, body, 415, "unsupported_media_type", content_type=None)

    @defer.inlineCallbacks
    def test_envelope_errors_each_have_their_code(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        good = json.loads(body)
        cases = [
            (b"not json", "bad_json"),
            (b"[1, 2]", "bad_json"),
            (json.dumps({**good, "extra": 1}).encode(), "unknown_field"),
            (json.dumps({k: v for k, v in good.items() if k != "ct"}).encode(), "missing_field"),
            (json.dumps({**good, "ts": "now"}).encode(), "bad_type"),
            (json.dumps({**good, "enc": good["enc"] + "!"}).encode(), "bad_base64"),
            (json.dumps({**good, "enc": b64u_encode(bytes(16))}).encode(), "bad_length"),
            (json.dumps({**good, "v": 2}).encode(), "bad_version"),
            (json.dumps({**good, "mode": "psk"}).encode(), "bad_mode"),
        ]
        for raw, code in cases:
            _, error = yield self.rejected(running, raw, 400, code)
            self.assertNotIn(good["enc"], json.dumps(error))

    @defer.inlineCallbacks
    def test_device_auth_required(self) -> Any:
        running = yield self.router(device_auth="required")
        body, _, _ = yield sealed(running)
        yield self.rejected(running, body, 400, "device_auth_required")
        tokens: list[str] = []
        device = hpke.generate_key_pair()
        done = yield defer.Deferred.fromCoroutine(
            running.client(device_key=device).chat(prompt(), tokens.append)
        )
        self.assertEqual(done.finish_reason, "stop")

    # 2. per-IP rate limit

    @defer.inlineCallbacks
    def test_rate_limited_with_retry_after(self) -> Any:
        running = yield self.router(rate_limit_per_minute=6, rate_limit_burst=2)
        for _ in range(2):
            body, _, _ = yield sealed(running)
            status, _, _ = yield post_chat(running.url, body)
            self.assertEqual(status, 200)
        body, _, _ = yield sealed(running)
        headers, error = yield self.rejected(running, body, 429, "rate_limited")
        retry_after = int(headers.getRawHeaders(b"retry-after")[0])
        self.assertTrue(1 <= retry_after <= 10, retry_after)
        self.assertEqual(error["retry_after"], retry_after)
        line = json.loads(running.events[-1])
        self.assertEqual(line["event"], "rate_limited")
        self.assertRegex(line["ip"], "^[0-9a-f]{16}$")
        self.assertNotIn("127.0.0.1", running.events[-1])
        running.router.clock.advance(retry_after)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_rate_limit_uses_forwarded_address_only_from_trusted_proxy(self) -> Any:
        running = yield self.router(
            rate_limit_per_minute=1, rate_limit_burst=1, trusted_proxies=("127.0.0.1",)
        )
        for i in range(3):  # three different clients behind the proxy: none limited
            body, _, _ = yield sealed(running)
            status, _, _ = yield post_chat(
                running.url, body, {b"X-Forwarded-For": [f"198.51.100.{i}".encode()]}
            )
            self.assertEqual(status, 200)
        body, _, _ = yield sealed(running)
        yield self.rejected(
            running, body, 429, "rate_limited", {b"X-Forwarded-For": [b"198.51.100.0"]}
        )

    @defer.inlineCallbacks
    def test_ipv6_clients_share_a_bucket_per_prefix(self) -> Any:
        """Every address of an IPv6 /64 had its own bucket: unlimited buckets (issue 8). By
        default a /56 is one bucket (issue 19: with /64 a /48 holder had 65,536)."""
        running = yield self.router(
            rate_limit_per_minute=1, rate_limit_burst=1, trusted_proxies=("127.0.0.1",)
        )

        def from_(address: str) -> Any:
            return {b"X-Forwarded-For": [address.encode()]}

        for address in ("2001:db8:0:100::1", "2001:db8:0:200::1", "198.51.100.1", "198.51.100.2"):
            body, _, _ = yield sealed(running)
            status, _, _ = yield post_chat(running.url, body, from_(address))
            self.assertEqual(status, 200, address)
        for address in ("2001:db8:0:1ff::2", "2001:db8:0:101:ffff:1:2:3", "::ffff:198.51.100.1"):
            body, _, _ = yield sealed(running)
            yield self.rejected(running, body, 429, "rate_limited", from_(address))

    @defer.inlineCallbacks
    def test_ipv6_prefix_is_configurable(self) -> Any:
        running = yield self.router(
            rate_limit_per_minute=1,
            rate_limit_burst=1,
            trusted_proxies=("127.0.0.1",),
            rate_limit_ipv6_prefix=48,
        )
        body, _, _ = yield sealed(running)
        status, _, _ = yield post_chat(running.url, body, {b"X-Forwarded-For": [b"2001:db8::1"]})
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running)
        yield self.rejected(
            running, body, 429, "rate_limited", {b"X-Forwarded-For": [b"2001:db8:0:ff::1"]}
        )

    @defer.inlineCallbacks
    def test_unix_socket_proxy_forwards_addresses_only_when_trusted(self) -> Any:
        """UNIX-socket peers all shared one ``local`` bucket, so behind a local Caddy one client
        could 429 everyone (issue 8). ``TRUSTED_PROXIES=unix`` trusts X-Forwarded-For there."""
        for trusted, second in (((), 429), (("unix",), 200)):
            running = yield self.router(
                unix=True, rate_limit_per_minute=1, rate_limit_burst=1, trusted_proxies=trusted
            )
            for address, expected in ((b"198.51.100.1", 200), (b"198.51.100.2", second)):
                body, _, _ = yield sealed(running)
                status, _, _ = yield post_chat(running.url, body, {b"X-Forwarded-For": [address]})
                self.assertEqual(status, expected, (trusted, address))

    # 3. proof of work under stress

    @defer.inlineCallbacks
    def test_pow_required_then_solved(self) -> Any:
        running = yield self.router(pow_threshold_rps=0.1, pow_difficulty=6)
        body, envelope, _ = yield sealed(running)
        _, error = yield self.rejected(running, body, 401, "pow_required")
        self.assertEqual(error["difficulty"], 6)
        header = pow.solve(error["challenge"], envelope.enc)
        status, _, _ = yield post_chat(running.url, body, {pow.HEADER.encode(): [header.encode()]})
        self.assertEqual(status, 200)
        # the Python client does this by itself
        done = yield defer.Deferred.fromCoroutine(running.client().chat(prompt()))
        self.assertEqual(done.finish_reason, "stop")

    @defer.inlineCallbacks
    def test_pow_invalid(self) -> Any:
        running = yield self.router(pow_threshold_rps=0.1, pow_difficulty=6)
        body, envelope, _ = yield sealed(running)
        _, error = yield self.rejected(running, body, 401, "pow_required")
        challenge, enc = error["challenge"], envelope.enc
        other = hpke.generate_key_pair().pk
        # nonces that do not solve this request's challenge (a random nonce does 1 time in 64)
        wrong = _failing(challenge, enc, 6, solves=other)  # a solution for another request's enc
        unsolved = _failing(challenge, enc, 6)
        for header in (wrong, "garbage", unsolved):
            _, again = yield self.rejected(
                running, body, 401, "pow_invalid", {pow.HEADER.encode(): [header.encode()]}
            )
            self.assertIn("challenge", again)
        self.assertIn("pow_failed", "".join(running.events))

    @defer.inlineCallbacks
    def test_pow_solution_is_spent_when_checked(self) -> Any:
        """One solved header with junk ciphertext passed again and again, each costing a
        decapsulation: the enc only entered the replay cache after a decryption (issue 8)."""
        running = yield self.router(pow_threshold_rps=0.1, pow_difficulty=6)
        body, envelope, _ = yield sealed(running)
        _, error = yield self.rejected(running, body, 401, "pow_required")
        header = {pow.HEADER.encode(): [pow.solve(error["challenge"], envelope.enc).encode()]}
        doc = json.loads(body)
        junk = json.dumps(dict(doc, ct=b64u_encode(b"\x00" * 40))).encode()
        yield self.rejected(running, junk, 400, "decrypt_failed", header)
        yield self.rejected(running, junk, 401, "pow_invalid", header)
        yield self.rejected(running, body, 401, "pow_invalid", header)  # spent, even if genuine

    @defer.inlineCallbacks
    def test_junk_from_one_address_does_not_raise_the_stress_signal(self) -> Any:
        """Requests were counted toward "under stress" before the per-IP limit, so one address
        sending junk forced proof of work on everyone (issue 8)."""
        running = yield self.router(
            pow_threshold_rps=1,
            pow_difficulty=6,
            rate_limit_per_minute=6,
            rate_limit_burst=2,
            trusted_proxies=("127.0.0.1",),
        )
        attacker = {b"X-Forwarded-For": [b"203.0.113.9"]}
        for _ in range(30):
            yield post_chat(running.url, b"junk", attacker)
        body, _, _ = yield sealed(running)
        status, _, raw = yield post_chat(running.url, body, {b"X-Forwarded-For": [b"192.0.2.1"]})
        self.assertEqual(status, 200, raw)

    @defer.inlineCallbacks
    def test_pow_under_open_stream_threshold(self) -> Any:
        running = yield self.router(Script(hang=True), pow_threshold_streams=1, pow_difficulty=4)
        body, _, _ = yield sealed(running)
        first = post_chat(running.url, body)
        while running.router.admission.slots.open < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        body2, _, _ = yield sealed(running)
        yield self.rejected(running, body2, 401, "pow_required")
        first.cancel()
        yield self.assertFailure(first, Exception)

    @defer.inlineCallbacks
    def test_non_ascii_pow_header_is_400_without_a_log_line(self) -> Any:
        """It raised UnicodeDecodeError before any limit and logged a traceback (issue 8)."""
        from twisted.logger import LogLevel, globalLogPublisher

        observed: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(observed.append)
        self.addCleanup(globalLogPublisher.removeObserver, observed.append)
        running = yield self.router(pow_threshold_rps=0.1, pow_difficulty=6)
        body, _, _ = yield sealed(running)
        for value in (b"\xff\xfe:1", "défi:1".encode("latin-1")):
            yield self.rejected(running, body, 400, "bad_pow_header", {b"X-LLMRouter-PoW": [value]})
        self.assertEqual([e for e in observed if e.get("log_level") == LogLevel.error], [])

    # 4. timestamp

    @defer.inlineCallbacks
    def test_stale(self) -> Any:
        running = yield self.router()
        running.router.clock.advance(60)  # timestamps before the router started are refused
        now = int(running.router.clock.seconds())
        for ts in (now - 61, now + 61):
            body, _, _ = yield sealed(running, ts=ts)
            yield self.rejected(running, body, 401, "stale")
        body, _, _ = yield sealed(running, ts=now - 60)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_requests_sealed_before_the_start_are_stale(self) -> Any:
        """The replay cache is in memory: after a restart a request captured just before it
        could be replayed while its timestamp is still accepted (issue 8)."""
        running = yield self.router()
        started = int(running.router.clock.seconds())
        body, _, _ = yield sealed(running, ts=started - 1)
        _, error = yield self.rejected(running, body, 401, "stale")
        self.assertIn("seal it again", error["message"])
        body, _, _ = yield sealed(running, ts=started)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)

    # 5. key id

    @defer.inlineCallbacks
    def test_key_unknown(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        doc = json.loads(body)
        known = {k.kid for k in running.router.keys.keys()}
        unused = next(f"{i:02x}" for i in range(256) if f"{i:02x}" not in known)
        doc["kid"] = unused
        yield self.rejected(running, json.dumps(doc).encode(), 400, "key_unknown")
        doc["kid"] = "XY"
        yield self.rejected(running, json.dumps(doc).encode(), 400, "key_unknown")

    # 6. replay

    @defer.inlineCallbacks
    def test_replay(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        yield self.rejected(running, body, 409, "replay")
        self.assertEqual(json.loads(running.events[-1])["event"], "replay")

    @defer.inlineCallbacks
    def test_junk_is_not_recorded_for_replay(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        doc = json.loads(body)
        tampered = dict(doc, ct=doc["ct"][:-2] + ("AA" if doc["ct"][-2:] != "AA" else "BA"))
        yield self.rejected(running, json.dumps(tampered).encode(), 400, "decrypt_failed")
        status, _, _ = yield post_chat(running.url, body)  # same enc, genuine: accepted
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_replay_cache_full(self) -> Any:
        running = yield self.router(replay_max_entries=1)
        body, _, _ = yield sealed(running)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running)
        yield self.rejected(running, body, 503, "overloaded", sealed=True)  # at the commit

    # 7. decryption

    @defer.inlineCallbacks
    def test_decrypt_failed_is_one_generic_code(self) -> Any:
        running = yield self.router()
        body, _, _ = yield sealed(running)
        doc = json.loads(body)
        other = hpke.generate_key_pair()
        cases = [
            dict(doc, ct=b64u_encode(b"\x00" * 40)),
            dict(doc, rid=b64u_encode(b"\x01" * 16)),  # aad mismatch
            dict(doc, enc=b64u_encode(other.pk)),  # wrong enc
        ]
        messages = set()
        for case in cases:
            _, error = yield self.rejected(
                running, json.dumps(case).encode(), 400, "decrypt_failed"
            )
            messages.add(error["message"])
        self.assertEqual(len(messages), 1)
        self.assertIn('"event":"auth_failed"', running.events[-1])

    @defer.inlineCallbacks
    def test_bad_payload(self) -> Any:
        running = yield self.router()
        document = yield _keydoc(running)
        key = document.current()
        ts = int(running.router.clock.seconds())
        rid = b64u_encode(b"\x02" * 16)
        enc, ctx = hpke.setup_s(key.pk, REQUEST_INFO)
        aad = f"llmrouter/v1|{key.kid}|base|{ts}|{rid}|".encode()
        ct = ctx.seal(aad, b'{"messages": "not a list"}')
        doc = {
            "v": 1,
            "kid": key.kid,
            "mode": "base",
            "enc": b64u_encode(enc),
            "ts": ts,
            "rid": rid,
            "ct": b64u_encode(ct),
        }
        state = RequestState(enc, ctx.export(RESPONSE_LABEL, 32))
        body = remember(json.dumps(doc).encode(), state)
        _, error = yield self.rejected(running, body, 400, "bad_payload")
        self.assertIn("messages", error["message"])  # what was wrong: inside the sealed chunk

    # New devices (auth mode): a fresh key must cost something

    @defer.inlineCallbacks
    def test_new_device_solves_proof_of_work_once(self) -> Any:
        """Device keys cost nothing, so rotating them escaped every per-device limit (issue 8)."""
        running = yield self.router(new_device_pow_difficulty=6)
        device = hpke.generate_key_pair()
        body, envelope, _ = yield sealed(running, device=device)
        _, error = yield self.rejected(running, body, 401, "pow_required")
        self.assertEqual(error["difficulty"], 6)
        header = pow.solve(error["challenge"], envelope.enc)
        status, _, _ = yield post_chat(running.url, body, {pow.HEADER.encode(): [header.encode()]})
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running, device=device)  # known now: no work
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running)  # mode base carries no device
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        done = yield defer.Deferred.fromCoroutine(
            running.client(device_key=hpke.generate_key_pair()).chat(prompt())
        )
        self.assertEqual(done.finish_reason, "stop")

    @defer.inlineCallbacks
    def test_new_devices_per_address_are_rate_limited(self) -> Any:
        running = yield self.router(
            new_devices_per_hour=1, new_device_burst=2, trusted_proxies=("127.0.0.1",)
        )
        here = {b"X-Forwarded-For": [b"198.51.100.7"]}
        devices = [hpke.generate_key_pair() for _ in range(3)]
        for device in devices[:2]:
            body, _, _ = yield sealed(running, device=device)
            status, _, _ = yield post_chat(running.url, body, here)
            self.assertEqual(status, 200)
        body, _, _ = yield sealed(running, device=devices[2])
        headers, _ = yield self.rejected(running, body, 429, "new_device_rate_limited", here)
        self.assertGreaterEqual(int(headers.getRawHeaders(b"retry-after")[0]), 1)
        body, _, _ = yield sealed(running, device=devices[0])  # a known device is not affected
        status, _, _ = yield post_chat(running.url, body, here)
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running, device=devices[2])  # nor another address
        status, _, _ = yield post_chat(running.url, body, {b"X-Forwarded-For": [b"192.0.2.7"]})
        self.assertEqual(status, 200)

    # 8. per-device rate limit

    @defer.inlineCallbacks
    def test_device_rate_limited(self) -> Any:
        running = yield self.router(device_rate_limit_per_minute=1, device_rate_limit_burst=1)
        device = hpke.generate_key_pair()
        body, _, _ = yield sealed(running, device=device)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        body, _, _ = yield sealed(running, device=device)
        _, error = yield self.rejected(running, body, 429, "device_rate_limited")
        self.assertGreaterEqual(error["retry_after"], 1)
        line = running.events[-1]
        self.assertIn('"event":"device_rate_limited"', line)
        self.assertNotIn(b64u_encode(device.pk), line)
        self.assertNotIn(base64.b64encode(device.pk).decode(), line)
        other = hpke.generate_key_pair()  # another device is not affected
        body, _, _ = yield sealed(running, device=other)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)

    # 9. privacy budget

    @defer.inlineCallbacks
    def test_budget_exhausted(self) -> Any:
        running = yield self.router(
            epsilon_total=0.2, epsilon_per_query=0.1, budget_period_seconds=3600
        )
        device = hpke.generate_key_pair()
        for _ in range(2):
            body, _, _ = yield sealed(running, device=device)
            status, _, _ = yield post_chat(running.url, body)
            self.assertEqual(status, 200)
        body, _, _ = yield sealed(running, device=device)
        _, error = yield self.rejected(running, body, 429, "budget_exhausted")
        self.assertEqual(error["retry_after"], 3600)
        running.router.clock.advance(3600)
        body, _, _ = yield sealed(running, device=device)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)

    # 10. stream limits

    @defer.inlineCallbacks
    def test_global_stream_limit(self) -> Any:
        running = yield self.router(Script(hang=True), max_streams=1)
        body, _, _ = yield sealed(running)
        first = post_chat(running.url, body)
        while running.router.admission.slots.open < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        body2, _, _ = yield sealed(running)
        yield self.rejected(running, body2, 503, "overloaded", sealed=True)
        first.cancel()
        yield self.assertFailure(first, Exception)
        while running.router.admission.slots.open:
            yield deferLater(reactor, 0.01, lambda: None)  # the slot is released on disconnect

    @defer.inlineCallbacks
    def test_only_admitted_requests_spend_budget(self) -> Any:
        """The budget was charged before the stream-slot check, so ``overloaded`` and
        ``device_streams`` refusals still spent a device's budget (issue 8)."""
        running = yield self.router(Script(hang=True), max_streams_per_device=1, max_streams=2)
        device, other = hpke.generate_key_pair(), hpke.generate_key_pair()
        body, _, _ = yield sealed(running, device=device)
        first = post_chat(running.url, body)
        while running.router.admission.slots.open < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        body, _, _ = yield sealed(running, device=device)
        yield self.rejected(running, body, 429, "device_streams")
        body, _, _ = yield sealed(running)
        second = post_chat(running.url, body)
        while running.router.admission.slots.open < 2:
            yield deferLater(reactor, 0.01, lambda: None)
        body, _, _ = yield sealed(running, device=other)
        yield self.rejected(running, body, 503, "overloaded", sealed=True)
        left = yield self.remaining(running, device.pk)
        self.assertAlmostEqual(left, 10.0 - 0.1)
        left = yield self.remaining(running, other.pk)
        self.assertEqual(left, 10.0)
        for d in (first, second):
            d.cancel()
            yield self.assertFailure(d, Exception)

    @defer.inlineCallbacks
    def test_a_request_refused_for_its_model_spends_nothing(self) -> Any:
        """Routing (``model_unknown``) is checked before the stream slot and the budget charge:
        a refused request spends no budget and holds no slot."""
        running = yield self.router()
        self.fake.models = ["m"]
        yield running.router.pool.probe(running.router.pool.backends[0])
        device = hpke.generate_key_pair()
        body, _, _ = yield sealed(running, prompt("hi", model="nope"), device=device)
        yield self.rejected(running, body, 404, "model_unknown")
        left = yield self.remaining(running, device.pk)
        self.assertEqual(left, 10.0)
        self.assertEqual(running.router.admission.slots.open, 0)
        body, _, _ = yield sealed(running, prompt("hi", model="m"), device=device)
        status, _, _ = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        left = yield self.remaining(running, device.pk)
        self.assertAlmostEqual(left, 10.0 - 0.1)

    @defer.inlineCallbacks
    def test_device_stream_limit(self) -> Any:
        running = yield self.router(Script(hang=True), max_streams_per_device=1)
        device = hpke.generate_key_pair()
        body, _, _ = yield sealed(running, device=device)
        first = post_chat(running.url, body)
        while running.router.admission.slots.open < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        body2, _, _ = yield sealed(running, device=device)
        yield self.rejected(running, body2, 429, "device_streams")
        body3, _, _ = yield sealed(running)  # base mode, no device: only the global limit
        third = post_chat(running.url, body3)
        while running.router.admission.slots.open < 2:
            yield deferLater(reactor, 0.01, lambda: None)
        first.cancel()
        third.cancel()
        yield self.assertFailure(first, Exception)
        yield self.assertFailure(third, Exception)

    # After admission

    @defer.inlineCallbacks
    def test_no_backend(self) -> Any:
        running = yield self.router()
        self.fake.healthy = False
        yield running.router.pool.probe(running.router.pool.backends[0])
        status, _, _ = yield http(running.url, path="/health")
        self.assertEqual(status, 503)
        body, _, _ = yield sealed(running)
        status, headers, raw = yield post_chat(running.url, body)
        got, error, was_sealed = refusal(body, status, headers, raw)
        self.assertEqual((got, error["code"], was_sealed), (503, "no_backend", True))

    @defer.inlineCallbacks
    def test_client_error_surfaces_as_chat_error(self) -> Any:
        running = yield self.router(device_auth="required")
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(running.client().chat(prompt())), ChatError
        )
        self.assertEqual((e.code, e.status), ("device_auth_required", 400))


class ErrorShapeTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_404_405_and_500_are_json_without_details(self) -> Any:
        _fake, url = yield start_fault_backend(self, Script())
        running = yield start_router(self, [url])
        status, _, body = yield http(running.url, path="/secret-canary-path")
        self.assertEqual((status, error_of(body)[0]), (404, "not_found"))
        self.assertNotIn(b"canary", body)
        status, headers, body = yield http(running.url, b"PUT", "/api/pubkey", b"x")
        self.assertEqual((status, error_of(body)[0]), (405, "method_not_allowed"))
        (allow,) = headers.getRawHeaders(b"allow")
        self.assertEqual(set(allow.split(b", ")), {b"GET", b"HEAD"})
        status, _, body = yield http(running.url, path="/metrics")
        self.assertEqual(status, 404)  # never on the public listener
        status, _, body = yield http(running.url, path="/secret-canary%ff")
        self.assertEqual((status, error_of(body)[0]), (400, "bad_url"))

        def explode(*args: Any) -> Any:
            raise RuntimeError("boom secret-canary-value")

        running.router.admission.admit = explode
        observed: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(observed.append)
        self.addCleanup(globalLogPublisher.removeObserver, observed.append)
        body, _, _ = yield sealed(running)
        status, _, raw = yield post_chat(running.url, body)
        self.assertEqual((status, error_of(raw)), (500, ("internal", "internal error")))
        from twisted.logger import formatEvent

        text = "\n".join(formatEvent(e) for e in observed)
        self.assertIn("RuntimeError", text)
        self.assertNotIn("secret-canary-value", text)
        for event in observed:
            self.assertNotIn("log_failure", event)

    @defer.inlineCallbacks
    def test_key_endpoints(self) -> Any:
        _fake, url = yield start_fault_backend(self, Script())
        running = yield start_router(self, [url])
        doc = yield _keydoc(running)
        status, headers, body = yield http(running.url, path="/.well-known/jwks.json")
        self.assertEqual(status, 200)
        jwks = json.loads(body)
        self.assertEqual({k["kid"] for k in jwks["keys"]}, {k.kid for k in doc.keys})
        status, headers, body = yield http(running.url, path="/.well-known/ohttp-keys")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/ohttp-keys"])
        self.assertEqual(len(body), 2 * (2 + 41))
        status, _, body = yield http(running.url, path="/health/live")
        self.assertEqual((status, body), (200, b'{"status": "ok"}'))


@defer.inlineCallbacks
def _keydoc(running: Any) -> Any:
    from tests.router_support import key_document

    doc = yield key_document(running.url, running.router.clock.seconds())
    return doc
