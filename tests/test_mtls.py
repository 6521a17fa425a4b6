"""Mutual TLS between router and inference with certificates from llmrouter-pki.

A real ``twistd inference`` listens on ``ssl:`` with a server certificate from a private CA made
by llmrouter.ops.pki. The good path is a real ``twistd llmrouter`` using it as an ``https://``
backend (its readiness needs a successful health probe over mutual TLS) and the router's own TLS
client code fetching through it. The bad cases are all refused:

- server side (the inference daemon): no client certificate, a client certificate from another
  CA, an expired client certificate, a client that offers only TLS 1.2;
- client side (the router's TLS client, llmrouter.httpclient): a server certificate from another
  CA, an expired server certificate, a certificate for another name, a server that speaks only
  TLS 1.2.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, threads
from twisted.internet import ssl as tssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.ops import pki

TLS_FAILURES = (ResponseNeverReceived, RequestTransmissionFailed, SSL.Error)


def tls_error_text(exc: BaseException) -> str:
    """The TLS/identity errors inside an Agent failure, as text (empty if there are none)."""
    reasons = getattr(exc, "reasons", None)
    if reasons is None:
        return repr(exc) if isinstance(exc, SSL.Error) else ""
    found = [repr(r.value) for r in reasons if r.check(SSL.Error, VerificationError)]
    return " ".join(found)


PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PKIFixture:
    """Two CAs made with llmrouter.ops.pki and the certificates the cases need."""

    def __init__(self, directory: Path) -> None:
        self.good = directory / "good"
        self.other = directory / "other"
        pki.create_ca(self.good)
        pki.create_ca(self.other)
        pki.issue(self.good, "server", "inference-1", ["localhost"], ["127.0.0.1"])
        pki.issue(self.good, "client", "router")
        pki.issue(self.other, "client", "router")
        pki.issue(self.other, "server", "inference-1", ["localhost"], ["127.0.0.1"])
        # issued ten days ago for seven days: expired three days ago
        pki.issue(self.good, "client", "router-expired", now=PAST)
        pki.issue(self.good, "server", "inference-expired", ["localhost"], now=PAST)
        pki.issue(self.good, "server", "inference-2", ["inference-2.wg"])

    def files(self, ca_dir: Path, name: str) -> tuple[Path, Path]:
        return ca_dir / f"{name}.crt", ca_dir / f"{name}.key"


def _stdlib_request(
    port: int,
    ca: Path,
    cert: tuple[Path, Path] | None,
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> tuple[str, bytes]:
    """One HTTP/1.1 GET /health over TLS with the standard library (a client independent of
    Twisted). Returns (negotiated version, response bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.maximum_version = max_version
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            return tls.version() or "", data


class InferenceRefusesTests(unittest.TestCase):
    """The real inference daemon's ``ssl:`` listener."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from tests.daemons import start_inference

        tmp = Path(tempfile.mkdtemp(prefix="mtls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        self.pki = PKIFixture(tmp)
        self.port = free_port()
        cert, key = self.pki.files(self.pki.good, "inference-1")
        self.daemon = yield start_inference(
            self,
            listen=[f"ssl:{self.port}:interface=127.0.0.1"],
            extra_args=[
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--tls-ca",
                str(self.pki.good / "ca.crt"),
            ],
        )

    def attempt(
        self,
        cert: tuple[Path, Path] | None,
        max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    ) -> defer.Deferred[tuple[str, bytes]]:
        return threads.deferToThread(
            _stdlib_request, self.port, self.pki.good / "ca.crt", cert, max_version
        )

    @defer.inlineCallbacks
    def assert_refused(
        self, cert: tuple[Path, Path] | None, max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ) -> Any:
        try:
            _, data = yield self.attempt(cert, max_version)
        except (ssl.SSLError, ConnectionError, OSError):
            return
        # TLS 1.3 reports a rejected client certificate after the client's handshake is done:
        # then no HTTP response must have come back
        self.assertNotIn(b"HTTP/1.1", data)

    @defer.inlineCallbacks
    def test_good_client(self) -> Any:
        version, data = yield self.attempt(self.pki.files(self.pki.good, "router"))
        self.assertEqual(version, "TLSv1.3")
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:100])

    def test_no_client_certificate(self) -> defer.Deferred[None]:
        return self.assert_refused(None)

    def test_client_certificate_from_another_ca(self) -> defer.Deferred[None]:
        return self.assert_refused(self.pki.files(self.pki.other, "router"))

    def test_expired_client_certificate(self) -> defer.Deferred[None]:
        return self.assert_refused(self.pki.files(self.pki.good, "router-expired"))

    def test_tls12_offered(self) -> defer.Deferred[None]:
        return self.assert_refused(
            self.pki.files(self.pki.good, "router"), max_version=ssl.TLSVersion.TLSv1_2
        )

    @defer.inlineCallbacks
    def test_router_client_code(self) -> Any:
        """The router's own TLS client (pinned CA, client certificate, service-identity)."""
        cert, key = self.pki.files(self.pki.good, "router")
        tls = ClientTLS(ca=self.pki.good / "ca.crt", cert=cert, key=key)
        agent, base = agent_for(reactor, f"https://localhost:{self.port}", tls)
        response = yield agent.request(b"GET", f"{base}/health".encode(), Headers())
        yield readBody(response)
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_router_client_refuses_wrong_server_name(self) -> Any:
        """The server certificate names localhost/127.0.0.1; expecting inference-2.wg fails."""
        cert, key = self.pki.files(self.pki.good, "router")
        tls = ClientTLS(
            ca=self.pki.good / "ca.crt", cert=cert, key=key, server_name="inference-2.wg"
        )
        agent, base = agent_for(reactor, f"https://localhost:{self.port}", tls)
        with self.assertRaises(TLS_FAILURES) as caught:
            yield agent.request(b"GET", f"{base}/health".encode(), Headers())
        self.assertIn("inference-2.wg", tls_error_text(caught.exception))

    @defer.inlineCallbacks
    def test_router_client_refuses_server_from_another_ca(self) -> Any:
        cert, key = self.pki.files(self.pki.good, "router")
        tls = ClientTLS(ca=self.pki.other / "ca.crt", cert=cert, key=key)
        agent, base = agent_for(reactor, f"https://localhost:{self.port}", tls)
        with self.assertRaises(TLS_FAILURES) as caught:
            yield agent.request(b"GET", f"{base}/health".encode(), Headers())
        self.assertIn("certificate verify failed", tls_error_text(caught.exception))


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"


class RouterClientRefusesServersTests(unittest.TestCase):
    """Servers the router must refuse: expired certificate, TLS 1.2 only. These run an
    in-process Twisted TLS server so that the server side can be misconfigured on purpose."""

    timeout = 60

    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="mtls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        self.pki = PKIFixture(tmp)

    @defer.inlineCallbacks
    def serve(self, name: str, max_tls12: bool = False) -> Any:
        cert, key = self.pki.files(self.pki.good, name)
        private = tssl.PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())
        extra: dict[str, Any] = {}
        if max_tls12:
            extra["lowerMaximumSecurityTo"] = tssl.TLSVersion.TLSv1_2
        options = tssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            **extra,
        )
        port = yield SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            server.Site(Hello())
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def fetch(self, port: int) -> Any:
        cert, key = self.pki.files(self.pki.good, "router")
        tls = ClientTLS(ca=self.pki.good / "ca.crt", cert=cert, key=key)
        agent, base = agent_for(reactor, f"https://localhost:{port}", tls)
        response = yield agent.request(b"GET", f"{base}/".encode(), Headers())
        body = yield readBody(response)
        return body

    @defer.inlineCallbacks
    def test_control_good_server(self) -> Any:
        port = yield self.serve("inference-1")
        body = yield self.fetch(port)
        self.assertEqual(body, b"hello")

    @defer.inlineCallbacks
    def test_expired_server_certificate(self) -> Any:
        port = yield self.serve("inference-expired")
        with self.assertRaises(TLS_FAILURES) as caught:
            yield self.fetch(port)
        self.assertIn("certificate verify failed", tls_error_text(caught.exception))

    @defer.inlineCallbacks
    def test_tls12_only_server(self) -> Any:
        port = yield self.serve("inference-1", max_tls12=True)
        with self.assertRaises(TLS_FAILURES) as caught:
            yield self.fetch(port)
        self.assertIn("version", tls_error_text(caught.exception))


class RouterOverMutualTLSTests(unittest.TestCase):
    """The good path end to end: the real router uses the real inference daemon as an
    ``https://`` backend; /health turns 200 only after a health probe over mutual TLS
    succeeded, and the backend is reported healthy in the router's metrics."""

    timeout = 240

    @defer.inlineCallbacks
    def test_router_reaches_inference_over_mtls(self) -> Any:
        from tests.daemons import start_inference, start_router_daemon

        tmp = Path(tempfile.mkdtemp(prefix="mtls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        fixture = PKIFixture(tmp)
        port = free_port()
        cert, key = fixture.files(fixture.good, "inference-1")
        ca = fixture.good / "ca.crt"
        yield start_inference(
            self,
            listen=[f"ssl:{port}:interface=127.0.0.1"],
            extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)],
        )
        rcert, rkey = fixture.files(fixture.good, "router")
        (tmp / "router").mkdir()
        router = start_router_daemon(
            self,
            tmp / "router",
            [f"https://localhost:{port}"],
            ["--tls-ca", str(ca), "--tls-client-cert", str(rcert), "--tls-client-key", str(rkey)],
        )
        yield router.start()
        metrics = f"unix:{tmp / 'router' / 'metrics.sock'}"
        status, _, body = yield router.request(b"GET", "/metrics", base=metrics)
        self.assertEqual(status, 200)
        self.assertIn(b'llmrouter_backend_healthy{backend="backend-0"} 1.0', body)


def _handshake(
    port: int,
    ca: Path,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion],
    alpn: list[str] | None = None,
    ciphers: str | None = None,
) -> tuple[str, str, str | None]:
    """Handshake only: (version, cipher, ALPN protocol)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.minimum_version, context.maximum_version = versions
    if ciphers:
        context.set_ciphers(ciphers)
    elif versions[1] < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client really offers it
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            cipher = tls.cipher()
            return tls.version() or "", cipher[0] if cipher else "", tls.selected_alpn_protocol()


class RouterTerminatesTLSTests(unittest.TestCase):
    """The alternative to Caddy (docs/tls.md): ``twistd llmrouter --listen ssl:...`` with a
    certificate (here from llmrouter-pki; in production from ACME). TLS 1.3 is preferred,
    TLS 1.2 still accepted with forward-secret ECDHE and AEAD ciphers only (CBC suites refused),
    anything older refused; HTTP/2 is never offered through ALPN: the router's site speaks
    HTTP/1.1 only (Caddy in front serves HTTP/2 and HTTP/3)."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from tests.daemons import Daemon

        tmp = Path(tempfile.mkdtemp(prefix="rtls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        pki.create_ca(tmp / "pki")
        pki.issue(tmp / "pki", "server", "public", ["localhost"])
        self.ca = tmp / "pki" / "ca.crt"
        self.port = free_port()
        key, cert = tmp / "pki" / "public.key", tmp / "pki" / "public.crt"
        router = Daemon(
            "llmrouter",
            [
                "--listen",
                f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                "--metrics-listen",
                f"unix:{tmp}/m.sock",
                "--keys-dir",
                str(tmp / "keys"),
                "--inference",
                f"unix:{tmp}/none.sock",
            ],
            directory=tmp,
            # the metrics listener answering means start-up (ssl: listener included) is done
            health=f"unix:{tmp}/m.sock",
            health_path="/metrics",
        )
        self.addCleanup(router.stop)
        yield router.start()
        agent, base = agent_for(
            reactor, f"https://localhost:{self.port}", ClientTLS(ca=self.ca, tls13_only=False)
        )
        response = yield agent.request(b"GET", f"{base}/api/pubkey".encode(), Headers())
        yield readBody(response)
        self.assertEqual(response.code, 200)

    def handshake(
        self,
        low: ssl.TLSVersion,
        high: ssl.TLSVersion,
        alpn: list[str] | None = None,
        ciphers: str | None = None,
    ) -> defer.Deferred[tuple[str, str, str | None]]:
        return threads.deferToThread(_handshake, self.port, self.ca, (low, high), alpn, ciphers)

    @defer.inlineCallbacks
    def test_versions_ciphers_alpn(self) -> Any:
        version, cipher, alpn = yield self.handshake(
            ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, ["h2", "http/1.1"]
        )
        self.assertEqual((version, alpn), ("TLSv1.3", "http/1.1"))
        version, cipher, alpn = yield self.handshake(
            ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, ["http/1.1"]
        )
        self.assertEqual((version, alpn), ("TLSv1.2", "http/1.1"))
        self.assertTrue(cipher.startswith("ECDHE-"), cipher)
        self.assertTrue("GCM" in cipher or "CHACHA20" in cipher, cipher)
        # a TLS 1.2 client offering only CBC suites (which OpenSSL's defaults still accept)
        cbc = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256"
        with self.assertRaises(ssl.SSLError) as caught:
            yield self.handshake(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, None, cbc)
        self.assertIn("ALERT", str(caught.exception).upper())
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with self.assertRaises(ssl.SSLError) as caught:
                yield self.handshake(old, old)
            # the server's alert, not this client declining to send the hello
            self.assertIn("ALERT", str(caught.exception).upper())


class CertificateReloadTests(unittest.TestCase):
    """A renewal reloads the daemons (SIGHUP, the units' ``ExecReload=``) instead of restarting
    them: the node serves its new certificate and trusts the new CA, the router presents its new
    client certificate on every new connection and exports the new expiry. The files are
    replaced by ones from another CA, so nothing loaded before the SIGHUP can pass."""

    timeout = 300

    @defer.inlineCallbacks
    def test_sighup_reloads_certificates(self) -> Any:
        from tests.daemons import start_inference, start_router_daemon

        tmp = Path(tempfile.mkdtemp(prefix="mtls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        fixture = PKIFixture(tmp)
        node, router_files = tmp / "node", tmp / "router-pki"

        def install(ca_dir: Path) -> None:
            for directory, names in ((node, ("inference-1",)), (router_files, ("router",))):
                directory.mkdir(exist_ok=True)
                shutil.copy(ca_dir / "ca.crt", directory / "ca.crt")
                for name in names:
                    for suffix in ("crt", "key"):
                        shutil.copy(ca_dir / f"{name}.{suffix}", directory / f"{name}.{suffix}")

        install(fixture.good)
        # the renewed router certificate expires an hour before a fresh one: a distinct gauge
        pki.issue(fixture.other, "client", "router", now=_utcnow() - datetime.timedelta(hours=1))
        port = free_port()
        node_args = ["--tls-cert", str(node / "inference-1.crt"), "--tls-key"]
        node_args += [str(node / "inference-1.key"), "--tls-ca", str(node / "ca.crt")]
        listen = [f"ssl:{port}:interface=127.0.0.1"]
        inference = yield start_inference(self, listen=listen, extra_args=node_args)
        (tmp / "router").mkdir()
        router = start_router_daemon(
            self,
            tmp / "router",
            [f"https://localhost:{port}"],
            [
                *("--tls-ca", str(router_files / "ca.crt")),
                *("--tls-client-cert", str(router_files / "router.crt")),
                *("--tls-client-key", str(router_files / "router.key")),
            ],
        )
        yield router.start()
        metrics = f"unix:{tmp / 'router' / 'metrics.sock'}"
        yield self.wait_healthy(router, metrics)

        install(fixture.other)  # what the renewal (or the copy from the CA host) does
        inference.signal("HUP")
        router.signal("HUP")
        client = (router_files / "router.crt", router_files / "router.key")
        served = yield self.eventually(
            lambda: threads.deferToThread(_served_serial, port, node / "ca.crt", client)
        )
        self.assertEqual(served, _serial(fixture.other / "inference-1.crt"))
        expected = _not_after(router_files / "router.crt")
        yield self.eventually(lambda: self.gauge(router, metrics, expected))
        _, _, body = yield inference.request(b"GET", "/metrics")
        gauge = "inference_server_certificate_expiry_timestamp_seconds"
        self.assertEqual(_sample(body, gauge), _not_after(node / "inference-1.crt"))
        # A new node process (new connections, the new CA only): the router reaches it only
        # with the client certificate it reloaded.
        yield inference.stop()
        yield start_inference(self, listen=listen, extra_args=node_args)
        yield self.wait_healthy(router, metrics)
        self.assertIn("client certificate re-read", router.log_text())

    @defer.inlineCallbacks
    def eventually(self, attempt: Any, seconds: float = 30) -> Any:
        deadline = reactor.seconds() + seconds
        while True:
            try:
                result = yield attempt()
                return result
            except Exception:
                if reactor.seconds() > deadline:
                    raise
            yield deferLater(reactor, 0.3, lambda: None)

    @defer.inlineCallbacks
    def gauge(self, router: Any, metrics: str, expected: float) -> Any:
        _, _, body = yield router.request(b"GET", "/metrics", base=metrics)
        gauge = "llmrouter_client_certificate_expiry_timestamp_seconds"
        self.assertEqual(_sample(body, gauge), expected)

    def wait_healthy(self, router: Any, metrics: str) -> Any:
        @defer.inlineCallbacks
        def healthy() -> Any:
            _, _, body = yield router.request(b"GET", "/metrics", base=metrics)
            self.assertIn(b'llmrouter_backend_healthy{backend="backend-0"} 1.0', body)

        return self.eventually(healthy, 60)


def _sample(metrics: bytes, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name}")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial(path: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _not_after(path: Path) -> float:
    from llmrouter.listen import certificate_expiry

    return certificate_expiry(path)


def _served_serial(port: int, ca: Path, cert: tuple[Path, Path]) -> int:
    """The serial of the certificate the server presents, in a full mutual-TLS handshake."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if not tls.recv(64).startswith(b"HTTP/1.1 200"):  # TLS 1.3: client auth ends here
                raise AssertionError("no answer")
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
