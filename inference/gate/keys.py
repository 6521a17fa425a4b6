"""The node's keys for protocol v2: its key directory, its certificate, its ``/v2/keys`` entry.

The directory (``--keys-dir``, e.g. ``/var/lib/inference/keys``) is a
:class:`~llmrouter.keystore.KeyStore` opened as a node's: ``signing.key`` (the node signing key,
created here and never copied anywhere: the operator certifies its public key, which
``llmrouter-keys --keys-dir DIR pin`` prints), HPKE keys rotated daily with an overlap (the keys
requests are wrapped to), and ``node.cert``, the operator's certificate of the signing key that
lists the models this node serves. ``node.cert`` is public: the operator installs it, and a
changed file is picked up at the next request (renewal needs no restart).

What the node publishes (``GET /v2/keys``) is ``{"certificate", "keys", "attestations"}``: the
certificate as installed, and the current and next HPKE keys signed by the node signing key
(:func:`~llmrouter.v2.certs.build_node_keys`), signed again every hour and whenever the keys or
the certificate change, like the router's key document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmrouter.keystore import KeyStore
from llmrouter.protocol import key_document_issued_at
from llmrouter.v2.certs import Certificate, CertificateError, build_node_keys, read_certificate

__all__ = ["CERT_FILE", "MAX_CERT_BYTES", "NodeKeys"]

log = Logger()

CERT_FILE = "node.cert"
MAX_CERT_BYTES = 64 * 1024


@dataclass(frozen=True)
class _Installed:
    """``node.cert`` as last read: the file's identity, and the certificate or why not."""

    stamp: tuple[int, int, int]
    certificate: Certificate | None
    problem: str | None


class NodeKeys:
    """The node's key directory and certificate. ``store`` rotates on the injected clock once
    started; ``close()`` wipes the secret keys."""

    def __init__(self, store: KeyStore, clock: IReactorTime) -> None:
        self.store = store
        self._clock = clock
        self._installed = _Installed((-1, -1, -1), None, f"no {CERT_FILE} in the key directory")
        self._entry: tuple[object, bytes] | None = None

    def __repr__(self) -> str:
        return f"NodeKeys({str(self.store.directory)!r}, <secrets redacted>)"

    @classmethod
    def open(
        cls,
        directory: Path,
        clock: IReactorTime,
        rotation_seconds: float = 86400,
        overlap_seconds: float = 3600,
    ) -> NodeKeys:
        store = KeyStore.open(directory, clock, rotation_seconds, overlap_seconds, node=True)
        keys = cls(store, clock)
        keys.refresh()
        if keys.problem is not None:
            log.warn("protocol v2 is unavailable on this node: {problem}", problem=keys.problem)
        return keys

    @property
    def cert_path(self) -> Path:
        return self.store.directory / CERT_FILE

    def start(self) -> None:
        self.store.start()

    def close(self) -> None:
        self.store.close()

    # The certificate.

    def refresh(self) -> None:
        """Read ``node.cert`` again if the file changed (a stat per call: cheap enough to call
        per request, so a renewed certificate takes effect without a restart)."""
        try:
            st = os.stat(self.cert_path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._installed.stamp:
            return
        certificate, problem = None, None
        if stamp == (0, 0, 0):
            problem = f"no {CERT_FILE} in the key directory (the operator certifies this node)"
        else:
            certificate, problem = self._read()
        if problem is not None and self._installed.certificate is not None:
            log.error("{file} is no longer usable: {problem}", file=CERT_FILE, problem=problem)
        elif certificate is not None:
            log.info(
                "{file}: node {name}, models {models}, valid until {not_after}",
                file=CERT_FILE,
                name=certificate.name,
                models=list(certificate.models),
                not_after=certificate.not_after,
            )
        self._installed = _Installed(stamp, certificate, problem)

    def _read(self) -> tuple[Certificate | None, str | None]:
        try:
            with open(self.cert_path, "rb") as f:
                raw = f.read(MAX_CERT_BYTES + 1)
        except OSError as e:
            return None, f"cannot read {self.cert_path}: {e.strerror}"
        if len(raw) > MAX_CERT_BYTES:
            return None, f"{self.cert_path} is larger than {MAX_CERT_BYTES} bytes"
        try:
            doc = json.loads(raw)
        except ValueError:
            return None, f"{self.cert_path} is not JSON"
        own = bytes(self.store.signing_key.verify_key)
        try:
            return read_certificate(doc, type="node", key=own), None
        except CertificateError as e:
            return None, f"{self.cert_path}: {e}"

    @property
    def certificate(self) -> Certificate | None:
        """The installed certificate (None: none usable, v2 is unavailable)."""
        return self._installed.certificate

    @property
    def problem(self) -> str | None:
        """Why v2 is unavailable (no certificate, a damaged one, one for another key)."""
        return self._installed.problem

    # What the node publishes.

    def entry(self) -> bytes | None:
        """The body of ``GET /v2/keys`` (None without a usable certificate)."""
        certificate = self.certificate
        if certificate is None:
            return None
        issued_at = key_document_issued_at(self._clock.seconds())
        published = tuple(self.store.published())
        version = (issued_at, published, self._installed.stamp)
        if self._entry is None or self._entry[0] != version:
            doc: dict[str, Any] = {
                "certificate": certificate.raw,
                "keys": build_node_keys(self.store.signing_key, published, issued_at),
                "attestations": [],
            }
            self._entry = (version, json.dumps(doc).encode("ascii"))
        return self._entry[1]

    def private_key_for(self, kid: str) -> bytes | None:
        """The HPKE secret key requests wrapped to ``kid`` open with now (current, next, or
        retired inside its overlap), else None."""
        return self.store.private_key_for(kid)
