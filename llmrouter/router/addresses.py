"""Who is asking: the client address behind trusted proxies, and its rate-limit bucket.

Why buckets and not addresses: an IPv6 client usually holds a whole /64 (often a /56 or /48),
so keying limits on the exact address hands it 2^64 fresh buckets. IPv6 addresses are bucketed
by ``RATE_LIMIT_IPV6_PREFIX`` (default 64) and IPv4 ones (also IPv4-mapped IPv6) by address.

Proxies: only a peer in ``TRUSTED_PROXIES`` may name the client in ``X-Forwarded-For``; the
client is the right-most hop that is not itself trusted. Peers on a UNIX-socket listener have no
address: they share one ``local`` bucket unless ``TRUSTED_PROXIES`` holds the word ``unix``, which
trusts them (a Caddy on the same host) to forward the address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.web.iweb import IRequest

__all__ = ["LOCAL", "UNIX", "TrustedProxies", "bucket"]

LOCAL = "local"  # the bucket of UNIX-socket peers that forward nothing we trust
UNIX = "unix"  # the TRUSTED_PROXIES word for UNIX-socket peers

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class TrustedProxies:
    networks: tuple[_Network, ...] = ()
    unix: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        """``unix`` or IP addresses/CIDR networks; raises ValueError on anything else."""
        networks: list[_Network] = []
        unix = False
        for entry in entries:
            if entry == UNIX:
                unix = True
            else:
                networks.append(ipaddress.ip_network(entry, strict=False))
        return cls(tuple(networks), unix)

    def trusts(self, address: str) -> bool:
        """Whether a peer (an IP address, or ``local`` for a UNIX socket) is a trusted proxy."""
        return self.unix if address == LOCAL else self._trusted(address)

    def _trusted(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def client_address(self, request: IRequest) -> str:
        """The peer address, or behind a trusted proxy the last untrusted X-Forwarded-For hop."""
        host = getattr(request.getClientAddress(), "host", None)
        if isinstance(host, str):
            if not self._trusted(host):
                return host
            fallback = host
        elif self.unix:
            fallback = LOCAL
        else:
            return LOCAL
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        hops = [h.strip() for line in forwarded for h in line.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if _ip(hop) is None:
                return fallback  # garbage: do not let a client pick its own bucket
            if not self._trusted(hop):
                return str(hop)
        return fallback


def bucket(address: str, ipv6_prefix: int) -> str:
    """The rate-limit key of an address: its IPv6 prefix, the IPv4 address, or ``local``."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
