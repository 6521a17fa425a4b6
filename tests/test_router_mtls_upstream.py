"""https:// upstreams: mutual TLS to a real inference daemon with a pinned CA and name checks.

The inference daemon listens on ``ssl:`` (TLS 1.3, client certificate required); certificates are
generated for the test. The router (in-process, real reactor) must get through with its client
certificate, and must refuse a backend whose certificate is from another CA or for another name.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.certs import make_pki
from tests.daemons import start_inference
from tests.router_support import prompt, short_tempdir, start_router
from tests.test_router_e2e import INFERENCE_ARGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MutualTLSTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def backend(self, server: Any, pki: Any) -> Any:
        port = free_port()
        yield start_inference(
            self,
            listen=[f"ssl:{port}:interface=127.0.0.1"],
            extra_args=[
                *INFERENCE_ARGS,
                "--tls-cert",
                str(server.cert),
                "--tls-key",
                str(server.key),
                "--tls-ca",
                str(pki.ca),
            ],
        )
        return port

    def router_to(self, port: int, client: Any, ca: Path) -> defer.Deferred[Any]:
        """A router whose only backend is ``https://localhost:PORT``, with these TLS files."""
        return start_router(
            self,
            [f"https://localhost:{port}"],
            clock=reactor,
            upstream_tls_cert=client.cert,
            upstream_tls_key=client.key,
            upstream_tls_ca=ca,
        )

    @defer.inlineCallbacks
    def test_chat_over_mutual_tls(self) -> Any:
        pki = make_pki(short_tempdir(self))
        port = yield self.backend(pki.server, pki)
        running = yield self.router_to(port, pki.client, pki.ca)
        self.assertTrue(running.router.pool.ready())
        done = yield defer.Deferred.fromCoroutine(
            running.client().chat(prompt("over TLS", max_tokens=3))
        )
        self.assertEqual(done.completion_tokens, 3)

    @defer.inlineCallbacks
    def test_untrusted_or_misnamed_backend_is_refused(self) -> Any:
        pki = make_pki(short_tempdir(self))
        port = yield self.backend(pki.wrong_name_server, pki)
        wrong_name = yield self.router_to(port, pki.client, pki.ca)
        self.assertFalse(wrong_name.router.pool.ready())
        good_port = yield self.backend(pki.server, pki)
        # a router that does not pin the backend's CA
        other_ca = yield self.router_to(good_port, pki.client, pki.other_ca)
        self.assertFalse(other_ca.router.pool.ready())
        # a client certificate from another CA: the backend refuses the handshake
        no_client_cert = yield self.router_to(good_port, pki.other_client, pki.ca)
        self.assertFalse(no_client_cert.router.pool.ready())
