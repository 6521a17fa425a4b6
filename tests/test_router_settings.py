"""Router settings: layering (defaults < env file < environment < command line) and validation."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import TestCase

from llmrouter.router import settings as settings_module
from llmrouter.router.settings import Endpoint, Settings, SettingsError, load, read_env_file
from llmrouter.router.tap import Options

ROOT = Path(__file__).resolve().parents[1]


class LayeringTests(TestCase):
    def env_file(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(text)
        return path

    def test_defaults(self) -> None:
        s = load({})
        self.assertEqual(s.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(s.metrics_listen, "tcp:9100:interface=127.0.0.1")
        self.assertEqual(s.keys_dir, Path("./dev-keys"))
        self.assertEqual(
            s.inference_endpoints, ("unix:/run/llmrouter/inference.sock kind=llmrouter",)
        )
        self.assertEqual(s.device_auth, "optional")
        self.assertEqual(s.max_body_bytes, 262144)
        self.assertEqual(s.pad_bytes, 64)
        self.assertEqual(s.epsilon_total, 10.0)
        self.assertEqual(s.source_of("pad_bytes"), "default")

    def test_order(self) -> None:
        path = self.env_file(
            "# comment\n\nexport PAD_BYTES=128\nRATE_LIMIT_BURST='7'\nKEYS_DIR=/from/file\n"
        )
        s = load(
            {"RATE_LIMIT_BURST": "9", "INFERENCE_ENDPOINTS": "unix:/a.sock, unix:/b.sock"},
            path,
            {"keys_dir": Path("/from/cli"), "listen": []},
        )
        self.assertEqual(s.pad_bytes, 128)
        self.assertEqual(s.source_of("pad_bytes"), f"env file {path}")
        self.assertEqual(s.rate_limit_burst, 9)
        self.assertEqual(s.source_of("rate_limit_burst"), "environment")
        self.assertEqual(s.keys_dir, Path("/from/cli"))
        self.assertEqual(s.source_of("keys_dir"), "command line")
        self.assertEqual(s.inference_endpoints, ("unix:/a.sock", "unix:/b.sock"))
        self.assertEqual(s.listen, Settings().listen)  # an empty CLI list is "not given"

    def test_frozen(self) -> None:
        s = Settings()
        with self.assertRaises(AttributeError):
            s.pad_bytes = 1  # type: ignore[misc]

    def test_bad_env_file_line(self) -> None:
        path = self.env_file("PAD_BYTES 128\n")
        e = self.assertRaises(SettingsError, read_env_file, path)
        self.assertIn(":1: expected KEY=VALUE", str(e))

    def test_missing_env_file(self) -> None:
        e = self.assertRaises(SettingsError, load, {}, Path("/nonexistent/env"))
        self.assertIn("cannot read env file", str(e))

    def test_every_env_name_maps_to_a_field(self) -> None:
        fields = set(Settings.__dataclass_fields__)
        for env, (name, _) in settings_module.ENV_NAMES.items():
            self.assertIn(name, fields, env)


class ValidationTests(TestCase):
    def check(self, environ: dict[str, str], fragment: str) -> None:
        e = self.assertRaises(SettingsError, load, environ)
        self.assertIn(fragment, str(e))

    def test_not_a_number(self) -> None:
        self.check({"MAX_STREAMS": "many"}, "MAX_STREAMS (environment) is not a valid value")

    def test_ranges(self) -> None:
        self.check({"MAX_STREAMS": "0"}, "MAX_STREAMS must be greater than 0")
        self.check({"STREAM_CADENCE_MS": "-5"}, "STREAM_CADENCE_MS must not be negative")
        self.check({"POW_DIFFICULTY": "40"}, "POW_DIFFICULTY must be from 1 to 32")
        self.check({"EPSILON_PER_QUERY": "11"}, "EPSILON_PER_QUERY must not exceed")
        self.check({"ENVIRONMENT": "staging"}, "ENVIRONMENT must be")
        self.check({"DEVICE_AUTH": "sometimes"}, "DEVICE_AUTH")
        self.check({"TRUSTED_PROXIES": "proxy.example"}, "TRUSTED_PROXIES")
        self.check({"RATE_LIMIT_IPV6_PREFIX": "129"}, "RATE_LIMIT_IPV6_PREFIX must be from")
        self.check({"WRITE_STALL_SECONDS": "0"}, "WRITE_STALL_SECONDS must be greater than 0")
        self.check({"NEW_DEVICE_POW_DIFFICULTY": "33"}, "NEW_DEVICE_POW_DIFFICULTY must be")

    def test_shared_state_and_key_role(self) -> None:
        """STATE_URL forms; a bad one is refused without echoing it (it may hold a password)."""
        for url in (
            "redis://localhost",
            "redis://:pass%40word@10.8.0.1:6379/0",
            "redis://user:pw@[::1]:6380/15",
            "rediss://redis.example.org:6380",
            "unix:///run/redis/redis-server.sock",
            "unix:///run/redis/redis-server.sock?db=2",
            "unix://:pw@/run/redis/redis-server.sock",
        ):
            self.assertEqual(Settings(state_url=url).state_url, url)
        for url in ("http://localhost", "redis://", "redis://h:p/x", "redis://:secretpw@h:port"):
            error = self.assertRaises(SettingsError, Settings, state_url=url)
            self.assertIn("STATE_URL", str(error))
            self.assertNotIn("secretpw", str(error))
        self.assertNotIn("secretpw", repr(Settings(state_url="redis://:secretpw@localhost")))
        self.assertRaises(SettingsError, Settings, state_tls_ca=Path("/ca"))
        Settings(state_url="rediss://h", state_tls_ca=Path("/ca"))
        self.assertRaises(SettingsError, Settings, state_lease_seconds=1)
        self.assertEqual(Settings(keys_role="follower").keys_role, "follower")
        self.assertRaises(SettingsError, Settings, keys_role="leeder")

    def test_replay_window_covers_the_skew(self) -> None:
        """Below 2 x 60 s a request could be replayed once its enc left the cache (issue 8)."""
        self.check({"REPLAY_WINDOW_SECONDS": "100"}, "REPLAY_WINDOW_SECONDS must be at least 120")
        self.assertEqual(load({"REPLAY_WINDOW_SECONDS": "120"}).replay_window_seconds, 120)

    def test_trusted_proxies_unix(self) -> None:
        """``unix`` trusts the peer of UNIX-socket listeners (a local Caddy) for X-Forwarded-For."""
        s = load({"TRUSTED_PROXIES": "unix,10.0.0.0/8", "RATE_LIMIT_IPV6_PREFIX": "56"})
        self.assertEqual(s.trusted_proxies, ("unix", "10.0.0.0/8"))
        self.assertEqual(s.rate_limit_ipv6_prefix, 56)
        self.assertEqual(load({}).rate_limit_ipv6_prefix, 56)  # a /48 is 256 buckets (issue 19)

    def test_endpoints(self) -> None:
        self.check({"INFERENCE_ENDPOINTS": "tcp:1234"}, "INFERENCE_ENDPOINTS entries")
        self.check({"INFERENCE_ENDPOINTS": "http://10.0.0.5:8000"}, "only on loopback")
        self.check({"INFERENCE_ENDPOINTS": ""}, "needs at least one backend")
        self.check(
            {"INFERENCE_ENDPOINTS": "https://gpu1:8443", "UPSTREAM_TLS_CA": "/ca.pem"},
            "need UPSTREAM_TLS_CERT, UPSTREAM_TLS_KEY",
        )
        s = load(
            {
                "INFERENCE_ENDPOINTS": "https://gpu1:8443,unix:/run/x.sock,http://127.0.0.1:9",
                "UPSTREAM_TLS_CA": "/ca.pem",
                "UPSTREAM_TLS_CERT": "/c.pem",
                "UPSTREAM_TLS_KEY": "/k.pem",
            }
        )
        self.assertEqual(len(s.inference_endpoints), 3)

    def test_endpoint_models_and_kinds(self) -> None:
        s = load(
            {
                "INFERENCE_ENDPOINTS": "unix:/a.sock model=small, unix:/b.sock model=big"
                " model=big-2 kind=vllm\nunix:/c.sock unix:/d.sock kind=llama-server",
                "DEFAULT_MODEL": "big",
            }
        )
        self.assertEqual(
            s.endpoints(),
            (
                Endpoint("unix:/a.sock", ("small",)),
                Endpoint("unix:/b.sock", ("big", "big-2"), "vllm"),
                Endpoint("unix:/c.sock"),
                Endpoint("unix:/d.sock", (), "llama-server"),
            ),
        )
        self.assertEqual(s.default_model, "big")
        self.check({"INFERENCE_ENDPOINTS": "model=x unix:/a.sock"}, "INFERENCE_ENDPOINTS")
        for bad in ("model=bad/../n@me!", "model=", "kind=tgi"):
            self.check({"INFERENCE_ENDPOINTS": f"unix:/a.sock {bad}"}, "kind=llmrouter|")
        self.check({"DEFAULT_MODEL": "no such"}, "DEFAULT_MODEL must be a model name")
        # every endpoint pinned and none serves the default: it could never be routed
        self.check(
            {"INFERENCE_ENDPOINTS": "unix:/a.sock model=a", "DEFAULT_MODEL": "b"},
            "DEFAULT_MODEL is not among",
        )


class OptionsTests(TestCase):
    def setUp(self) -> None:
        saved = {k: v for k, v in os.environ.items() if k in settings_module.ENV_NAMES}
        for k in saved:
            del os.environ[k]

        def restore() -> None:
            for k in settings_module.ENV_NAMES:
                os.environ.pop(k, None)
            os.environ.update(saved)

        self.addCleanup(restore)

    def test_command_line(self) -> None:
        options = Options()
        options.parseOptions(
            [
                "--listen",
                "tcp:1:interface=127.0.0.1",
                "--listen",
                "unix:/tmp/r.sock",
                "--inference",
                "unix:/x.sock",
                "--inference",
                "unix:/y.sock model=small kind=llmrouter",
                "--default-model",
                "small",
                "--device-auth",
                "required",
                "--keys-dir",
                "/k",
                "--metrics-listen",
                "tcp:2:interface=127.0.0.1",
            ]
        )
        s = options.settings
        assert s is not None
        self.assertEqual(s.listen, ("tcp:1:interface=127.0.0.1", "unix:/tmp/r.sock"))
        self.assertEqual(
            s.endpoints(),
            (Endpoint("unix:/x.sock"), Endpoint("unix:/y.sock", ("small",), "llmrouter")),
        )
        self.assertEqual(s.default_model, "small")
        self.assertEqual(s.device_auth, "required")
        self.assertEqual(s.keys_dir, Path("/k"))
        self.assertEqual(s.metrics_listen, "tcp:2:interface=127.0.0.1")

    def test_environment_fallback(self) -> None:
        os.environ["DEVICE_AUTH"] = "required"
        os.environ["INFERENCE_ENDPOINTS"] = "unix:/a.sock unix:/b.sock"
        options = Options()
        options.parseOptions(["--inference", "unix:/c.sock"])
        assert options.settings is not None
        self.assertEqual(options.settings.device_auth, "required")
        self.assertEqual(options.settings.inference_endpoints, ("unix:/c.sock",))

    def test_usage_error(self) -> None:
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--device-auth", "maybe"])
        self.assertIn("DEVICE_AUTH", str(e))

    def test_help_documents_everything(self) -> None:
        text = str(Options())
        for option in ("--listen", "--metrics-listen", "--keys-dir", "--inference", "--env-file"):
            self.assertIn(option, text)
        for env in settings_module.ENV_NAMES:
            self.assertIn(env, text)

    def test_shipped_env_files_load(self) -> None:
        for name in ("env.development", "env.production"):
            path = ROOT / "etc" / "llmrouter" / name
            s = load({}, path)
            self.assertIsInstance(s, Settings)
        production = load({}, ROOT / "etc" / "llmrouter" / "env.production")
        self.assertTrue(production.production)
        self.assertEqual(production.device_auth, "required")
