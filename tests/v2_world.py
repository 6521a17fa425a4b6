"""A protocol v2 deployment in memory, for the tests: an operator, a router and its nodes.

Every key is real (Ed25519 signing keys, X25519 HPKE keys) and every document is built with the
wire module's own functions, so the tests exercise both halves of llmrouter.v2. ``seed`` makes
the keys reproducible; without it they are fresh.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.v2 import certs

DAY = 86400


def _seeded(seed: bytes | None, label: str) -> bytes:
    if seed is None:
        return hpke.generate_key_pair().sk  # 32 fresh random bytes
    return hashlib.sha256(seed + b"|" + label.encode()).digest()


@dataclass
class Node:
    name: str
    models: tuple[str, ...]
    signing: nacl.signing.SigningKey
    current: hpke.KeyPair
    upcoming: hpke.KeyPair
    kids: tuple[str, str] = ("0a", "0b")
    attestations: list[dict[str, Any]] = field(default_factory=list)
    certificate: dict[str, str] = field(default_factory=dict)

    def published(self, now: float) -> list[p.PublishedKey]:
        start = int(now) - 60
        return [
            p.PublishedKey(self.kids[0], self.current.pk, "current", start, start + DAY),
            p.PublishedKey(self.kids[1], self.upcoming.pk, "next", start + DAY, start + 2 * DAY),
        ]

    def key_set(self, now: float, issued_at: int | None = None) -> dict[str, str]:
        issued = p.key_document_issued_at(now) if issued_at is None else issued_at
        return certs.build_node_keys(self.signing, self.published(now), issued)

    def entry(self, now: float) -> dict[str, Any]:
        """What the node serves at ``GET /v2/keys``."""
        return {
            "certificate": self.certificate,
            "keys": self.key_set(now),
            "attestations": self.attestations,
        }

    def secret_key(self, kid: str) -> bytes:
        return {self.kids[0]: self.current.sk, self.kids[1]: self.upcoming.sk}[kid]


class World:
    """An operator key, a certified router with two outer keys, certified nodes."""

    def __init__(
        self,
        nodes: dict[str, tuple[str, ...]] | None = None,
        *,
        seed: bytes | None = None,
        now: float | None = None,
    ) -> None:
        self.now = time.time() if now is None else now
        self.seed = seed
        self.operator = nacl.signing.SigningKey(_seeded(seed, "operator"))
        self.pin = bytes(self.operator.verify_key)
        self.router_signing = nacl.signing.SigningKey(_seeded(seed, "router signing"))
        self.router_certificate = self.certify("router", "router-1", self.router_signing)
        self.outer = self.key_pair("outer 1")
        self.outer_next = self.key_pair("outer 2")
        self.outer_kids = ("01", "02")
        self.default_model: str | None = "m1"
        self.nodes: list[Node] = []
        for name, models in (nodes or {"node-a": ("m1",), "node-b": ("m1", "m2")}).items():
            self.add_node(name, models)

    def key_pair(self, label: str) -> hpke.KeyPair:
        sk = _seeded(self.seed, label)
        return hpke.KeyPair(sk, hpke.public_key(sk))

    def certify(
        self,
        type: str,
        name: str,
        key: nacl.signing.SigningKey,
        models: tuple[str, ...] = (),
        *,
        not_before: int | None = None,
        days: int = 30,
        operator: nacl.signing.SigningKey | None = None,
    ) -> dict[str, str]:
        start = int(self.now) - 3600 if not_before is None else not_before
        return certs.issue_certificate(
            bytes(operator or self.operator),
            type=type,
            name=name,
            key=bytes(key.verify_key),
            models=models,
            not_before=start,
            not_after=start + days * DAY,
        )

    def add_node(self, name: str, models: tuple[str, ...]) -> Node:
        signing = nacl.signing.SigningKey(_seeded(self.seed, f"node {name} signing"))
        node = Node(
            name,
            models,
            signing,
            self.key_pair(f"node {name} 1"),
            self.key_pair(f"node {name} 2"),
        )
        node.certificate = self.certify("node", name, signing, models)
        self.nodes.append(node)
        return node

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def router_keys(self) -> list[p.PublishedKey]:
        start = int(self.now) - 60
        return [
            p.PublishedKey(self.outer_kids[0], self.outer.pk, "current", start, start + DAY),
            p.PublishedKey(
                self.outer_kids[1], self.outer_next.pk, "next", start + DAY, start + 2 * DAY
            ),
        ]

    def router_secret_key(self, kid: str) -> bytes | None:
        return {self.outer_kids[0]: self.outer.sk, self.outer_kids[1]: self.outer_next.sk}.get(kid)

    def document(
        self,
        entries: list[dict[str, Any]] | None = None,
        *,
        issued_at: int | None = None,
    ) -> bytes:
        """The body of ``GET /api/v2/keys`` as the router would serve it."""
        return certs.build_key_document_v2(
            self.router_signing,
            self.router_certificate,
            self.router_keys(),
            [n.entry(self.now) for n in self.nodes] if entries is None else entries,
            self.default_model,
            p.key_document_issued_at(self.now) if issued_at is None else issued_at,
        )

    def verified(self) -> certs.KeyDocumentV2:
        return certs.verify_key_document_v2(self.document(), self.pin, now=self.now)
