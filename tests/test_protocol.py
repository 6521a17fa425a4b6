"""Wire protocol v1: envelope validation, request sealing, the response stream and key documents."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import nacl.signing
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.sse import SSEParser

NOW = 1_767_225_600


def make_key(kid: str = "0a") -> tuple[hpke.KeyPair, p.PublishedKey]:
    pair = hpke.generate_key_pair()
    return pair, p.PublishedKey(kid, pair.pk, "current", NOW - 10, NOW + 86400)


def sealed(
    request: p.ChatRequest | None = None, device: hpke.KeyPair | None = None
) -> tuple[hpke.KeyPair, dict[str, Any], p.RequestState]:
    pair, key = make_key()
    request = request or p.ChatRequest.from_prompt("hello")
    env, state = p.seal_request(key, request, NOW, device_key=device)
    return pair, env.to_json(), state


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


class EnvelopeTests(SynchronousTestCase):
    def assertCode(self, raw: bytes, code: str, status: int = 400, **kw: Any) -> None:
        with self.assertRaises(p.ProtocolError) as cm:
            p.parse_envelope(raw, **kw)
        self.assertEqual((cm.exception.code, cm.exception.status), (code, status))
        error = json.loads(cm.exception.to_json())["error"]
        self.assertEqual(error["code"], code)
        self.assertIsInstance(error["message"], str)

    def test_valid_base_and_auth(self) -> None:
        _, doc, _ = sealed()
        env = p.parse_envelope(body(doc))
        self.assertEqual((env.kid, env.mode, env.ts), ("0a", "base", NOW))
        self.assertIsNone(env.device_pubkey)
        device = hpke.generate_key_pair()
        _, doc, _ = sealed(device=device)
        env = p.parse_envelope(body(doc))
        self.assertEqual(env.mode, "auth")
        self.assertEqual(env.device_pubkey, device.pk)

    def test_aad_exact_format(self) -> None:
        device = hpke.generate_key_pair()
        _, doc, _ = sealed(device=device)
        env = p.parse_envelope(body(doc))
        expected = f"llmrouter/v1|0a|auth|{NOW}|{doc['rid']}|{doc['device_pubkey']}"
        self.assertEqual(env.aad(), expected.encode("ascii"))
        _, doc, _ = sealed()
        self.assertEqual(
            p.parse_envelope(body(doc)).aad(), f"llmrouter/v1|0a|base|{NOW}|{doc['rid']}|".encode()
        )

    def test_size_limit(self) -> None:
        _, doc, _ = sealed()
        raw = body(doc)
        self.assertCode(raw, "body_too_large", 413, max_body=len(raw) - 1)
        p.parse_envelope(raw, max_body=len(raw))
        self.assertCode(b" " * (p.DEFAULT_MAX_BODY + 1), "body_too_large", 413)

    def test_bad_json(self) -> None:
        for raw in (b"{", b"\xff\xfe", b"[]", b'"x"', b"NaN", b'{"v": 1, "v": 1}'):
            self.assertCode(raw, "bad_json")

    def test_unknown_and_missing_fields(self) -> None:
        _, doc, _ = sealed()
        self.assertCode(body({**doc, "extra": 1}), "unknown_field")
        for name in ("v", "kid", "mode", "enc", "ts", "rid", "ct"):
            partial = dict(doc)
            del partial[name]
            self.assertCode(body(partial), "missing_field")
        self.assertCode(body({**doc, "mode": "auth"}), "missing_field")

    def test_types(self) -> None:
        _, doc, _ = sealed()
        for name, value in [
            ("v", "1"),
            ("v", True),
            ("ts", "1"),
            ("ts", 1.5),
            ("ts", -1),
            ("ts", True),
            ("kid", 10),
            ("enc", 5),
            ("rid", None),
            ("ct", []),
            ("mode", 0),
        ]:
            self.assertCode(body({**doc, name: value}), "bad_type")

    def test_version_mode_kid(self) -> None:
        _, doc, _ = sealed()
        self.assertCode(body({**doc, "v": 2}), "bad_version")
        self.assertCode(body({**doc, "mode": "psk"}), "bad_mode")
        device = p.b64u_encode(hpke.generate_key_pair().pk)
        self.assertCode(body({**doc, "device_pubkey": device}), "bad_mode")
        for kid in ("0A", "a", "abc", "zz", ""):
            self.assertCode(body({**doc, "kid": kid}), "key_unknown")

    def test_base64_and_lengths(self) -> None:
        _, doc, _ = sealed()
        enc = doc["enc"]
        self.assertCode(body({**doc, "enc": enc + "="}), "bad_base64")
        self.assertCode(body({**doc, "enc": enc[:-1] + "+"}), "bad_base64")
        self.assertCode(body({**doc, "enc": p.b64u_encode(os.urandom(31))}), "bad_length")
        self.assertCode(body({**doc, "enc": enc[:-2]}), "bad_base64")
        self.assertCode(body({**doc, "enc": p.b64u_encode(os.urandom(33))}), "bad_length")
        self.assertCode(body({**doc, "rid": p.b64u_encode(os.urandom(15))}), "bad_length")
        self.assertCode(body({**doc, "ct": p.b64u_encode(os.urandom(15))}), "bad_length")
        # Non-canonical: trailing bits set in the last character.
        self.assertCode(body({**doc, "rid": doc["rid"][:-1] + "B"}), "bad_base64")

    def test_timestamp(self) -> None:
        p.check_timestamp(NOW, NOW + 60)
        p.check_timestamp(NOW, NOW - 60)
        for now in (NOW + 61, NOW - 61):
            with self.assertRaises(p.ProtocolError) as cm:
                p.check_timestamp(NOW, now)
            self.assertEqual((cm.exception.code, cm.exception.status), ("stale", 401))


class RequestTests(SynchronousTestCase):
    def test_open_base_and_auth(self) -> None:
        request = p.ChatRequest(
            (p.Message("system", "be brief"), p.Message("user", "hi")),
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            stop=("\n",),
        )
        for device in (None, hpke.generate_key_pair()):
            pair, doc, state = sealed(request, device)
            opened, secret = p.open_request(p.parse_envelope(body(doc)), pair.sk)
            self.assertEqual(opened, request)
            self.assertEqual(secret, state.secret)

    def test_request_plaintext_is_padded(self) -> None:
        for prompt in ("", "x", "y" * 63, "z" * 200):
            pair, doc, _ = sealed(p.ChatRequest.from_prompt(prompt))
            env = p.parse_envelope(body(doc))
            pt = hpke.setup_r(env.enc, pair.sk, p.REQUEST_INFO).open(env.aad(), env.ct)
            self.assertEqual(len(pt) % p.DEFAULT_PAD, 0)
            self.assertEqual(len(env.ct), len(pt) + hpke.N_T)

    def test_any_crypto_failure_is_one_code(self) -> None:
        device = hpke.generate_key_pair()
        pair, doc, _ = sealed(device=device)
        variants = [
            {**doc, "ts": doc["ts"] + 1},  # aad changed
            {**doc, "rid": p.b64u_encode(os.urandom(16))},
            {**doc, "device_pubkey": p.b64u_encode(hpke.generate_key_pair().pk)},
            {**doc, "enc": p.b64u_encode(hpke.generate_key_pair().pk)},
            {**doc, "enc": p.b64u_encode(bytes(32))},  # small-order point
            {**doc, "ct": p.b64u_encode(os.urandom(80))},
        ]
        for variant in variants:
            env = p.parse_envelope(body(variant))
            with self.assertRaises(p.ProtocolError) as cm:
                p.open_request(env, pair.sk)
            self.assertEqual(cm.exception.code, "decrypt_failed")
            self.assertEqual(cm.exception.message, "the request could not be decrypted")
        with self.assertRaises(p.ProtocolError) as cm:
            p.open_request(p.parse_envelope(body(doc)), hpke.generate_key_pair().sk)
        self.assertEqual(cm.exception.code, "decrypt_failed")

    def test_bad_payloads(self) -> None:
        cases: list[Any] = [
            [],
            {},
            {"messages": []},
            {"messages": [{"role": "user"}]},
            {"messages": [{"role": "tool", "content": "x"}]},
            {"messages": [{"role": "user", "content": 5}]},
            {"messages": [{"role": "user", "content": "x", "name": "n"}]},
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5},
            {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
            {"messages": [{"role": "user", "content": "x"}], "stop": "x"},
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
            {"messages": [{"role": "user", "content": "x"}], "gpt": "model"},
            # unhashable roles once raised TypeError (a 500) instead of bad_payload (issue 8)
            {"messages": [{"role": ["user"], "content": "x"}]},
            {"messages": [{"role": {"user": 1}, "content": "x"}]},
        ]
        for case in cases:
            with self.assertRaises(p.ProtocolError) as cm:
                p.parse_chat_request(json.dumps(case).encode())
            self.assertEqual(cm.exception.code, "bad_payload")
            self.assertNotIn("gpt", cm.exception.message)
        with self.assertRaises(p.ProtocolError):
            p.parse_chat_request(b"\xff")

    def test_padding_spaces_only(self) -> None:
        doc = b'{"messages":[{"role":"user","content":"x"}]}'
        self.assertEqual(len(p.parse_chat_request(doc + b"    ").messages), 1)
        with self.assertRaises(p.ProtocolError):
            p.parse_chat_request(doc + b"\x00\x00")

    def test_to_openai(self) -> None:
        req = p.ChatRequest.from_prompt("hi", max_tokens=3)
        self.assertEqual(
            req.to_openai("m"),
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
                "model": "m",
            },
        )

    def test_reprs_hide_content(self) -> None:
        req = p.ChatRequest.from_prompt("canary-7f3a")
        _pair, doc, state = sealed(req)
        for obj in (req, req.messages[0], state, p.parse_envelope(body(doc))):
            self.assertNotIn("canary-7f3a", repr(obj))
        self.assertNotIn(p.b64u_encode(state.secret), repr(state))

    def test_state_round_trip(self) -> None:
        _, _, state = sealed()
        self.assertEqual(p.RequestState.from_json(json.loads(json.dumps(state.to_json()))), state)
        with self.assertRaises(p.ProtocolError):
            p.RequestState.from_json({"v": "2"})


def stream_for(
    state: p.RequestState, pair: hpke.KeyPair, doc: dict[str, Any], pad: int = 64
) -> Any:
    _, secret = p.open_request(p.parse_envelope(body(doc)), pair.sk)
    return p.ResponseSealer(secret, state.enc, pad=pad)


class ResponseStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pair, self.doc, self.state = sealed()
        self.sealer = stream_for(self.state, self.pair, self.doc)

    def events(self, raw: bytes) -> list[tuple[str, str]]:
        return SSEParser().feed(raw)

    def test_multi_chunk_round_trip_any_split(self) -> None:
        texts = ["Hello", ", ", "wörld", " \u2603", "\n", ""]
        raw = self.sealer.init_event() + b"".join(self.sealer.delta(t) for t in texts)
        raw += p.KEEPALIVE + self.sealer.done("stop", 12, len(texts))
        for step in (1, 7, len(raw)):
            opener = p.ResponseOpener(self.state)
            items = []
            for i in range(0, len(raw), step):
                items += opener.feed(raw[i : i + step])
            self.assertEqual([i.text for i in items if isinstance(i, p.Delta)], texts)
            self.assertEqual(opener.close(), p.Done("stop", 12, len(texts)))

    def test_key_schedule_and_padding_independently(self) -> None:
        """Recompute the section 3.3 schedule by hand: nonce_i = aead_nonce XOR i, final aad."""
        raw = self.sealer.init_event() + self.sealer.delta("a") + self.sealer.delta("b" * 100)
        raw += self.sealer.error("upstream_failed", "backend went away")
        events = self.events(raw)
        self.assertEqual([e for e, _ in events], ["init", "chunk", "chunk", "final"])
        nonce = p.b64u_decode(json.loads(events[0][1])["response_nonce"], "n", 32)
        prk = hpke.hkdf_extract(self.state.enc + nonce, self.state.secret)
        key = hpke.hkdf_expand(prk, b"key", 32)
        base = hpke.hkdf_expand(prk, b"nonce", 12)
        for i, (name, data) in enumerate(events[1:]):
            n = bytes(a ^ b for a, b in zip(base, i.to_bytes(12, "big"), strict=True))
            aad = b"final" if name == "final" else b""
            pt = hpke.aead_open(key, n, aad, p.b64u_decode(data, "c"))
            self.assertEqual(len(pt) % 64, 0)
            self.assertIn(b'"type":', pt)
        self.assertTrue(self.sealer.finished)
        self.assertRaises(p.StreamError, self.sealer.delta, "late")

    def test_all_chunks_same_length_bucket(self) -> None:
        raw = self.sealer.init_event() + b"".join(self.sealer.delta(c) for c in "abcdefgh")
        lengths = {len(data) for name, data in self.events(raw) if name == "chunk"}
        self.assertEqual(len(lengths), 1, "one-character deltas must be indistinguishable")

    def test_error_final(self) -> None:
        raw = self.sealer.init_event() + self.sealer.delta("x") + self.sealer.error("timeout", "t")
        opener = p.ResponseOpener(self.state)
        opener.feed(raw)
        self.assertEqual(opener.close(), p.ErrorChunk("timeout", "t"))

    def test_sealed_refusal_carries_what_a_plain_one_did(self) -> None:
        """A refusal after decryption is a stream whose only chunk is the error (issue 19):
        with the HTTP status, Retry-After and the backend's reason a plain refusal had."""
        raw = self.sealer.init_event() + self.sealer.error(
            "upstream_refused",
            "refused",
            400,
            upstream_status=400,
            upstream_code="max_tokens_exceeded",
            upstream_param="max_tokens",
        )
        opener = p.ResponseOpener(self.state)
        (item,) = opener.feed(raw)
        self.assertEqual(
            item,
            p.ErrorChunk(
                "upstream_refused", "refused", 400, None, 400, "max_tokens_exceeded", "max_tokens"
            ),
        )
        self.assertEqual(item.detail()["upstream_param"], "max_tokens")
        for bad in (
            {"status": "429"},
            {"status": 99},
            {"retry_after": -1},
            {"upstream_code": "a b"},
        ):
            sealer = p.ResponseSealer(self.state.secret, self.state.enc)
            raw = sealer.init_event() + sealer.error("x", "y", **bad)
            self.assertStreamError(raw)

    def assertStreamError(self, raw: bytes, state: p.RequestState | None = None) -> None:
        opener = p.ResponseOpener(state or self.state)
        with self.assertRaises(p.StreamError):
            opener.feed(raw)
            opener.close()

    def test_truncation(self) -> None:
        init, d1, d2 = self.sealer.init_event(), self.sealer.delta("a"), self.sealer.delta("b")
        final = self.sealer.done("length", 1, 2)
        self.assertStreamError(b"")
        self.assertStreamError(init + d1 + d2)
        self.assertStreamError(init + d1 + d2 + final[:-2])  # final event never dispatched

    def test_tampering(self) -> None:
        init, d1, d2 = self.sealer.init_event(), self.sealer.delta("a"), self.sealer.delta("b")
        final = self.sealer.done("stop", 1, 2)
        self.assertStreamError(init + d2 + d1 + final)  # reordered
        self.assertStreamError(init + d1 + final)  # dropped chunk
        self.assertStreamError(init + d1 + d2 + d2 + final)  # replayed chunk
        self.assertStreamError(d1 + d2 + final)  # no init
        self.assertStreamError(init + init + d1 + d2 + final)
        self.assertStreamError(init + d1 + d2 + final.replace(b"event: final", b"event: chunk"))
        self.assertStreamError(init + d1 + d2.replace(b"event: chunk", b"event: final") + final)
        self.assertStreamError(init + d1 + d2 + final + d1)  # data after final
        flipped = bytearray(d1)
        flipped[-5] = ord("A") if flipped[-5] != ord("A") else ord("B")
        self.assertStreamError(init + bytes(flipped) + d2 + final)
        other = sealed()[2]
        self.assertStreamError(init + d1 + d2 + final, state=other)  # someone else's stream

    def test_v11_chunk_types(self) -> None:
        logprobs = [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5}, {"token": "Yo", "logprob": -1}],
            }
        ]
        raw = self.sealer.init_event() + self.sealer.reasoning("think")
        raw += self.sealer.delta("Hi", logprobs)
        raw += self.sealer.tool_call(0, "call_1", "get_weather", "")
        raw += self.sealer.tool_call(0, None, None, '{"city":')
        raw += self.sealer.tool_call(1, "call_2", "f", "{}") + self.sealer.done("tool_calls", 5, 4)
        opener = p.ResponseOpener(self.state)
        items = opener.feed(raw)
        self.assertEqual(items[0], p.Reasoning("think"))
        self.assertEqual(items[1].text, "Hi")
        assert isinstance(items[1], p.Delta) and items[1].logprobs is not None
        (entry,) = items[1].logprobs
        self.assertEqual((entry.token, entry.logprob, entry.bytes), ("Hi", -0.5, (72, 105)))
        self.assertEqual([t.token for t in entry.top_logprobs], ["Hi", "Yo"])
        self.assertEqual(
            items[2:5],
            [
                p.ToolCallDelta(0, "call_1", "get_weather", ""),
                p.ToolCallDelta(0, None, None, '{"city":'),
                p.ToolCallDelta(1, "call_2", "f", "{}"),
            ],
        )
        self.assertEqual(opener.close(), p.Done("tool_calls", 5, 4))

    def test_v1_delta_bytes_unchanged(self) -> None:
        """A delta without logprobs is the v1 plaintext exactly (the worked example pins it)."""
        sealer = stream_for(self.state, self.pair, self.doc)
        events = self.events(sealer.init_event() + sealer.delta("Hi"))
        nonce = p.b64u_decode(json.loads(events[0][1])["response_nonce"], "n", 32)
        keys = p.ResponseKeys(self.state.secret, self.state.enc, nonce)
        plaintext = keys.open(b"", p.b64u_decode(events[1][1], "c"))
        self.assertEqual(plaintext, b'{"type":"delta","text":"Hi"}'.ljust(64))

    def test_malformed_v11_chunks(self) -> None:
        for message in (
            {"type": "reasoning", "text": 5},
            {"type": "tool_call", "index": -1, "arguments": ""},
            {"type": "tool_call", "index": 64, "arguments": ""},
            {"type": "tool_call", "index": True, "arguments": ""},
            {"type": "tool_call", "index": 0, "arguments": None},
            {"type": "tool_call", "index": 0, "id": 5, "arguments": ""},
            {"type": "delta", "text": "x", "logprobs": [{"token": "x"}]},
            {"type": "delta", "text": "x", "logprobs": [{"token": "x", "logprob": "-1"}]},
            {"type": "delta", "text": "x", "logprobs": {"content": []}},
        ):
            pair, doc, state = sealed()
            sealer = stream_for(state, pair, doc)
            raw = sealer.init_event() + sealer._event("chunk", b"", message)
            self.assertStreamError(raw, state)
        # minus infinity (null from a backend) is carried as OpenAI does
        entries = p.logprob_entries([{"token": "x", "logprob": None, "top_logprobs": []}])
        self.assertEqual(entries[0]["logprob"], p.MIN_LOGPROB)
        with self.assertRaises(ValueError):
            p.logprob_entries([{"token": "x", "logprob": 0}] * (p.MAX_LOGPROB_ENTRIES + 1))

    def test_unknown_events_and_comments_ignored(self) -> None:
        raw = b": hello\n\nevent: ping\ndata: {}\n\n" + self.sealer.init_event()
        raw += self.sealer.done("cancelled", 0, 0)
        opener = p.ResponseOpener(self.state)
        opener.feed(raw)
        self.assertEqual(opener.close(), p.Done("cancelled", 0, 0))

    @settings(max_examples=40, deadline=None)
    @given(
        texts=st.lists(st.text(max_size=40), max_size=12),
        pad=st.sampled_from([1, 16, 64, 256]),
        cut=st.integers(min_value=1, max_value=64),
    )
    def test_property_round_trip(self, texts: list[str], pad: int, cut: int) -> None:
        pair, doc, state = sealed()
        sealer = stream_for(state, pair, doc, pad=pad)
        raw = sealer.init_event() + b"".join(sealer.delta(t) for t in texts)
        raw += sealer.done("stop", 1, len(texts))
        opener = p.ResponseOpener(state)
        got = []
        for i in range(0, len(raw), cut):
            got += [x.text for x in opener.feed(raw[i : i + cut]) if isinstance(x, p.Delta)]
        self.assertEqual(got, [t.replace("\r\n", "\n") for t in texts])
        opener.close()


class KeyDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.signing = nacl.signing.SigningKey.generate()
        self.current = make_key("0a")[1]
        self.next = p.PublishedKey("0b", hpke.generate_key_pair().pk, "next", NOW, NOW + 90000)

    def test_round_trip_and_pin(self) -> None:
        raw = p.build_key_document([self.current, self.next], self.signing, NOW)
        pin = bytes(self.signing.verify_key)
        doc = p.verify_key_document(raw, pin, now=NOW)
        self.assertEqual(doc.keys, (self.current, self.next))
        self.assertEqual(doc.current(), self.current)
        self.assertEqual(doc.issued_at, NOW)
        outer = json.loads(raw)
        payload = json.loads(p.b64u_decode(outer["payload"], "p"))
        self.assertEqual(payload["suite"], {"kem": 32, "kdf": 1, "aead": 3})
        self.assertEqual(payload["v"], 1)
        other = bytes(nacl.signing.SigningKey.generate().verify_key)
        self.assertRaises(p.KeyDocumentError, p.verify_key_document, raw, other, now=NOW)

    def refused(self, keys: list[p.PublishedKey], issued_at: int = NOW, now: int = NOW) -> str:
        raw = p.build_key_document(keys, self.signing, issued_at)
        with self.assertRaises(p.KeyDocumentError) as caught:
            p.verify_key_document(raw, now=now)
        return str(caught.exception)

    def test_stale_or_future_documents_are_refused(self) -> None:
        """issued_at was never checked, so an old signed document carrying a revoked key could
        be replayed to clients, and they sealed to it (issue 8)."""
        keys = [self.current, self.next]
        for issued_at in (NOW - p.KEY_DOCUMENT_MAX_AGE, NOW + p.KEY_DOCUMENT_SKEW):
            raw = p.build_key_document(keys, self.signing, issued_at)
            self.assertEqual(p.verify_key_document(raw, now=NOW).issued_at, issued_at)
        self.assertIn("older than", self.refused(keys, NOW - p.KEY_DOCUMENT_MAX_AGE - 1))
        self.assertIn("future", self.refused(keys, NOW + p.KEY_DOCUMENT_SKEW + 1))

    def test_current_key_outside_its_validity_is_refused(self) -> None:
        early = p.PublishedKey("0a", self.current.pk, "current", NOW + 301, NOW + 9000)
        late = p.PublishedKey("0a", self.current.pk, "current", NOW - 9000, NOW - 301)
        for current in (early, late):
            self.assertIn("validity", self.refused([current, self.next]))
        edge = p.PublishedKey("0a", self.current.pk, "current", NOW + 300, NOW + 9000)
        raw = p.build_key_document([edge, self.next], self.signing, NOW)
        self.assertEqual(p.verify_key_document(raw, now=NOW).current(), edge)

    def test_duplicate_kids_and_missing_next_are_refused(self) -> None:
        twin = p.PublishedKey("0a", self.next.pk, "next", NOW, NOW + 90000)
        self.assertIn("duplicate", self.refused([self.current, twin]))
        self.assertIn("one current and one next", self.refused([self.current]))
        other_next = p.PublishedKey("0c", self.next.pk, "next", NOW, NOW + 90000)
        self.assertIn(
            "one current and one next", self.refused([self.current, self.next, other_next])
        )

    def test_signature_over_exact_bytes(self) -> None:
        raw = p.build_key_document([self.current], self.signing, NOW)
        outer = json.loads(raw)
        payload = p.b64u_decode(outer["payload"], "p")
        reformatted = json.dumps(json.loads(payload), indent=1).encode()
        self.assertRaises(
            p.KeyDocumentError,
            p.verify_key_document,
            json.dumps({**outer, "payload": p.b64u_encode(reformatted)}).encode(),
            now=NOW,
        )

    def test_inconsistent_documents(self) -> None:
        two_current = p.PublishedKey("0c", self.next.pk, "current", 0, 1)
        raw = p.build_key_document([self.current, two_current], self.signing, NOW)
        self.assertRaises(p.KeyDocumentError, p.verify_key_document, raw, now=NOW)
        raw = p.build_key_document([self.next], self.signing, NOW)
        self.assertRaises(p.KeyDocumentError, p.verify_key_document, raw, now=NOW)
        for junk in (b"", b"[]", b"{}", b'{"payload": 1}'):
            self.assertRaises(p.KeyDocumentError, p.verify_key_document, junk, now=NOW)

    def test_jwks(self) -> None:
        jwks = json.loads(p.build_jwks([self.current, self.next]))
        self.assertEqual(
            jwks["keys"][0],
            {
                "kty": "OKP",
                "crv": "X25519",
                "x": p.b64u_encode(self.current.pk),
                "kid": "0a",
                "use": "enc",
            },
        )
        self.assertEqual(len(jwks["keys"]), 2)

    def test_ohttp_key_configs(self) -> None:
        raw = p.build_ohttp_key_configs([self.current, self.next])
        self.assertEqual(len(raw), 2 * (2 + 41))
        first = raw[2:43]
        self.assertEqual(raw[:2], (41).to_bytes(2, "big"))
        self.assertEqual(first[0], 0x0A)
        self.assertEqual(first[1:3], b"\x00\x20")
        self.assertEqual(first[3:35], self.current.pk)
        self.assertEqual(first[35:], b"\x00\x04\x00\x01\x00\x03")
        self.assertEqual(raw[45], 0x0B)

    def test_kid_mapping(self) -> None:
        self.assertEqual(p.kid_for_key_id(10), "0a")
        self.assertEqual(p.key_id_for_kid("ff"), 255)
        self.assertRaises(ValueError, p.kid_for_key_id, 256)
        self.assertRaises(ValueError, p.key_id_for_kid, "FF")


class SSETests(SynchronousTestCase):
    def test_line_endings_and_multiline(self) -> None:
        parser = SSEParser()
        raw = b"event: a\r\ndata: 1\rdata: 2\n\n: c\n\ndata: x\r"
        self.assertEqual(parser.feed(raw), [("a", "1\n2")])
        self.assertEqual(parser.feed(b"\n"), [])
        self.assertEqual(parser.feed(b"\n"), [("message", "x")])

    def test_bounded(self) -> None:
        parser = SSEParser(max_line=10)
        self.assertRaises(ValueError, parser.feed, b"data: " + b"x" * 20)

    def test_event_data_bounded(self) -> None:
        """Short ``data:`` lines accumulated without bound until a blank line: a hostile proxy
        could exhaust the client's memory one line at a time (issue 8)."""
        parser = SSEParser(max_line=100, max_event=1000)
        self.assertEqual(
            parser.feed(b"data: x\n" * 400 + b"\n"), [("message", "\n".join("x" * 400))]
        )
        with self.assertRaises(ValueError):
            for _ in range(200):
                parser.feed(b"data: xxxxxxxxx\n")
        parser = SSEParser(max_line=100, max_event=1000)
        with self.assertRaises(ValueError):
            parser.feed(b"data:\n" * 2000)  # empty lines count too (one newline each)

    def test_a_long_line_in_small_pieces_is_linear_work(self) -> None:
        """A hostile hop sends a 1 MiB line one byte at a time: each byte must not rescan the
        line from its start (issue 19). Work is counted in bytes examined, not seconds."""
        line = b"data: " + b"x" * ((1 << 20) - 6)
        parser = SSEParser(max_line=1 << 20)
        bound = 4 * (len(line) + 2)
        for i in range(len(line)):
            self.assertEqual(parser.feed(line[i : i + 1]), [])
            if parser.scanned > bound:  # fail as soon as the work is superlinear
                self.fail(f"{parser.scanned} bytes examined after {i + 1} bytes fed")
        self.assertEqual(parser.feed(b"\n\n"), [("message", "x" * ((1 << 20) - 6))])
        self.assertLessEqual(parser.scanned, bound)


class TimestampTests(SynchronousTestCase):
    def test_now(self) -> None:
        p.check_timestamp(int(time.time()), time.time())
