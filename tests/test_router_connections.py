"""Connection bounds: slow requests, connections per address, total connections (issue 8).

Twisted's HTTP channel times out only a connection that sends nothing (twelve hours by default),
so a client trickling its headers kept connections, and file descriptors, for ever. In-process
router on a real loopback port; its timers run on a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from llmrouter.router.connections import IDLE_KEEPALIVE_SECONDS
from tests.router_support import Script, http, start_fault_backend, start_router


class _Peer(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if not self.closed:
            self.closed = True
            self.lost.callback(None)


def settle() -> defer.Deferred[None]:
    return deferLater(reactor, 0.05, lambda: None)


class ConnectionTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def router(self, **changes: Any) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=2))
        running = yield start_router(self, [url], **changes)
        return running

    @defer.inlineCallbacks
    def connect(self, running: Any) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", running.port.getHost().port)
        peer = yield connectProtocol(endpoint, _Peer())
        self.addCleanup(lambda: peer.lost)  # cleanups run last first: this waits for the abort
        self.addCleanup(lambda: None if peer.closed else peer.transport.abortConnection())
        yield settle()
        return peer

    def dropped(self, running: Any, reason: str) -> float:
        text = running.router.metrics.render().decode()
        line = f'llmrouter_connections_dropped_total{{reason="{reason}"}} '
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    @defer.inlineCallbacks
    def test_a_trickled_request_is_cut_off(self) -> Any:
        running = yield self.router(request_read_seconds=15)
        clock = running.router.clock
        peer = yield self.connect(running)
        peer.transport.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
        for _ in range(14):  # a header byte every second: Twisted's idle timeout never fires
            clock.advance(1)
            peer.transport.write(b"X")
            yield settle()
        self.assertFalse(peer.closed)
        clock.advance(1)
        yield peer.lost
        self.assertEqual(self.dropped(running, "read_timeout"), 1)
        status, _, _ = yield http(running.url, path="/health/live")  # others are served
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_connections_per_address(self) -> Any:
        running = yield self.router(max_connections_per_address=2)
        first = yield self.connect(running)
        second = yield self.connect(running)
        third = yield self.connect(running)
        yield third.lost
        self.assertFalse(first.closed or second.closed)
        self.assertEqual(self.dropped(running, "per_address"), 1)

    @defer.inlineCallbacks
    def test_a_trusted_proxy_has_no_per_address_limit(self) -> Any:
        running = yield self.router(max_connections_per_address=1, trusted_proxies=("127.0.0.1",))
        peers = []
        for _ in range(3):
            peer = yield self.connect(running)
            peers.append(peer)
        self.assertFalse(any(peer.closed for peer in peers))

    @defer.inlineCallbacks
    def test_full_router_sheds_the_longest_waiting_connection(self) -> Any:
        running = yield self.router(max_connections=2, trusted_proxies=("127.0.0.1",))
        first = yield self.connect(running)
        second = yield self.connect(running)
        status, _, _ = yield http(running.url, path="/health/live")  # a third: served
        self.assertEqual(status, 200)
        yield first.lost  # the oldest idle one made room
        self.assertFalse(second.closed)
        self.assertEqual(self.dropped(running, "shed"), 1)

    @defer.inlineCallbacks
    def ask(self, peer: _Peer, answers: int = 1) -> Any:
        """``GET /health/live`` on ``peer``; waits for the ``answers``-th answer or the close."""
        peer.transport.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):
            if peer.closed or peer.data.count(b'{"status": "ok"}') == answers:
                break
            yield settle()

    @defer.inlineCallbacks
    def kept_alive(self, running: Any) -> Any:
        """A connection that sent one ``GET /health/live``, read its answer and stays open."""
        peer = yield self.connect(running)
        yield self.ask(peer)
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 200 "))
        self.assertFalse(peer.closed)
        return peer

    @defer.inlineCallbacks
    def test_idle_keep_alive_connections_are_shed(self) -> Any:
        """Connections that finished a request and idle were neither waiting nor streaming, so
        nothing could shed them: 16 of them filled a 16-connection router for everyone
        (issue 19). An idle connection is sheddable once its response ends."""
        running = yield self.router(max_connections=16, trusted_proxies=("127.0.0.1",))
        idle = []
        for _ in range(16):
            peer = yield self.kept_alive(running)
            idle.append(peer)
        newcomer = yield self.connect(running)
        yield self.ask(newcomer)  # a 17th: served
        self.assertTrue(newcomer.data.startswith(b"HTTP/1.1 200 "), self.dropped(running, "full"))
        yield idle[0].lost  # the one idle longest made room
        self.assertFalse(any(peer.closed for peer in idle[1:]))
        self.assertEqual(self.dropped(running, "shed"), 1)
        self.assertEqual(self.dropped(running, "full"), 0)

    @defer.inlineCallbacks
    def test_idle_keep_alive_connections_time_out(self) -> Any:
        running = yield self.router()
        clock = running.router.clock
        peer = yield self.kept_alive(running)
        clock.advance(IDLE_KEEPALIVE_SECONDS - 1)
        yield settle()
        self.assertFalse(peer.closed)
        yield self.ask(peer, answers=2)  # a second request on it
        self.assertEqual(peer.data.count(b"HTTP/1.1 200 "), 2)
        clock.advance(IDLE_KEEPALIVE_SECONDS - 1)  # counted from the end of the second answer
        yield settle()
        self.assertFalse(peer.closed)
        clock.advance(1)
        yield peer.lost
        self.assertEqual(self.dropped(running, "idle"), 1)

    @defer.inlineCallbacks
    def test_a_trusted_proxy_keeps_its_idle_connections_longer(self) -> Any:
        """A reverse proxy reuses its idle connections: one closed at 5 s, just as it sent a
        POST on it, would fail that request. Shed when full, like any other, but not timed out."""
        running = yield self.router(trusted_proxies=("127.0.0.1",))
        peer = yield self.kept_alive(running)
        running.router.clock.advance(IDLE_KEEPALIVE_SECONDS + 1)
        yield settle()
        self.assertFalse(peer.closed)
        yield self.ask(peer, answers=2)
        self.assertEqual(peer.data.count(b"HTTP/1.1 200 "), 2)
