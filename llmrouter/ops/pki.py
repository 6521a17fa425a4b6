"""``llmrouter-pki``: a private CA and short-lived certificates for the router <-> inference link.

Production links are mutual TLS over WireGuard: inference nodes present server certificates, the
router presents a client certificate, and both sides trust only this private CA. Certificates are
short-lived (7 days by default) so that a leaked key stops working on its own within days; a
systemd timer runs ``renew --if-expiring-within 2d`` daily, which keeps them fresh without a
revocation list.

Layout of a PKI directory (the CA key never leaves the machine that runs this tool):

    ca.key, ca.crt            the CA (key 0600)
    NAME.key, NAME.crt        one issued identity per NAME (key 0600, or 0640 with --group;
                              certificate 0644)

The directory is 0755: certificates are public, and each key is guarded by its own mode, so a
service (the router, user llmrouter) can read the one key made readable to its group. A key or
certificate that is written again (renewal, a second ``issue``) keeps the owner, group and mode
the operator gave the file it replaces (a key never gains access for others), so a renewal run
by root never leaves a service unable to read its key.

Keys are ECDSA P-256 by default (step-ca's default, supported by every TLS stack) or Ed25519.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_CA_DAYS",
    "DEFAULT_DAYS",
    "CertInfo",
    "PKIError",
    "create_ca",
    "inspect",
    "issue",
    "list_certificates",
    "main",
    "parse_duration",
    "renew",
    "verify",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
DEFAULT_DAYS = 7
DEFAULT_CA_DAYS = 3650
# Backdating absorbs small clock differences between nodes without weakening the expiry.
BACKDATE = datetime.timedelta(minutes=5)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

Algorithm = Literal["p256", "ed25519"]
Kind = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PKIError(Exception):
    """A refusal with a message fit for the operator (never contains key material)."""


@dataclass(frozen=True)
class CertInfo:
    """What an operator needs to know about one certificate."""

    name: str
    kind: str  # "ca", "server", "client" or "server+client"
    subject: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    algorithm: str

    def remaining(self, now: datetime.datetime) -> datetime.timedelta:
        return self.not_after - now


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse_duration(text: str) -> datetime.timedelta:
    """``30s``, ``15m``, ``12h``, ``2d``, ``1w`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise PKIError(f"bad duration {text!r}: use e.g. 30s, 15m, 12h, 2d, 1w")
    value = float(match.group(1))
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return datetime.timedelta(seconds=value * unit)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name) or name == "ca":
        raise PKIError(f"bad name {name!r}: letters, digits, '.', '_', '-'; not 'ca'")


def _new_key(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PKIError(f"unknown algorithm {algorithm!r}")


def _algorithm_of(key: object) -> Algorithm:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "p256"
    raise PKIError("unsupported key type (only ECDSA P-256 and Ed25519 are issued)")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; ECDSA needs a digest.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _write_atomic(
    path: Path, data: bytes, mode: int, group: int | None = None, private: bool = False
) -> None:
    """Write ``data`` so readers see either the old or the new file, never a partial or
    world-readable one: the temporary file gets its mode and owner before any byte is written.

    A file that replaces another keeps that one's owner, group and mode (without access for
    others when ``private``), unless ``group`` is given: then it gets ``mode`` and that group.
    A new file gets ``mode`` (and ``group``). Giving the file another owner than ours needs
    CAP_CHOWN (llmrouter-pki-renew.service keeps only that capability).
    """
    uid = gid = -1
    try:
        old = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        uid, gid = old.st_uid, old.st_gid
        if group is None:
            mode = stat.S_IMODE(old.st_mode) & (0o770 if private else 0o777)
    if group is not None:
        gid = group
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # Mode, then owner (root without CAP_FOWNER cannot chmod another user's file), then
        # the data: the file is still empty while anyone else could open it.
        os.fchmod(fd, mode)
        st = os.fstat(fd)
        if (uid, gid) != (-1, -1) and (uid, gid) != (st.st_uid, st.st_gid):
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"{path} does not exist") from None
    except ValueError:
        raise PKIError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path}: unsupported key type")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path} does not exist") from None
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def _load_ca(directory: Path) -> tuple[PrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if not key_path.exists() or not cert_path.exists():
        raise PKIError(f"no CA in {directory}: run `llmrouter-pki --dir {directory} init-ca` first")
    return _load_key(key_path), _load_cert(cert_path)


def create_ca(
    directory: Path,
    common_name: str = "llmrouter private CA",
    days: float = DEFAULT_CA_DAYS,
    algorithm: Algorithm = "p256",
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """Create ``ca.key`` (0600) and ``ca.crt`` in ``directory`` (0755); refuse to overwrite."""
    now = now or _utcnow()
    if not directory.exists():
        directory.mkdir(parents=True)
        # whatever the umask: services read their own files in it (keys have their own modes)
        os.chmod(directory, 0o755)  # noqa: S103
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise PKIError(f"a CA already exists in {directory}; refusing to overwrite it")
    key = _new_key(algorithm)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # pathlen 0: this CA issues leaves only, so a stolen leaf key can never mint certificates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .sign(key, _hash_for(key))
    )
    _write_atomic(directory / CA_KEY, _key_pem(key), 0o600, private=True)
    _write_atomic(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def issue(
    directory: Path,
    kind: Kind,
    name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    lifetime: datetime.timedelta = datetime.timedelta(days=DEFAULT_DAYS),
    algorithm: Algorithm = "p256",
    now: datetime.datetime | None = None,
    key: PrivateKey | None = None,
    group: str | None = None,
) -> x509.Certificate:
    """Issue ``NAME.crt`` and a fresh ``NAME.key`` (0600) signed by the CA in ``directory``.

    Server certificates need at least one DNS name or IP address: clients check the server's
    identity against them (service-identity), never against the subject CN. With ``group`` the
    key is 0640 and belongs to that group (the service that reads it on this host); otherwise a
    key that already exists keeps its owner, group and mode.
    """
    _check_name(name)
    if kind not in ("server", "client"):
        raise PKIError(f"kind must be 'server' or 'client', not {kind!r}")
    if lifetime <= datetime.timedelta(0):
        raise PKIError("lifetime must be positive")
    now = now or _utcnow()
    gid = _group_id(group) if group is not None else None
    ca_key, ca_cert = _load_ca(directory)
    try:
        ips = [ipaddress.ip_address(ip) for ip in ip_addresses]
    except ValueError as exc:
        raise PKIError(str(exc)) from None
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    if kind == "server" and not sans:
        raise PKIError("a server certificate needs at least one --dns or --ip name")
    if kind == "client" and not sans:
        # A name the server side can log (as an HMAC) or authorise on, mirroring step-ca.
        sans = [x509.DNSName(name)]
    not_after = now + lifetime
    if not_after > ca_cert.not_valid_after_utc:
        raise PKIError("the certificate would outlive the CA; renew the CA first")
    key = key or _new_key(algorithm)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, _hash_for(ca_key))
    )
    # Key first: a reader that sees the new certificate always finds its key already in place.
    key_mode = 0o600 if gid is None else 0o640
    _write_atomic(directory / f"{name}.key", _key_pem(key), key_mode, gid, private=True)
    _write_atomic(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def _group_id(group: str) -> int:
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PKIError(f"no group {group!r} on this host") from None


def _kind_of(cert: x509.Certificate) -> str:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "unknown"
    kinds = []
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        kinds.append("server")
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        kinds.append("client")
    return "+".join(kinds) or "unknown"


def inspect(path: Path) -> CertInfo:
    """Summarise one certificate file."""
    cert = _load_cert(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    name = path.name.removesuffix(".crt")
    return CertInfo(
        name=name,
        kind=_kind_of(cert),
        subject=cert.subject.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns,
        ip_addresses=ips,
        algorithm=_algorithm_of(cert.public_key()),
    )


def list_certificates(directory: Path) -> list[CertInfo]:
    """Every certificate in ``directory``, the CA first."""
    paths = sorted(directory.glob("*.crt"), key=lambda p: (p.name != CA_CERT, p.name))
    return [inspect(p) for p in paths]


def verify(
    directory: Path,
    name: str,
    server_name: str | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Check that ``NAME.crt`` chains to the CA, is valid at ``now``, matches its key, has the
    extended key usage for its role and (for a server) carries ``server_name``; raise PKIError
    saying what is wrong. Uses the same libraries as the daemons at run time (OpenSSL through
    pyOpenSSL for the chain, service-identity for the name)."""
    import service_identity
    from OpenSSL import crypto
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    _check_name(name)
    _, ca_cert = _load_ca(directory)
    cert = _load_cert(directory / f"{name}.crt")
    key = _load_key(directory / f"{name}.key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise PKIError(f"{name}.key does not belong to {name}.crt")
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca_cert))
    store.set_time((now or _utcnow()).astimezone(datetime.UTC).replace(tzinfo=None))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise PKIError(f"{name}: {exc}") from None
    kind = _kind_of(cert)
    if kind not in ("server", "client"):
        raise PKIError(f"{name}: certificate is not a server or client certificate ({kind})")
    if kind == "client":
        return
    if server_name is None:
        info = inspect(directory / f"{name}.crt")
        server_name = (info.dns_names + info.ip_addresses)[0]
    try:
        try:
            verify_certificate_ip_address(cert, server_name)
        except ValueError:
            verify_certificate_hostname(cert, server_name)
    except service_identity.VerificationError:
        raise PKIError(f"{name}: certificate is not valid for {server_name!r}") from None


def renew(
    directory: Path,
    names: Sequence[str] = (),
    if_expiring_within: datetime.timedelta | None = None,
    lifetime: datetime.timedelta | None = None,
    keep_key: bool = False,
    now: datetime.datetime | None = None,
) -> list[str]:
    """Re-issue certificates (all issued ones when ``names`` is empty) with the same names, kind and
    lifetime, and a new key unless ``keep_key``. With ``if_expiring_within``, only those that expire
    within that window are renewed. Returns the names renewed."""
    now = now or _utcnow()
    if not names:
        names = [i.name for i in list_certificates(directory) if i.kind != "ca"]
    renewed = []
    for name in names:
        _check_name(name)
        info = inspect(directory / f"{name}.crt")
        if if_expiring_within is not None and info.remaining(now) > if_expiring_within:
            continue
        if info.kind not in ("server", "client"):
            raise PKIError(f"{name}: cannot renew a certificate of kind {info.kind!r}")
        old_lifetime = info.not_after - info.not_before - BACKDATE
        # Round the original lifetime to whole minutes so renewals do not drift.
        old_lifetime = datetime.timedelta(minutes=round(old_lifetime.total_seconds() / 60))
        key = _load_key(directory / f"{name}.key") if keep_key else None
        dns = info.dns_names
        if info.kind == "client" and dns == (name,):
            dns = ()
        issue(
            directory,
            info.kind,  # type: ignore[arg-type]
            name,
            dns_names=dns,
            ip_addresses=info.ip_addresses,
            lifetime=lifetime or old_lifetime,
            algorithm=info.algorithm,  # type: ignore[arg-type]
            now=now,
            key=key,
        )
        renewed.append(name)
    return renewed


def _format_remaining(delta: datetime.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "EXPIRED"
    days, rest = divmod(seconds, 86400)
    return f"{days}d{rest // 3600:02d}h"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrouter-pki",
        description="Private CA and short-lived mTLS certificates for router <-> inference links.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("LLMROUTER_PKI_DIR", "/etc/llmrouter/pki")),
        help="PKI directory [LLMROUTER_PKI_DIR] (default /etc/llmrouter/pki)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-ca", help="create the CA (refuses to overwrite)")
    p.add_argument("--common-name", default="llmrouter private CA")
    p.add_argument("--days", type=float, default=DEFAULT_CA_DAYS)
    p.add_argument("--algorithm", choices=["p256", "ed25519"], default="p256")

    p = sub.add_parser("issue", help="issue a server or client certificate and a new key")
    p.add_argument("kind", choices=["server", "client"])
    p.add_argument("name", help="file stem and subject CN, e.g. inference-1 or router")
    p.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    p.add_argument("--lifetime", default=f"{DEFAULT_DAYS}d", help="validity, e.g. 7d or 36h")
    p.add_argument("--algorithm", choices=["p256", "ed25519"], default="p256")
    p.add_argument(
        "--group",
        help="key 0640 owned by this group (the service on this host that reads it, e.g. "
        "llmrouter); renewals keep it",
    )

    p = sub.add_parser("renew", help="re-issue certificates (new keys) before they expire")
    p.add_argument("names", nargs="*", help="default: every issued certificate")
    p.add_argument("--if-expiring-within", metavar="DURATION", help="e.g. 2d: skip the others")
    p.add_argument("--lifetime", help="default: the certificate's current lifetime")
    p.add_argument("--keep-key", action="store_true", help="reuse the existing key (pinning)")

    sub.add_parser("list", help="every certificate with its expiry")

    p = sub.add_parser("inspect", help="details of one certificate file")
    p.add_argument("path", type=Path)

    p = sub.add_parser("verify", help="check chain, validity, key match and server name")
    p.add_argument("name")
    p.add_argument("--server-name")

    p = sub.add_parser("check", help="exit 1 if any certificate expires within DURATION")
    p.add_argument("--within", default="2d", metavar="DURATION")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    directory: Path = args.dir
    now = _utcnow()
    try:
        if args.command == "init-ca":
            cert = create_ca(directory, args.common_name, args.days, args.algorithm, now=now)
            print(f"created {directory / CA_CERT} (expires {cert.not_valid_after_utc:%Y-%m-%d})")
        elif args.command == "issue":
            cert = issue(
                directory,
                args.kind,
                args.name,
                dns_names=args.dns,
                ip_addresses=args.ip,
                lifetime=parse_duration(args.lifetime),
                algorithm=args.algorithm,
                now=now,
                group=args.group,
            )
            print(
                f"issued {directory / (args.name + '.crt')} "
                f"(expires {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        elif args.command == "renew":
            within = parse_duration(args.if_expiring_within) if args.if_expiring_within else None
            lifetime = parse_duration(args.lifetime) if args.lifetime else None
            renewed = renew(directory, args.names, within, lifetime, args.keep_key, now=now)
            print("renewed: " + (", ".join(renewed) if renewed else "nothing"))
        elif args.command == "list":
            for info in list_certificates(directory):
                remaining = _format_remaining(info.remaining(now))
                names = ",".join(info.dns_names + info.ip_addresses)
                print(
                    f"{info.name:24} {info.kind:13} {info.algorithm:8} "
                    f"{info.not_after:%Y-%m-%dT%H:%M:%SZ} {remaining:>8}  {names}".rstrip()
                )
        elif args.command == "inspect":
            info = inspect(args.path)
            for field, value in vars(info).items():
                print(f"{field}: {value}")
        elif args.command == "verify":
            verify(directory, args.name, args.server_name, now=now)
            print(f"{args.name}: ok")
        elif args.command == "check":
            within = parse_duration(args.within)
            expiring = [i for i in list_certificates(directory) if i.remaining(now) <= within]
            for info in expiring:
                print(f"{info.name}: expires {info.not_after:%Y-%m-%dT%H:%M:%SZ}", file=sys.stderr)
            return 1 if expiring else 0
    except PKIError as exc:
        print(f"llmrouter-pki: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
