"""The router's listeners: Twisted endpoint strings, with our TLS policy for ``ssl:``.

Twisted's ``ssl:`` string parser loads the certificate and key but has no options for the
protocol versions, cipher list or ALPN, and its default cipher list still accepts CBC suites in
TLS 1.2. So the router keeps Twisted's parsing (same syntax, same error messages) and serves the
parsed certificate with options of its own: TLS 1.2 at least (1.3 preferred: OpenSSL picks the
highest version both sides offer), ECDHE with AEAD ciphers only in TLS 1.2, and ALPN offering
HTTP/1.1 only.

Why not HTTP/2: the router's site is HTTP/1.1 (its body limits, slow-client limits and flow
control are written against Twisted's HTTP/1.1 channel), and the TLS proxy in front (Caddy)
already speaks HTTP/2 and HTTP/3 to clients and HTTP/1.1 to us. Serving HTTP/2 here as well would
add a second, less exercised request path and its own attack surface (stream floods, rapid
reset, HPACK and CONTINUATION abuse) for no client that needs it. Offering ``h2`` by ALPN
without serving it broke HTTP/2 clients, so it is not offered, whatever is installed.

Socket-activated (``systemd:``) UNIX sockets are served without touching their file
(:class:`AdoptedUNIXEndpoint`); the inference daemon uses that too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer, fdesc, ssl, tcp, unix
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "TLS12_CIPHERS",
    "AdoptedUNIXEndpoint",
    "ListenError",
    "adopt_unix",
    "alpn_protocols",
    "certificate_expiry",
    "public_tls",
    "server_endpoint",
    "split_description",
]

# Forward secrecy and authenticated encryption only; TLS 1.3 suites are all AEAD already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ListenError(Exception):
    """A listen string that cannot be served; the message names the string and the reason."""


def alpn_protocols() -> list[bytes]:
    """What ALPN offers: HTTP/1.1 only (see the module docstring)."""
    return [b"http/1.1"]


def public_tls(parsed: ssl.CertificateOptions) -> ssl.CertificateOptions:
    """The certificate, key and chain Twisted loaded, served under our version/cipher policy."""
    return ssl.CertificateOptions(
        privateKey=parsed.privateKey,
        certificate=parsed.certificate,
        extraCertChain=parsed.extraCertChain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        acceptableProtocols=alpn_protocols(),
    )


class _SystemdUNIXPort(unix.Port):
    """A listening UNIX socket that belongs to the service manager, not to us.

    Twisted's adoption (``reactor.adoptStreamPort``) runs the same code as a fresh bind: it
    chmods the socket file to 0666 when it starts listening (undoing ``SocketMode=0660``) and
    unlinks it when it stops (so that after a restart of the service nobody can reach the socket
    systemd still holds). This port never touches the path: the daemon needs no access to the
    socket's directory at all.
    """

    def startListening(self) -> None:
        skt, self._preexistingSocket = self._preexistingSocket, None
        assert skt is not None and self.factory is not None
        tcp._reservedFD.reserve()  # as Twisted's ports: the spare fd for accept() at EMFILE
        self.factory.doStart()
        skt.listen(self.backlog)
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class AdoptedUNIXEndpoint:
    """``systemd:domain=UNIX``: serve the inherited socket as :class:`_SystemdUNIXPort`."""

    def __init__(self, reactor: Any, fileno: int):
        self._reactor = reactor
        self._fileno = fileno

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        try:
            fdesc.setNonBlocking(self._fileno)
            port = _SystemdUNIXPort._fromListeningDescriptor(self._reactor, self._fileno, factory)
            port.startListening()
            os.close(self._fileno)  # the port holds its own duplicate
        except Exception:
            return defer.fail()
        return defer.succeed(port)


def adopt_unix(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """An adopted (``systemd:``) UNIX endpoint as :class:`AdoptedUNIXEndpoint`; others as is."""
    if isinstance(endpoint, AdoptedStreamServerEndpoint) and (
        endpoint.addressFamily == socket.AF_UNIX
    ):
        return AdoptedUNIXEndpoint(endpoint.reactor, endpoint.fileno)
    return endpoint


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """``(["kind", *args], {key: value})`` of a Twisted endpoint string: colon-separated,
    ``\\`` escapes, ``key=value`` options (for checks of a string before it is served)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            kwargs[key] = value
        else:
            args.append(part)
    return [parts[0], *args], kwargs


def certificate_expiry(path: Path) -> float:
    """When the (first) certificate in a PEM file expires, as a Unix time: the daemons export
    it for the certificates they loaded, so an alert fires before a missed renewal bites."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``description`` as an endpoint; ``ssl:`` ones with :func:`public_tls`."""
    if description.split(":", 1)[0].lower() == "ssl" and "sslmethod=" in description:
        raise ListenError(f"{description!r}: sslmethod is not supported (TLS 1.2+ is fixed)")
    try:
        endpoint = serverFromString(reactor, description)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ListenError(f"{description!r}: {type(e).__name__}: {e}") from None
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return adopt_unix(endpoint)
    # Twisted keeps the parsed port, interface and backlog in private attributes.
    return SSL4ServerEndpoint(
        reactor,
        endpoint._port,
        public_tls(endpoint._sslContextFactory),
        backlog=endpoint._backlog,
        interface=endpoint._interface,
    )
