"""llmrouter.listen: the router's listen strings (``ssl:`` under our policy, systemd sockets)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from llmrouter.listen import ListenError, server_endpoint
from llmrouter.ops import pki


class PublicEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rlisten-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        pki.create_ca(self.dir)
        pki.issue(self.dir, "server", "public", ["localhost"])
        self.key, self.cert = self.dir / "public.key", self.dir / "public.crt"

    def test_plain_strings_unchanged(self) -> None:
        endpoint = server_endpoint(MemoryReactor(), "tcp:8080:interface=127.0.0.1")
        self.assertIsInstance(endpoint, TCP4ServerEndpoint)

    def test_ssl_gets_our_policy(self) -> None:
        endpoint = server_endpoint(
            MemoryReactor(),
            f"ssl:8443:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
        )
        assert isinstance(endpoint, SSL4ServerEndpoint)
        self.assertEqual((endpoint._port, endpoint._interface), (8443, "127.0.0.1"))
        context = endpoint._sslContextFactory.getContext()
        connection = SSL.Connection(context, None)
        ciphers = connection.get_cipher_list()
        self.assertTrue(ciphers)
        for name in ciphers:
            if name.startswith("TLS_"):
                continue  # TLS 1.3 suites: all AEAD
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)

    def test_http2_is_never_offered(self) -> None:
        """With ``h2`` installed the listener offered HTTP/2 by ALPN, but the site speaks only
        HTTP/1.1, so HTTP/2 clients broke (issue 8). Here ``h2`` looks installed to both."""
        import importlib.machinery
        import sys
        import types

        from twisted.web import http
        from twisted.web.resource import Resource

        from llmrouter.listen import alpn_protocols
        from llmrouter.router.app import RouterSite

        fake = types.ModuleType("h2")
        fake.__spec__ = importlib.machinery.ModuleSpec("h2", None)
        self.patch(sys, "modules", {**sys.modules, "h2": fake})
        self.patch(http, "H2_ENABLED", True)
        self.assertEqual(alpn_protocols(), [b"http/1.1"])
        self.assertEqual(RouterSite(Resource(), 1024).acceptableProtocols(), [b"http/1.1"])

    def test_missing_file_is_a_clear_error(self) -> None:
        missing = self.dir / "nope.key"
        with self.assertRaises(ListenError) as caught:
            server_endpoint(MemoryReactor(), f"ssl:8443:privateKey={missing}:certKey={self.cert}")
        self.assertIn("nope.key", str(caught.exception))

    def test_sslmethod_refused(self) -> None:
        with self.assertRaises(ListenError):
            server_endpoint(
                MemoryReactor(),
                f"ssl:8443:privateKey={self.key}:certKey={self.cert}:sslmethod=TLSv1_METHOD",
            )

    def test_unknown_type(self) -> None:
        with self.assertRaises(ListenError):
            server_endpoint(MemoryReactor(), "bogus:1")


class SocketActivationTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_systemd_unix_socket_left_as_systemd_made_it(self) -> Any:
        """The router behind a socket unit: served, and the file neither chmodded nor removed."""
        from tests.daemons import Daemon, activation_socket

        short = Path(tempfile.mkdtemp(prefix="rsa-"))
        self.addCleanup(shutil.rmtree, short, True)
        path = short / "router.sock"
        listener = activation_socket(self, path)  # SocketMode=0660
        router = Daemon(
            "llmrouter",
            [
                *("--listen", "systemd:domain=UNIX:index=0"),
                *("--metrics-listen", f"unix:{short}/m.sock"),
                *("--keys-dir", str(short / "keys"), "--inference", f"unix:{short}/none.sock"),
            ],
            health=f"unix:{path}",
            health_path="/api/pubkey",
            directory=short,
            listen_fds=[listener.fileno()],
        )
        self.addCleanup(router.stop)
        yield router.start()
        self.assertEqual(path.stat().st_mode & 0o777, 0o660)
        yield router.stop()
        self.assertTrue(path.is_socket())
        self.assertEqual(path.stat().st_mode & 0o777, 0o660)
