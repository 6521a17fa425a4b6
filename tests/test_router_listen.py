"""llmrouter.listen: the public listen strings, ``ssl:`` served under the router's TLS policy."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import pki
from llmrouter.listen import ListenError, server_endpoint


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
