"""docs/deployment.md, walked: every command block, in order, on three throwaway hosts.

The page's ``sh HOST`` blocks run as root in throwaway roots (tests/walk.py) standing for the
single server that becomes the router host, an inference node and the monitoring host: the
release wheel from ``make dist`` installed side by side with a symlink, service users created
by ``systemd-sysusers``, the real daemons started from the installed unit files under their
units' sandbox as their own users, Caddy and Prometheus as Debian's units run them, the
nftables rulesets loaded, ``verify-network`` on each host's real listeners. The test adds only
what the machine cannot give (named in section 12 of the page): a public certificate and DNS
name for Caddy, WireGuard keys where the page says to fill them in, and six days of
certificate lifetime before the renewal runs. Between steps it checks what the page promises:
the keys and the pin survive the move to production, the router runs the release the link
points to, renewed keys stay readable to the router, the monitoring host scrapes everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from cryptography import x509
from twisted.trial import unittest

from llmrouter.ops import pki
from tests.test_systemd_sandbox import require_sandbox
from tests.walk import (
    REPO,
    Block,
    Host,
    Walk,
    apt_packages,
    blocks,
    group_id,
    installed,
    set_lines,
)

DOC = REPO / "docs" / "deployment.md"
SITE = "llm.example.org"
ADDRESSES = {SITE: "server", "inference-1.example.org": "node", "monitoring.example.org": "monitor"}
TOOLS = ("nsenter", "unshare", "setpriv", "ip", "nft", "wg", "caddy", "prometheus", "curl")
PKI = "/etc/llmrouter/pki"


def require_walk(testcase: unittest.TestCase) -> None:
    """Root, namespaces, overlayfs and the packages the page installs (etc/dev/ci-deps installs
    them); fail in CI, skip elsewhere."""
    require_sandbox(testcase)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if "overlay" not in Path("/proc/filesystems").read_text():
        missing.append("overlayfs")
    named = {
        package
        for block in blocks(DOC.read_text())
        for command in block.commands()
        if command.startswith("apt-get ")
        for package in apt_packages(command)
    }
    missing += sorted(package for package in named if not installed(package))
    if missing:
        message = f"cannot walk docs/deployment.md here: missing {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            testcase.fail(message)
        raise unittest.SkipTest(message)


class PageTests(unittest.TestCase):
    """The page's blocks are well formed (a walk that silently skips a block proves nothing)."""

    def test_blocks(self) -> None:
        found = blocks(DOC.read_text())
        self.assertEqual({b.host for b in found}, {"server", "node", "monitor"})
        self.assertGreater(sum(len(list(b.commands())) for b in found), 100)
        for block in found:
            if block.kind == "edit":
                self.assertTrue(block.path.startswith("/etc/"), block)
                self.assertTrue(all("=" in line for line in block.lines), block)
        fences = re.findall(r"^```(\S+)(?: (\S+))?$", DOC.read_text(), re.M)
        for language, host in fences:
            self.assertIn(language, ("sh", "ini", "text"), language)
            self.assertIn(host, ("server", "node", "monitor"), (language, host))

    def test_version_is_the_package_version(self) -> None:
        """The page installs the version setup.cfg builds, which CHANGELOG.md lists."""
        version = re.search(r"(?m)^version = (\S+)", (REPO / "setup.cfg").read_text())
        assert version is not None
        first = next(b for b in blocks(DOC.read_text()) if b.kind == "sh")
        self.assertIn(f"VERSION={version.group(1)}", first.lines)
        self.assertIn(f"## {version.group(1)}", (REPO / "CHANGELOG.md").read_text())

    def test_set_lines(self) -> None:
        text = "A=1\n#B=2\nC=3\n"
        self.assertEqual(set_lines(text, ["B=9", "D=4", "A=0"]), "A=0\nB=9\nC=3\nD=4\n")
        # The active line wins over a comment that shows an example of the same setting.
        text = "#   A=x, y (an example in prose)\nA=1\n"
        self.assertEqual(set_lines(text, ["A=2"]), "#   A=x, y (an example in prose)\nA=2\n")

    def test_commands_join_continuations(self) -> None:
        block = Block("server", "sh", ("# comment", "a \\", "  b", "", "c"), 1)
        self.assertEqual(list(block.commands()), ["a b", "c"])


class DeploymentWalkTests(unittest.TestCase):
    def setUp(self) -> None:
        require_walk(self)
        self.scratch = Path(self.mktemp()).absolute()
        self.scratch.mkdir(parents=True)
        self.releases: list[str] = []

    def test_walk(self) -> None:
        walk = Walk(self.scratch, self.scratch / "logs", ["server", "node", "monitor"], ADDRESSES)
        self.addCleanup(walk.close)
        self.walk = walk
        self.world(walk)
        self.expectations(walk)
        for block in blocks(DOC.read_text()):
            walk.perform(block)
        server = walk.hosts["server"]
        # upgraded to NEW, then rolled back to VERSION, each time running what the link says
        self.assertEqual(self.releases[-2:], [server.variables["NEW"], server.variables["VERSION"]])
        for host in walk.hosts.values():
            for log in sorted(host.logs.glob(f"{host.name}-*.log")):
                self.assertNotIn("Traceback", log.read_text(errors="replace"), log.name)

    # What the machine cannot give.

    def world(self, walk: Walk) -> None:
        server = walk.hosts["server"]
        # DNS and a public CA for the site: a certificate Caddy finds in its storage, as if
        # Let's Encrypt had issued it (the walk has no internet), from a CA the host trusts
        public = self.scratch / "public-ca"
        pki.create_ca(public)
        pki.issue(public, "server", SITE, [SITE])
        with server.path("/etc/hosts").open("a") as hosts:
            hosts.write(f"127.0.0.1 {SITE}\n")
        with server.path("/etc/ssl/certs/ca-certificates.crt").open("ab") as bundle:
            bundle.write((public / "ca.crt").read_bytes())

        def acme() -> None:
            home = server.path("/var/lib/caddy")
            storage = home / ".local/share/caddy/certificates"
            storage = storage / "acme-v02.api.letsencrypt.org-directory" / SITE
            storage.mkdir(parents=True, exist_ok=True)
            for suffix in ("crt", "key"):
                shutil.copy(public / f"{SITE}.{suffix}", storage / f"{SITE}.{suffix}")
            (storage / f"{SITE}.json").write_text(json.dumps({"sans": [SITE]}))
            caddy = server.services.passwd("caddy")
            owned = [*storage.iterdir(), storage, *storage.relative_to(home).parents]
            for path in owned:
                os.chown(path if path.is_absolute() else home / path, int(caddy[2]), int(caddy[3]))

        server.services.before_start["caddy.service"] = acme
        for host in walk.hosts.values():
            host.services.before_start["wg-quick@wg0.service"] = self.fill_wireguard(host)

    @staticmethod
    def fill_wireguard(host: Host) -> object:
        """The page's "fill in every <...>": keys from wg, the peers' public addresses."""

        def fill() -> None:
            path = host.path("/etc/wireguard/wg0.conf")

            def value(match: re.Match[str]) -> str:
                kind = match.group(1)
                if kind == "public-address":
                    return "192.0.2.1"
                command = {"private-key": "wg genkey", "psk": "wg genpsk"}.get(
                    kind, "wg genkey | wg pubkey"
                )
                return host.shell(command).strip()

            text = re.sub(
                r"<[a-z0-9-]*?(private-key|public-key|psk|public-address)>", value, path.read_text()
            )
            path.write_text(text)

        return fill

    # What the page promises, checked along the way.

    def expectations(self, walk: Walk) -> None:
        walk.after += [
            (r"^systemctl enable --now inference.socket llmrouter.service$", self.router_user),
            (r"^PIN=", self.pin),
            (r"grep '\^llmrouter_backend_healthy'$", self.both_backends),
            (r"^llmrouter-client chat .*--device-key", self.same_pin),
            (r"^systemctl restart llmrouter$", self.runs_linked_release),
            (r"^curl -fsS http://10.8.0.1:9100/metrics", self.prometheus_targets),
            (r"^systemctl start llmrouter-pki-renew.service$", self.renewed),
            (r"^systemctl reload prometheus$", self.renewed_certificates_in_use),
        ]
        walk.before += [
            (r"grep '\^llmrouter_backend_healthy'$", self.wait_for_backends),
            (r"^systemctl start llmrouter-pki-renew.service$", self.six_days_later),
        ]

    def router_user(self, host: Host, command: str, output: str) -> None:
        """The router runs as llmrouter and keeps its keys where production will look."""
        uid = int(host.services.passwd("llmrouter")[2])
        status = Path(f"/proc/{host.services.pid('llmrouter.service')}/status").read_text()
        self.assertRegex(status, rf"(?m)^Uid:\s+{uid}\s")
        keys = host.path("/var/lib/llmrouter/keys")
        self.assertEqual((keys.stat().st_uid, keys.stat().st_mode & 0o777), (uid, 0o700))
        self.assertFalse(host.path("/var/lib/llmrouter/dev-keys").exists())

    def pin(self, host: Host, command: str, output: str) -> None:
        if command.startswith("PIN="):
            self.assertRegex(output, r"^[A-Za-z0-9_-]{43}$")
            self.dev_pin = output

    def wait_for_backends(self, host: Host, command: str) -> None:
        """The page says to repeat the check until both backends show 1 (5 s probes)."""
        if host.name != "server":
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = host.shell("curl -fsS http://127.0.0.1:9100/metrics")
            if len(re.findall(r"(?m)^llmrouter_backend_healthy\{.*\} 1\.0$", metrics)) == 2:
                return
            time.sleep(1)

    def both_backends(self, host: Host, command: str, output: str) -> None:
        if host.name == "server":
            self.assertEqual(len(re.findall(r"\} 1\.0$", output, re.M)), 2, output)

    def same_pin(self, host: Host, command: str, output: str) -> None:
        """Production serves the key document signed with the pin of section 2.9 (the chat
        that just ran checked it), from the same key directory."""
        pin = host.shell(
            "runuser -u llmrouter -- llmrouter-keys --keys-dir /var/lib/llmrouter/keys pin"
        ).strip()
        if "BACKUP_PIN" in command:
            self.assertEqual(pin, host.variables["BACKUP_PIN"])
            self.assertNotEqual(pin, self.dev_pin)
        else:
            self.assertEqual(pin, self.dev_pin)
            env = host.services.running["llmrouter.service"].env
            self.assertEqual(env["ENVIRONMENT"], "production")

    def runs_linked_release(self, host: Host, command: str, output: str) -> None:
        """After every restart the router runs the release /opt/llmrouter/venv points at."""
        release = host.shell("readlink /opt/llmrouter/venv").strip().removeprefix("releases/")
        pid = host.services.pid("llmrouter.service")
        interpreter = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        self.assertTrue(interpreter.startswith(f"/opt/llmrouter/releases/{release}/"), interpreter)
        installed = host.shell(
            "cd / && /opt/llmrouter/venv/bin/python -c "
            "'import importlib.metadata as m; print(m.version(\"llmrouter\"))'"
        ).strip()
        self.assertEqual(installed, release)
        self.releases.append(release)

    def prometheus_targets(self, host: Host, command: str, output: str) -> None:
        """Prometheus on the monitoring host scrapes the router and the node (mTLS) over wg0."""
        wanted = {"http://10.8.0.1:9100/metrics", "https://10.8.0.2:8443/metrics"}
        deadline = time.monotonic() + 60
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            targets = json.loads(host.shell("curl -fsS http://127.0.0.1:9090/api/v1/targets"))
            health = {t["scrapeUrl"]: t["health"] for t in targets["data"]["activeTargets"]}
            if all(health.get(url) == "up" for url in wanted):
                return
            time.sleep(1)
        self.fail(f"Prometheus targets: {health}")

    def six_days_later(self, host: Host, command: str) -> None:
        """No clock to advance: the certificates are re-issued with 30 h left, so that the
        renewal has something to do."""
        for args in (
            "client router --group llmrouter",
            "server inference-1 --dns inference-1.wg --ip 10.8.0.2",
            "client prometheus",
        ):
            host.shell(f"llmrouter-pki --dir {PKI} issue {args} --lifetime 30h")
        self.aged = {
            name: _certificate(host, f"{PKI}/{name}.crt").serial_number
            for name in ("router", "inference-1", "prometheus")
        }

    def renewed(self, host: Host, command: str, output: str) -> None:
        """The timer's service renewed under its sandbox, kept router.key readable to the
        router, and restarted the router, which came back up as llmrouter."""
        for name, serial in self.aged.items():
            self.assertNotEqual(_certificate(host, f"{PKI}/{name}.crt").serial_number, serial)
        key = host.path(f"{PKI}/router.key").stat()
        self.assertEqual(
            (key.st_uid, key.st_gid, key.st_mode & 0o777), (0, group_id(host, "llmrouter"), 0o640)
        )
        self.assertIn("llmrouter.service", host.services.running)
        self.router_user(host, command, output)

    def renewed_certificates_in_use(self, host: Host, command: str, output: str) -> None:
        """After the page's distribution steps, router and node serve with the renewed
        certificates (their expiry gauges) and the router reaches the node over them."""
        server, node = self.walk.hosts["server"], self.walk.hosts["node"]
        server.shell(f"curl -fsS --retry 10 --retry-all-errors https://{SITE}/health")
        metrics = server.shell("curl -fsS --max-time 10 http://10.8.0.1:9100/metrics")
        self.assertEqual(
            _gauge(metrics, "llmrouter_client"),
            _certificate(server, f"{PKI}/router.crt").not_valid_after_utc.timestamp(),
        )
        tls = "/etc/prometheus/pki"
        node_metrics = host.shell(
            f"curl -fsS --cacert {tls}/ca.crt --cert {tls}/prometheus.crt"
            f" --key {tls}/prometheus.key https://10.8.0.2:8443/metrics"
        )
        self.assertEqual(
            _gauge(node_metrics, "inference_server"),
            _certificate(node, f"{PKI}/inference-1.crt").not_valid_after_utc.timestamp(),
        )


def _gauge(metrics: str, prefix: str) -> float:
    """The certificate expiry gauge whose name starts with ``prefix``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        if family.name == f"{prefix}_certificate_expiry_timestamp_seconds":
            return float(family.samples[0].value)
    raise AssertionError(f"no {prefix}_certificate_expiry_timestamp_seconds")


def _certificate(host: Host, path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(host.path(path).read_bytes())
