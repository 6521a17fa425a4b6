"""Monitoring: Prometheus config and alert rules validate (promtool), alerts fire when they should
(promtool test rules), the Grafana dashboard is well formed, and every metric name the rules and
the dashboard use is a contract name that really appears in the /metrics output of a real router
and a real inference daemon."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from llmrouter.ops import pki
from tests.router_support import post_json
from tests.tools import require_tool

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "etc" / "prometheus"
DASHBOARD = REPO / "etc" / "grafana" / "llmrouter-dashboard.json"

# The contract (/tmp/team/contracts.md, "Prometheus metric names"), plus the certificate expiry
# gauges the daemons export when they use mutual TLS: family name -> type.
CONTRACT = {
    "inference_tokens_generated": "counter",
    "inference_time_to_first_token_seconds": "histogram",
    "inference_token_latency_seconds": "histogram",
    "inference_queue_depth": "gauge",
    "inference_active_generations": "gauge",
    "inference_requests": "counter",
    "inference_model_loaded": "gauge",
    "inference_server_certificate_expiry_timestamp_seconds": "gauge",
    # GPU offload: layers asked for and layers on a GPU (inference.gpu)
    "inference_gpu_layers_requested": "gauge",
    "inference_gpu_layers_offloaded": "gauge",
    "llmrouter_request_duration_seconds": "histogram",
    "llmrouter_upstream_duration_seconds": "histogram",
    "llmrouter_time_to_first_token_seconds": "histogram",
    "llmrouter_active_streams": "gauge",
    "llmrouter_tokens_streamed": "counter",
    "llmrouter_http_responses": "counter",
    "llmrouter_admission_rejections": "counter",
    "llmrouter_circuit_state": "gauge",
    "llmrouter_backend_healthy": "gauge",
    "llmrouter_upstream_retries": "counter",
    "llmrouter_key_rotations": "counter",
    "llmrouter_current_key_age_seconds": "gauge",
    "llmrouter_security_events": "counter",
    "llmrouter_client_certificate_expiry_timestamp_seconds": "gauge",
    # routers sharing state in Redis (STATE_URL) only
    "llmrouter_state_up": "gauge",
    "llmrouter_state_errors": "counter",
    "llmrouter_state_seconds": "histogram",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
NAME = re.compile(r"\b((?:llmrouter|inference)_[a-z0-9_]+)\b")


def rule_expressions() -> list[str]:
    """The ``expr:`` of every rule (plain or ``|`` block), without a YAML dependency."""
    exprs: list[str] = []
    lines = (PROM / "alerts.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr: ?(.*)$", line)
        if match is None:
            continue
        if match.group(2).strip() != "|":
            exprs.append(match.group(2))
            continue
        indent, block = len(match.group(1)), []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block))
    return exprs


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def used_names() -> set[str]:
    names: set[str] = set()
    for expr in rule_expressions() + dashboard_expressions():
        names |= set(NAME.findall(expr))
    return names


def family_of(sample_name: str) -> tuple[str, str] | None:
    """(family, type) of a sample name such as llmrouter_http_responses_total, per the contract."""
    for family, kind in CONTRACT.items():
        for suffix in SUFFIXES[kind]:
            if sample_name == family + suffix:
                return family, kind
    return None


class PromtoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.promtool = require_tool(self, "promtool")

    def run_promtool(self, *args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.promtool, *args], capture_output=True, text=True, cwd=cwd, check=False
        )

    def test_check_rules(self) -> None:
        result = self.run_promtool("check", "rules", "alerts.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_alerts_fire(self) -> None:
        result = self.run_promtool("test", "rules", "alerts_test.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_rule_unit_tests_can_fail(self) -> None:
        """A wrong expectation is reported, so the passing run above means something."""
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp)
        shutil.copy(PROM / "alerts.yml", tmp)
        text = (PROM / "alerts_test.yml").read_text().replace("1d 2h 19m 0s", "1d 1h 0m 0s")
        (tmp / "alerts_test.yml").write_text(text)
        self.assertNotEqual(
            self.run_promtool("test", "rules", "alerts_test.yml", cwd=tmp).returncode, 0
        )

    def test_check_config_with_pki_certificates(self) -> None:
        """promtool opens the TLS files: give it a CA and client certificate from llmrouter-pki
        at the paths the config names (relocated into a temp dir)."""
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp)
        pki.create_ca(tmp / "pki")
        pki.issue(tmp / "pki", "client", "prometheus")
        shutil.copy(PROM / "alerts.yml", tmp)
        config = (
            (PROM / "prometheus.yml").read_text().replace("/etc/prometheus/pki", str(tmp / "pki"))
        )
        (tmp / "prometheus.yml").write_text(config)
        result = self.run_promtool("check", "config", "prometheus.yml", cwd=tmp)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 26 rules found", result.stdout)


class DashboardQueryTests(unittest.TestCase):
    def test_queries_parse_as_promql(self) -> None:
        """promtool parses every dashboard query (Grafana variables substituted) as a
        recording rule, so a typo in a panel fails here rather than on a dashboard."""
        promtool = require_tool(self, "promtool")
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp)
        exprs = [
            e.replace("$__rate_interval", "5m").replace("$router", ".*")
            for e in dashboard_expressions()
            if not e.startswith("label_values(")
        ]
        lines = ["groups:", "  - name: dashboard", "    rules:"]
        for i, expr in enumerate(exprs):
            lines += [f"      - record: dashboard:panel_{i}", f"        expr: {json.dumps(expr)}"]
        (tmp / "dashboard.yml").write_text("\n".join(lines) + "\n")
        result = subprocess.run(
            [promtool, "check", "rules", str(tmp / "dashboard.yml")],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(exprs)} rules found", result.stdout)


class DashboardTests(unittest.TestCase):
    def test_well_formed(self) -> None:
        doc = json.loads(DASHBOARD.read_text())
        self.assertEqual(doc["uid"], "llmrouter-overview")
        ids = [p["id"] for p in doc["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in doc["panels"]:
            self.assertTrue(panel["targets"], panel["title"])
            self.assertEqual(panel["datasource"]["uid"], "${datasource}")
            for key in ("x", "y", "w", "h"):
                self.assertIsInstance(panel["gridPos"][key], int)
            for target in panel["targets"]:
                self.assertEqual(target["expr"].count("("), target["expr"].count(")"))

    def test_covers_the_contract(self) -> None:
        used = {
            family_of(n)[0] for n in NAME.findall(" ".join(dashboard_expressions())) if family_of(n)
        }
        self.assertEqual(set(CONTRACT) - used, set())


class ContractNameTests(unittest.TestCase):
    def test_every_used_name_is_a_contract_sample_name(self) -> None:
        unknown = {n for n in used_names() if family_of(n) is None}
        self.assertEqual(unknown, set())

    def test_alert_coverage(self) -> None:
        names = set()
        for expr in rule_expressions():
            names |= set(NAME.findall(expr))
        for required in (
            "llmrouter_http_responses_total",
            "llmrouter_backend_healthy",
            "llmrouter_circuit_state",
            "llmrouter_current_key_age_seconds",
            "llmrouter_time_to_first_token_seconds_bucket",
            "llmrouter_state_up",
            "inference_gpu_layers_offloaded",
        ):
            self.assertIn(required, names)


def _families(text: str) -> dict[str, tuple[str, set[str]]]:
    """family name -> (type, label names seen on its samples)."""
    result: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        result[family.name] = (family.type, labels)
    return result


class LiveMetricsTests(unittest.TestCase):
    """Start the real daemons and compare the names used by alerts and dashboard with what
    they actually export."""

    timeout = 240

    def check(self, prefix: str, text: str) -> None:
        families = _families(text)
        used = {n for n in used_names() if n.startswith(prefix)}
        self.assertTrue(used)
        missing = []
        for name in sorted(used):
            found = family_of(name)
            assert found is not None, name
            family, kind = found
            if families.get(family, ("", set()))[0] != kind:
                missing.append(name)
        self.assertEqual(missing, [], f"not in the live /metrics of {prefix}*")
        expected_labels = {
            "llmrouter_http_responses": "status",
            "llmrouter_backend_healthy": "backend",
            "llmrouter_circuit_state": "backend",
            "inference_requests": "outcome",
        }
        for family, label in expected_labels.items():
            if family.startswith(prefix) and families[family][1]:
                self.assertIn(label, families[family][1], family)

    @defer.inlineCallbacks
    def test_router_and_inference_export_every_used_name(self) -> Any:
        """Over mutual TLS, as in production, so that the certificate expiry gauges (exported
        only by daemons that load a certificate) are there too, with the loaded expiry."""
        from tests.certs import make_pki
        from tests.daemons import start_inference, start_router_daemon
        from tests.router_support import short_tempdir
        from tests.test_router_mtls_upstream import free_port

        certs = make_pki(short_tempdir(self))
        port = free_port()
        tls = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key)]
        inference = yield start_inference(
            self,
            listen=[f"ssl:{port}:interface=127.0.0.1"],
            extra_args=[*tls, "--tls-ca", str(certs.ca)],
        )
        # one request so labelled series (outcome) have samples
        status, _, _ = yield post_json(
            f"unix:{inference.socket}",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        self.assertEqual(status, 200)
        status, _, body = yield inference.request(b"GET", "/metrics")
        self.assertEqual(status, 200)
        self.check("inference_", body.decode())
        self.assertExpiry(
            body, "inference_server_certificate_expiry_timestamp_seconds", certs.server.cert
        )

        directory = Path(tempfile.mkdtemp(prefix="llmr-"))
        self.addCleanup(shutil.rmtree, directory, True)
        client = [
            *("--tls-ca", str(certs.ca)),
            *("--tls-client-cert", str(certs.client.cert)),
            *("--tls-client-key", str(certs.client.key)),
        ]
        from tests.redis_server import start_redis

        redis = start_redis(self)  # the shared-state metrics are exported with STATE_URL only
        router = start_router_daemon(
            self, directory, [f"https://localhost:{port}"], client, env={"STATE_URL": redis.url}
        )
        yield router.start()  # ready only once a health probe over mutual TLS succeeded
        yield router.request(b"GET", "/api/pubkey")
        metrics = f"unix:{directory / 'metrics.sock'}"
        status, _, body = yield router.request(b"GET", "/metrics", base=metrics)
        self.assertEqual(status, 200)
        self.check("llmrouter_", body.decode())
        self.assertExpiry(
            body, "llmrouter_client_certificate_expiry_timestamp_seconds", certs.client.cert
        )

    def assertExpiry(self, body: bytes, name: str, cert: Path) -> None:
        from cryptography import x509

        expected = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        value = next(
            s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == name
        )
        self.assertEqual(value, expected.timestamp())
