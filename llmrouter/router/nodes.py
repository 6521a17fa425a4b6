"""The router's view of protocol v2 nodes: which backends are nodes, their keys, their load.

Every ``INFERENCE_ENDPOINTS`` backend is asked for ``GET /v2/keys`` on each health probe; one that
answers with its entry (``{"certificate", "keys", "attestations"}``) is a v2 node, named by its
certificate. The router cannot check the operator's signature (apps pin the operator key, the
router holds none): it checks what it can, that the key set is signed by the certified key and
fresh, and passes the entry on unchanged in its key document, where clients check the rest.

A request names its candidate nodes (its wraps); :meth:`NodePool.candidates` orders those the
router can reach by load (fewest streams in flight, random among equals), which is all the
choice the router has: it cannot steer a device to a node outside the set the client drew.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from llmrouter.probing import Probing
from llmrouter.protocol import KeyDocumentError, ProtocolError, b64u_decode
from llmrouter.terminate.backends import Backend
from llmrouter.terminate.bodies import BodyReader
from llmrouter.v2.certs import Certificate, read_certificate, verify_node_keys

__all__ = ["MAX_ENTRY_BYTES", "Node", "NodePool"]

log = Logger()

MAX_ENTRY_BYTES = 1 << 16


@dataclass(eq=False)
class Node:
    """One backend as a v2 node: its entry (None: not a v2 node, or not reachable now)."""

    backend: Backend
    entry: dict[str, Any] | None = None
    certificate: Certificate | None = None
    streams: int = 0
    problem: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str | None:
        return None if self.certificate is None else self.certificate.name

    @property
    def usable(self) -> bool:
        return self.entry is not None and self.backend.healthy

    def uri(self, path: str) -> bytes:
        return self.backend.uri(path)


class NodePool:
    """The v2 nodes among ``backends``; probes ``/v2/keys`` every ``interval`` seconds."""

    def __init__(
        self,
        clock: IReactorTime,
        backends: Sequence[Backend],
        interval: float,
        probe_timeout: float,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self.nodes = [Node(backend) for backend in backends]
        self._probing = Probing(
            clock, interval, probe_timeout, lambda: [self.probe(node) for node in self.nodes]
        )
        self._rng = rng or random.SystemRandom()
        self.version = 0  # changes whenever a node's entry changes

    # What the key document lists.

    def state(self) -> tuple[int, tuple[bool, ...]]:
        """Changes whenever :meth:`entries` may have (a probe, a backend's health)."""
        return self.version, tuple(node.usable for node in self.nodes)

    def entries(self) -> list[dict[str, Any]]:
        """The entries of the usable nodes, one per name, in configuration order."""
        seen: set[str] = set()
        entries = []
        for node in self.nodes:
            if node.usable and node.entry is not None and node.name not in seen:
                seen.add(node.name or "")
                entries.append(node.entry)
        return entries

    def models(self) -> list[str]:
        names: list[str] = []
        for node in self.nodes:
            if node.usable and node.certificate is not None:
                names.extend(m for m in node.certificate.models if m not in names)
        return names

    # Choosing.

    def serves(self, model: str) -> bool:
        """Whether a node the router knows lists ``model`` (usable now or not)."""
        return any(n.certificate is not None and model in n.certificate.models for n in self.nodes)

    def candidates(self, names: Sequence[str], model: str) -> list[Node]:
        """The nodes of ``names`` that serve ``model`` and can take a request now, fewest
        streams in flight first, ties in random order."""
        wanted = set(names)
        usable = [
            n
            for n in self.nodes
            if n.usable
            and n.name in wanted
            and n.certificate is not None
            and model in n.certificate.models
            and n.backend.breaker.available()
        ]
        self._rng.shuffle(usable)
        usable.sort(key=lambda n: n.streams)
        chosen: dict[str, Node] = {}
        for node in usable:  # one backend per name (the same node configured twice)
            chosen.setdefault(node.name or "", node)
        return list(chosen.values())

    # Probing.

    def start(self) -> None:
        self._probing.start()

    def stop(self) -> Deferred[None]:
        return self._probing.stop()

    def probe(self, node: Node) -> Deferred[None]:
        """``GET /v2/keys`` of one node; its entry is replaced, or dropped on any failure."""

        async def run() -> tuple[int, bytes]:
            response: IResponse = await node.backend.agent.request(b"GET", node.uri("/v2/keys"))
            reader = BodyReader(MAX_ENTRY_BYTES + 1)
            response.deliverBody(reader)
            return int(response.code), await reader.done

        d: Deferred[tuple[int, bytes]] = self._probing.timed(Deferred.fromCoroutine(run()))

        def done(result: tuple[int, bytes] | Failure) -> None:
            if isinstance(result, Failure):
                if not result.check(CancelledError):
                    log.debug("v2 probe of {name} failed", name=node.backend.name)
                self._set(node, None, None, "unreachable")
                return
            code, body = result
            if code != 200:
                self._set(node, None, None, None if code == 404 else f"answered {code}")
                return
            self._accept(node, body)

        return d.addBoth(done)

    def _accept(self, node: Node, body: bytes) -> None:
        try:
            if len(body) > MAX_ENTRY_BYTES:
                raise KeyDocumentError("the node's entry is too large")
            entry = json.loads(body)
            if not isinstance(entry, dict) or set(entry) != {"certificate", "keys", "attestations"}:
                raise KeyDocumentError("the node's entry does not have v2's fields")
            signing_key = b64u_decode(entry["keys"]["signing_key"], "signing_key", 32)
            certificate = read_certificate(entry["certificate"], type="node", key=signing_key)
            verify_node_keys(entry["keys"], certificate.key, now=self._clock.seconds())
        except KeyDocumentError as e:
            self._set(node, None, None, str(e))
            return
        except (ProtocolError, ValueError, TypeError, KeyError):
            self._set(node, None, None, "malformed entry")
            return
        self._set(node, entry, certificate, None)

    def _set(
        self,
        node: Node,
        entry: dict[str, Any] | None,
        certificate: Certificate | None,
        problem: str | None,
    ) -> None:
        if problem != node.problem and problem is not None and node.entry is not None:
            log.warn(
                "node {name} ({backend}) left the key document: {problem}",
                name=node.name,
                backend=node.backend.name,
                problem=problem,
            )
        before = node.entry
        node.entry, node.certificate, node.problem = entry, certificate, problem
        if before != entry:
            if entry is not None and before is None:
                log.info(
                    "node {name} ({backend}) serves protocol v2",
                    name=node.name,
                    backend=node.backend.name,
                )
            self.version += 1
