"""Protocol v2's chain of trust: operator certificates, node key sets, the v2 key document.

The operator's Ed25519 key is kept offline and pinned by apps. It certifies the router's signing
key and each node's signing key (:func:`issue_certificate`); a node signs its own HPKE keys
(:func:`build_node_keys`); the router signs the key document that carries its keys and every
node's certificate and key set (:func:`build_key_document_v2`). A client accepts a node key only
through :func:`verify_key_document_v2`, so a router, whoever controls it, cannot make a client
seal to a key of its choosing.

Every signature is over ``context || 0x00 || payload`` with a context string of its own, so no
signed object of one kind passes for another. Signatures are checked over the exact payload
bytes received, before the payload is parsed. Messages are fixed sentences: nothing a peer sent
is repeated in them.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from llmrouter.chat import MODEL_NAME
from llmrouter.protocol import (
    KEY_DOCUMENT_SKEW,
    SUITE,
    KeyDocumentError,
    ProtocolError,
    PublishedKey,
    b64u_decode,
    b64u_encode,
    check_key_set,
    check_key_times,
    compact_json,
    parse_json,
    parse_published_key,
)

__all__ = [
    "CERTIFICATE_CONTEXT",
    "DEFAULT_VALIDITY_DAYS",
    "KEY_DOCUMENT_CONTEXT",
    "MAX_ATTESTATIONS",
    "MAX_KEYS",
    "MAX_KEY_DOCUMENT",
    "MAX_MODELS",
    "MAX_NODES",
    "MAX_VALIDITY",
    "NAME",
    "NODE_KEYS_CONTEXT",
    "VERSION",
    "Certificate",
    "CertificateError",
    "KeyDocumentError",
    "KeyDocumentV2",
    "NodeEntry",
    "build_key_document_v2",
    "build_node_keys",
    "issue_certificate",
    "read_certificate",
    "signed_message",
    "verify_certificate",
    "verify_key_document_v2",
    "verify_node_entry",
    "verify_node_keys",
]

VERSION = 2
CERTIFICATE_CONTEXT = b"llmrouter/v2 certificate"
NODE_KEYS_CONTEXT = b"llmrouter/v2 node keys"
KEY_DOCUMENT_CONTEXT = b"llmrouter/v2 key document"
NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
TYPES = ("router", "node")
MAX_MODELS = 64
MAX_VALIDITY = 366 * 86400
DEFAULT_VALIDITY_DAYS = 30
MAX_ATTESTATIONS = 8
MAX_ATTESTATION_FORMAT = 64
MAX_NODES = 256
MAX_KEYS = 16  # HPKE keys in one key set: current, next, and room for what a later version adds
MAX_KEY_DOCUMENT = 1 << 20  # bytes; 256 nodes with 8 small attestations each fit easily
_SIGNATURE_BYTES = 64
_MAX_JSON_INT = (1 << 53) - 1


class CertificateError(KeyDocumentError):
    """A certificate is malformed, not signed by the operator, of the wrong type or not valid
    now (also: :func:`issue_certificate` was asked for one that breaks the rules)."""


def signed_message(context: bytes, payload: bytes) -> bytes:
    """What every v2 signature covers: ``context || 0x00 || payload``."""
    return context + b"\x00" + payload


def _sign(signing_key: nacl.signing.SigningKey, context: bytes, payload: bytes) -> str:
    return b64u_encode(signing_key.sign(signed_message(context, payload)).signature)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_JSON_INT


def _fields(doc: Any, names: frozenset[str], what: str, error: type[KeyDocumentError]) -> None:
    """``doc`` is a JSON object with exactly these fields."""
    if not isinstance(doc, dict) or set(doc) != names:
        raise error(f"{what} does not have exactly the fields protocol v2 defines")


def _signed_payload(
    doc: dict[str, Any],
    key: bytes,
    context: bytes,
    what: str,
    error: type[KeyDocumentError],
) -> Any:
    """Decode ``payload`` and ``signature``, verify under ``key`` with ``context`` over the exact
    bytes, and only then parse the payload (strict JSON)."""
    try:
        payload = b64u_decode(doc["payload"], "payload")
        signature = b64u_decode(doc["signature"], "signature", _SIGNATURE_BYTES)
    except ProtocolError:
        raise error(f"{what} is not base64url where it must be") from None
    try:
        nacl.signing.VerifyKey(key).verify(signed_message(context, payload), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise error(f"the signature of the {what} does not verify") from None
    try:
        return parse_json(payload, "bad_json", what)
    except ProtocolError:
        raise error(f"the {what} payload is not UTF-8 JSON") from None


# Certificates.


@dataclass(frozen=True, repr=False)
class Certificate:
    """A verified operator certificate. ``raw`` is the signed object as received (what the
    router and the nodes publish again)."""

    type: str
    name: str
    key: bytes
    models: tuple[str, ...]
    not_before: int
    not_after: int
    raw: dict[str, Any]

    def __repr__(self) -> str:
        return f"Certificate(type={self.type!r}, name={self.name!r}, models={len(self.models)})"


def _check_claims(
    type: str, name: Any, models: Any, not_before: Any, not_after: Any
) -> tuple[str, ...]:
    """The rules every certificate follows, issued or received; returns the models."""
    if type not in TYPES:
        raise CertificateError("a certificate's type is router or node")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CertificateError("a certificate's name is [a-z0-9][a-z0-9.-]{0,62}")
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
        raise CertificateError("a certificate's models are a list of model names")
    if type == "router" and models:
        raise CertificateError("a router certificate lists no models")
    if type == "node":
        if not 1 <= len(models) <= MAX_MODELS:
            raise CertificateError(f"a node certificate lists 1 to {MAX_MODELS} models")
        if not all(MODEL_NAME.fullmatch(m) for m in models) or len(set(models)) != len(models):
            raise CertificateError("a node certificate's models are distinct model names")
    if not _is_int(not_before) or not _is_int(not_after):
        raise CertificateError("a certificate's validity is two non-negative integers")
    if not not_before < not_after <= not_before + MAX_VALIDITY:
        raise CertificateError("a certificate is valid for at most 366 days")
    return tuple(models)


def issue_certificate(
    operator_sk: bytes,
    *,
    type: str,
    name: str,
    key: bytes,
    models: Sequence[str] = (),
    not_before: int,
    not_after: int,
) -> dict[str, str]:
    """The operator's certificate of ``key`` (an Ed25519 public key); ``operator_sk`` is the
    operator key's 32-byte seed."""
    if len(key) != 32:
        raise CertificateError("the certified key is a 32-byte Ed25519 public key")
    models = _check_claims(type, name, list(models), not_before, not_after)
    claims: dict[str, Any] = {"v": VERSION, "type": type, "name": name, "key": b64u_encode(key)}
    if type == "node":
        claims["models"] = list(models)
    claims.update(not_before=not_before, not_after=not_after)
    payload = compact_json(claims)
    signing_key = nacl.signing.SigningKey(operator_sk)
    return {
        "payload": b64u_encode(payload),
        "signature": _sign(signing_key, CERTIFICATE_CONTEXT, payload),
    }


_CERTIFICATE = frozenset({"payload", "signature"})
_CLAIMS = {
    "router": frozenset({"v", "type", "name", "key", "not_before", "not_after"}),
    "node": frozenset({"v", "type", "name", "key", "models", "not_before", "not_after"}),
}


def verify_certificate(doc: Any, operator_pk: bytes, *, now: float, type: str) -> Certificate:
    """Check 1 of docs/protocol.md section 9.2 for one certificate: the operator's signature,
    the type asked for, the claims, and validity at ``now`` with 300 s of skew."""
    _fields(doc, _CERTIFICATE, "certificate", CertificateError)
    claims = _signed_payload(doc, operator_pk, CERTIFICATE_CONTEXT, "certificate", CertificateError)
    certificate = _certificate(doc, claims, type)
    _check_validity(certificate, now)
    return certificate


def _check_validity(certificate: Certificate, now: float) -> None:
    """A certificate is valid at ``now``, with 300 s of skew."""
    if now < certificate.not_before - KEY_DOCUMENT_SKEW:
        raise CertificateError(
            f"the {certificate.type} certificate is not valid yet (check the clock)"
        )
    if now > certificate.not_after + KEY_DOCUMENT_SKEW:
        raise CertificateError(f"the {certificate.type} certificate has expired")


def read_certificate(doc: Any, *, type: str, key: bytes) -> Certificate:
    """The claims of a certificate as its holder reads its own (a node its ``node.cert``, a
    router its ``router.cert``): the holder has no operator key to check the signature with
    (apps pin it and check), so only the form is checked, and that it certifies ``key``, the
    holder's own signing key. Validity times are reported, not enforced."""
    _fields(doc, _CERTIFICATE, "certificate", CertificateError)
    try:
        b64u_decode(doc["signature"], "signature", _SIGNATURE_BYTES)
        claims = parse_json(b64u_decode(doc["payload"], "payload"), "bad_json", "certificate")
    except ProtocolError:
        raise CertificateError("the certificate is not base64url-encoded JSON") from None
    certificate = _certificate(doc, claims, type)
    if not hmac.compare_digest(certificate.key, key):
        raise CertificateError(f"the {type} certificate certifies another signing key")
    return certificate


def _certificate(doc: dict[str, Any], claims: Any, type: str) -> Certificate:
    """The claims of a certificate of ``type``, checked (but not its validity now)."""
    if not isinstance(claims, dict) or claims.get("v") != VERSION or "type" not in claims:
        raise CertificateError("the certificate is not a protocol v2 certificate")
    if claims["type"] != type:
        raise CertificateError(f"the certificate is not a {type} certificate")
    _fields(claims, _CLAIMS[type], "certificate", CertificateError)
    models = _check_claims(
        type, claims["name"], claims.get("models", []), claims["not_before"], claims["not_after"]
    )
    try:
        key = b64u_decode(claims["key"], "key", 32)
    except ProtocolError:
        raise CertificateError("the certified key is not a 32-byte key in base64url") from None
    return Certificate(
        type, claims["name"], key, models, claims["not_before"], claims["not_after"], doc
    )


# Node key sets.


def build_node_keys(
    signing_key: nacl.signing.SigningKey, keys: Sequence[PublishedKey], issued_at: int
) -> dict[str, str]:
    """The node key set document a node serves (and the router relays)."""
    payload = compact_json(
        {
            "v": VERSION,
            "type": "node-keys",
            "suite": SUITE,
            "issued_at": issued_at,
            "keys": [k.to_json() for k in keys],
        }
    )
    return {
        "payload": b64u_encode(payload),
        "signature": _sign(signing_key, NODE_KEYS_CONTEXT, payload),
        "signing_key": b64u_encode(bytes(signing_key.verify_key)),
    }


_SIGNED = frozenset({"payload", "signature", "signing_key"})
_NODE_KEYS = frozenset({"v", "type", "suite", "issued_at", "keys"})


def _keys(raw: Any, what: str) -> tuple[PublishedKey, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_KEYS:
        raise KeyDocumentError(f"the {what} has no valid list of keys")
    try:
        return tuple(parse_published_key(k) for k in raw)
    except (ValueError, KeyError, TypeError, ProtocolError):
        raise KeyDocumentError(f"a key of the {what} is malformed") from None


def verify_node_keys(doc: Any, node_pk: bytes, *, now: float) -> tuple[PublishedKey, ...]:
    """A node key set signed by ``node_pk`` (the key its certificate certifies), checked as v1
    checks a key document: fresh (24 h), unique kids, one current and one next, the current
    valid now."""
    return _node_keys(doc, node_pk, now=now)[1]


def _node_keys(doc: Any, node_pk: bytes, *, now: float) -> tuple[int, tuple[PublishedKey, ...]]:
    """:func:`verify_node_keys`, with the key set's ``issued_at``."""
    _fields(doc, _SIGNED, "node key set", KeyDocumentError)
    try:
        signing_key = b64u_decode(doc["signing_key"], "signing_key", 32)
    except ProtocolError:
        raise KeyDocumentError("the node key set's signing_key is not a 32-byte key") from None
    if not hmac.compare_digest(signing_key, node_pk):
        raise KeyDocumentError("the node key set is not signed by the certified node key")
    p = _signed_payload(doc, node_pk, NODE_KEYS_CONTEXT, "node key set", KeyDocumentError)
    _fields(p, _NODE_KEYS, "node key set", KeyDocumentError)
    if p["v"] != VERSION or p["type"] != "node-keys" or p["suite"] != SUITE:
        raise KeyDocumentError("the node key set is not a protocol v2 node-keys set")
    if not _is_int(p["issued_at"]):
        raise KeyDocumentError("the node key set's issued_at is not an integer")
    keys = _keys(p["keys"], "node key set")
    check_key_set(p["issued_at"], keys, now=now, what="node key set")
    return p["issued_at"], keys


# The v2 key document.


@dataclass(frozen=True, repr=False)
class NodeEntry:
    """One verified node of a key document: seal only to ``current``."""

    name: str
    models: tuple[str, ...]
    current: PublishedKey
    keys: tuple[PublishedKey, ...]
    attestations: tuple[dict[str, Any], ...]
    certificate: Certificate
    issued_at: int  # of the node's key set

    def __repr__(self) -> str:
        return f"NodeEntry({self.name!r}, current={self.current.kid!r})"

    def check_times(self, now: float) -> None:
        """The time rules of check 4 alone (certificate, key set freshness, current key), for
        an entry verified earlier and about to be sealed to again."""
        _check_validity(self.certificate, now)
        check_key_times(self.issued_at, self.current, now=now, what="node key set")


_ENTRY = frozenset({"certificate", "keys", "attestations"})


def _attestations(raw: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or len(raw) > MAX_ATTESTATIONS:
        raise KeyDocumentError(f"a node's attestations are a list of at most {MAX_ATTESTATIONS}")
    for item in raw:
        fmt = item.get("format") if isinstance(item, dict) else None
        if not isinstance(fmt, str) or not 1 <= len(fmt) <= MAX_ATTESTATION_FORMAT:
            raise KeyDocumentError("an attestation is an object with a string format")
    return tuple(raw)


def verify_node_entry(entry: Any, operator_pk: bytes, *, now: float) -> NodeEntry:
    """Check 4 of docs/protocol.md section 9.2 for one node entry ``{"certificate", "keys",
    "attestations"}`` (what a node serves at ``GET /v2/keys``)."""
    _fields(entry, _ENTRY, "node entry", KeyDocumentError)
    certificate = verify_certificate(entry["certificate"], operator_pk, now=now, type="node")
    issued_at, keys = _node_keys(entry["keys"], certificate.key, now=now)
    attestations = _attestations(entry["attestations"])
    current = next(k for k in keys if k.status == "current")
    return NodeEntry(
        certificate.name, certificate.models, current, keys, attestations, certificate, issued_at
    )


@dataclass(frozen=True, repr=False)
class KeyDocumentV2:
    """A verified v2 key document: the router's outer keys and the nodes that passed check 4."""

    issued_at: int
    router_keys: tuple[PublishedKey, ...]
    current: PublishedKey
    default_model: str | None
    nodes: tuple[NodeEntry, ...]
    router: Certificate
    signing_key: bytes

    def __repr__(self) -> str:
        return f"KeyDocumentV2(issued_at={self.issued_at}, nodes={len(self.nodes)})"

    def still_valid(self, now: float) -> KeyDocumentV2:
        """The document as it would verify at ``now`` (its signatures were checked when it was
        received; only time has passed): :class:`KeyDocumentError` if the router's part no
        longer holds (its certificate, ``issued_at`` within 24 hours, the current outer key),
        else the document without the node entries that no longer pass check 4. A client
        calls it before each seal (a revoked key stops being used within a day)."""
        _check_validity(self.router, now)
        check_key_times(self.issued_at, self.current, now=now, what="key document")
        nodes = []
        for node in self.nodes:
            try:
                node.check_times(now)
            except KeyDocumentError:
                continue
            nodes.append(node)
        if len(nodes) == len(self.nodes):
            return self
        return dataclasses.replace(self, nodes=tuple(nodes))

    def nodes_for(self, model: str) -> tuple[NodeEntry, ...]:
        """The verified nodes whose certificate lists ``model``, in document order."""
        return tuple(node for node in self.nodes if model in node.models)

    def models(self) -> tuple[str, ...]:
        """Every model some verified node serves, in document order."""
        seen: dict[str, None] = {}
        for node in self.nodes:
            seen.update(dict.fromkeys(node.models))
        return tuple(seen)


def build_key_document_v2(
    signing_key: nacl.signing.SigningKey,
    certificate: dict[str, Any],
    router_keys: Sequence[PublishedKey],
    nodes: Sequence[dict[str, Any]],
    default_model: str | None,
    issued_at: int,
) -> bytes:
    """The body of ``GET /api/v2/keys``. ``certificate`` is the operator's certificate of
    ``signing_key`` (router.cert); ``nodes`` are the nodes' ``GET /v2/keys`` answers, passed on
    as they are (a client drops any entry that does not verify)."""
    entries = [
        {
            "certificate": node["certificate"],
            "keys": node["keys"],
            "attestations": node.get("attestations", []),
        }
        for node in nodes
    ]
    payload = compact_json(
        {
            "v": VERSION,
            "suite": SUITE,
            "issued_at": issued_at,
            "default_model": default_model,
            "keys": [k.to_json() for k in router_keys],
            "nodes": entries,
        }
    )
    doc = {
        "payload": b64u_encode(payload),
        "signature": _sign(signing_key, KEY_DOCUMENT_CONTEXT, payload),
        "signing_key": b64u_encode(bytes(signing_key.verify_key)),
        "certificate": certificate,
    }
    return json.dumps(doc).encode("ascii")


_DOCUMENT = frozenset({"payload", "signature", "signing_key", "certificate"})
_PAYLOAD = frozenset({"v", "suite", "issued_at", "default_model", "keys", "nodes"})


def verify_key_document_v2(body: bytes, operator_pin: bytes, *, now: float) -> KeyDocumentV2:
    """Every check of docs/protocol.md section 9.2, in order. A node entry that fails check 4
    is dropped; two verified entries with one name refuse the whole document."""
    if len(operator_pin) != 32:
        raise KeyDocumentError("the operator pin is a 32-byte Ed25519 public key")
    if len(body) > MAX_KEY_DOCUMENT:
        raise KeyDocumentError("the key document is larger than 1 MiB")
    try:
        doc = parse_json(body, "bad_json", "key document")
    except ProtocolError:
        raise KeyDocumentError("malformed key document") from None
    _fields(doc, _DOCUMENT, "key document", KeyDocumentError)
    # 1. the router's certificate, under the pinned operator key
    router = verify_certificate(doc["certificate"], operator_pin, now=now, type="router")
    try:
        signing_key = b64u_decode(doc["signing_key"], "signing_key", 32)
    except ProtocolError:
        raise KeyDocumentError("the key document's signing_key is not a 32-byte key") from None
    if not hmac.compare_digest(signing_key, router.key):
        raise KeyDocumentError("the key document's signing key is not the certified router key")
    # 2. the router's signature over the exact payload bytes
    p = _signed_payload(doc, router.key, KEY_DOCUMENT_CONTEXT, "key document", KeyDocumentError)
    # 3. the payload, and the router's (outer) keys as v1 checks them
    _fields(p, _PAYLOAD, "key document", KeyDocumentError)
    if p["v"] != VERSION or p["suite"] != SUITE or not _is_int(p["issued_at"]):
        raise KeyDocumentError("the key document payload is not protocol v2")
    default_model = p["default_model"]
    if default_model is not None and (
        not isinstance(default_model, str) or not MODEL_NAME.fullmatch(default_model)
    ):
        raise KeyDocumentError("the key document's default_model is not a model name")
    router_keys = _keys(p["keys"], "key document")
    current = check_key_set(p["issued_at"], router_keys, now=now, what="key document")
    # 4. each node entry
    if not isinstance(p["nodes"], list) or len(p["nodes"]) > MAX_NODES:
        raise KeyDocumentError(f"the key document's nodes are a list of at most {MAX_NODES}")
    nodes: list[NodeEntry] = []
    for entry in p["nodes"]:
        try:
            nodes.append(verify_node_entry(entry, operator_pin, now=now))
        except KeyDocumentError:
            continue  # dropped: a client never seals to a node key that did not verify
    if len({node.name for node in nodes}) != len(nodes):
        raise KeyDocumentError("two verified nodes of the key document share a name")
    return KeyDocumentV2(
        p["issued_at"], router_keys, current, default_model, tuple(nodes), router, signing_key
    )
