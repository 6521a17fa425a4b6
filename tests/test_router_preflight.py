"""Production preflight: ENVIRONMENT=production refuses unsafe settings by name, all at once;
development stays permissive; the real daemon does not start; ``--check`` runs only the checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.trial.unittest import TestCase

from llmrouter.router import preflight
from llmrouter.router import settings as settings_module
from llmrouter.router.settings import Settings, SettingsError, load
from llmrouter.router.tap import Options

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "etc" / "llmrouter" / "env.production"
TWISTD = "from twisted.scripts.twistd import run; run()"


def production(**changes: Any) -> Settings:
    """The shipped production settings with ``changes`` (as if the operator edited the file)."""
    return load({}, PRODUCTION).replace(**changes)


class ChecksTests(TestCase):
    def assertRefused(self, settings: Settings, *names: str) -> list[str]:
        found = preflight.problems(settings)
        for name in names:
            self.assertTrue(any(name in line for line in found), (name, found))
        return found

    def test_shipped_production_file_passes(self) -> None:
        s = production()
        self.assertTrue(s.production)
        self.assertEqual(preflight.problems(s), [])
        preflight.check(s)

    def test_defaults_fail_on_each_unsafe_setting(self) -> None:
        found = self.assertRefused(
            Settings(environment="production"),
            "DEVICE_AUTH",
            "KEYS_DIR",
            "STREAM_CADENCE_MS",
            "TRUSTED_PROXIES",
        )
        self.assertEqual(len(found), 4, found)
        error = self.assertRaises(
            SettingsError, preflight.check, Settings(environment="production")
        )
        for line in found:
            self.assertIn(line, str(error))  # every problem in one message

    def test_swap_in_use_is_refused(self) -> None:
        """The router holds decrypted prompts; inference nodes only ran ``swapoff -a``, so swap
        came back at the next boot (issue 19). Production refuses a host with swap on (zram,
        compressed RAM, is no disk and passes)."""
        swaps = Path(self.mktemp())
        header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        swaps.write_text(header + "/dev/zram0  partition\t1048572\t0\t100\n")
        preflight.check(production(), swaps)
        self.assertEqual(preflight.host_problems(swaps), [])
        swaps.write_text(header + "/swapfile  file\t1048572\t0\t-2\n")
        error = self.assertRaises(SettingsError, preflight.check, production(), swaps)
        self.assertIn("swap is on (/swapfile)", str(error))
        self.assertIn("systemctl mask swap.target", str(error))
        preflight.check(Settings(environment="development", listen=("tcp:8080",)), swaps)

    def test_development_is_permissive(self) -> None:
        lax = Settings(environment="development", listen=("tcp:8080",))
        self.assertTrue(preflight.problems(lax))
        preflight.check(lax)  # no error

    def test_names_where_the_value_came_from(self) -> None:
        s = load({"DEVICE_AUTH": "optional"}, PRODUCTION)
        (line,) = preflight.problems(s)
        self.assertIn("DEVICE_AUTH (environment) is optional", line)
        self.assertIn("DEVICE_AUTH=required", line)

    def test_relative_keys_dir(self) -> None:
        self.assertRefused(production(keys_dir=Path("dev-keys")), "KEYS_DIR")
        self.assertEqual(preflight.problems(production(keys_dir=Path("/srv/keys"))), [])

    def test_cadence_off(self) -> None:
        self.assertRefused(production(stream_cadence_ms=0), "STREAM_CADENCE_MS")

    def test_plain_http_listeners_off_loopback(self) -> None:
        for listen in (
            "tcp:8080",
            "tcp:8080:interface=0.0.0.0",
            "tcp:8080:interface=192.0.2.7",
            "tcp6:8080",
            "tcp6:8080:interface=\\:\\:",
            "tcp:8080:interface=router.example",
        ):
            self.assertRefused(production(listen=(listen,)), f"entry {listen} serves plain HTTP")
        ok = (
            "tcp:8080:interface=127.0.0.1",
            "tcp6:8080:interface=\\:\\:1",
            "ssl:443:privateKey=k.pem:certKey=c.pem",
            "systemd:domain=INET:index=0",
        )
        self.assertEqual(preflight.problems(production(listen=ok)), [])
        self.assertRefused(production(listen=("le:/srv/acme:tcp:443",)), "production accepts")

    def test_metrics_listener_only_loopback_or_private(self) -> None:
        for metrics in ("tcp:9100", "tcp:9100:interface=203.0.113.9"):
            self.assertRefused(production(metrics_listen=metrics), "METRICS_LISTEN")
        for metrics in ("tcp:9100:interface=10.8.0.1", "unix:/run/llmrouter/metrics.sock"):
            self.assertEqual(preflight.problems(production(metrics_listen=metrics)), [])

    def test_local_proxy_must_be_trusted(self) -> None:
        """Behind Caddy on loopback, TRUSTED_PROXIES must name it, or all clients share a bucket."""
        found = self.assertRefused(production(trusted_proxies=()), "TRUSTED_PROXIES")
        self.assertIn("set TRUSTED_PROXIES=127.0.0.1", found[0])
        self.assertRefused(production(trusted_proxies=("10.0.0.0/8",)), "TRUSTED_PROXIES")
        self.assertEqual(preflight.problems(production(trusted_proxies=("127.0.0.0/8",))), [])
        # behind a proxy on a UNIX socket (made by the router or handed over by systemd), the
        # proxy is trusted by the word `unix`, as the router's address bucketing reads it
        for listen in ("unix:/run/llmrouter/router.sock", "systemd:domain=UNIX:index=0"):
            found = self.assertRefused(production(listen=(listen,)), "TRUSTED_PROXIES=unix")
            self.assertEqual(len(found), 1)
            self.assertIn(f"entry {listen} is behind a proxy on a UNIX socket", found[0])
            trusted = production(listen=(listen,), trusted_proxies=("unix",))
            self.assertEqual(preflight.problems(trusted), [])
        # as an operator writes it in the env file, next to the loopback proxy
        both = load(
            {
                "LISTEN": "tcp:8080:interface=127.0.0.1 unix:/run/llmrouter/router.sock",
                "TRUSTED_PROXIES": "127.0.0.1,::1,unix",
            },
            PRODUCTION,
        )
        self.assertEqual(preflight.problems(both), [])
        self.assertRefused(production(trusted_proxies=("unix",)), "set TRUSTED_PROXIES=127.0.0.1")

    def test_shared_state_only_in_private(self) -> None:
        """Plain-text Redis only on loopback or the private (WireGuard) network; the URL's
        password is never in the message."""
        for url in ("redis://:s3cret@203.0.113.5:6379/0", "redis://:s3cret@redis.example.org"):
            found = self.assertRefused(production(state_url=url), "STATE_URL")
            self.assertNotIn("s3cret", " ".join(found))
        for url in (
            "redis://:s3cret@10.8.0.1:6379/0",
            "redis://127.0.0.1",
            "rediss://:s3cret@redis.example.org:6380/1",
            "unix:///run/redis/redis-server.sock",
            "",
        ):
            self.assertEqual(preflight.problems(production(state_url=url)), [], url)

    def test_plain_http_upstream(self) -> None:
        found = self.assertRefused(
            production(inference_endpoints=("http://127.0.0.1:8081",)), "INFERENCE_ENDPOINTS"
        )
        self.assertIn("https:// with mutual TLS", found[0])
        remote = production(
            inference_endpoints=("https://inference-1.wg:8443", "unix:/run/x.sock"),
            upstream_tls_ca=Path("/ca"),
            upstream_tls_cert=Path("/c"),
            upstream_tls_key=Path("/k"),
            router_terminated="off",
        )
        self.assertEqual(preflight.problems(remote), [])

    def test_router_terminated_mode_toward_remote_backends(self) -> None:
        """v1/v1.1 makes the router open prompts; toward a remote node that sends them on to
        another host, so production asks the operator to choose by name (issue 22)."""
        remote = production(
            inference_endpoints=("https://inference-1.wg:8443", "unix:/run/x.sock"),
            upstream_tls_ca=Path("/ca"),
            upstream_tls_cert=Path("/c"),
            upstream_tls_key=Path("/k"),
        )
        (line,) = self.assertRefused(remote, "ROUTER_TERMINATED=off", "https://inference-1.wg")
        self.assertNotIn("unix:/run/x.sock", line)
        for choice in ("allow", "off"):
            self.assertEqual(preflight.problems(remote.replace(router_terminated=choice)), [])
        self.assertEqual(preflight.problems(production()), [])  # local backends only
        self.assertRaises(SettingsError, production, router_terminated="yes")

    def test_modes(self) -> None:
        both = production(
            inference_endpoints=("https://n.wg:8443", "unix:/run/x.sock"),
            upstream_tls_ca=Path("/ca"),
            upstream_tls_cert=Path("/c"),
            upstream_tls_key=Path("/k"),
        )
        self.assertEqual(
            preflight.modes(both.replace(router_terminated="allow"), None),
            [
                "protocol v2 (the nodes open requests; the router relays ciphertext): on",
                "protocol v1/v1.1 (the router opens requests): on, toward 1 local and 1 remote"
                " backend(s) (ROUTER_TERMINATED=allow)",
            ],
        )
        off = preflight.modes(production(router_terminated="off"), "no router.cert")
        self.assertIn("off (no router.cert)", off[0])
        self.assertIn("off (ROUTER_TERMINATED=off)", off[1])


class OptionsTests(TestCase):
    def setUp(self) -> None:
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k in settings_module.ENV_NAMES}
        self.addCleanup(os.environ.update, saved)
        self.addCleanup(lambda: [os.environ.pop(k, None) for k in settings_module.ENV_NAMES])

    def test_production_refusal_is_a_usage_error(self) -> None:
        os.environ["ENVIRONMENT"] = "production"
        error = self.assertRaises(usage.UsageError, Options().parseOptions, [])
        for name in ("DEVICE_AUTH", "KEYS_DIR", "STREAM_CADENCE_MS", "TRUSTED_PROXIES"):
            self.assertIn(name, str(error))

    def test_check_flag(self) -> None:
        out = self.patch_stdout()
        exit_ = self.assertRaises(
            SystemExit, Options().parseOptions, ["--env-file", str(PRODUCTION), "--check"]
        )
        self.assertEqual(exit_.code, 0)
        self.assertIn("settings OK (production)", out())
        self.assertIn("llmrouter: protocol v2 (the nodes open requests", out())
        self.assertIn("off (the key directory has no signing key yet)", out())
        self.assertIn("protocol v1/v1.1 (the router opens requests): on, toward 1 local", out())
        exit_ = self.assertRaises(
            SystemExit,
            Options().parseOptions,
            ["--env-file", str(PRODUCTION), "--device-auth", "optional", "--check"],
        )
        self.assertIn("DEVICE_AUTH (command line) is optional", str(exit_.code))

    def test_check_reads_the_tls_files(self) -> None:
        """--check fails on a client certificate the router could not read (it used to say OK
        and the router then started without its https backends)."""
        self.patch_stdout()
        os.environ["ROUTER_TERMINATED"] = "allow"  # else the remote backend alone is refused
        missing = Path(self.mktemp()) / "router.crt"
        args = ["--env-file", str(PRODUCTION), "--inference", "https://inference-1.wg:8443"]
        args += ["--tls-ca", str(PRODUCTION), "--tls-client-key", str(PRODUCTION)]
        args += ["--tls-client-cert", str(missing), "--check"]
        exit_ = self.assertRaises(SystemExit, Options().parseOptions, args)
        self.assertIn(f"cannot read UPSTREAM_TLS_CERT {missing}", str(exit_.code))

    def patch_stdout(self) -> Any:
        import io

        buffer = io.StringIO()
        self.patch(sys, "stdout", buffer)
        return buffer.getvalue


class DaemonTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_daemon_refuses_to_start(self) -> Any:
        """The real ``twistd llmrouter`` exits before it listens or creates keys, naming each
        setting."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        env_file = directory / "env"
        env_file.write_text(
            PRODUCTION.read_text()
            + "DEVICE_AUTH=optional\nSTREAM_CADENCE_MS=0\nLISTEN=tcp:0:interface=0.0.0.0\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in settings_module.ENV_NAMES}
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", TWISTD, "-n", "--pidfile=", "llmrouter", "--env-file", str(env_file)],
            env=env,
            path=str(directory),
        )
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        for name in ("DEVICE_AUTH", "STREAM_CADENCE_MS", "LISTEN", "entry tcp:0:interface=0.0.0.0"):
            self.assertIn(name, text)
        self.assertNotIn("Traceback", text)
        self.assertFalse((directory / "keys").exists())
