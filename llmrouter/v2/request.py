"""A protocol v2 request: the router's outer layer, the nodes' inner layer, the device proof.

The client (:func:`seal_request`) picks a fresh content key ``K``, encrypts the chat request
under it, wraps ``K`` to k candidate nodes' HPKE keys, and seals all that (with the model name
and the device's public key and proof) to the router in RFC 9458's encapsulated-request format.
The router (:func:`parse_outer_header`, :func:`open_outer`) opens only the outer layer: it learns
what it needs to admit and route, and forwards one wrap and the inner ciphertext to a node
(:func:`node_request_body`). The node (:func:`parse_node_request`, :func:`open_node_request`)
unwraps ``K`` and reads the request; the response secret it seals its stream with comes from
``K`` too, so the router can open neither direction.

docs/protocol.md, part II, is the prose version of this module.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmrouter import hpke
from llmrouter.chat import MODEL_NAME
from llmrouter.protocol import (
    DEFAULT_MAX_BODY,
    DEFAULT_PAD,
    ChatRequest,
    ProtocolError,
    SealedRefusal,
    b64u_decode,
    b64u_encode,
    compact_json,
    key_id_for_kid,
    kid_for_key_id,
    parse_chat_request,
    parse_json,
)
from llmrouter.protocol import pad as _pad
from llmrouter.v2.certs import NAME, VERSION, KeyDocumentV2, NodeEntry

__all__ = [
    "CONTENT_SALT",
    "CONTENT_TYPE",
    "DEFAULT_K",
    "DEVICE_INFO",
    "HEADER_BYTES",
    "MAX_WRAPS",
    "OUTER_INFO",
    "ROUTER_RESPONSE_LABEL",
    "WRAP_INFO",
    "ClientState",
    "NodeRequest",
    "OuterRequest",
    "Random",
    "SealedRefusal",
    "Wrap",
    "binding",
    "content_keys",
    "node_request_body",
    "open_node_request",
    "open_outer",
    "outer_header",
    "parse_node_request",
    "parse_outer_header",
    "seal_request",
]

CONTENT_TYPE = "message/ohttp-req"
OUTER_INFO = b"llmrouter/v2 request"
DEVICE_INFO = b"llmrouter/v2 device"
WRAP_INFO = b"llmrouter/v2 wrap"
CONTENT_SALT = b"llmrouter/v2 content"
ROUTER_RESPONSE_LABEL = b"llmrouter/v2 router response"
BINDING_PREFIX = "llmrouter/v2"
HEADER_BYTES = 7  # key_id (1) || kem_id (2) || kdf_id (2) || aead_id (2), RFC 9458 section 4.3
KEY_BYTES = 32  # the content key K
WRAP_KEY_BYTES = KEY_BYTES + hpke.N_T
PROOF_BYTES = hpke.N_ENC + hpke.N_T
SECRET_BYTES = 32
DEFAULT_K = 3
MAX_WRAPS = 16
_MIN_BODY = HEADER_BYTES + hpke.N_ENC + hpke.N_T
_SUITE = (
    hpke.KEM_ID.to_bytes(2, "big")
    + hpke.KDF_ID.to_bytes(2, "big")
    + hpke.AEAD_ID.to_bytes(2, "big")
)
_MAX_JSON_INT = (1 << 53) - 1


class Random(Protocol):
    """Where randomness comes from: the :mod:`secrets` module, or a fixed source that
    reproduces the worked examples of docs/protocol.md."""

    def token_bytes(self, n: int, /) -> bytes: ...

    def randbelow(self, n: int, /) -> int: ...


def outer_header(kid: str) -> bytes:
    """RFC 9458's ``hdr``: the router key's id, then the suite."""
    return bytes([key_id_for_kid(kid)]) + _SUITE


def binding(ts: int, model: str, device_pk: bytes | None) -> bytes:
    """The AAD of every wrap and of the inner ciphertext: what the router can see of the request
    and must not change (``"llmrouter/v2|" ts "|" model "|" device pk or ""``, ASCII)."""
    device = "" if device_pk is None else b64u_encode(device_pk)
    return f"{BINDING_PREFIX}|{ts}|{model}|{device}".encode("ascii")


def content_keys(content_key: bytes) -> tuple[bytes, bytes, bytes]:
    """``(key, nonce, response secret)`` of a content key: RFC 5869 HKDF-SHA256 as in v1
    section 3.1, not HPKE's labelled variant."""
    prk = hpke.hkdf_extract(CONTENT_SALT, content_key)
    return (
        hpke.hkdf_expand(prk, b"request key", hpke.N_K),
        hpke.hkdf_expand(prk, b"request nonce", hpke.N_N),
        hpke.hkdf_expand(prk, b"response", SECRET_BYTES),
    )


def _key_pair(rng: Random) -> hpke.KeyPair:
    """An ephemeral key pair: RFC 9180 DeriveKeyPair of 32 random bytes (how hpke-js and others
    generate them, so the worked examples can be reproduced there too)."""
    return hpke.derive_key_pair(rng.token_bytes(hpke.N_SK))


def _choose(nodes: Sequence[NodeEntry], k: int, rng: Random) -> tuple[NodeEntry, ...]:
    """``k`` of ``nodes`` uniformly at random (all if fewer), in document order."""
    if k >= len(nodes):
        return tuple(nodes)
    indices = list(range(len(nodes)))
    chosen = []
    for _ in range(min(k, len(nodes))):  # a partial Fisher-Yates shuffle
        chosen.append(indices.pop(rng.randbelow(len(indices))))
    return tuple(nodes[i] for i in sorted(chosen))


# The client.


@dataclass(frozen=True, repr=False)
class ClientState:
    """What the client keeps to open the answer: the outer ``enc`` and the two secrets (the
    router's, for its sealed refusals; the nodes', for the stream). Secret: no repr of it."""

    outer_enc: bytes
    router_secret: bytes
    response_secret: bytes

    def __repr__(self) -> str:
        return "ClientState(<redacted>)"

    def to_json(self) -> dict[str, str]:
        return {
            "v": str(VERSION),
            "enc": b64u_encode(self.outer_enc),
            "router_secret": b64u_encode(self.router_secret),
            "response_secret": b64u_encode(self.response_secret),
        }

    @classmethod
    def from_json(cls, doc: Any) -> ClientState:
        if not isinstance(doc, dict) or doc.get("v") != str(VERSION):
            raise ProtocolError("bad_state", "not a protocol v2 request state")
        return cls(
            b64u_decode(doc.get("enc", ""), "enc", hpke.N_ENC),
            b64u_decode(doc.get("router_secret", ""), "router_secret", SECRET_BYTES),
            b64u_decode(doc.get("response_secret", ""), "response_secret", SECRET_BYTES),
        )


def seal_request(
    doc: KeyDocumentV2,
    request: ChatRequest,
    *,
    model: str,
    device_sk: bytes | None,
    k: int = DEFAULT_K,
    ts: int | None = None,
    pad: int = DEFAULT_PAD,
    rng: Random = secrets,
) -> tuple[bytes, ClientState]:
    """The body of ``POST /api/v2/chat`` (``message/ohttp-req``) and what opens its answer.

    ``model`` is the request's model (the document's ``default_model`` when the app names none);
    the sealed chat request carries it too. ``device_sk`` (an X25519 secret key) proves the
    device to the router and to the node; without it the request is anonymous (base mode). The
    content key goes to ``k`` nodes of the model (docs/protocol.md section 10). ``ts`` defaults
    to the wall clock; ``rng`` exists to reproduce the worked examples.
    """
    if not MODEL_NAME.fullmatch(model):
        raise ValueError("model is not a model name")
    if request.model not in (None, model):
        raise ValueError("the request names another model than model=")
    if not 1 <= k <= MAX_WRAPS:
        raise ValueError(f"k is 1 to {MAX_WRAPS}")
    candidates = doc.nodes_for(model)
    if not candidates:
        raise ProtocolError(
            "model_unknown", "no verified node of the key document serves this model", 404
        )
    if ts is None:
        ts = int(time.time())
    device_pk = None if device_sk is None else hpke.public_key(device_sk)
    bound = binding(ts, model, device_pk)
    content_key = rng.token_bytes(KEY_BYTES)
    key, nonce, response_secret = content_keys(content_key)
    plaintext = _pad(compact_json(dataclasses.replace(request, model=model).to_plaintext()), pad)
    inner = hpke.aead_seal(key, nonce, bound, plaintext)
    wraps = []
    for node in _choose(candidates, k, rng):
        enc_i, ctx_i = hpke.setup_s(
            node.current.pk, WRAP_INFO, sk_s=device_sk, ephemeral=_key_pair(rng)
        )
        wrapped = ctx_i.seal(bound, content_key)
        wraps.append(Wrap(node.name, node.current.kid, enc_i, wrapped).to_json())
    hdr = outer_header(doc.current.kid)
    enc, ctx = hpke.setup_s(doc.current.pk, OUTER_INFO + b"\x00" + hdr, ephemeral=_key_pair(rng))
    outer: dict[str, Any] = {"v": VERSION, "ts": ts, "model": model}
    if device_sk is not None and device_pk is not None:
        enc_p, ctx_p = hpke.setup_s(
            doc.current.pk, DEVICE_INFO, sk_s=device_sk, ephemeral=_key_pair(rng)
        )
        proof = enc_p + ctx_p.seal(enc, b"")
        outer["device"] = {"pk": b64u_encode(device_pk), "proof": b64u_encode(proof)}
    outer.update(wraps=wraps, ct=b64u_encode(inner))
    body = hdr + enc + ctx.seal(b"", _pad(compact_json(outer), pad))
    state = ClientState(enc, ctx.export(ROUTER_RESPONSE_LABEL, SECRET_BYTES), response_secret)
    return body, state


# The router.


@dataclass(frozen=True, repr=False)
class Wrap:
    """The content key wrapped to one candidate node's key ``kid``."""

    node: str
    kid: str
    enc: bytes
    key: bytes

    def __repr__(self) -> str:
        return f"Wrap(node={self.node!r}, kid={self.kid!r})"

    def to_json(self) -> dict[str, str]:
        return {
            "node": self.node,
            "kid": self.kid,
            "enc": b64u_encode(self.enc),
            "key": b64u_encode(self.key),
        }


@dataclass(frozen=True, repr=False)
class OuterRequest:
    """What the router learns from the outer layer. ``router_secret`` seals its refusals."""

    kid: str
    enc: bytes
    ts: int
    model: str
    device_pk: bytes | None
    device_proven: bool
    wraps: tuple[Wrap, ...]
    ct: bytes
    router_secret: bytes

    def __repr__(self) -> str:
        return f"OuterRequest(kid={self.kid!r}, wraps={len(self.wraps)})"

    def wrap_for(self, node: str) -> Wrap | None:
        return next((w for w in self.wraps if w.node == node), None)


def parse_outer_header(body: bytes, max_body: int = DEFAULT_MAX_BODY) -> tuple[str, bytes]:
    """``(kid, enc)`` of an encapsulated request, before any cryptography (``body_too_large``,
    ``bad_request``)."""
    if len(body) > max_body:
        raise ProtocolError("body_too_large", "request body exceeds the size limit")
    if len(body) < _MIN_BODY:
        raise ProtocolError("bad_request", "the body is shorter than an encapsulated request")
    if body[1:HEADER_BYTES] != _SUITE:
        raise ProtocolError("bad_request", "the request's HPKE suite is not supported")
    return kid_for_key_id(body[0]), body[HEADER_BYTES : HEADER_BYTES + hpke.N_ENC]


_OUTER = frozenset({"v", "ts", "model", "device", "wraps", "ct"})
_DEVICE = frozenset({"pk", "proof"})
_WRAP = frozenset({"node", "kid", "enc", "key"})


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_JSON_INT


def _wrap(raw: Any) -> Wrap:
    if not isinstance(raw, dict) or set(raw) != _WRAP:
        raise ProtocolError("bad_payload", "a wrap does not have exactly node, kid, enc, key")
    node, kid = raw["node"], raw["kid"]
    if not isinstance(node, str) or not NAME.fullmatch(node):
        raise ProtocolError("bad_payload", "a wrap's node is not a node name")
    if not isinstance(kid, str):
        raise ProtocolError("bad_payload", "a wrap's kid is not a key id")
    try:
        key_id_for_kid(kid)
    except ValueError:
        raise ProtocolError("bad_payload", "a wrap's kid is not a key id") from None
    enc = b64u_decode(raw["enc"], "wrap enc", hpke.N_ENC)
    return Wrap(node, kid, enc, b64u_decode(raw["key"], "wrap key", WRAP_KEY_BYTES))


def _common_fields(doc: dict[str, Any], what: str) -> tuple[int, str, bytes]:
    """``v``, ``ts``, ``model`` and ``ct``, which the outer plaintext and the forwarded request
    share (their presence is checked by the caller)."""
    if doc["v"] != VERSION or isinstance(doc["v"], bool):
        raise ProtocolError("bad_payload", f"{what} is not protocol v2")
    if not _int(doc["ts"]):
        raise ProtocolError("bad_payload", "ts is not a non-negative integer")
    if not isinstance(doc["model"], str) or not MODEL_NAME.fullmatch(doc["model"]):
        raise ProtocolError("bad_payload", "model is not a model name")
    ct = b64u_decode(doc["ct"], "ct")
    if len(ct) < hpke.N_T:
        raise ProtocolError("bad_payload", "ct is shorter than the AEAD tag")
    return doc["ts"], doc["model"], ct


def _outer_fields(doc: Any) -> tuple[int, str, dict[str, Any] | None, tuple[Wrap, ...], bytes]:
    if not isinstance(doc, dict):
        raise ProtocolError("bad_payload", "the outer plaintext is not a JSON object")
    if not _OUTER.issuperset(doc):
        raise ProtocolError("bad_payload", "the outer plaintext has a field v2 does not define")
    for name in ("v", "ts", "model", "wraps", "ct"):
        if name not in doc:
            raise ProtocolError("bad_payload", f"the outer plaintext has no {name}")
    ts, model, ct = _common_fields(doc, "the outer plaintext")
    device = doc.get("device")
    if device is not None and (not isinstance(device, dict) or set(device) != _DEVICE):
        raise ProtocolError("bad_payload", "device does not have exactly pk and proof")
    raw_wraps = doc["wraps"]
    if not isinstance(raw_wraps, list) or not 1 <= len(raw_wraps) <= MAX_WRAPS:
        raise ProtocolError("bad_payload", f"wraps is a list of 1 to {MAX_WRAPS} wraps")
    wraps = tuple(_wrap(w) for w in raw_wraps)
    if len({w.node for w in wraps}) != len(wraps):
        raise ProtocolError("bad_payload", "two wraps name the same node")
    return ts, model, device, wraps, ct


def open_outer(body: bytes, sk_router: bytes) -> OuterRequest:
    """Open the outer layer with the private key of the header's kid.

    ``decrypt_failed`` (plain: nothing was opened) for any cryptographic failure; after that,
    :class:`SealedRefusal` ``bad_payload`` (the outer plaintext's shape) or
    ``device_proof_failed`` (the device key was not proven).
    """
    kid, enc = parse_outer_header(body, len(body))
    try:
        ctx = hpke.setup_r(enc, sk_router, OUTER_INFO + b"\x00" + body[:HEADER_BYTES])
        plaintext = ctx.open(b"", body[HEADER_BYTES + hpke.N_ENC :])
    except hpke.HPKEError:
        raise ProtocolError("decrypt_failed", "the request could not be decrypted") from None
    secret = ctx.export(ROUTER_RESPONSE_LABEL, SECRET_BYTES)
    try:
        doc = parse_json(plaintext.rstrip(b" "), "bad_payload", "the outer plaintext")
        ts, model, device, wraps, ct = _outer_fields(doc)
        device_pk = proof = None
        if device is not None:
            device_pk = b64u_decode(device["pk"], "device pk", hpke.N_PK)
            proof = b64u_decode(device["proof"], "device proof", PROOF_BYTES)
    except ProtocolError as e:
        raise SealedRefusal(ProtocolError("bad_payload", e.message), secret, enc) from None
    if device_pk is not None and proof is not None:
        try:
            ctx_p = hpke.setup_r(proof[: hpke.N_ENC], sk_router, DEVICE_INFO, pk_s=device_pk)
            ctx_p.open(enc, proof[hpke.N_ENC :])
        except hpke.HPKEError:
            raise SealedRefusal(
                ProtocolError("device_proof_failed", "the device key was not proven"), secret, enc
            ) from None
    return OuterRequest(kid, enc, ts, model, device_pk, device_pk is not None, wraps, ct, secret)


def node_request_body(outer: OuterRequest, wrap: Wrap) -> bytes:
    """What the router POSTs to the node at ``/v2/chat``: one wrap, never the others."""
    return compact_json(
        {
            "v": VERSION,
            "ts": outer.ts,
            "model": outer.model,
            "device_pk": None if outer.device_pk is None else b64u_encode(outer.device_pk),
            "wrap": wrap.to_json(),
            "ct": b64u_encode(outer.ct),
        }
    )


# The node.


@dataclass(frozen=True, repr=False)
class NodeRequest:
    """A forwarded request as the node receives it, before anything is opened."""

    ts: int
    model: str
    device_pk: bytes | None
    kid: str
    enc: bytes
    key: bytes
    ct: bytes
    node: str

    def __repr__(self) -> str:
        return f"NodeRequest(node={self.node!r}, kid={self.kid!r})"


_NODE_REQUEST = frozenset({"v", "ts", "model", "device_pk", "wrap", "ct"})


def parse_node_request(body: bytes, max_body: int = DEFAULT_MAX_BODY) -> NodeRequest:
    """Strict parsing of the router's forwarded request (``body_too_large``, ``bad_request``)."""
    if len(body) > max_body:
        raise ProtocolError("body_too_large", "request body exceeds the size limit")
    try:
        doc = parse_json(body, "bad_request", "the forwarded request")
        if not isinstance(doc, dict) or set(doc) != _NODE_REQUEST:
            raise ProtocolError("bad_request", "the forwarded request's fields are not v2's")
        ts, model, ct = _common_fields(doc, "the forwarded request")
        wrap = _wrap(doc["wrap"])
        device = doc["device_pk"]
        device_pk = None if device is None else b64u_decode(device, "device_pk", hpke.N_PK)
    except ProtocolError as e:
        raise ProtocolError("bad_request", e.message) from None
    return NodeRequest(ts, model, device_pk, wrap.kid, wrap.enc, wrap.key, ct, wrap.node)


def open_node_request(req: NodeRequest, sk_node: bytes) -> tuple[ChatRequest, bytes]:
    """Unwrap ``K`` with the private key of ``req.kid`` (auth mode with the device key when
    there is one) and read the chat request; returns it with the response secret.

    ``decrypt_failed`` (plain: the wrap did not open, the router charges the client's address);
    after that, :class:`SealedRefusal` (``decrypt_failed`` for an inner ciphertext that does not
    open, ``bad_payload``), answered as a sealed stream.
    """
    bound = binding(req.ts, req.model, req.device_pk)
    try:
        ctx = hpke.setup_r(req.enc, sk_node, WRAP_INFO, pk_s=req.device_pk)
        content_key = ctx.open(bound, req.key)
    except hpke.HPKEError:
        raise ProtocolError("decrypt_failed", "the request could not be decrypted") from None
    if len(content_key) != KEY_BYTES:
        raise ProtocolError("decrypt_failed", "the request could not be decrypted")
    key, nonce, secret = content_keys(content_key)
    try:
        plaintext = hpke.aead_open(key, nonce, bound, req.ct)
    except hpke.OpenError:
        raise SealedRefusal(
            ProtocolError("decrypt_failed", "the request could not be decrypted"), secret, b""
        ) from None
    try:
        request = parse_chat_request(plaintext)
    except ProtocolError as e:
        raise SealedRefusal(e, secret, b"") from None
    if request.model not in (None, req.model):
        raise SealedRefusal(
            ProtocolError(
                "bad_payload", "the sealed request names another model than the router saw"
            ),
            secret,
            b"",
        )
    return dataclasses.replace(request, model=req.model), secret
