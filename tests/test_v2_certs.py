"""Protocol v2's chain of trust: every check of the key document, and each way it fails."""

from __future__ import annotations

import json
from typing import Any

import nacl.signing
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.v2 import certs
from tests.v2_world import DAY, World


def resign(
    doc: dict[str, Any],
    payload: dict[str, Any] | bytes,
    key: nacl.signing.SigningKey,
    context: bytes,
) -> dict[str, Any]:
    """``doc`` with ``payload`` signed by ``key`` under ``context`` (to test each check alone)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = key.sign(certs.signed_message(context, raw)).signature
    return {**doc, "payload": p.b64u_encode(raw), "signature": p.b64u_encode(signature)}


def claims(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(p.b64u_decode(doc["payload"], "payload"))
    return result


class CertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        self.now = self.world.now
        self.node = self.world.nodes[1]

    def verify(self, doc: Any, type: str = "node", now: float | None = None) -> certs.Certificate:
        return certs.verify_certificate(
            doc, self.world.pin, now=self.now if now is None else now, type=type
        )

    def assertRefused(self, doc: Any, text: str, type: str = "node", **kw: Any) -> None:
        with self.assertRaises(certs.CertificateError) as caught:
            self.verify(doc, type, **kw)
        self.assertIn(text, str(caught.exception))

    def test_round_trip(self) -> None:
        cert = self.verify(self.node.certificate)
        self.assertEqual((cert.type, cert.name, cert.models), ("node", "node-b", ("m1", "m2")))
        self.assertEqual(cert.key, bytes(self.node.signing.verify_key))
        self.assertEqual(cert.raw, self.node.certificate)
        router = self.verify(self.world.router_certificate, "router")
        self.assertEqual((router.type, router.name, router.models), ("router", "router-1", ()))
        self.assertEqual(
            list(claims(self.node.certificate)),
            ["v", "type", "name", "key", "models", "not_before", "not_after"],
        )

    def test_tampered_payload_or_signature(self) -> None:
        doc = dict(self.node.certificate)
        tampered = claims(doc)
        tampered["models"].append("m3")
        doc["payload"] = p.b64u_encode(json.dumps(tampered).encode())
        self.assertRefused(doc, "signature of the certificate does not verify")
        doc = dict(self.node.certificate)
        signature = bytearray(p.b64u_decode(doc["signature"], "s"))
        signature[5] ^= 1
        doc["signature"] = p.b64u_encode(bytes(signature))
        self.assertRefused(doc, "does not verify")

    def test_another_operator(self) -> None:
        other = nacl.signing.SigningKey.generate()
        doc = self.world.certify("node", "node-x", self.node.signing, ("m1",), operator=other)
        self.assertRefused(doc, "does not verify")

    def test_wrong_context(self) -> None:
        """The same payload signed by the operator under another context is no certificate."""
        for context in (certs.NODE_KEYS_CONTEXT, certs.KEY_DOCUMENT_CONTEXT, b"", b"x"):
            doc = resign(
                self.node.certificate,
                p.b64u_decode(self.node.certificate["payload"], "p"),
                self.world.operator,
                context,
            )
            self.assertRefused(doc, "does not verify")
        # a signature over the bare payload (no context) does not verify either
        raw = p.b64u_decode(self.node.certificate["payload"], "p")
        bare = self.world.operator.sign(raw).signature
        self.assertRefused({**self.node.certificate, "signature": p.b64u_encode(bare)}, "verify")

    def test_wrong_type(self) -> None:
        self.assertRefused(self.node.certificate, "not a router certificate", "router")
        self.assertRefused(self.world.router_certificate, "not a node certificate", "node")
        with self.assertRaises(certs.CertificateError):
            self.verify(self.node.certificate, "operator")

    def test_validity_with_skew(self) -> None:
        cert = self.verify(self.node.certificate)
        self.verify(self.node.certificate, now=cert.not_before - 300)
        self.verify(self.node.certificate, now=cert.not_after + 300)
        self.assertRefused(self.node.certificate, "not valid yet", now=cert.not_before - 301)
        self.assertRefused(self.node.certificate, "has expired", now=cert.not_after + 301)

    def test_issue_rules(self) -> None:
        key = self.node.signing
        bad: list[dict[str, Any]] = [
            {"type": "node", "name": "Node-A", "models": ("m1",)},
            {"type": "node", "name": "-a", "models": ("m1",)},
            {"type": "node", "name": "a" * 64, "models": ("m1",)},
            {"type": "node", "name": "a", "models": ()},
            {"type": "node", "name": "a", "models": tuple(f"m{i}" for i in range(65))},
            {"type": "node", "name": "a", "models": ("m1", "m1")},
            {"type": "node", "name": "a", "models": ("bad model",)},
            {"type": "router", "name": "a", "models": ("m1",)},
            {"type": "operator", "name": "a", "models": ()},
            {"type": "node", "name": "a", "models": ("m1",), "days": 367},
            {"type": "node", "name": "a", "models": ("m1",), "days": 0},
        ]
        for case in bad:
            with self.assertRaises(certs.CertificateError, msg=str(case)):
                self.world.certify(
                    case["type"],
                    case["name"],
                    key,
                    case["models"],
                    **({"days": case["days"]} if "days" in case else {}),
                )
        self.world.certify("node", "a" * 63, key, tuple(f"m{i}" for i in range(64)), days=366)
        with self.assertRaises(certs.CertificateError):
            certs.issue_certificate(
                bytes(self.world.operator),
                type="node",
                name="a",
                key=b"short",
                models=("m1",),
                not_before=0,
                not_after=1,
            )

    def test_operator_signed_nonsense_is_still_refused(self) -> None:
        """The rules hold for what a careless operator tool might have signed."""
        base = claims(self.node.certificate)
        cases = [
            ({**base, "not_after": base["not_before"] + 367 * DAY}, "366 days"),
            ({**base, "not_after": base["not_before"]}, "366 days"),
            ({**base, "models": []}, "1 to 64"),
            ({**base, "name": "UPPER"}, "name"),
            ({**base, "key": "short"}, "32-byte"),
            ({**base, "extra": 1}, "exactly the fields"),
            ({k: v for k, v in base.items() if k != "models"}, "exactly the fields"),
            ({**base, "v": 1}, "not a protocol v2 certificate"),
            ({**base, "not_before": 1.5}, "integers"),
            ({**base, "not_before": True}, "integers"),
            ([base], "not a protocol v2 certificate"),
        ]
        for payload, text in cases:
            doc = resign(
                self.node.certificate,
                json.dumps(payload).encode(),
                self.world.operator,
                certs.CERTIFICATE_CONTEXT,
            )
            self.assertRefused(doc, text)
        doc = resign(self.node.certificate, b"\xff", self.world.operator, certs.CERTIFICATE_CONTEXT)
        self.assertRefused(doc, "not UTF-8 JSON")

    def test_malformed_envelope(self) -> None:
        for doc in (
            None,
            [],
            "x",
            {"payload": "AA"},
            {**self.node.certificate, "x": 1},
            {**self.node.certificate, "signature": "not base64!"},
            {**self.node.certificate, "signature": p.b64u_encode(bytes(63))},
            {**self.node.certificate, "payload": 7},
        ):
            with self.assertRaises(certs.CertificateError, msg=repr(doc)):
                self.verify(doc)


class NodeKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        self.now = self.world.now
        self.node = self.world.nodes[0]
        self.pk = bytes(self.node.signing.verify_key)

    def assertRefused(self, doc: Any, text: str, pk: bytes | None = None) -> None:
        with self.assertRaises(p.KeyDocumentError) as caught:
            certs.verify_node_keys(doc, pk or self.pk, now=self.now)
        self.assertIn(text, str(caught.exception))

    def payload(self, **changes: Any) -> dict[str, Any]:
        return {**claims(self.node.key_set(self.now)), **changes}

    def signed(self, payload: Any, context: bytes = certs.NODE_KEYS_CONTEXT) -> dict[str, Any]:
        return resign(self.node.key_set(self.now), payload, self.node.signing, context)

    def test_round_trip(self) -> None:
        keys = certs.verify_node_keys(self.node.key_set(self.now), self.pk, now=self.now)
        self.assertEqual([(k.kid, k.status) for k in keys], [("0a", "current"), ("0b", "next")])
        self.assertEqual(keys[0].pk, self.node.current.pk)
        self.assertEqual(claims(self.node.key_set(self.now))["type"], "node-keys")

    def test_signed_by_another_key(self) -> None:
        other = self.world.nodes[1]
        self.assertRefused(other.key_set(self.now), "not signed by the certified node key")
        # the right signing_key field, but the signature made by another key
        forged = resign(
            self.node.key_set(self.now), self.payload(), other.signing, certs.NODE_KEYS_CONTEXT
        )
        self.assertRefused(forged, "does not verify")

    def test_wrong_context(self) -> None:
        for context in (certs.CERTIFICATE_CONTEXT, certs.KEY_DOCUMENT_CONTEXT):
            self.assertRefused(self.signed(self.payload(), context), "does not verify")

    def test_payload_checks(self) -> None:
        keys = self.payload()["keys"]
        hour = p.key_document_issued_at(self.now)
        cases = [
            (self.payload(type="key-document"), "node-keys"),
            (self.payload(v=1), "node-keys"),
            (self.payload(suite={"kem": 16, "kdf": 1, "aead": 3}), "node-keys"),
            (self.payload(issued_at=hour - DAY - 3600), "older than 24 hours"),
            (self.payload(issued_at=int(self.now) + 301), "in the future"),
            (self.payload(issued_at="1"), "issued_at"),
            (self.payload(keys=[keys[0], {**keys[1], "kid": "0a"}]), "duplicate key ids"),
            (self.payload(keys=[keys[0], {**keys[1], "status": "current"}]), "one current"),
            (self.payload(keys=[keys[0]]), "one current"),
            (self.payload(keys=[]), "list of keys"),
            (self.payload(keys=[keys[0]] * 17), "list of keys"),
            (self.payload(keys=[keys[0], {**keys[1], "pk": "AA"}]), "malformed"),
            (
                self.payload(keys=[{**keys[0], "not_after": int(self.now) - 301}, keys[1]]),
                "outside its validity window",
            ),
            ({**self.payload(), "extra": 1}, "exactly the fields"),
        ]
        for payload, text in cases:
            self.assertRefused(self.signed(payload), text)


class KeyDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World({"node-a": ("m1",), "node-b": ("m1", "m2"), "node-c": ("m2",)})
        self.now = self.world.now

    def verify(self, body: bytes, pin: bytes | None = None) -> certs.KeyDocumentV2:
        return certs.verify_key_document_v2(body, pin or self.world.pin, now=self.now)

    def assertRefused(self, body: bytes, text: str, pin: bytes | None = None) -> None:
        with self.assertRaises(p.KeyDocumentError) as caught:
            self.verify(body, pin)
        self.assertIn(text, str(caught.exception))

    def document(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.world.document())
        return result

    def resigned(self, **changes: Any) -> bytes:
        doc = self.document()
        payload = {**claims(doc), **changes}
        doc = resign(doc, payload, self.world.router_signing, certs.KEY_DOCUMENT_CONTEXT)
        return json.dumps(doc).encode()

    def test_round_trip(self) -> None:
        doc = self.verify(self.world.document())
        self.assertEqual([n.name for n in doc.nodes], ["node-a", "node-b", "node-c"])
        self.assertEqual(doc.current.kid, "01")
        self.assertEqual(doc.current.pk, self.world.outer.pk)
        self.assertEqual(doc.default_model, "m1")
        self.assertEqual([n.name for n in doc.nodes_for("m2")], ["node-b", "node-c"])
        self.assertEqual(doc.nodes_for("m3"), ())
        self.assertEqual(doc.models(), ("m1", "m2"))
        self.assertEqual(doc.router.name, "router-1")
        self.assertEqual(doc.nodes[0].current.pk, self.world.nodes[0].current.pk)
        self.assertEqual(
            sorted(self.document()), ["certificate", "payload", "signature", "signing_key"]
        )
        self.assertEqual(
            list(claims(self.document())),
            ["v", "suite", "issued_at", "default_model", "keys", "nodes"],
        )
        self.assertNotIn("redacted", repr(doc))  # nothing secret in there to redact
        self.assertIn("nodes=3", repr(doc))

    def test_wrong_pin(self) -> None:
        other = bytes(nacl.signing.SigningKey.generate().verify_key)
        self.assertRefused(self.world.document(), "does not verify", pin=other)
        # the router's own signing key is no operator pin
        self.assertRefused(
            self.world.document(),
            "does not verify",
            pin=bytes(self.world.router_signing.verify_key),
        )
        self.assertRefused(self.world.document(), "32-byte", pin=b"short")

    def test_router_certificate_checks(self) -> None:
        doc = self.document()
        # a node's certificate is not a router's
        node_cert = {**doc, "certificate": self.world.nodes[0].certificate}
        self.assertRefused(json.dumps(node_cert).encode(), "not a router certificate")
        # a genuine router certificate of another key: signing_key must be the certified key
        other = nacl.signing.SigningKey.generate()
        swapped = {**doc, "certificate": self.world.certify("router", "router-2", other)}
        self.assertRefused(json.dumps(swapped).encode(), "not the certified router key")
        # ... and a document signed by that other (certified) key with our signing_key claim
        signed = resign(
            {**swapped, "signing_key": p.b64u_encode(bytes(other.verify_key))},
            claims(doc),
            other,
            certs.KEY_DOCUMENT_CONTEXT,
        )
        self.verify(json.dumps(signed).encode())  # a second certified router: fine
        # expired router certificate
        self.world.router_certificate = self.world.certify(
            "router", "router-1", self.world.router_signing, not_before=int(self.now) - 40 * DAY
        )
        self.assertRefused(self.world.document(), "router certificate has expired")

    def test_signature_checks(self) -> None:
        doc = self.document()
        payload = claims(doc)
        payload["default_model"] = "m2"
        tampered = {**doc, "payload": p.b64u_encode(json.dumps(payload).encode())}
        self.assertRefused(json.dumps(tampered).encode(), "does not verify")
        for context in (certs.CERTIFICATE_CONTEXT, certs.NODE_KEYS_CONTEXT):
            wrong = resign(doc, claims(doc), self.world.router_signing, context)
            self.assertRefused(json.dumps(wrong).encode(), "does not verify")
        # the operator's signature is no router signature either
        wrong = resign(doc, claims(doc), self.world.operator, certs.KEY_DOCUMENT_CONTEXT)
        self.assertRefused(json.dumps(wrong).encode(), "does not verify")

    def test_payload_checks(self) -> None:
        hour = p.key_document_issued_at(self.now)
        keys = claims(self.document())["keys"]
        cases = [
            ({"v": 1}, "not protocol v2"),
            ({"suite": {"kem": 32, "kdf": 1, "aead": 1}}, "not protocol v2"),
            ({"issued_at": hour - DAY - 1}, "older than 24 hours"),
            ({"issued_at": int(self.now) + 301}, "in the future"),
            ({"issued_at": None}, "not protocol v2"),
            ({"default_model": "bad model"}, "default_model"),
            ({"default_model": 3}, "default_model"),
            ({"keys": [keys[0], {**keys[1], "kid": keys[0]["kid"]}]}, "duplicate key ids"),
            ({"keys": [keys[1], {**keys[0], "status": "next"}]}, "one current"),
            ({"keys": keys[:1]}, "one current"),
            ({"keys": {}}, "list of keys"),
            ({"nodes": {}}, "at most 256"),
            ({"nodes": [{}] * 257}, "at most 256"),
        ]
        for changes, text in cases:
            self.assertRefused(self.resigned(**changes), text)
        doc = self.document()
        extra = resign(
            doc, {**claims(doc), "x": 1}, self.world.router_signing, certs.KEY_DOCUMENT_CONTEXT
        )
        self.assertRefused(json.dumps(extra).encode(), "exactly the fields")
        self.assertEqual(self.verify(self.resigned(default_model=None)).default_model, None)

    def test_malformed_body(self) -> None:
        for body in (
            b"",
            b"[]",
            b"{",
            b'{"payload": "x"}',
            b"\xff\xfe",
            b"null",
            b'{"a": 1, "a": 2}',
            json.dumps({**self.document(), "x": 1}).encode(),
            b" " * (certs.MAX_KEY_DOCUMENT + 1),
        ):
            with self.assertRaises(p.KeyDocumentError):
                self.verify(body)

    def test_a_bad_node_entry_is_dropped(self) -> None:
        """Each failure of check 4 drops that entry only; the others stay usable."""
        world = self.world
        good = [n.entry(self.now) for n in world.nodes]
        other_operator = nacl.signing.SigningKey.generate()
        a = world.nodes[0]
        expired = world.certify(
            "node", "node-a", a.signing, ("m1",), not_before=int(self.now) - 31 * DAY
        )
        bad_entries: dict[str, Any] = {
            "foreign operator": {
                **good[0],
                "certificate": world.certify(
                    "node", "node-a", a.signing, ("m1",), operator=other_operator
                ),
            },
            "router certificate": {**good[0], "certificate": world.router_certificate},
            "expired certificate": {**good[0], "certificate": expired},
            "key set of another node": {**good[0], "keys": good[1]["keys"]},
            "stale key set": {**good[0], "keys": a.key_set(self.now, int(self.now) - 2 * DAY)},
            "too many attestations": {**good[0], "attestations": [{"format": "x"}] * 9},
            "attestation without format": {**good[0], "attestations": [{"report": "x"}]},
            "attestation not an object": {**good[0], "attestations": ["x"]},
            "extra field": {**good[0], "x": 1},
            "missing field": {k: v for k, v in good[0].items() if k != "attestations"},
            "not an object": [],
        }
        for why, entry in bad_entries.items():
            doc = self.verify(self.resigned(nodes=[entry, good[1], good[2]]))
            self.assertEqual([n.name for n in doc.nodes], ["node-b", "node-c"], why)
            self.assertEqual(doc.nodes_for("m1")[0].name, "node-b", why)

    def test_attestations_are_kept_unread(self) -> None:
        """Formats the client does not know are carried, not checked (a later policy may)."""
        attestation = {"format": "tdx-quote/v1", "report": "AAAA", "x": [1, 2]}
        self.world.nodes[0].attestations = [attestation] * 8
        doc = self.verify(self.world.document())
        self.assertEqual(doc.nodes[0].attestations, (attestation,) * 8)

    def test_duplicate_node_names_refuse_the_document(self) -> None:
        """Wraps name their node: two verified entries of one name would make that ambiguous."""
        world = self.world
        twin = world.add_node("node-a", ("m2",))
        self.assertRefused(world.document(), "share a name")
        # a duplicate that fails check 4 is dropped first, and then it is no duplicate
        entries = [n.entry(self.now) for n in world.nodes]
        entries[-1] = {**entries[-1], "keys": world.nodes[1].key_set(self.now)}
        self.assertEqual(len(self.verify(world.document(entries)).nodes), 3)
        del twin

    def test_no_node_at_all(self) -> None:
        doc = self.verify(self.world.document([]))
        self.assertEqual((doc.nodes, doc.models()), ((), ()))

    def test_still_valid_as_time_passes(self) -> None:
        """What a client checks again before each seal (issue 19): the document as it would
        verify now. A node whose certificate has expired since is dropped; the router's
        certificate, the document's 24 hours and the outer key's validity refuse the whole."""
        world = self.world
        node = world.nodes[0]
        node.certificate = world.certify(
            "node", node.name, node.signing, node.models,
            not_before=int(self.now) - 10 * DAY, days=10,
        )  # fmt: skip
        doc = self.verify(world.document())
        self.assertIs(doc.still_valid(self.now), doc)
        later = doc.still_valid(self.now + p.KEY_DOCUMENT_SKEW + 1)
        self.assertEqual([n.name for n in later.nodes], ["node-b", "node-c"])
        self.assertEqual(later.current, doc.current)
        for when, text in (
            (doc.issued_at + DAY + 1, "older than 24 hours"),  # node keys lapse the same day
            (doc.current.not_after + p.KEY_DOCUMENT_SKEW + 1, ""),
            (self.now - 3600 - p.KEY_DOCUMENT_SKEW - 1, "not valid yet"),  # the router's cert
        ):
            with self.assertRaises(p.KeyDocumentError) as caught:
                doc.still_valid(when)
            self.assertIn(text, str(caught.exception))
        # the same verdicts as verifying the document again then
        at = self.now + p.KEY_DOCUMENT_SKEW + 1
        again = certs.verify_key_document_v2(world.document(), world.pin, now=at)
        self.assertEqual([n.name for n in again.nodes], [n.name for n in later.nodes])

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_any_changed_byte_is_refused_or_harmless(self, data: st.DataObject) -> None:
        """A byte changed anywhere in the body: refused with KeyDocumentError, or (outside the
        signed parts, e.g. JSON whitespace) a document with the same content."""
        body = bytearray(self.world.document())
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255).filter(lambda b: b != body[index]))
        try:
            doc = self.verify(bytes(body))
        except p.KeyDocumentError:
            return
        reference = self.verify(self.world.document())
        self.assertEqual(doc.current.pk, reference.current.pk)
        self.assertTrue({n.name for n in doc.nodes} <= {n.name for n in reference.nodes})
        for node in doc.nodes:
            self.assertEqual(
                node.current.pk, next(n for n in reference.nodes if n.name == node.name).current.pk
            )


class PinnedKeyTests(SynchronousTestCase):
    def test_hpke_key_sizes(self) -> None:
        """Published keys are X25519 public keys (32 bytes) of the one suite."""
        world = World()
        doc = world.verified()
        for key in (*doc.router_keys, *(k for n in doc.nodes for k in n.keys)):
            self.assertEqual(len(key.pk), hpke.N_PK)
