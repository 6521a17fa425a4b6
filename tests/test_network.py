"""Private network: verify-network against real listeners, nftables syntax, WireGuard templates."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.tools import require_tool

REPO = Path(__file__).resolve().parent.parent
VERIFY = REPO / "bin" / "verify-network"
NFT = REPO / "etc" / "nftables"
WG = REPO / "etc" / "wireguard"


def verify_network(*args: str) -> tuple[int, list[dict[str, object]], str]:
    """Run the script on this test process's own sockets only (others share the machine)."""
    result = subprocess.run(
        [sys.executable, str(VERIFY), "--json", "--pid", str(os.getpid()), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, json.loads(result.stdout or "[]"), result.stderr


def public_ipv4() -> str | None:
    """A non-loopback address of this host (to bind a 'public' listener), if any."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
        address: str = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if ipaddress.ip_address(address).is_loopback else address


class VerifyNetworkTests(unittest.TestCase):
    def listen(self, family: int, kind: int, address: str) -> int:
        sock = socket.socket(family, kind)
        self.addCleanup(sock.close)
        sock.bind((address, 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        port: int = sock.getsockname()[1]
        return port

    def entry(self, report: list[dict[str, object]], port: int, proto: str) -> dict[str, object]:
        matches = [r for r in report if r["port"] == port and r["proto"] == proto]
        self.assertEqual(len(matches), 1, report)
        return matches[0]

    def test_dhcp_client_is_not_counted(self) -> None:
        """A DHCP host's client socket (0.0.0.0:68/udp) made every run fail: it is the lease's
        reply port, held by a DHCP client, and counts only when another process holds it."""
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.SourceFileLoader("verify_network", str(VERIFY))
        spec = importlib.util.spec_from_loader("verify_network", loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["verify_network"] = module  # dataclasses look their module up
        self.addCleanup(sys.modules.pop, "verify_network", None)
        loader.exec_module(module)
        public = module.PUBLIC["production"]
        for process, port, verdict in (
            ("dhclient", 68, "ok"),
            ("systemd-network", 546, "ok"),
            ("python3", 68, "EXPOSED"),
            ("dhclient", 69, "EXPOSED"),
        ):
            item = module.Listener("udp", "0.0.0.0", port, 1, process=process)
            module.judge(item, public, [], [])
            self.assertEqual(item.verdict, verdict, (process, port))

    def test_loopback_only_is_clean(self) -> None:
        port = self.listen(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        code, report, _ = verify_network("--profile", "development")
        self.assertEqual(code, 0, report)
        item = self.entry(report, port, "tcp")
        self.assertEqual((item["address"], item["verdict"]), ("127.0.0.1", "ok"))
        self.assertEqual(item["pid"], os.getpid())

    def test_wildcard_tcp_is_exposed(self) -> None:
        self.listen(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        port = self.listen(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")
        code, report, _ = verify_network("--profile", "production")
        self.assertEqual(code, 1)
        item = self.entry(report, port, "tcp")
        self.assertEqual(item["verdict"], "EXPOSED")
        self.assertIn("all interfaces", str(item["reason"]))
        # allowed explicitly: clean again
        code, report, _ = verify_network("--profile", "production", "--allow", f"{port}/tcp")
        self.assertEqual(code, 0, report)

    def test_wildcard_udp_and_ipv6_are_exposed(self) -> None:
        udp = self.listen(socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")
        ports = [(udp, "udp")]
        if socket.has_ipv6:
            try:
                ports.append((self.listen(socket.AF_INET6, socket.SOCK_STREAM, "::"), "tcp"))
            except OSError:
                pass
        code, report, _ = verify_network("--profile", "development")
        self.assertEqual(code, 1)
        for port, proto in ports:
            self.assertEqual(self.entry(report, port, proto)["verdict"], "EXPOSED")

    def test_private_network_address(self) -> None:
        """Production: any port is fine on the WireGuard network, not on a public address."""
        address = public_ipv4()
        if address is None:
            raise unittest.SkipTest("no non-loopback IPv4 address on this host")
        port = self.listen(socket.AF_INET, socket.SOCK_STREAM, address)
        net = str(ipaddress.ip_network(f"{address}/24", strict=False))
        code, report, _ = verify_network("--profile", "production", "--private-net", net)
        self.assertEqual(code, 0, report)
        self.assertEqual(self.entry(report, port, "tcp")["address"], address)
        code, report, _ = verify_network("--profile", "production")
        self.assertEqual(code, 1)
        self.assertIn("public address", str(self.entry(report, port, "tcp")["reason"]))

    def test_unix_socket_modes(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="vn-"))
        self.addCleanup(shutil.rmtree, directory)
        paths = {}
        for name, mode in (("private.sock", 0o660), ("open.sock", 0o666)):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(sock.close)
            sock.bind(str(directory / name))
            sock.listen()
            os.chmod(directory / name, mode)
            paths[name] = str(directory / name)
        code, report, _ = verify_network("--unix-dir", str(directory))
        self.assertEqual(code, 1)
        verdicts = {r["address"]: r["verdict"] for r in report if r["proto"] == "unix"}
        self.assertEqual(verdicts[paths["private.sock"]], "ok")
        self.assertEqual(verdicts[paths["open.sock"]], "EXPOSED")

    def test_agrees_with_ss(self) -> None:
        """Cross-check the /proc parsing against iproute2's `ss -H -ltnp`."""
        require_tool(self, "ss")
        ports = {
            self.listen(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
            self.listen(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
        }
        out = subprocess.run(
            ["ss", "-H", "-ltnp"], capture_output=True, text=True, check=True
        ).stdout
        mine = f"pid={os.getpid()},"
        seen = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if mine in line}
        _, report, _ = verify_network()
        self.assertEqual(ports & seen, ports)
        self.assertEqual({r["port"] for r in report if r["proto"] == "tcp"} & ports, ports)

    def test_text_output_and_usage_error(self) -> None:
        self.listen(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")
        result = subprocess.run(
            [sys.executable, str(VERIFY), "--pid", str(os.getpid())],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stdout, r"EXPOSED\s+tcp\s+0\.0\.0\.0:\d+")
        self.assertIn("exposed", result.stderr)
        bad = subprocess.run(
            [sys.executable, str(VERIFY), "--allow", "http"], capture_output=True, check=False
        )
        self.assertEqual(bad.returncode, 2)


class NftablesTests(unittest.TestCase):
    def check(self, path: Path) -> subprocess.CompletedProcess[str]:
        nft = require_tool(self, "nft")
        # -c only parses and validates; a private network namespace guarantees nothing on the
        # host could change even if it did not.
        argv = [nft, "-c", "-f", str(path)]
        if shutil.which("unshare") and os.geteuid() == 0:
            argv = ["unshare", "--net", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def test_rulesets_validate(self) -> None:
        files = sorted(NFT.glob("*.nft"))
        self.assertEqual(
            [f.name for f in files],
            ["development.nft", "inference-node.nft", "monitoring.nft", "router.nft"],
        )
        for path in files:
            result = self.check(path)
            self.assertEqual(result.returncode, 0, f"{path.name}: {result.stderr}")

    def test_checker_rejects_errors(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        broken = directory / "broken.nft"
        broken.write_text(
            (NFT / "development.nft").read_text().replace("tcp dport 443", "tcp dprt 443")
        )
        self.assertNotEqual(self.check(broken).returncode, 0)

    def accepted_ports(self, path: Path) -> list[str]:
        return re.findall(r"^\s*(.*?dport.*accept)\s*$", path.read_text(), re.M)

    def test_development_policy(self) -> None:
        text = (NFT / "development.nft").read_text()
        self.assertIn("policy drop", text)
        ports = {
            m
            for line in self.accepted_ports(NFT / "development.nft")
            for m in re.findall(r"dport (\d+)", line)
        }
        self.assertEqual(ports, {"22", "443"})

    def test_monitoring_host_serves_nothing(self) -> None:
        """Prometheus pulls over wg0; from outside only SSH and WireGuard come in."""
        lines = self.accepted_ports(NFT / "monitoring.nft")
        self.assertEqual(len(lines), 2, lines)
        for line in lines:
            self.assertRegex(line, r"^iifname != \$WG_IF (tcp dport 22|udp dport 51820) accept$")

    def test_inference_only_on_wireguard(self) -> None:
        for line in self.accepted_ports(NFT / "inference-node.nft"):
            if line.startswith("iifname != $WG_IF"):  # public: SSH and WireGuard only
                self.assertRegex(line, r"dport (22|51820) ")
            else:  # everything else only on wg0, only from named peers
                self.assertRegex(line, r"^iifname \$WG_IF ip saddr ")
        router = self.accepted_ports(NFT / "router.nft")
        for line in router:
            if "9100" in line:
                self.assertIn("iifname $WG_IF", line)


class WireGuardTests(unittest.TestCase):
    def fill(self, template: Path, directory: Path) -> Path:
        wg = require_tool(self, "wg")

        def run(argv: list[str], data: str | None = None) -> str:
            return subprocess.run(
                argv, input=data, capture_output=True, text=True, check=True
            ).stdout.strip()

        def key(match: re.Match[str]) -> str:
            kind = match.group(1)
            if kind == "private-key":
                return run([wg, "genkey"])
            if kind == "public-key":
                return run([wg, "pubkey"], run([wg, "genkey"]))
            if kind == "psk":
                return run([wg, "genpsk"])
            return "192.0.2.1"

        text = re.sub(
            r"<[a-z0-9-]*?(private-key|public-key|psk|public-address)>", key, template.read_text()
        )
        self.assertIsNone(re.search(r"^[^#]*<", text, re.M), text)
        path = directory / "wg0.conf"
        path.write_text(text)
        return path

    def test_templates_parse(self) -> None:
        """`wg-quick strip` (wg-quick's own parser) accepts the filled templates. Loading them
        into a kernel interface is not possible here (no wireguard module in this kernel)."""
        require_tool(self, "wg-quick")
        for name, address in (
            ("wg0-router.conf", "10.8.0.1/24"),
            ("wg0-inference.conf", "10.8.0.2/24"),
            ("wg0-monitoring.conf", "10.8.0.10/24"),
            ("wg0-router-2.conf", "10.8.0.11/24"),
        ):
            directory = Path(tempfile.mkdtemp())
            self.addCleanup(shutil.rmtree, directory)
            path = self.fill(WG / name, directory)
            result = subprocess.run(
                ["wg-quick", "strip", str(path)], capture_output=True, text=True, check=False
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("PrivateKey", result.stdout)
            self.assertIn(f"Address = {address}", path.read_text())
            # peers are pinned to single tunnel addresses, never a default route
            for allowed in re.findall(r"AllowedIPs = (\S+)", result.stdout):
                self.assertTrue(allowed.endswith("/32"), allowed)
                self.assertTrue(
                    ipaddress.ip_network(allowed).subnet_of(ipaddress.ip_network("10.8.0.0/24"))
                )
            # every peer has an endpoint, so either side can start the handshake
            peers = result.stdout.count("[Peer]")
            self.assertEqual(result.stdout.count("Endpoint = "), peers, name)

    def test_templates_agree(self) -> None:
        """Each pair of hosts names the same preshared key placeholder for each other, and
        each host's public key placeholder is the one its peers use."""
        psks = {
            name: set(re.findall(r"<([a-z0-9-]+-psk)>", (WG / name).read_text()))
            for name in ("wg0-router.conf", "wg0-inference.conf", "wg0-monitoring.conf")
        }
        self.assertEqual(
            psks["wg0-router.conf"] & psks["wg0-inference.conf"], {"router-inference-1-psk"}
        )
        self.assertEqual(
            psks["wg0-router.conf"] & psks["wg0-monitoring.conf"], {"router-prometheus-psk"}
        )
        self.assertEqual(
            psks["wg0-inference.conf"] & psks["wg0-monitoring.conf"], {"inference-1-prometheus-psk"}
        )
