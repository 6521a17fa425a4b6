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
from typing import Any

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
ADDRESSES = {
    SITE: "server",
    "inference-1.example.org": "node",
    "monitoring.example.org": "monitor",
    "spare.example.org": "spare",
}
HOSTS = ["server", "node", "monitor", "spare"]
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
        self.assertEqual({b.host for b in found}, set(HOSTS))
        self.assertGreater(sum(len(list(b.commands())) for b in found), 100)
        for block in found:
            if block.kind == "edit":
                self.assertTrue(block.path.startswith("/etc/"), block)
                self.assertTrue(all("=" in line for line in block.lines), block)
        fences = re.findall(r"^```(\S+)(?: (\S+))?$", DOC.read_text(), re.M)
        for language, host in fences:
            self.assertIn(language, ("sh", "ini", "text"), language)
            self.assertIn(host, HOSTS, (language, host))

    def test_version_is_the_package_version(self) -> None:
        """The page installs the version setup.cfg builds, which CHANGELOG.md lists."""
        version = re.search(r"(?m)^version = (\S+)", (REPO / "setup.cfg").read_text())
        assert version is not None
        first = next(b for b in blocks(DOC.read_text()) if b.kind == "sh")
        self.assertIn(f"VERSION={version.group(1)}", first.lines)
        self.assertIn(f"## {version.group(1)}", (REPO / "CHANGELOG.md").read_text())
        # every section sets it again (a new login shell each), always to the same version
        literal = set(re.findall(r"(?m)^VERSION=(\d\S*)$", DOC.read_text()))
        self.assertEqual(literal, {version.group(1)})

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
        self.releases: list[tuple[str, int]] = []

    def test_walk(self) -> None:
        walk = Walk(self.scratch, self.scratch / "logs", HOSTS, ADDRESSES)
        self.addCleanup(walk.close)
        self.walk = walk
        self.world(walk)
        self.expectations(walk)
        for block in blocks(DOC.read_text()):
            walk.perform(block)
        server = walk.hosts["server"]
        # one router: upgraded to NEW, rolled back to VERSION; then two, the same; each time
        # every router runs what the link says (the restored host: the release in service)
        old, new = server.variables["VERSION"], server.variables["NEW"]
        self.assertEqual(
            self.releases,
            [(old, 1), (new, 1), (old, 1), (old, 2), (new, 2), (old, 2), (old, 2)],
        )
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
        for host in (server, walk.hosts["spare"]):  # the spare takes over the name
            with host.path("/etc/hosts").open("a") as hosts:
                hosts.write(f"127.0.0.1 {SITE}\n")
            with host.path("/etc/ssl/certs/ca-certificates.crt").open("ab") as bundle:
                bundle.write((public / "ca.crt").read_bytes())
            host.services.before_start["caddy.service"] = self.acme(host, public)
        for host in walk.hosts.values():
            host.services.before_start["wg-quick@wg0.service"] = self.fill_wireguard(host)

    @staticmethod
    def acme(server: Host, public: Path) -> Any:
        """A certificate for the site in Caddy's storage, as if Let's Encrypt had issued it."""

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

        return acme

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
        self.dev_pin = ""
        self.lost = False
        walk.after += [
            (r"^systemctl enable --now inference.socket llmrouter.service$", self.router_user),
            (r"^PIN=", self.pin),
            (r"grep '\^llmrouter_backend_healthy'$", self.both_backends),
            (r"^llmrouter-client chat .*--device-key", self.same_pin),
            (r"^llmrouter-release check$", self.runs_linked_release),
            (r"^curl -fsS http://10.8.0.1:9100/metrics", self.prometheus_targets),
            (r"^systemctl start llmrouter-pki-renew.service$", self.renewed),
            (r"^systemctl reload prometheus$", self.renewed_certificates_in_use),
        ]
        walk.before += [
            (r"grep '\^llmrouter_backend_healthy'$", self.wait_for_backends),
            (r"^systemctl start llmrouter-pki-renew.service$", self.six_days_later),
            (r".", self.lose_the_router_host),
        ]

    @staticmethod
    def routers(host: Host) -> list[str]:
        """The router units running on ``host``: llmrouter.service, or llmrouter@N.service."""
        return sorted(
            n for n in host.services.running if re.fullmatch(r"llmrouter(@\d+)?\.service", n)
        )

    def router_user(self, host: Host, command: str, output: str) -> None:
        """The routers run as llmrouter and keep their keys where production will look."""
        uid = int(host.services.passwd("llmrouter")[2])
        for name in self.routers(host):
            status = Path(f"/proc/{host.services.pid(name)}/status").read_text()
            self.assertRegex(status, rf"(?m)^Uid:\s+{uid}\s")
        keys = host.path("/var/lib/llmrouter/keys")
        self.assertEqual((keys.stat().st_uid, keys.stat().st_mode & 0o777), (uid, 0o700))
        self.assertFalse(host.path("/var/lib/llmrouter/dev-keys").exists())

    def pin(self, host: Host, command: str, output: str) -> None:
        """The pin of section 2.9 is the one printed again later (3.3); the restored host
        prints the one in service when the backup was made (the backup key, after 5.3)."""
        self.assertRegex(output, r"^[A-Za-z0-9_-]{43}$")
        if host.name == "spare":
            self.assertEqual(output, self.walk.hosts["server"].variables["BACKUP_PIN"])
        elif not self.dev_pin:
            self.dev_pin = output
        else:
            self.assertEqual(output, self.dev_pin)

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
        that just ran checked it), from the same key directory; after the switch of 5.3, and
        on the restored host, the backup key's."""
        pin = host.shell(
            "runuser -u llmrouter -- llmrouter-keys --keys-dir /var/lib/llmrouter/keys pin"
        ).strip()
        backup = self.walk.hosts["server"].variables.get("BACKUP_PIN")
        if "BACKUP_PIN" in command or host.name == "spare":
            self.assertEqual(pin, backup)
            self.assertNotEqual(pin, self.dev_pin)
        else:
            self.assertEqual(pin, self.dev_pin)
        for name in self.routers(host):
            self.assertEqual(host.services.running[name].env["ENVIRONMENT"], "production")

    def runs_linked_release(self, host: Host, command: str, output: str) -> None:
        """After every restart each router runs the release /opt/llmrouter/venv points at, as
        llmrouter-release check just said (checked here from the services' own processes)."""
        if host.name == "node":
            return
        release = host.shell("readlink /opt/llmrouter/venv").strip().removeprefix("releases/")
        routers = self.routers(host)
        self.assertTrue(routers)
        for name in routers:
            pid = host.services.pid(name)
            interpreter = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            self.assertTrue(interpreter.startswith(f"/opt/llmrouter/releases/{release}/"), name)
        installed = host.shell(
            "cd / && /opt/llmrouter/venv/bin/python -c "
            "'import importlib.metadata as m; print(m.version(\"llmrouter\"))'"
        ).strip()
        self.assertEqual(installed, release)
        seen = (release, len(routers))
        if not self.releases or self.releases[-1] != seen or host.name == "spare":
            self.releases.append(seen)

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
        renewal has something to do. The routers' and the node's processes are noted: the
        renewal must reload them, not restart them."""
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
        self.router_pids = {name: host.services.pid(name) for name in self.routers(host)}
        self.node_pid = self.walk.hosts["node"].services.pid("inference@inference-1.service")

    def renewed(self, host: Host, command: str, output: str) -> None:
        """The timer's service renewed under its sandbox, kept router.key readable to the
        routers, and reloaded every router (llmrouter@N too): the same processes, now
        exporting the renewed certificate's expiry."""
        for name, serial in self.aged.items():
            self.assertNotEqual(_certificate(host, f"{PKI}/{name}.crt").serial_number, serial)
        key = host.path(f"{PKI}/router.key").stat()
        self.assertEqual(
            (key.st_uid, key.st_gid, key.st_mode & 0o777), (0, group_id(host, "llmrouter"), 0o640)
        )
        self.assertEqual(
            {name: host.services.pid(name) for name in self.routers(host)}, self.router_pids
        )
        expiry = _certificate(host, f"{PKI}/router.crt").not_valid_after_utc.timestamp()
        for name in self.router_pids:
            port = re.search(r"tcp:(\d+):", host.services.running[name].env["METRICS_LISTEN"])
            assert port is not None
            url = f"http://10.8.0.1:{port.group(1)}/metrics"
            deadline = time.monotonic() + 30
            while (
                _gauge(host.shell(f"curl -fsS --max-time 10 {url}"), "llmrouter_client") != expiry
            ):
                self.assertLess(time.monotonic(), deadline, f"{name} did not reload")
                time.sleep(0.5)
        self.router_user(host, command, output)

    def renewed_certificates_in_use(self, host: Host, command: str, output: str) -> None:
        """After the page's distribution steps (5.2), router and node serve with the renewed
        certificates (their expiry gauges), the node reloaded without a restart, and the router
        reaches the node over them."""
        server, node = self.walk.hosts["server"], self.walk.hosts["node"]
        if "llmrouter.service" not in server.services.running:
            return  # the reload of section 6.1, after the move to several routers
        server.shell(f"curl -fsS --retry 10 --retry-all-errors https://{SITE}/health")
        metrics = server.shell("curl -fsS --max-time 10 http://10.8.0.1:9100/metrics")
        self.assertEqual(
            _gauge(metrics, "llmrouter_client"),
            _certificate(server, f"{PKI}/router.crt").not_valid_after_utc.timestamp(),
        )
        self.assertEqual(node.services.pid("inference@inference-1.service"), self.node_pid)
        tls = "/etc/prometheus/pki"
        node_metrics = host.shell(
            f"curl -fsS --cacert {tls}/ca.crt --cert {tls}/prometheus.crt"
            f" --key {tls}/prometheus.key https://10.8.0.2:8443/metrics"
        )
        self.assertEqual(
            _gauge(node_metrics, "inference_server"),
            _certificate(node, f"{PKI}/inference-1.crt").not_valid_after_utc.timestamp(),
        )

    def lose_the_router_host(self, host: Host, command: str) -> None:
        """Before the restore: the router host is gone (its services stop, it leaves the
        network); the spare takes its name and WireGuard address."""
        if host.name != "spare" or self.lost:
            return
        self.lost = True
        server = self.walk.hosts["server"]
        server.services.stop_all()
        self.walk.link.detach(server)


def _gauge(metrics: str, prefix: str) -> float:
    """The certificate expiry gauge whose name starts with ``prefix``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        if family.name == f"{prefix}_certificate_expiry_timestamp_seconds":
            return float(family.samples[0].value)
    raise AssertionError(f"no {prefix}_certificate_expiry_timestamp_seconds")


def _certificate(host: Host, path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(host.path(path).read_bytes())
