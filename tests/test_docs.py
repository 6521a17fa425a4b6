"""The production documents stay true to the repository: every file they name exists, every
test they cite is defined in the named test module, and the threat model covers the required
topics."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial import unittest

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    REPO / "docs" / name
    for name in (
        "threat-model.md",
        "deployment.md",
        "tls.md",
        "clients.md",
        "security-testing.md",
    )
]
ROOTS = ("llmrouter/", "inference/", "tests/", "etc/", "docs/", "bin/", "clients/", "bench/")
CODE = re.compile(r"`([^`\s]+)`")
# `tests/test_x.py` (`name`, `name2`) or (`name`; ...) right after the module
CITATION = re.compile(r"`(tests/test_[a-z0-9_]+\.py)` \(([^)]*)\)")


def referenced_paths(text: str) -> set[str]:
    paths = set()
    for token in CODE.findall(text):
        if token.startswith(ROOTS) and "{" not in token and "*" not in token:
            paths.add(token.split("::")[0])
    return paths


class ReferenceTests(unittest.TestCase):
    def test_named_files_exist(self) -> None:
        missing = []
        for doc in DOCS:
            for path in referenced_paths(doc.read_text()):
                if not (REPO / path).exists():
                    missing.append(f"{doc.name}: {path}")
        self.assertEqual(missing, [])

    def test_cited_tests_exist(self) -> None:
        missing = []
        count = 0
        for doc in DOCS:
            for module, inside in CITATION.findall(doc.read_text()):
                source = (REPO / module).read_text()
                for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", inside):
                    count += 1
                    if not re.search(rf"^\s*(def|class) {name}\b", source, re.M):
                        missing.append(f"{doc.name}: {module} {name}")
        self.assertEqual(missing, [])
        self.assertGreater(count, 30)

    def test_every_control_row_names_code_and_proof(self) -> None:
        """Implemented controls in the threat model's tables cite a file and a test."""
        text = (REPO / "docs" / "threat-model.md").read_text()
        rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
        checked = 0
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            if len(cells) != 4 or cells[0] == "Control":
                continue
            status, implementation, proof = cells[1], cells[2], cells[3]
            if status.startswith("**not"):
                continue
            checked += 1
            self.assertTrue(referenced_paths(implementation), row)
            self.assertTrue(any(p.startswith("tests/") for p in referenced_paths(proof)), row)
        self.assertGreater(checked, 30)


class CoverageTests(unittest.TestCase):
    def test_threat_model_topics(self) -> None:
        text = (REPO / "docs" / "threat-model.md").read_text().lower()
        for topic in (
            "network observer",
            "remote attacker",
            "rogue infrastructure admin",
            "curious operator",
            "out of scope",
            "assumptions",
            "tls 1.3",
            "mutual tls",
            "replay",
            "rate limit",
            "24 h",
            "revocation",
            "privacy budget",
            "constant-time",
            "padding",
            "cadence",
            "denial of service",
            "homomorphic",
        ):
            self.assertIn(topic, text)

    def test_deployment_sections(self) -> None:
        text = (REPO / "docs" / "deployment.md").read_text().lower()
        for topic in (
            "development",
            "production",
            "migrating from development to production",
            "upgrade and rollback",
            "backup signing key",
            "monitoring host",
            "how this page is tested",
            "key and certificate rotation",
            "incident response checklist",
            "swap",
            "sandbox verification",
        ):
            self.assertIn(topic, text)

    def test_runbook_links_reach_a_heading(self) -> None:
        """Alerts link to sections of docs/deployment.md by their anchors (GitHub's rule:
        lowercase, punctuation other than '-' dropped, spaces to '-')."""
        headings = re.findall(r"^#+ (.+)$", (REPO / "docs" / "deployment.md").read_text(), re.M)
        anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        links = re.findall(
            r"docs/deployment\.md#([\w-]+)",
            (REPO / "etc" / "prometheus" / "alerts.yml").read_text(),
        )
        self.assertTrue(links)
        self.assertEqual(set(links) - anchors, set())

    def test_tls_sections(self) -> None:
        text = (REPO / "docs" / "tls.md").read_text().lower()
        for topic in ("caddy", "ssl:", "alpn", "step-ca", "pinning", "backup", "rotation"):
            self.assertIn(topic, text)
