"""etc/caddy/Caddyfile: validates, needs its site name, uses port 443 only, reloads through its
default admin socket, and a real Caddy in front of a real HTTP upstream streams SSE unbuffered,
enforces the 256 KiB body limit, drops query strings and identifying headers, hides /metrics and
writes no access log; over a UNIX socket to the router, TRUSTED_PROXIES=unix keeps one bucket per
client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

CADDYFILE = Path(__file__).resolve().parent.parent / "etc" / "caddy" / "Caddyfile"
DROP_IN = CADDYFILE.parent / "llmrouter.conf"
SECRET_QUERY = "canary-query-7f3a"


def caddy_binary(testcase: unittest.TestCase) -> str:
    path = shutil.which("caddy")
    if path is None:
        if os.environ.get("CI") == "true":
            testcase.fail("caddy is missing in CI: run etc/dev/ci-deps")
        raise unittest.SkipTest("caddy not installed (etc/dev/ci-deps installs it)")
    return path


def caddy_env(home: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env.update(XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"))
    env.update(extra)
    return env


class StaticTests(unittest.TestCase):
    def setUp(self) -> None:
        self.caddy = caddy_binary(self)
        self.home = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.home)

    def adapt(self, **env: str) -> dict[str, Any]:
        result = subprocess.run(
            [self.caddy, "adapt", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
            capture_output=True,
            text=True,
            env=caddy_env(self.home, LLMROUTER_SITE="llm.example.org", **env),
            check=True,
        )
        self.assertNotIn("not formatted", result.stderr)
        adapted: dict[str, Any] = json.loads(result.stdout)
        return adapted

    def validate(self, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.caddy, "validate", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
            capture_output=True,
            text=True,
            env=caddy_env(self.home, **env),
            check=False,
        )

    def test_validate(self) -> None:
        result = self.validate(LLMROUTER_SITE="llm.example.org")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Valid configuration", result.stdout + result.stderr)

    def test_site_name_is_required(self) -> None:
        """Without LLMROUTER_SITE (a Caddy unit that read no environment file) Caddy refuses
        the file instead of serving a made-up name."""
        result = self.validate()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("server block without any key", result.stderr)

    def test_only_port_443(self) -> None:
        """No port 80: no redirect listener, no HTTP challenge (verify-network stays clean and
        the firewall's closed port 80 breaks nothing)."""
        config = self.adapt()
        http = config["apps"]["http"]
        self.assertEqual([s["listen"] for s in http["servers"].values()], [[":443"]])
        self.assertEqual(http["servers"]["srv0"]["automatic_https"], {"disable_redirects": True})
        (policy,) = config["apps"]["tls"]["automation"]["policies"]
        self.assertEqual(policy["subjects"], ["llm.example.org"])
        self.assertEqual(policy["issuers"][0]["challenges"]["http"], {"disabled": True})
        self.assertNotIn("tls-alpn", policy["issuers"][0]["challenges"])  # 443 stays on

    def test_drop_in(self) -> None:
        """The caddy.service drop-in gives Caddy its site name and its admin socket directory."""
        from tests.test_systemd_sandbox import read_unit

        unit = read_unit(DROP_IN)
        self.assertEqual(unit["Service.EnvironmentFile"], ["/etc/caddy/llmrouter.env"])
        self.assertEqual(unit["Service.RuntimeDirectory"], ["caddy"])
        self.assertIn("unix//run/caddy/admin.sock", CADDYFILE.read_text())

    def test_adapted_settings(self) -> None:
        config = self.adapt()
        server_config = config["apps"]["http"]["servers"]["srv0"]
        self.assertEqual(server_config["listen"], [":443"])  # automatic HTTPS
        self.assertEqual(server_config["protocols"], ["h1", "h2", "h3"])
        self.assertNotIn("logs", server_config)  # no access log
        self.assertEqual(config["logging"]["logs"]["default"]["level"], "ERROR")
        text = json.dumps(config)
        self.assertIn('"max_size": 262144', text)
        self.assertIn('"flush_interval": -1', text)
        (handler,) = [h for h in _handlers(config) if h.get("handler") == "reverse_proxy"]
        self.assertEqual(handler["load_balancing"]["selection_policy"], {"policy": "least_conn"})
        self.assertEqual(handler["health_checks"]["active"]["uri"], "/health/live")
        self.assertNotIn('"handler": "encode"', text)  # no compression: buffers, leaks lengths

    def test_several_routers(self) -> None:
        """The scale-out settings (docs/deployment.md, "Several routers"): every router's
        socket is an upstream, and the health check asks /health (degraded: skipped)."""
        sockets = "unix//run/llmrouter-front/1.sock unix//run/llmrouter-front/2.sock"
        config = self.adapt(LLMROUTER_UPSTREAM=sockets, LLMROUTER_HEALTH_URI="/health")
        (handler,) = [h for h in _handlers(config) if h.get("handler") == "reverse_proxy"]
        self.assertEqual(
            [u["dial"] for u in handler["upstreams"]],
            ["unix//run/llmrouter-front/1.sock", "unix//run/llmrouter-front/2.sock"],
        )
        self.assertEqual(handler["health_checks"]["active"]["uri"], "/health")
        self.assertEqual(handler["flush_interval"], -1)


def _handlers(node: Any) -> list[dict[str, Any]]:
    """Every handler object anywhere in an adapted Caddy configuration."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "handler" in node:
            found.append(node)
        for value in node.values():
            found += _handlers(value)
    elif isinstance(node, list):
        for value in node:
            found += _handlers(value)
    return found


class UpstreamResource(resource.Resource):
    """Stands in for the router: records what arrives, streams two SSE events, and sends the
    second only once the test has seen the first arrive through Caddy."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], int]] = []
        self.release: defer.Deferred[None] = defer.Deferred()

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        # Caddy's own health checks (proxied requests carry X-Forwarded-For)
        health_check = b"x-forwarded-for" not in headers and request.path == b"/health/live"
        if not health_check:
            self.seen.append((request.method, request.uri, headers, len(body)))
        # so Caddy does not keep an idle upstream connection open past the test
        request.setHeader(b"connection", b"close")
        if request.path != b"/api/chat":
            return b"{}"
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"event: init\ndata: first\n\n")

        def second(_: object) -> None:
            request.write(b"event: final\ndata: second\n\n")
            request.finish()

        self.release.addCallback(second)
        return server.NOT_DONE_YET


class TrackingSite(server.Site):
    """A Site that can drop the connections Caddy keeps open to it, for a clean reactor."""

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root)
        self.open: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self.open.append(proto)
        return proto

    def close_all(self) -> defer.Deferred[None]:
        for proto in self.open:
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return task.deferLater(reactor, 0.01, lambda: None)


class StreamReader(protocol.Protocol):
    def __init__(self, on_first: defer.Deferred[None]) -> None:
        self.data = b""
        self.on_first = on_first
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"first" in self.data and not self.on_first.called:
            self.on_first.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@defer.inlineCallbacks
def start_caddy(testcase: unittest.TestCase, home: Path, **env: str) -> Any:
    """``caddy run`` on the Caddyfile with ``env``, stopped at cleanup; fires with the port
    of its site (``http://127.0.0.1:PORT``) once it accepts connections. Log: home/caddy.log."""
    caddy = caddy_binary(testcase)
    port = free_port()
    site = {"LLMROUTER_SITE": f"http://127.0.0.1:{port}", "CADDY_ADMIN": "off"}
    with (home / "caddy.log").open("wb") as log:
        process = subprocess.Popen(
            [caddy, "run", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=caddy_env(home, **{**site, **env}),
        )

    def stop() -> None:
        process.terminate()
        process.wait(10)

    testcase.addCleanup(stop)
    for _ in range(400):
        if process.poll() is not None:
            testcase.fail(f"caddy exited: {(home / 'caddy.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return port
        except OSError:
            yield task.deferLater(reactor, 0.05, lambda: None)
    testcase.fail("caddy did not start listening")


class LiveProxyTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        home = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, home)
        self.upstream = UpstreamResource()
        site = TrackingSite(self.upstream)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(site.close_all)
        self.stop_upstream = port.stopListening
        self.caddy_port = yield start_caddy(
            self, home, LLMROUTER_UPSTREAM=f"127.0.0.1:{port.getHost().port}"
        )
        self.log = home / "caddy.log"
        self.agent = Agent(reactor)

    def request(
        self,
        method: bytes,
        path: str,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> defer.Deferred[Any]:
        from io import BytesIO

        producer = None if body is None else FileBodyProducer(BytesIO(body))
        url = f"http://127.0.0.1:{self.caddy_port}{path}".encode()
        return self.agent.request(method, url, Headers(headers or {}), producer)

    @defer.inlineCallbacks
    def test_sse_streams_unbuffered_and_headers_stripped(self) -> Any:
        headers = {
            b"content-type": [b"application/json"],
            b"cookie": [b"session=canary-cookie"],
            b"user-agent": [b"canary-agent/1.0"],
            b"referer": [b"https://canary.example/"],
            b"origin": [b"https://app.example"],
            b"x-forwarded-for": [b"203.0.113.99"],
        }
        response = yield self.request(b"POST", f"/api/chat?{SECRET_QUERY}=1", b'{"v": 1}', headers)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"server"))
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        reader = StreamReader(self.upstream.release)
        response.deliverBody(reader)
        # Deadlock unless Caddy forwards the first event before the upstream finishes: the
        # upstream sends the second event only after the first reached this client.
        body = yield reader.done
        self.assertEqual(body, b"event: init\ndata: first\n\nevent: final\ndata: second\n\n")
        method, uri, seen, length = self.upstream.seen[-1]
        self.assertEqual((method, uri, length), (b"POST", b"/api/chat", 8))
        for name in (b"cookie", b"referer"):
            self.assertNotIn(name, seen)
        # the page's origin reaches the router, whose CORS_ORIGINS (docs/router.md) needs it
        self.assertEqual(seen[b"origin"], [b"https://app.example"])
        # Go's HTTP client puts its constant default in place of the removed User-Agent
        self.assertNotIn(b"canary", b"".join(seen.get(b"user-agent", [])))
        # the client's spoofed X-Forwarded-For is replaced by the real peer address
        self.assertEqual(seen[b"x-forwarded-for"], [b"127.0.0.1"])
        log = self.log.read_text()
        for canary in (SECRET_QUERY, "canary-cookie", "canary-agent", "/api/chat"):
            self.assertNotIn(canary, log)

    @defer.inlineCallbacks
    def test_body_limit(self) -> Any:
        self.upstream.release.callback(None)
        big = yield self.request(b"POST", "/api/pubkey", b"x" * (256 * 1024 + 1))
        yield readBody(big)
        self.assertEqual(big.code, 413)
        self.assertEqual(self.upstream.seen, [])
        ok = yield self.request(b"POST", "/api/pubkey", b"x" * (256 * 1024))
        yield readBody(ok)
        self.assertEqual(ok.code, 200)
        self.assertEqual(self.upstream.seen[-1][3], 256 * 1024)
        # no Content-Length at all (a GET) must not trip the size check
        get = yield self.request(b"GET", "/api/pubkey")
        yield readBody(get)
        self.assertEqual(get.code, 200)

    @defer.inlineCallbacks
    def test_error_log_carries_no_request_details(self) -> Any:
        """An upstream failure is logged (level ERROR) without the client's URI or headers."""
        yield self.stop_upstream()
        response = yield self.request(
            b"POST", f"/api/chat?{SECRET_QUERY}=1", b"{}", {b"user-agent": [b"canary-agent/2"]}
        )
        yield readBody(response)
        self.assertEqual(response.code, 502)
        yield task.deferLater(reactor, 0.2, lambda: None)  # let Caddy flush its log line
        log = self.log.read_text()
        self.assertIn('"level":"error"', log)
        for canary in (SECRET_QUERY, "canary-agent", "/api/chat", "remote_ip", '"request"'):
            self.assertNotIn(canary, log)

    @defer.inlineCallbacks
    def test_every_public_route_is_proxied(self) -> Any:
        self.upstream.release.callback(None)
        routes = ["/api/pubkey", "/api/models", "/.well-known/jwks.json"]
        routes += ["/.well-known/ohttp-keys", "/health", "/health/live"]
        for path in routes:
            response = yield self.request(b"GET", path)
            yield readBody(response)
            self.assertEqual(response.code, 200, path)
        self.assertEqual([uri for _, uri, _, _ in self.upstream.seen], [r.encode() for r in routes])

    @defer.inlineCallbacks
    def test_metrics_and_unknown_paths_not_proxied(self) -> Any:
        for path in ("/metrics", "/metrics/x", "/admin", "/"):
            response = yield self.request(b"GET", path)
            yield readBody(response)
            self.assertEqual(response.code, 404, path)
        self.assertEqual(self.upstream.seen, [])


RELOAD = r"""
set -eu
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0750 /run/caddy             # RuntimeDirectory=caddy of the drop-in
ip link set lo up
caddy run --environ --adapter caddyfile --config "$CADDYFILE" > "$HOME/caddy.log" 2>&1 &
caddy=$!
for _ in $(seq 100); do [ -S /run/caddy/admin.sock ] && break; sleep 0.1; done
# what Debian's caddy.service runs for `systemctl reload caddy` (ExecReload=)
status=0
caddy reload --adapter caddyfile --config "$CADDYFILE" --force || status=$?
kill "$caddy"
wait "$caddy" || true
exit $status
"""


class DefaultAdminTests(unittest.TestCase):
    """The admin API on its default address (no CADDY_ADMIN): `systemctl reload caddy` works.
    In private mount and network namespaces, so /run/caddy and port 443 are this test's own."""

    timeout = 60

    def test_reload_through_the_default_admin_socket(self) -> None:
        caddy_binary(self)
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            if os.environ.get("CI") == "true":
                self.fail("needs root and unshare (namespaces) in CI")
            raise unittest.SkipTest("needs root and unshare (namespaces)")
        home = Path(tempfile.mkdtemp(prefix="cad-"))
        self.addCleanup(shutil.rmtree, home, True)
        env = caddy_env(home, LLMROUTER_SITE="http://127.0.0.1:8081", CADDYFILE=str(CADDYFILE))
        result = subprocess.run(
            ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", RELOAD],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=50,
        )
        log = (home / "caddy.log").read_text() if (home / "caddy.log").exists() else ""
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + log)


class FullStackThroughCaddyTests(unittest.TestCase):
    """App client → Caddy (this Caddyfile) → real router → real inference daemon: the sealed
    SSE stream arrives through Caddy and decrypts, and Caddy's log holds nothing of it."""

    timeout = 240

    @defer.inlineCallbacks
    def test_encrypted_chat_through_caddy(self) -> Any:
        from llmrouter.client import Client
        from llmrouter.protocol import ChatRequest, Message
        from tests.daemons import Daemon, start_inference

        caddy_binary(self)  # skips before the daemons start when Caddy is missing
        home = Path(tempfile.mkdtemp(prefix="cad-"))
        self.addCleanup(shutil.rmtree, home, True)
        inference = yield start_inference(self)
        router_port = free_port()
        router = Daemon(
            "llmrouter",
            [
                "--listen",
                f"tcp:{router_port}:interface=127.0.0.1",
                "--metrics-listen",
                f"unix:{home}/m.sock",
                "--keys-dir",
                str(home / "keys"),
                "--inference",
                f"unix:{inference.socket}",
            ],
            health=f"http://127.0.0.1:{router_port}",
            directory=home,
            # Caddy is the trusted proxy whose X-Forwarded-For the router believes
            env={"TRUSTED_PROXIES": "127.0.0.1"},
        )
        self.addCleanup(router.stop)
        yield router.start()
        caddy_port = yield start_caddy(self, home, LLMROUTER_UPSTREAM=f"127.0.0.1:{router_port}")
        log_path = home / "caddy.log"

        # pin the signing key as the app would, learned directly from the router (first use)
        direct = Client(
            reactor, f"http://127.0.0.1:{router_port}", tofu=Path(self.mktemp()), protocol=1
        )
        keys = yield defer.Deferred.fromCoroutine(direct.fetch_keys())
        client = Client(reactor, f"http://127.0.0.1:{caddy_port}", pin=keys.signing_key, protocol=1)
        deltas: list[str] = []
        canary = "prompt-canary-5e1b"
        request = ChatRequest(messages=(Message("user", f"Say hi {canary}"),), max_tokens=4)
        try:
            done = yield defer.Deferred.fromCoroutine(client.chat(request, deltas.append))
        except Exception as exc:
            self.fail(
                f"{exc}\nrouter:\n{router.log_text()[-3000:]}\ncaddy:\n{log_path.read_text()}"
            )
        self.assertEqual(done.completion_tokens, 4)
        self.assertTrue(deltas)
        log = log_path.read_text()
        self.assertNotIn(canary, log)
        self.assertNotIn("/api/chat", log)


class UnixSocketUpstreamTests(unittest.TestCase):
    """Caddy reaching the router over a UNIX socket (``LLMROUTER_UPSTREAM=unix/PATH``): with
    ``TRUSTED_PROXIES=unix`` the router believes Caddy's X-Forwarded-For, so each client has its
    own rate-limit bucket; without it every client shares the socket's one bucket."""

    timeout = 60

    @defer.inlineCallbacks
    def statuses(self, trusted: tuple[str, ...]) -> Any:
        """Three requests from 127.0.0.2, then one from 127.0.0.3 (burst 2, no refill)."""
        from io import BytesIO

        from tests.router_support import start_router

        home = Path(tempfile.mkdtemp(prefix="cad-"))
        self.addCleanup(shutil.rmtree, home, True)
        running = yield start_router(
            self,
            ["unix:/nonexistent/inference.sock"],
            probe=False,
            unix=True,
            trusted_proxies=trusted,
            rate_limit_burst=2,
        )
        upstream = "unix/" + running.url.removeprefix("unix:")
        port = yield start_caddy(self, home, LLMROUTER_UPSTREAM=upstream)
        found = []
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3"):
            response = yield Agent(reactor, bindAddress=(source, 0)).request(
                b"POST",
                f"http://127.0.0.1:{port}/api/chat".encode(),
                Headers({b"content-type": [b"application/json"]}),
                FileBodyProducer(BytesIO(b"{}")),  # refused (400) after the per-address limit
            )
            yield readBody(response)
            found.append(response.code)
        return found

    @defer.inlineCallbacks
    def test_trusted_unix_proxy_gives_each_client_its_bucket(self) -> Any:
        found = yield self.statuses(("unix",))
        self.assertEqual(found, [400, 400, 429, 400])

    @defer.inlineCallbacks
    def test_untrusted_unix_proxy_shares_one_bucket(self) -> Any:
        found = yield self.statuses(())
        self.assertEqual(found, [400, 400, 429, 429])
