"""Protocol v2 requests: sealing, the router's opening, forwarding, the node's opening."""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.v2 import request as rq
from tests.v2_world import World

PROMPT = "canary-7f3e: what is the airspeed of an unladen swallow?"


class FixedRandom:
    """Deterministic ``rng``: bytes from a counter, and ``randbelow`` from a list (then 0)."""

    def __init__(self, choices: list[int] | None = None) -> None:
        self.counter = 0
        self.choices = list(choices or [])
        self.drawn: list[int] = []

    def token_bytes(self, n: int, /) -> bytes:
        self.counter += 1
        return bytes([self.counter]) * n

    def randbelow(self, n: int, /) -> int:
        self.drawn.append(n)
        return self.choices.pop(0) % n if self.choices else 0


def seal_outer(world: World, plaintext: bytes, kid: str = "01") -> tuple[bytes, bytes, bytes]:
    """An encapsulated request around any plaintext: (body, enc, router secret)."""
    hdr = rq.outer_header(kid)
    pk = world.outer.pk if kid == "01" else world.outer_next.pk
    enc, ctx = hpke.setup_s(pk, rq.OUTER_INFO + b"\x00" + hdr)
    body = hdr + enc + ctx.seal(b"", plaintext)
    return body, enc, ctx.export(rq.ROUTER_RESPONSE_LABEL, 32)


class Fixture(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World({"node-a": ("m1",), "node-b": ("m1", "m2"), "node-c": ("m1",)})
        self.doc = self.world.verified()
        self.device = hpke.generate_key_pair()
        self.ts = int(self.world.now)
        self.request = p.ChatRequest.from_prompt(PROMPT, max_tokens=8)

    def seal(self, **kw: Any) -> tuple[bytes, rq.ClientState]:
        kw.setdefault("model", "m1")
        kw.setdefault("device_sk", self.device.sk)
        kw.setdefault("ts", self.ts)
        return rq.seal_request(self.doc, kw.pop("request", self.request), **kw)

    def open(self, body: bytes) -> rq.OuterRequest:
        kid, _ = rq.parse_outer_header(body)
        sk = self.world.router_secret_key(kid)
        assert sk is not None
        return rq.open_outer(body, sk)

    def at_node(self, outer: rq.OuterRequest, wrap: rq.Wrap) -> rq.NodeRequest:
        return rq.parse_node_request(rq.node_request_body(outer, wrap))

    def node_open(self, req: rq.NodeRequest) -> tuple[p.ChatRequest, bytes]:
        return rq.open_node_request(req, self.world.node(req.node).secret_key(req.kid))


class RoundTripTests(Fixture):
    def test_auth_mode(self) -> None:
        body, state = self.seal()
        outer = self.open(body)
        self.assertEqual((outer.kid, outer.ts, outer.model), ("01", self.ts, "m1"))
        self.assertEqual((outer.device_pk, outer.device_proven), (self.device.pk, True))
        self.assertEqual(outer.enc, state.outer_enc)
        self.assertEqual(outer.router_secret, state.router_secret)
        self.assertEqual(sorted(w.node for w in outer.wraps), ["node-a", "node-b", "node-c"])
        for wrap in outer.wraps:
            chat, secret = self.node_open(self.at_node(outer, wrap))
            self.assertEqual(chat.messages, self.request.messages)
            self.assertEqual((chat.model, chat.max_tokens), ("m1", 8))
            self.assertEqual(secret, state.response_secret)

    def test_base_mode(self) -> None:
        body, state = self.seal(device_sk=None)
        outer = self.open(body)
        self.assertEqual((outer.device_pk, outer.device_proven), (None, False))
        req = self.at_node(outer, outer.wraps[0])
        self.assertIsNone(req.device_pk)
        chat, secret = self.node_open(req)
        self.assertEqual((chat.messages, secret), (self.request.messages, state.response_secret))

    def test_next_outer_key_opens_too(self) -> None:
        """The router accepts its next key, as in v1 (the client seals to current only)."""
        doc = dataclasses.replace(self.doc, current=self.doc.router_keys[1])
        body, _ = rq.seal_request(doc, self.request, model="m1", device_sk=None)
        self.assertEqual(self.open(body).kid, "02")

    def test_encapsulated_request_format(self) -> None:
        """RFC 9458 section 4.3: hdr || enc || ct, hdr = key_id, kem_id, kdf_id, aead_id."""
        body, state = self.seal()
        self.assertEqual(body[:7], bytes([0x01, 0x00, 0x20, 0x00, 0x01, 0x00, 0x03]))
        self.assertEqual(body[7:39], state.outer_enc)
        self.assertEqual((len(body) - 39 - 16) % 64, 0)  # the outer plaintext is padded
        self.assertEqual(rq.parse_outer_header(body), ("01", state.outer_enc))

    def test_inner_request_is_padded_and_carries_the_model(self) -> None:
        body, _ = self.seal(pad=128)
        outer = self.open(body)
        self.assertEqual((len(outer.ct) - 16) % 128, 0)
        # a request that names the model itself: the same one is fine, another is refused
        request = dataclasses.replace(self.request, model="m1")
        self.seal(request=request)
        with self.assertRaises(ValueError):
            self.seal(request=dataclasses.replace(self.request, model="m2"))

    def test_the_router_sees_no_content(self) -> None:
        """What the router holds after opening: no prompt, no key that opens the inner layer."""
        body, _ = self.seal()
        outer = self.open(body)
        seen = rq.node_request_body(outer, outer.wraps[0]) + outer.router_secret
        self.assertNotIn(b"canary", seen)
        self.assertNotIn(b"canary", body)
        for wrap in outer.wraps:
            with self.assertRaises(hpke.HPKEError):  # the router's keys open no wrap
                hpke.setup_r(wrap.enc, self.world.outer.sk, rq.WRAP_INFO, pk_s=self.device.pk).open(
                    rq.binding(outer.ts, outer.model, outer.device_pk), wrap.key
                )

    def test_two_requests_of_one_device_share_nothing_but_the_header(self) -> None:
        """What a TLS-terminating hop sees: only the 7-byte header repeats (same kid, suite)."""
        first, _ = self.seal()
        second, _ = self.seal()
        self.assertEqual(first[:7], second[:7])
        grams = {first[i : i + 8] for i in range(7, len(first) - 7)}
        self.assertFalse(any(second[i : i + 8] in grams for i in range(7, len(second) - 7)))
        self.assertNotIn(self.device.pk, first + second)


class CandidateTests(Fixture):
    def test_k_candidates_among_the_models_nodes(self) -> None:
        for k, expected in ((1, 1), (2, 2), (3, 3), (16, 3)):
            body, _ = self.seal(k=k)
            nodes = [w.node for w in self.open(body).wraps]
            self.assertEqual(len(nodes), expected)
            self.assertEqual(len(set(nodes)), expected)
        body, _ = self.seal(model="m2", k=3)
        self.assertEqual([w.node for w in self.open(body).wraps], ["node-b"])
        for k in (0, 17):
            with self.assertRaises(ValueError):
                self.seal(k=k)

    def test_each_wrap_goes_to_the_nodes_current_key(self) -> None:
        body, _ = self.seal()
        for wrap in self.open(body).wraps:
            self.assertEqual(wrap.kid, self.world.node(wrap.node).kids[0])

    def test_uniform_choice_from_the_rng(self) -> None:
        """The choice is the rng's (a partial Fisher-Yates shuffle): every pair is reachable, and
        the wraps come in document order whatever was drawn."""
        seen = set()
        for first in range(3):
            for second in range(2):
                rng = FixedRandom([first, second])
                body, _ = self.seal(k=2, rng=rng)
                self.assertEqual(rng.drawn, [3, 2])
                nodes = tuple(w.node for w in self.open(body).wraps)
                self.assertEqual(list(nodes), sorted(nodes))
                seen.add(nodes)
        self.assertEqual(seen, {("node-a", "node-b"), ("node-a", "node-c"), ("node-b", "node-c")})

    def test_default_rng_spreads_the_choice(self) -> None:
        counts = collections.Counter(
            w.node for _ in range(150) for w in self.open(self.seal(k=1)[0]).wraps
        )
        self.assertEqual(set(counts), {"node-a", "node-b", "node-c"})
        self.assertTrue(all(count >= 20 for count in counts.values()), counts)

    def test_no_node_for_the_model(self) -> None:
        with self.assertRaises(p.ProtocolError) as caught:
            self.seal(model="m9")
        self.assertEqual((caught.exception.code, caught.exception.status), ("model_unknown", 404))
        with self.assertRaises(ValueError):
            self.seal(model="not a model")

    def test_deterministic_with_a_fixed_rng(self) -> None:
        first = self.seal(rng=FixedRandom())
        second = self.seal(rng=FixedRandom())
        self.assertEqual(first[0], second[0])
        self.assertEqual(first[1].to_json(), second[1].to_json())


class OuterHeaderTests(Fixture):
    def test_refused_before_any_cryptography(self) -> None:
        body, _ = self.seal()
        cases = [
            (body[:54], "bad_request", 400),
            (b"", "bad_request", 400),
            (body[:1] + b"\x00\x10" + body[3:], "bad_request", 400),  # P-256
            (body[:5] + b"\x00\x01" + body[7:], "bad_request", 400),  # AES-128-GCM
            (body + b" " * 300_000, "body_too_large", 413),
        ]
        for data, code, status in cases:
            with self.assertRaises(p.ProtocolError) as caught:
                rq.parse_outer_header(data)
            self.assertEqual((caught.exception.code, caught.exception.status), (code, status))
        self.assertEqual(rq.parse_outer_header(body[:55])[0], "01")
        self.assertEqual(rq.parse_outer_header(b"\xff" + body[1:])[0], "ff")
        with self.assertRaises(p.ProtocolError):
            rq.parse_outer_header(body, max_body=len(body) - 1)


class OpenOuterTests(Fixture):
    def assertPlainRefusal(self, body: bytes, sk: bytes, code: str) -> None:
        with self.assertRaises(p.ProtocolError) as caught:
            rq.open_outer(body, sk)
        self.assertNotIsInstance(caught.exception, rq.SealedRefusal)
        self.assertEqual(caught.exception.code, code)

    def assertSealedRefusal(self, body: bytes, secret: bytes, code: str) -> rq.SealedRefusal:
        with self.assertRaises(rq.SealedRefusal) as caught:
            rq.open_outer(body, self.world.outer.sk)
        self.assertEqual(caught.exception.code, code)
        self.assertEqual(caught.exception.secret, secret)
        return caught.exception

    def test_decryption_failures_are_plain(self) -> None:
        body, _ = self.seal()
        self.assertPlainRefusal(body, self.world.outer_next.sk, "decrypt_failed")
        flipped = bytearray(body)
        flipped[-1] ^= 1
        self.assertPlainRefusal(bytes(flipped), self.world.outer.sk, "decrypt_failed")
        # the header is bound through the HPKE info: another key_id does not open
        self.assertPlainRefusal(b"\x05" + body[1:], self.world.outer.sk, "decrypt_failed")
        # a small-order enc
        self.assertPlainRefusal(
            body[:7] + bytes(32) + body[39:], self.world.outer.sk, "decrypt_failed"
        )

    def test_outer_plaintext_shape_is_a_sealed_bad_payload(self) -> None:
        body, state = self.seal()
        good = json.loads(self.decrypt(body).rstrip(b" "))
        wrap = good["wraps"][0]
        cases: list[Any] = [
            b"not json",
            b"\xff",
            b"[]",
            {**good, "v": 1},
            {**good, "v": True},
            {**good, "ts": -1},
            {**good, "ts": 1.5},
            {**good, "model": "no spaces"},
            {**good, "extra": 1},
            {k: v for k, v in good.items() if k != "wraps"},
            {k: v for k, v in good.items() if k != "ct"},
            {**good, "wraps": []},
            {**good, "wraps": [wrap] * 17},
            {**good, "wraps": [wrap, wrap]},
            {**good, "wraps": [{**wrap, "node": "UPPER"}]},
            {**good, "wraps": [{**wrap, "kid": "1"}]},
            {**good, "wraps": [{**wrap, "kid": 1}]},
            {**good, "wraps": [{**wrap, "key": wrap["key"][:-2]}]},
            {**good, "wraps": [{**wrap, "extra": 1}]},
            {**good, "ct": "AAAA"},
            {**good, "ct": "not base64!"},
            {**good, "device": {"pk": good["device"]["pk"]}},
            {**good, "device": {**good["device"], "pk": "AAAA"}},
            {**good, "device": {**good["device"], "proof": "AAAA"}},
        ]
        for case in cases:
            plaintext = case if isinstance(case, bytes) else json.dumps(case).encode()
            data, _, secret = seal_outer(self.world, plaintext)
            refusal = self.assertSealedRefusal(data, secret, "bad_payload")
            self.assertNotIn(b"canary", repr(refusal).encode() + refusal.to_json())
            self.assertNotIn(p.b64u_encode(secret), repr(refusal) + str(refusal))
            self.assertNotIn("secret", json.dumps(refusal.to_dict()))
        # without a device, and with a null one, the request is in base mode
        for device in ({}, {"device": None}):
            base = {k: v for k, v in good.items() if k != "device"} | device
            data, _, _ = seal_outer(self.world, json.dumps(base).encode())
            self.assertFalse(rq.open_outer(data, self.world.outer.sk).device_proven)
        del state

    def decrypt(self, body: bytes) -> bytes:
        ctx = hpke.setup_r(body[7:39], self.world.outer.sk, rq.OUTER_INFO + b"\x00" + body[:7])
        return ctx.open(b"", body[39:])

    def test_device_proof_from_another_key(self) -> None:
        """Claiming a device key without its secret: the proof does not verify."""
        body, _ = self.seal()
        good = json.loads(self.decrypt(body).rstrip(b" "))
        victim = hpke.generate_key_pair()
        # (a) the victim's public key with the attacker's own proof
        forged = {**good, "device": {**good["device"], "pk": p.b64u_encode(victim.pk)}}
        data, _, secret = seal_outer(self.world, json.dumps(forged).encode())
        self.assertSealedRefusal(data, secret, "device_proof_failed")
        # (b) a genuine proof of the device, lifted from another request (bound to its enc)
        data, _, secret = seal_outer(self.world, json.dumps(good).encode())
        self.assertSealedRefusal(data, secret, "device_proof_failed")
        # (c) a proof sealed in base mode (no device secret at all)
        hdr = rq.outer_header("01")
        enc, ctx = hpke.setup_s(self.world.outer.pk, rq.OUTER_INFO + b"\x00" + hdr)
        enc_p, ctx_p = hpke.setup_s(self.world.outer.pk, rq.DEVICE_INFO)
        forged = {
            **good,
            "device": {
                "pk": p.b64u_encode(victim.pk),
                "proof": p.b64u_encode(enc_p + ctx_p.seal(enc, b"")),
            },
        }
        data = hdr + enc + ctx.seal(b"", json.dumps(forged).encode())
        with self.assertRaises(rq.SealedRefusal) as caught:
            rq.open_outer(data, self.world.outer.sk)
        self.assertEqual(caught.exception.code, "device_proof_failed")
        # (d) a small-order device key
        forged = {**good, "device": {**good["device"], "pk": p.b64u_encode(bytes(32))}}
        data, _, secret = seal_outer(self.world, json.dumps(forged).encode())
        self.assertSealedRefusal(data, secret, "device_proof_failed")

    def test_reprs_hold_no_secret(self) -> None:
        body, state = self.seal()
        outer = self.open(body)
        req = self.at_node(outer, outer.wraps[0])
        secrets_ = [state.router_secret, state.response_secret, outer.wraps[0].key]
        text = repr(state) + repr(outer) + repr(outer.wraps) + repr(req)
        for secret in secrets_:
            self.assertNotIn(secret.hex(), text)
            self.assertNotIn(p.b64u_encode(secret), text)
        self.assertEqual(repr(state), "ClientState(<redacted>)")


class NodeRequestTests(Fixture):
    def test_forwarded_body_carries_one_wrap(self) -> None:
        body, _ = self.seal()
        outer = self.open(body)
        wrap = outer.wraps[1]
        forwarded = json.loads(rq.node_request_body(outer, wrap))
        self.assertEqual(sorted(forwarded), ["ct", "device_pk", "model", "ts", "v", "wrap"])
        self.assertEqual(forwarded["wrap"], wrap.to_json())
        self.assertEqual(forwarded["device_pk"], p.b64u_encode(self.device.pk))
        req = rq.parse_node_request(rq.node_request_body(outer, wrap))
        self.assertEqual(
            (req.node, req.kid, req.enc, req.key), (wrap.node, wrap.kid, wrap.enc, wrap.key)
        )
        self.assertEqual(outer.wrap_for(wrap.node), wrap)
        self.assertIsNone(outer.wrap_for("node-z"))

    def test_parse_refusals(self) -> None:
        body, _ = self.seal()
        outer = self.open(body)
        good = json.loads(rq.node_request_body(outer, outer.wraps[0]))
        cases: list[Any] = [
            b"{",
            b"[]",
            {**good, "x": 1},
            {k: v for k, v in good.items() if k != "device_pk"},
            {**good, "v": 1},
            {**good, "ts": "1"},
            {**good, "model": ""},
            {**good, "wrap": [good["wrap"]]},
            {**good, "wrap": {**good["wrap"], "enc": "AAAA"}},
            {**good, "device_pk": "AAAA"},
            {**good, "ct": ""},
        ]
        for case in cases:
            data = case if isinstance(case, bytes) else json.dumps(case).encode()
            with self.assertRaises(p.ProtocolError) as caught:
                rq.parse_node_request(data)
            self.assertEqual(caught.exception.code, "bad_request", case)
        with self.assertRaises(p.ProtocolError) as caught:
            rq.parse_node_request(json.dumps(good).encode(), max_body=10)
        self.assertEqual(caught.exception.code, "body_too_large")

    def variants(self) -> tuple[rq.NodeRequest, dict[str, rq.NodeRequest]]:
        body, _ = self.seal()
        outer = self.open(body)
        req = self.at_node(outer, outer.wraps[0])
        other = hpke.generate_key_pair()
        return req, {
            "ts": dataclasses.replace(req, ts=req.ts + 1),
            "model": dataclasses.replace(req, model="m2"),
            "device swapped": dataclasses.replace(req, device_pk=other.pk),
            "device dropped": dataclasses.replace(req, device_pk=None),
            "wrap key": dataclasses.replace(req, key=bytes(48)),
        }

    def test_wrap_binding_mismatch_is_a_plain_decrypt_failed(self) -> None:
        """The router can change nothing it sees: ts, model, device key (the wrap's AAD, and
        for the device also the auth mode)."""
        _, variants = self.variants()
        for what, req in variants.items():
            with self.assertRaises(p.ProtocolError) as caught:
                self.node_open(req)
            self.assertNotIsInstance(caught.exception, rq.SealedRefusal)
            self.assertEqual(caught.exception.code, "decrypt_failed", what)

    def test_device_added_to_an_anonymous_request(self) -> None:
        """The router cannot put a victim's device on a base-mode request (cache isolation)."""
        body, _ = self.seal(device_sk=None)
        outer = self.open(body)
        req = dataclasses.replace(self.at_node(outer, outer.wraps[0]), device_pk=self.device.pk)
        with self.assertRaises(p.ProtocolError) as caught:
            self.node_open(req)
        self.assertEqual(caught.exception.code, "decrypt_failed")

    def test_wrong_node_key(self) -> None:
        req, _ = self.variants()
        for sk in (
            self.world.node(req.node).upcoming.sk,
            self.world.nodes[2].current.sk,
            self.world.outer.sk,
        ):
            with self.assertRaises(p.ProtocolError) as caught:
                rq.open_node_request(req, sk)
            self.assertEqual(caught.exception.code, "decrypt_failed")

    def test_inner_failures_after_the_wrap_opened_are_sealed(self) -> None:
        body, state = self.seal()
        outer = self.open(body)
        req = self.at_node(outer, outer.wraps[0])
        # another request's inner ciphertext, with this wrap
        other_body, _ = self.seal()
        other = self.open(other_body)
        mixed = dataclasses.replace(req, ct=other.ct)
        with self.assertRaises(rq.SealedRefusal) as caught:
            self.node_open(mixed)
        self.assertEqual(caught.exception.code, "decrypt_failed")
        self.assertEqual(caught.exception.secret, state.response_secret)

    def inner(self, plaintext: bytes, device: bool = True) -> tuple[rq.NodeRequest, bytes]:
        """A node request around any inner plaintext, correctly wrapped."""
        node = self.world.nodes[0]
        device_pk = self.device.pk if device else None
        bound = rq.binding(self.ts, "m1", device_pk)
        k = bytes(range(32))
        key, nonce, secret = rq.content_keys(k)
        enc, ctx = hpke.setup_s(
            node.current.pk, rq.WRAP_INFO, sk_s=self.device.sk if device else None
        )
        req = rq.NodeRequest(
            self.ts,
            "m1",
            device_pk,
            node.kids[0],
            enc,
            ctx.seal(bound, k),
            hpke.aead_seal(key, nonce, bound, plaintext),
            node.name,
        )
        return req, secret

    def test_bad_inner_request_is_a_sealed_bad_payload(self) -> None:
        for plaintext in (
            b"{",
            b"[]",
            b'{"messages": []}',
            b'{"messages": [{"role": "user", "content": "x"}], "model": "m2"}',
            b'{"messages": [{"role": "user", "content": "x"}], "n": 2}',
        ):
            req, secret = self.inner(plaintext)
            with self.assertRaises(rq.SealedRefusal) as caught:
                self.node_open(req)
            self.assertEqual(
                (caught.exception.code, caught.exception.secret), ("bad_payload", secret)
            )
        req, _ = self.inner(b'{"messages": [{"role": "user", "content": "x"}]}' + b" " * 30)
        chat, _ = self.node_open(req)
        self.assertEqual(chat.model, "m1")  # the outer model, which the wrap's AAD bound

    def test_wrapped_key_of_the_wrong_length(self) -> None:
        node = self.world.nodes[0]
        bound = rq.binding(self.ts, "m1", None)
        enc, ctx = hpke.setup_s(node.current.pk, rq.WRAP_INFO)
        req = rq.NodeRequest(
            self.ts, "m1", None, "0a", enc, ctx.seal(bound, bytes(31)), bytes(16), node.name
        )
        with self.assertRaises(p.ProtocolError) as caught:
            self.node_open(req)
        self.assertEqual(caught.exception.code, "decrypt_failed")

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=600))
    def test_any_forwarded_body_is_refused_cleanly(self, data: bytes) -> None:
        try:
            req = rq.parse_node_request(data)
        except p.ProtocolError as e:
            self.assertIn(e.code, ("bad_request", "body_too_large"))
            return
        with self.assertRaises(p.ProtocolError):
            self.node_open(req)


class ClientStateTests(SynchronousTestCase):
    def test_json_round_trip(self) -> None:
        state = rq.ClientState(bytes(32), bytes(range(32)), bytes(range(32, 64)))
        self.assertEqual(rq.ClientState.from_json(json.loads(json.dumps(state.to_json()))), state)
        for doc in (
            None,
            {},
            {"v": "1"},
            {**state.to_json(), "enc": "AA"},
            {**state.to_json(), "router_secret": 1},
        ):
            with self.assertRaises(p.ProtocolError):
                rq.ClientState.from_json(doc)


class BindingTests(SynchronousTestCase):
    def test_binding_text(self) -> None:
        self.assertEqual(rq.binding(1767225660, "m1", None), b"llmrouter/v2|1767225660|m1|")
        self.assertEqual(
            rq.binding(5, "a/b:c", bytes(32)),
            b"llmrouter/v2|5|a/b:c|AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
