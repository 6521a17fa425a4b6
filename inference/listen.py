"""Turning ``--listen`` strings into server endpoints, with our transport policy.

``unix:`` goes to Twisted's parser unchanged; so does ``systemd:``, except that an adopted UNIX
socket is served without touching its file, which stays as the service manager made it.
``tcp:`` is plain HTTP and therefore only allowed on an explicit loopback interface. ``ssl:`` is
mutual TLS, built here because Twisted's ``ssl:`` string has no client-certificate options:
TLS 1.3 only, and a client certificate chaining to ``--tls-ca`` is required, so anything else
fails in the handshake.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from zope.interface import implementer

from llmrouter.listen import adopt_unix, split_description


class ListenError(Exception):
    """A listen string we refuse to serve on; the message says why."""


def is_loopback(interface: str) -> bool:
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _port(args: list[str], kwargs: dict[str, str], description: str) -> int:
    raw = kwargs.get("port") or (args[1] if len(args) > 1 else "")
    try:
        port = int(raw)
    except ValueError:
        raise ListenError(f"{description!r}: needs a port number") from None
    if not 0 <= port <= 65535:
        raise ListenError(f"{description!r}: port out of range")
    return port


def load_ca(path: Path) -> list[crypto.X509]:
    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    return [crypto.X509.from_cryptography(c) for c in certificates]


def mutual_tls_options(cert: Path, key: Path, ca: Path) -> ssl.CertificateOptions:
    """Server side: TLS 1.3 only, client certificate required and verified against ``ca``."""
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(private),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        requireCertificate=True,
        caCerts=load_ca(ca),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        enableSessions=False,
    )


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """The mutual-TLS options of the ``ssl:`` listeners, read again by :meth:`reload` (SIGHUP
    after a certificate renewal): new connections get the renewed certificate, open ones and the
    loaded model stay."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self._files = (cert, key, ca)
        self.cert = cert
        self.options = mutual_tls_options(cert, key, ca)

    def reload(self) -> None:
        """Raises (and keeps the loaded options) when the files cannot be loaded."""
        self.options = mutual_tls_options(*self._files)

    def getContext(self) -> SSL.Context:
        return self.options.getContext()

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)


def server_endpoint(
    reactor: Any,
    description: str,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    tls: ReloadableServerTLS | None = None,
) -> IStreamServerEndpoint:
    """``description`` as an endpoint; ``ssl:`` ones serve ``tls`` if given (several listeners
    share one, reloaded together), else the files."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("unix", "systemd"):
        try:
            return adopt_unix(serverFromString(reactor, description))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ListenError(f"{description!r}: {e}") from None
    args, kwargs = split_description(description)
    if kind == "tcp" or kind == "tcp6":
        interface = kwargs.get("interface")
        if interface is None or not is_loopback(interface):
            raise ListenError(
                f"{description!r}: plain TCP is only allowed on a loopback interface "
                "(add :interface=127.0.0.1); use ssl: with mutual TLS for other addresses"
            )
        return serverFromString(reactor, description)  # type: ignore[no-any-return]
    if kind == "ssl":
        if {"certKey", "privateKey", "caCertsDir", "extraCertChain"} & kwargs.keys():
            raise ListenError(
                f"{description!r}: give TLS files with --tls-cert, --tls-key and --tls-ca"
            )
        if tls_cert is None or tls_key is None or tls_ca is None:
            raise ListenError(f"{description!r}: ssl: needs --tls-cert, --tls-key and --tls-ca")
        for path in (tls_cert, tls_key, tls_ca):
            if not path.is_file():
                raise ListenError(f"TLS file not found: {path}")
        try:
            options = tls or ReloadableServerTLS(tls_cert, tls_key, tls_ca)
        except Exception as e:
            raise ListenError(f"cannot load the TLS files: {type(e).__name__}") from None
        return SSL4ServerEndpoint(
            reactor,
            _port(args, kwargs, description),
            options,
            backlog=int(kwargs.get("backlog", "50")),
            interface=kwargs.get("interface", ""),
        )
    raise ListenError(f"{description!r}: unsupported endpoint type (unix, ssl, systemd, tcp)")
