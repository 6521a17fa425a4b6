"""The protocol v2 worked examples of docs/protocol.md (section 16), recomputed here, so the page
cannot drift from the code; and the example opened again by each side, as a client, router and
node written from the page would."""

from __future__ import annotations

import json
from typing import Any

import nacl.signing
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.v2 import certs
from llmrouter.v2 import request as rq
from llmrouter.v2 import response as rs
from tests.test_protocol_example import DOC

TS = 1767225660
ISSUED_AT = 1767225600
DAY = 86400


def seed(first: int) -> bytes:
    return bytes(range(first, first + 32))


def repeated(byte: int) -> bytes:
    return bytes([byte]) * 32


class Given:
    """Hands out fixed "random" values in the order seal_request draws them."""

    def __init__(self, *values: bytes) -> None:
        self.values = list(values)

    def token_bytes(self, n: int, /) -> bytes:
        value = self.values.pop(0)
        assert len(value) == n
        return value

    def randbelow(self, n: int, /) -> int:
        raise AssertionError("k covers every node: nothing to choose")


OPERATOR = nacl.signing.SigningKey(seed(0x60))
ROUTER_SIGNING = nacl.signing.SigningKey(seed(0x80))
NODE_SIGNING = {"node-a": nacl.signing.SigningKey(seed(0xA0)),
                "node-b": nacl.signing.SigningKey(seed(0xC0))}  # fmt: skip
NODE_MODELS = {"node-a": ("m1",), "node-b": ("m1", "m2")}
ROUTER_KEYS = (hpke.derive_key_pair(seed(0x00)), hpke.derive_key_pair(repeated(0x02)))
NODE_KEYS = {
    name: tuple((f"{n:02x}", hpke.derive_key_pair(repeated(n))) for n in (first, first + 1))
    for name, first in (("node-a", 0x0A), ("node-b", 0x1A))
}
DEVICE = hpke.derive_key_pair(repeated(0xDE))
CONTENT_KEY = seed(0x30)
EPHEMERAL_IKM = {"node-a": repeated(0xE1), "node-b": repeated(0xE2), "outer": repeated(0xE3),
                 "proof": repeated(0xE4)}  # fmt: skip
NODE_NONCE = seed(0x40)
ROUTER_NONCE = seed(0xC0)
VALID = (ISSUED_AT, ISSUED_AT + 30 * DAY)


def published(pairs: Any) -> list[p.PublishedKey]:
    (kid1, first), (kid2, second) = pairs
    return [
        p.PublishedKey(kid1, first.pk, "current", ISSUED_AT, ISSUED_AT + DAY),
        p.PublishedKey(kid2, second.pk, "next", ISSUED_AT + DAY, ISSUED_AT + 2 * DAY),
    ]


def certificate(type: str, name: str, key: nacl.signing.SigningKey) -> dict[str, str]:
    return certs.issue_certificate(
        bytes(OPERATOR),
        type=type,
        name=name,
        key=bytes(key.verify_key),
        models=NODE_MODELS.get(name, ()),
        not_before=VALID[0],
        not_after=VALID[1],
    )


def node_entry(name: str) -> dict[str, Any]:
    return {
        "certificate": certificate("node", name, NODE_SIGNING[name]),
        "keys": certs.build_node_keys(NODE_SIGNING[name], published(NODE_KEYS[name]), ISSUED_AT),
        "attestations": [],
    }


def key_document() -> bytes:
    router_keys = published(zip(("01", "02"), ROUTER_KEYS, strict=True))
    return certs.build_key_document_v2(
        ROUTER_SIGNING,
        certificate("router", "router-1", ROUTER_SIGNING),
        router_keys,
        [node_entry("node-a"), node_entry("node-b")],
        "m1",
        ISSUED_AT,
    )


def decoded(doc: dict[str, str]) -> str:
    return p.b64u_decode(doc["payload"], "payload").decode()


def outer_plaintext(body: bytes) -> bytes:
    hdr = body[: rq.HEADER_BYTES]
    ctx = hpke.setup_r(body[7:39], ROUTER_KEYS[0].sk, rq.OUTER_INFO + b"\x00" + hdr)
    return ctx.open(b"", body[39:])


def v2_worked_example() -> dict[str, str]:
    """Every value of section 16, from the fixed inputs above."""
    body = key_document()
    doc = certs.verify_key_document_v2(body, bytes(OPERATOR.verify_key), now=TS)
    request = p.ChatRequest.from_prompt("Hello!", max_tokens=16)
    rng = Given(
        CONTENT_KEY,
        EPHEMERAL_IKM["node-a"],
        EPHEMERAL_IKM["node-b"],
        EPHEMERAL_IKM["outer"],
        EPHEMERAL_IKM["proof"],
    )
    sealed, state = rq.seal_request(doc, request, model="m1", device_sk=DEVICE.sk, ts=TS, rng=rng)
    outer = rq.open_outer(sealed, ROUTER_KEYS[0].sk)
    key, nonce, secret = rq.content_keys(CONTENT_KEY)
    sealer = p.ResponseSealer(secret, b"", response_nonce=NODE_NONCE)
    stream = sealer.init_event() + sealer.delta("Hi") + sealer.delta(" there")
    stream += sealer.done("stop", 9, 2)
    refusal = p.ProtocolError(
        "device_rate_limited", "too many requests from this device", retry_after=30
    )
    event = rs.seal_router_event(
        state.router_secret, state.outer_enc, refusal, rng=Given(ROUTER_NONCE)
    )
    entry = json.loads(body)
    payload = json.loads(decoded(entry))
    node_a = payload["nodes"][0]
    return {
        "operator_pin": p.b64u_encode(bytes(OPERATOR.verify_key)),
        "router_signing_key": p.b64u_encode(bytes(ROUTER_SIGNING.verify_key)),
        "router_certificate_claims": decoded(entry["certificate"]),
        "node_certificate_claims": decoded(node_a["certificate"]),
        "node_keys_payload": decoded(node_a["keys"]),
        "key_document": json.dumps(entry, indent=2),
        "router_pk": p.b64u_encode(ROUTER_KEYS[0].pk),
        "node_a_pk": p.b64u_encode(NODE_KEYS["node-a"][0][1].pk),
        "node_b_pk": p.b64u_encode(NODE_KEYS["node-b"][0][1].pk),
        "device_sk": DEVICE.sk.hex(),
        "device_pk": p.b64u_encode(DEVICE.pk),
        "binding": rq.binding(TS, "m1", DEVICE.pk).decode(),
        "inner_key": key.hex(),
        "inner_nonce": nonce.hex(),
        "response_secret": secret.hex(),
        "inner_plaintext": json.dumps(
            {**request.to_plaintext(), "model": "m1"}, separators=(",", ":")
        ),
        "outer_plaintext": outer_plaintext(sealed).rstrip(b" ").decode(),
        "hdr": sealed[:7].hex(),
        "outer_enc": p.b64u_encode(state.outer_enc),
        "body": p.b64u_encode(sealed),
        "router_secret": state.router_secret.hex(),
        "forwarded": rq.node_request_body(outer, outer.wraps[0]).decode(),
        "stream": stream.decode(),
        "router_event": event.decode(),
    }


class V2WorkedExampleTests(SynchronousTestCase):
    def test_document_matches_code(self) -> None:
        text = DOC.read_text()
        for name, value in v2_worked_example().items():
            for line in value.splitlines():
                self.assertIn(line.strip(), text, f"docs/protocol.md is out of date ({name})")

    def test_the_example_opens_on_every_side(self) -> None:
        """From the page's values alone: the client accepts the document (pretty-printed as on
        the page), the router opens the body, node-b the forwarded wrap, the client the stream
        and the router event."""
        ex = v2_worked_example()
        doc = certs.verify_key_document_v2(
            ex["key_document"].encode(), p.b64u_decode(ex["operator_pin"], "pin"), now=TS
        )
        self.assertEqual([n.name for n in doc.nodes], ["node-a", "node-b"])
        body = p.b64u_decode(ex["body"], "body")
        outer = rq.open_outer(body, ROUTER_KEYS[0].sk)
        self.assertEqual(
            (outer.model, outer.device_pk, outer.device_proven), ("m1", DEVICE.pk, True)
        )
        wrap = outer.wrap_for("node-b")
        assert wrap is not None
        chat, secret = rq.open_node_request(
            rq.parse_node_request(rq.node_request_body(outer, wrap)), NODE_KEYS["node-b"][0][1].sk
        )
        self.assertEqual((chat.messages[0].content, chat.model, secret.hex()),
                         ("Hello!", "m1", ex["response_secret"]))  # fmt: skip
        state = rq.ClientState(outer.enc, bytes.fromhex(ex["router_secret"]), secret)
        opener = rs.ResponseOpener(state)
        items = opener.feed(ex["stream"].encode())
        self.assertEqual([i.text for i in items if isinstance(i, p.Delta)], ["Hi", " there"])
        self.assertEqual(opener.close(), p.Done("stop", 9, 2))
        opener = rs.ResponseOpener(state)
        opener.feed(ex["router_event"].encode())
        self.assertEqual(
            opener.close(),
            rs.RouterRefusal(
                "device_rate_limited", "too many requests from this device", 429, retry_after=30
            ),
        )

    def test_the_example_document_ages_as_the_page_says(self) -> None:
        body = key_document()
        pin = bytes(OPERATOR.verify_key)
        certs.verify_key_document_v2(body, pin, now=ISSUED_AT + DAY)
        with self.assertRaises(p.KeyDocumentError):
            certs.verify_key_document_v2(body, pin, now=ISSUED_AT + DAY + 1)
