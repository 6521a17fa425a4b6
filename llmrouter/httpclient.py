"""HTTP agents for the places we talk to: UNIX sockets, plain HTTP, and mutual-TLS HTTPS.

The router's upstreams and the Python client both use this, so a backend URL means the same
thing everywhere: ``unix:/path.sock``, ``http://host:port`` or ``https://host:port``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import ssl
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["ClientTLS", "PinnedPolicy", "agent_for"]


@dataclass(frozen=True)
class ClientTLS:
    """Trust exactly ``ca`` (pinned, not the system store); present ``cert``/``key`` if given."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    tls13_only: bool = True


@implementer(IAgentEndpointFactory)
class _UNIXEndpointFactory:
    def __init__(self, reactor: object, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


@implementer(IPolicyForHTTPS)
class PinnedPolicy:
    """Trust exactly the CA of ``tls``; present its client certificate. :meth:`reload` reads the
    files again (a renewal replaced them), for connections made from then on."""

    def __init__(self, tls: ClientTLS) -> None:
        self._tls = tls
        self._trust, self._client = self._load()

    def _load(self) -> tuple[ssl.Certificate, ssl.PrivateCertificate | None]:
        tls = self._tls
        trust = ssl.Certificate.loadPEM(tls.ca.read_bytes())
        if tls.cert is None or tls.key is None:
            return trust, None
        client = ssl.PrivateCertificate.loadPEM(
            tls.cert.read_bytes() + b"\n" + tls.key.read_bytes()
        )
        return trust, client

    def reload(self) -> None:
        """Read the CA, certificate and key again; on any error (a half-written renewal, a
        permission) raise and keep what was loaded."""
        self._trust, self._client = self._load()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        extra = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3} if self._tls.tls13_only else {}
        name = self._tls.server_name or hostname.decode("ascii")
        return ssl.optionsForClientTLS(
            name,
            trustRoot=self._trust,
            clientCertificate=self._client,
            extraCertificateOptions=extra,
        )


def agent_for(
    reactor: object,
    url: str,
    tls: ClientTLS | PinnedPolicy | None = None,
    pool: HTTPConnectionPool | None = None,
    connect_timeout: float = 10.0,
) -> tuple[IAgent, str]:
    """Return an agent and the base URL to prefix paths with (``tls``: the settings, or a
    policy several agents share, so that one :meth:`PinnedPolicy.reload` serves them all)."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if not path:
            raise ValueError("unix: URL needs a socket path")
        factory = _UNIXEndpointFactory(reactor, path, connect_timeout)
        return Agent.usingEndpointFactory(reactor, factory, pool=pool), "http://localhost"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("URL must be unix:/path, http://host:port or https://host:port")
    base = f"{parts.scheme}://{parts.netloc}"
    if parts.scheme == "https":
        policy: IPolicyForHTTPS
        if isinstance(tls, ClientTLS):
            policy = PinnedPolicy(tls)
        else:
            policy = tls or _system_policy()
        return Agent(reactor, policy, connectTimeout=connect_timeout, pool=pool), base
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool), base


def _system_policy() -> IPolicyForHTTPS:
    from twisted.web.client import BrowserLikePolicyForHTTPS

    return BrowserLikePolicyForHTTPS()
