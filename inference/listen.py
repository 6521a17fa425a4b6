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
import os
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import defer, fdesc, ssl, tcp, unix
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


class ListenError(Exception):
    """A listen string we refuse to serve on; the message says why."""


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint syntax: colon-separated, ``\\`` escapes, ``key=value`` options."""
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


def _adopted(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    if isinstance(endpoint, AdoptedStreamServerEndpoint) and (
        endpoint.addressFamily == socket.AF_UNIX
    ):
        return AdoptedUNIXEndpoint(endpoint.reactor, endpoint.fileno)
    return endpoint


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


def server_endpoint(
    reactor: Any,
    description: str,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> IStreamServerEndpoint:
    kind = description.split(":", 1)[0].lower()
    if kind in ("unix", "systemd"):
        try:
            return _adopted(serverFromString(reactor, description))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ListenError(f"{description!r}: {e}") from None
    args, kwargs = _split(description)
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
            options = mutual_tls_options(tls_cert, tls_key, tls_ca)
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
