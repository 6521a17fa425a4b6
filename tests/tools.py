"""System tools the production tests drive (promtool, nft, caddy, systemd-analyze, ...)."""

from __future__ import annotations

import os
import shutil

from twisted.internet.protocol import Protocol
from twisted.trial import unittest


def require_tool(testcase: unittest.TestCase, tool: str) -> str:
    """The tool's path; skips where it is not installed, but fails in CI (which installs it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            testcase.fail(f"{tool} is missing in CI: run etc/dev/ci-deps")
        raise unittest.SkipTest(f"{tool} not installed (etc/dev/ci-deps installs it)")
    return path


def files_open_under(pid: int, directory: str) -> list[str]:
    """What process ``pid`` holds open under ``directory`` (deleted temporary files included:
    ``tempfile.TemporaryFile`` opens them unnamed, ``/dir/#inode (deleted)``)."""
    found = []
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except OSError:  # closed meanwhile
            continue
        if target.startswith(directory.rstrip("/") + "/"):
            found.append(target)
    return found


class RawClient(Protocol):
    """Raw bytes in and out of a connection (to send a request in pieces)."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
