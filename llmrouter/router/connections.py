"""Client connections: how long a request may take to arrive, and how many connections stay open.

Why: each open connection costs a file descriptor and memory, and Twisted's HTTP channel only
times out a connection that sends nothing (a byte now and then resets it). So a slowloris
client, trickling its headers, could keep connections open until the router ran out of file
descriptors and refused everyone. Three bounds, none of which turns into a lockout of others:

* a request (headers and body) must arrive within ``read_seconds`` of its first byte (or of the
  connection opening), else the connection is closed (``read_timeout``);
* one address bucket (an IPv4 address, an IPv6 prefix) holds at most ``max_per_address``
  connections; trusted proxies (and UNIX-socket peers) are exempt: they carry everyone;
* when ``max_connections`` are open, the connection that has waited longest for its request is
  closed to make room (``shed``): a connection that is streaming a response is never shed, and
  only when every connection is streaming is a new one refused (``full``).

A kept-alive connection whose response ended waits for its next request like a new one: it can be
shed at once, and it is closed after :data:`IDLE_KEEPALIVE_SECONDS` (``idle``). Before, it was
neither waiting nor streaming, so a few dozen addresses that each sent one request and idled
filled the router for everyone. A trusted proxy's connections (and UNIX-socket peers) are shed
like any other when the router is full, but not closed after those seconds: a reverse proxy
reuses its idle connections, and one closed just as it sends a POST would fail that request
(Twisted's one-minute idle timeout still applies to them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport

from llmrouter.router.metrics import RouterMetrics

__all__ = ["IDLE_KEEPALIVE_SECONDS", "ConnectionGuard"]

IDLE_KEEPALIVE_SECONDS = 5.0
IDLE_EXEMPT_SECONDS = 60.0  # a trusted proxy's: as Twisted's idle timeout (router.app.IDLE_SECONDS)


class ConnectionGuard:
    """Driven by the HTTP channel: ``opened``, ``reading``, ``dispatched``, ``idle``,
    ``closed``."""

    def __init__(
        self,
        clock: IReactorTime,
        metrics: RouterMetrics,
        read_seconds: float,
        max_connections: int,
        max_per_address: int,
        bucket: Callable[[str], str | None],
        idle_seconds: float = IDLE_KEEPALIVE_SECONDS,
    ) -> None:
        """``bucket`` maps a peer address to its per-address key, or None when exempt."""
        self._clock = clock
        self._metrics = metrics
        self._read_seconds = read_seconds
        self._idle_seconds = idle_seconds
        self._max = max_connections
        self._max_per_address = max_per_address
        self._bucket = bucket
        self._open: dict[ITransport, str | None] = {}
        self._per_address: dict[str, int] = {}
        # Connections waiting for (the rest of) a request, oldest first, with their deadline;
        # those among them that are idle between requests (no byte of the next one yet).
        self._waiting: OrderedDict[ITransport, IDelayedCall] = OrderedDict()
        self._idle: set[ITransport] = set()

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, transport: ITransport, address: str) -> bool:
        """A new connection; False (and closed) when there is no room for it."""
        key = self._bucket(address)
        if key is not None and self._per_address.get(key, 0) >= self._max_per_address:
            return self._refuse(transport, "per_address")
        if len(self._open) >= self._max:
            if not self._waiting:
                return self._refuse(transport, "full")
            oldest = next(iter(self._waiting))
            self._drop(oldest, "shed")
        self._open[transport] = key
        if key is not None:
            self._per_address[key] = self._per_address.get(key, 0) + 1
        self._metrics.open_connections.set(len(self._open))
        self.reading(transport)
        return True

    def reading(self, transport: ITransport) -> None:
        """Bytes of a request arrived: it must be complete within the read time."""
        if transport in self._idle:
            self.dispatched(transport)
        if transport in self._waiting or transport not in self._open:
            return
        self._waiting[transport] = self._clock.callLater(
            self._read_seconds, self._drop, transport, "read_timeout"
        )

    def dispatched(self, transport: ITransport) -> None:
        """The whole request arrived; its response may take as long as it needs."""
        self._idle.discard(transport)
        timer = self._waiting.pop(transport, None)
        if timer is not None and timer.active():
            timer.cancel()

    def idle(self, transport: ITransport) -> None:
        """The response ended on a kept-alive connection: it waits for a next request, last in
        the line to be shed, and is closed if none begins within the idle time (a trusted
        proxy's: by Twisted's idle timeout)."""
        if transport not in self._open:
            return
        self.dispatched(transport)
        self._idle.add(transport)
        exempt = self._open[transport] is None
        self._waiting[transport] = self._clock.callLater(
            IDLE_EXEMPT_SECONDS if exempt else self._idle_seconds, self._drop, transport, "idle"
        )

    def closed(self, transport: ITransport) -> None:
        self.dispatched(transport)
        if transport not in self._open:
            return
        key = self._open.pop(transport)
        if key is not None:
            left = self._per_address[key] - 1
            if left:
                self._per_address[key] = left
            else:
                del self._per_address[key]
        self._metrics.open_connections.set(len(self._open))

    def _refuse(self, transport: ITransport, reason: str) -> bool:
        self._metrics.connections_dropped.labels(reason).inc()
        transport.abortConnection()  # type: ignore[attr-defined]
        return False

    def _drop(self, transport: ITransport, reason: str) -> None:
        self._waiting.pop(transport, None)
        self._idle.discard(transport)
        self.closed(transport)
        self._refuse(transport, reason)
