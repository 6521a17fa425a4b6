"""Listening policy: mutual TLS 1.3 with generated certificates, loopback-only plain TCP."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived, readBody
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from inference.listen import ListenError, is_loopback, server_endpoint
from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.listen import split_description
from tests.certs import PKI, make_pki
from tests.daemons import Daemon, activation_socket, start_inference
from tests.tinymodel import tiny_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, creator: IOpenSSLClientConnectionCreator):
        self.creator = creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self.creator


@defer.inlineCallbacks
def get(url: str, tls: ClientTLS | None = None, agent: Any = None) -> Any:
    if agent is None:
        agent, base = agent_for(reactor, url, tls=tls)
    else:
        base = url
    response = yield agent.request(b"GET", (base + "/health").encode())
    body = yield readBody(response)
    return response.code, body


class MutualTLSTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a Deferred setUp
        self.pki: PKI = make_pki(Path(self.mktemp()).absolute())
        self.port = free_port()
        self.url = f"https://localhost:{self.port}"
        self.daemon = yield start_inference(
            self,
            listen=[f"ssl:{self.port}:interface=127.0.0.1"],
            extra_args=[
                "--tls-cert",
                str(self.pki.server.cert),
                "--tls-key",
                str(self.pki.server.key),
                "--tls-ca",
                str(self.pki.ca),
            ],
        )

    @defer.inlineCallbacks
    def refused(self, url: str | None = None, **kwargs: Any) -> Any:
        """The request fails in the TLS handshake (an OpenSSL error), never with a response."""
        try:
            result = yield get(url or self.url, **kwargs)
        except ResponseNeverReceived as e:
            reasons = [r.value for r in e.reasons]
            self.assertTrue(
                any(isinstance(r, SSL.Error) or "VerificationError" in repr(r) for r in reasons),
                reasons,
            )
            return e
        self.fail(f"request got through: {result}")

    @defer.inlineCallbacks
    def test_good_client_certificate(self) -> Any:
        tls = ClientTLS(ca=self.pki.ca, cert=self.pki.client.cert, key=self.pki.client.key)
        status, body = yield get(self.url, tls)
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        agent, base = agent_for(reactor, self.url, tls=tls)
        response = yield agent.request(
            b"POST",
            (base + "/v1/chat/completions").encode(),
            None,
            _body(b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'),
        )
        data = yield readBody(response)
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 4)

    @defer.inlineCallbacks
    def test_no_client_certificate(self) -> Any:
        yield self.refused(tls=ClientTLS(ca=self.pki.ca))

    @defer.inlineCallbacks
    def test_certificate_from_another_ca(self) -> Any:
        other = self.pki.other_client
        yield self.refused(tls=ClientTLS(ca=self.pki.ca, cert=other.cert, key=other.key))

    @defer.inlineCallbacks
    def test_expired_client_certificate(self) -> Any:
        expired = self.pki.expired_client
        yield self.refused(tls=ClientTLS(ca=self.pki.ca, cert=expired.cert, key=expired.key))

    @defer.inlineCallbacks
    def test_tls12_client_refused(self) -> Any:
        client = ssl.PrivateCertificate.loadPEM(
            self.pki.client.cert.read_bytes() + self.pki.client.key.read_bytes()
        )
        creator = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(self.pki.ca.read_bytes()),
            clientCertificate=client,
            extraCertificateOptions={"lowerMaximumSecurityTo": ssl.TLSVersion.TLSv1_2},
        )
        # Same client, TLS 1.3 allowed: accepted, so the refusal below is about the version.
        good = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(self.pki.ca.read_bytes()),
            clientCertificate=client,
        )
        status, _ = yield get(self.url, agent=Agent(reactor, _Policy(good)))
        self.assertEqual(status, 200)
        yield self.refused(agent=Agent(reactor, _Policy(creator)))

    @defer.inlineCallbacks
    def test_client_refuses_wrong_server_name(self) -> Any:
        """The other direction, which the router relies on: a server cert for another name."""
        port = free_port()
        wrong = self.pki.wrong_name_server
        yield start_inference(
            self,
            listen=[f"ssl:{port}:interface=127.0.0.1"],
            extra_args=[
                *("--tls-cert", str(wrong.cert), "--tls-key", str(wrong.key)),
                *("--tls-ca", str(self.pki.ca)),
            ],
        )
        tls = ClientTLS(ca=self.pki.ca, cert=self.pki.client.cert, key=self.pki.client.key)
        error = yield self.refused(tls=tls, url=f"https://localhost:{port}")
        self.assertIn("VerificationError", repr(error))


def _body(data: bytes) -> Any:
    return FileBodyProducer(BytesIO(data))


class StartupRefusalTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def refused_at_startup(self, listen: str, message: str) -> Any:
        daemon = yield start_inference(self, listen=[listen], wait=False)
        code = yield daemon.wait_exit()
        self.assertNotEqual(code, 0)
        self.assertIn(message, daemon.log_text())
        self.assertNotIn("Traceback", daemon.log_text())

    def test_tcp_on_all_interfaces(self) -> Any:
        return self.refused_at_startup(
            f"tcp:{free_port()}:interface=0.0.0.0", "only allowed on a loopback interface"
        )

    def test_tcp_without_interface(self) -> Any:
        return self.refused_at_startup(f"tcp:{free_port()}", "only allowed on a loopback interface")

    def test_ssl_without_tls_files(self) -> Any:
        return self.refused_at_startup(
            f"ssl:{free_port()}", "needs --tls-cert, --tls-key and --tls-ca"
        )

    def test_systemd_without_socket(self) -> Any:
        return self.refused_at_startup("systemd:domain=UNIX:index=0", "systemd:domain=UNIX")

    def test_unknown_endpoint_type(self) -> Any:
        return self.refused_at_startup("udp:53", "unsupported endpoint type")

    @defer.inlineCallbacks
    def test_tcp_on_loopback(self) -> Any:
        port = free_port()
        yield start_inference(self, listen=[f"tcp:{port}:interface=127.0.0.1"])
        status, body = yield get(f"http://127.0.0.1:{port}")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))

    @defer.inlineCallbacks
    def test_env_fallback_and_unix_mode(self) -> Any:
        """INFERENCE_LISTEN is used when --listen is absent; mode= sets the socket's mode."""
        short = Path(tempfile.mkdtemp(prefix="llmr-"))
        sock = short / "env.sock"
        daemon = Daemon(
            "inference",
            ["--threads", "1"],
            health=f"unix:{sock}",
            env={
                "INFERENCE_LISTEN": f"unix:{sock}:mode=600",
                "INFERENCE_MODEL": str(tiny_model_path()),
            },
            directory=short,
        )
        self.addCleanup(daemon.stop)
        self.addCleanup(shutil.rmtree, short, True)
        yield daemon.start()
        self.assertEqual(sock.stat().st_mode & 0o777, 0o600)
        status, _, data = yield daemon.request(b"GET", "/v1/models")
        self.assertEqual((status, json.loads(data)["data"][0]["id"]), (200, "tiny"))


class SocketActivationTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_systemd_socket(self) -> Any:
        """``systemd:domain=UNIX:index=0`` serves on a socket passed in by the service manager."""
        short = Path(tempfile.mkdtemp(prefix="llmr-"))
        self.addCleanup(shutil.rmtree, short, True)
        path = short / "activated.sock"
        listener = activation_socket(self, path)  # SocketMode=0660
        daemon = Daemon(
            "inference",
            [
                *("--listen", "systemd:domain=UNIX:index=0", "--threads", "1"),
                *("--model", str(tiny_model_path())),
            ],
            health=f"unix:{path}",
            directory=short,
            listen_fds=[listener.fileno()],
        )
        self.addCleanup(daemon.stop)
        yield daemon.start()
        self.assertEqual(path.stat().st_mode & 0o777, 0o660)
        status, _, data = yield daemon.request(
            b"POST",
            "/v1/completions",
            json.dumps({"prompt": "hi", "max_tokens": 3}).encode(),
        )
        self.assertEqual((status, json.loads(data)["usage"]["completion_tokens"]), (200, 3))
        yield daemon.stop()
        # the file is the service manager's: neither widened to 0666 nor removed at stop
        self.assertTrue(path.is_socket())
        self.assertEqual(path.stat().st_mode & 0o777, 0o660)


class ParsingTests(unittest.TestCase):
    def test_loopback(self) -> None:
        for name in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
            self.assertTrue(is_loopback(name), name)
        for name in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
            self.assertFalse(is_loopback(name), name)

    def test_split(self) -> None:
        self.assertEqual(
            split_description(r"tcp:8080:interface=\:\:1"),
            (["tcp", "8080"], {"interface": "::1"}),
        )

    def test_refusals(self) -> None:
        for description in ("tcp:80:interface=192.168.1.1", "tcp6:80:interface=::", "ssl:443"):
            with self.assertRaises(ListenError):
                server_endpoint(reactor, description)
