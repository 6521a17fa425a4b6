"""The v2 key document (``GET /api/v2/keys``): the router's certificate, keys and nodes, signed.

``router.cert`` in the key directory is the operator's certificate of the router's signing key
(public; the operator installs it, and a changed file is read again at the next request). Without
one the router serves protocol v1/v1.1 only and ``/api/v2/keys`` answers 503 ``v2_unavailable``.
The document carries the router's HPKE keys (the v2 outer keys: the same as v1's) and the entry
of every usable node, and is signed again every hour on the hour and whenever the keys, the
certificate or the nodes change, like the v1 document.

An ``operator.key`` in the key directory stops the router: the operator key certifies which
nodes clients seal to, and the one host it must never be on is the router.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import nacl.signing
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmrouter.protocol import ProtocolError, PublishedKey, b64u_decode, key_document_issued_at
from llmrouter.router.nodes import NodePool
from llmrouter.v2.certs import (
    Certificate,
    CertificateError,
    build_key_document_v2,
    read_certificate,
)

__all__ = [
    "CERT_FILE",
    "OPERATOR_FILE",
    "KeyDocumentV2Source",
    "read_router_cert",
    "refuse_operator_key",
    "router_cert_problem",
]

log = Logger()

CERT_FILE = "router.cert"
OPERATOR_FILE = "operator.key"
_MAX_CERT_BYTES = 64 * 1024


class SigningKeys(Protocol):
    """The part of the key store the document needs."""

    signing_key: nacl.signing.SigningKey

    def published(self) -> list[PublishedKey]: ...


def refuse_operator_key(directory: Path) -> str | None:
    """Why the router must not start with this key directory (None: it may)."""
    if (directory / OPERATOR_FILE).exists():
        return (
            f"{directory / OPERATOR_FILE} is on the router: the operator key certifies which"
            " nodes apps seal to and must never be on a router host; move it offline (and, if"
            " anyone else could read it, make a new one and certify everything again)"
        )
    return None


def read_router_cert(path: Path, own: bytes) -> tuple[Certificate | None, str | None]:
    """``router.cert`` at ``path``, for the signing key ``own``; or why it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CERT_BYTES + 1)
    except FileNotFoundError:
        return None, f"no {CERT_FILE} in the key directory"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    try:
        return read_certificate(json.loads(raw), type="router", key=own), None
    except ValueError:
        return None, f"{path} is not JSON"
    except CertificateError as e:
        return None, f"{path}: {e}"


def router_cert_problem(directory: Path) -> str | None:
    """Why the key directory's ``router.cert`` does not turn protocol v2 on (None: it does),
    read without opening the key store (for ``--check``)."""
    try:
        state = json.loads((directory / "state.json").read_bytes())
        own = b64u_decode(state["signing_key"], "signing_key", 32)
    except (OSError, ValueError, KeyError, TypeError, ProtocolError):
        return "the key directory has no signing key yet"
    return read_router_cert(directory / CERT_FILE, own)[1]


class KeyDocumentV2Source:
    """Builds (and caches) the v2 key document from the key store, ``router.cert`` and the
    nodes; :meth:`document` is None while v2 is unavailable."""

    def __init__(
        self,
        keys: SigningKeys,
        directory: Path,
        nodes: NodePool,
        clock: IReactorTime,
        default_model: str | None,
    ) -> None:
        self._keys = keys
        self._path = Path(directory) / CERT_FILE
        self._nodes = nodes
        self._clock = clock
        self._default_model = default_model
        self._stamp: tuple[Any, ...] = ()
        self._certificate: Certificate | None = None
        self.problem: str | None = f"no {CERT_FILE} in the key directory"
        self._cache: tuple[object, bytes] | None = None

    @property
    def certificate(self) -> Certificate | None:
        self._refresh()
        return self._certificate

    def available(self) -> bool:
        return self.certificate is not None

    def document(self) -> bytes | None:
        certificate = self.certificate
        if certificate is None:
            return None
        issued_at = key_document_issued_at(self._clock.seconds())
        published = tuple(self._keys.published())
        version = (issued_at, published, self._stamp, self._nodes.state())
        if self._cache is None or self._cache[0] != version:
            # As in v1, a request that names no model gets the configured default, else the
            # first model of the first node (v1: of the first backend).
            default = self._default_model or next(iter(self._nodes.models()), None)
            body = build_key_document_v2(
                self._keys.signing_key,
                certificate.raw,
                published,
                self._nodes.entries(),
                default,
                issued_at,
            )
            self._cache = (version, body)
        return self._cache[1]

    def _refresh(self) -> None:
        """Read ``router.cert`` again if it (or the signing key) changed."""
        own = bytes(self._keys.signing_key.verify_key)
        try:
            st = os.stat(self._path)
            stamp: tuple[Any, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, own)
        except FileNotFoundError:
            stamp = (None, own)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        certificate, problem = read_router_cert(self._path, own)
        if problem is not None:
            log.warn("{problem}", problem=problem)
        else:
            assert certificate is not None
            log.info(
                "protocol v2 on: {file} certifies router {name} until {not_after}",
                file=CERT_FILE,
                name=certificate.name,
                not_after=certificate.not_after,
            )
        self._certificate, self.problem = certificate, problem
