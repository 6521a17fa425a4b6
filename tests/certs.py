"""Test PKI: certificates generated per test run with ``cryptography``.

``make_pki(directory)`` writes PEM files for a CA, a server certificate (SAN ``localhost`` and
``127.0.0.1``) and a client certificate signed by it, plus the material for negative tests: an
unrelated second CA with its own client certificate, an expired client certificate, a server
certificate for the wrong name, and an expired server certificate. EC P-256 keys keep it fast.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """Every file ``make_pki`` wrote: ``*.cert`` PEM certificates, ``*.key`` PKCS#8 keys."""

    directory: Path
    ca: Path  # CA bundle servers and clients trust
    ca_key: Path
    server: CertFiles  # SAN localhost, 127.0.0.1, signed by ca
    client: CertFiles  # clientAuth, signed by ca
    other_ca: Path  # an unrelated CA
    other_client: CertFiles  # a client certificate signed by other_ca
    expired_client: CertFiles  # signed by ca, validity ended yesterday
    wrong_name_server: CertFiles  # signed by ca, SAN wrong.example only
    expired_server: CertFiles  # signed by ca, SAN localhost/127.0.0.1, validity ended yesterday


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmrouter tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str) -> tuple[x509.Certificate, _Key]:
    key = _key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: _Key,
    common_name: str,
    *,
    server: bool,
    names: tuple[str, ...] = (),
    expired: bool = False,
) -> tuple[x509.Certificate, _Key]:
    key = _key()
    now = _now()
    if expired:
        start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: _Key) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_pair(directory: Path, stem: str, pair: tuple[x509.Certificate, _Key]) -> CertFiles:
    return CertFiles(
        cert=_write_cert(directory / f"{stem}.cert", pair[0]),
        key=_write_key(directory / f"{stem}.key", pair[1]),
    )


def make_pki(directory: Path) -> PKI:
    """Generate the whole test PKI into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("llmrouter test CA")
    other_cert, other_key = _ca("unrelated test CA")
    local = ("localhost", "127.0.0.1")
    return PKI(
        directory=directory,
        ca=_write_cert(directory / "ca.cert", ca_cert),
        ca_key=_write_key(directory / "ca.key", ca_key),
        server=_write_pair(
            directory, "server", _leaf(ca_cert, ca_key, "localhost", server=True, names=local)
        ),
        client=_write_pair(directory, "client", _leaf(ca_cert, ca_key, "router", server=False)),
        other_ca=_write_cert(directory / "other-ca.cert", other_cert),
        other_client=_write_pair(
            directory, "other-client", _leaf(other_cert, other_key, "router", server=False)
        ),
        expired_client=_write_pair(
            directory,
            "expired-client",
            _leaf(ca_cert, ca_key, "router", server=False, expired=True),
        ),
        wrong_name_server=_write_pair(
            directory,
            "wrong-name-server",
            _leaf(ca_cert, ca_key, "wrong.example", server=True, names=("wrong.example",)),
        ),
        expired_server=_write_pair(
            directory,
            "expired-server",
            _leaf(ca_cert, ca_key, "localhost", server=True, names=local, expired=True),
        ),
    )
