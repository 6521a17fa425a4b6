"""The router's listeners: Twisted endpoint strings, with our TLS policy for ``ssl:``.

Twisted's ``ssl:`` string parser loads the certificate and key but has no options for the
protocol versions, cipher list or ALPN, and its default cipher list still accepts CBC suites in
TLS 1.2. So the router keeps Twisted's parsing (same syntax, same error messages) and serves the
parsed certificate with options of its own: TLS 1.2 at least (1.3 preferred: OpenSSL picks the
highest version both sides offer), ECDHE with AEAD ciphers only in TLS 1.2, and HTTP/2 offered
through ALPN when the ``h2`` package is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

__all__ = ["TLS12_CIPHERS", "ListenError", "alpn_protocols", "public_tls", "server_endpoint"]

# Forward secrecy and authenticated encryption only; TLS 1.3 suites are all AEAD already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ListenError(Exception):
    """A listen string that cannot be served; the message names the string and the reason."""


def alpn_protocols() -> list[bytes]:
    """What ALPN offers: Twisted's web server speaks HTTP/2 only when ``h2`` is importable."""
    if importlib.util.find_spec("h2") is not None:
        return [b"h2", b"http/1.1"]
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


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``description`` as an endpoint; ``ssl:`` ones with :func:`public_tls`."""
    if description.split(":", 1)[0].lower() == "ssl" and "sslmethod=" in description:
        raise ListenError(f"{description!r}: sslmethod is not supported (TLS 1.2+ is fixed)")
    try:
        endpoint = serverFromString(reactor, description)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ListenError(f"{description!r}: {type(e).__name__}: {e}") from None
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint  # type: ignore[no-any-return]
    # Twisted keeps the parsed port, interface and backlog in private attributes.
    return SSL4ServerEndpoint(
        reactor,
        endpoint._port,
        public_tls(endpoint._sslContextFactory),
        backlog=endpoint._backlog,
        interface=endpoint._interface,
    )
