"""System tools the production tests drive (promtool, nft, caddy, systemd-analyze, ...)."""

from __future__ import annotations

import os
import shutil

from twisted.trial import unittest


def require_tool(testcase: unittest.TestCase, tool: str) -> str:
    """The tool's path; skips where it is not installed, but fails in CI (which installs it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            testcase.fail(f"{tool} is missing in CI: run etc/dev/ci-deps")
        raise unittest.SkipTest(f"{tool} not installed (etc/dev/ci-deps installs it)")
    return path
