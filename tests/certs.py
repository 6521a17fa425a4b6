"""Test PKI: certificates generated per test run with ``llmrouter-pki``'s functions.

``make_pki(directory)`` writes a CA, a server certificate (SAN ``localhost`` and ``127.0.0.1``)
and a client certificate signed by it, plus the material for negative tests: an unrelated second
CA with its own client certificate, an expired client certificate and a server certificate for
the wrong name.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrouter.ops import pki


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """Every file ``make_pki`` wrote."""

    ca: Path  # CA bundle servers and clients trust
    server: CertFiles  # SAN localhost, 127.0.0.1, signed by ca
    client: CertFiles  # clientAuth, signed by ca
    other_ca: Path  # an unrelated CA
    other_client: CertFiles  # a client certificate signed by other_ca
    expired_client: CertFiles  # signed by ca, validity ended yesterday
    wrong_name_server: CertFiles  # signed by ca, SAN wrong.example only


def _issue(directory: Path, kind: pki.Kind, name: str, **options: Any) -> CertFiles:
    pki.issue(directory, kind, name, **options)
    return CertFiles(cert=directory / f"{name}.crt", key=directory / f"{name}.key")


def make_pki(directory: Path) -> PKI:
    """Generate the whole test PKI into ``directory`` (created if missing)."""
    now = datetime.datetime.now(datetime.UTC)
    main, other = directory / "ca", directory / "other-ca"
    for ca in (main, other):
        ca.mkdir(parents=True, exist_ok=True)
        pki.create_ca(ca, now=now - datetime.timedelta(days=30))
    local = {"dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]}
    return PKI(
        ca=main / pki.CA_CERT,
        server=_issue(main, "server", "server", **local),
        client=_issue(main, "client", "router"),
        other_ca=other / pki.CA_CERT,
        other_client=_issue(other, "client", "router"),
        expired_client=_issue(
            main,
            "client",
            "expired-router",
            now=now - datetime.timedelta(days=10),
            lifetime=datetime.timedelta(days=9),
        ),
        wrong_name_server=_issue(main, "server", "wrong-name", dns_names=["wrong.example"]),
    )
