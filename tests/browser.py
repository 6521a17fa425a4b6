"""Real headless Chromium for tests, driven over the DevTools protocol on a pipe.

Debian's ``chromium`` (or ``$CHROMIUM``) with ``--remote-debugging-pipe``: JSON messages
separated by NUL bytes, commands on the child's fd 3, answers and events on its fd 4; no driver
package, no browser download. As clients/typescript/test/support/browser.ts does for the SDK.
Enough of the protocol to open a page and evaluate an expression in it (awaiting a promise).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.tools import require_tool

# The flags that work headless here: no sandbox (tests run as root), no GPU, and no background
# connections to the outside world (the network is closed).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)


class BrowserError(Exception):
    pass


class Chromium(ProcessProtocol):
    """One browser process; ``extra`` flags (e.g. ``--host-resolver-rules=...``)."""

    def __init__(self, executable: str, extra: tuple[str, ...] = ()) -> None:
        self._buffer = b""
        self._next = 1
        self._pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.profile = tempfile.mkdtemp(prefix="llmr-chromium-")
        argv = [executable, *FLAGS, *extra, f"--user-data-dir={self.profile}", "about:blank"]
        self._transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self,
            executable,
            argv,
            env={**os.environ},
            childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 4:
            return  # chromium's own chatter on stdout/stderr
        self._buffer += data
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            message = json.loads(raw)
            waiter = self._pending.pop(message.get("id", -1), None)
            if waiter is None:
                continue
            if "error" in message:
                waiter.errback(BrowserError(message["error"].get("message", "error")))
            else:
                waiter.callback(message.get("result", {}))

    def processEnded(self, reason: Failure) -> None:
        for waiter in self._pending.values():
            waiter.errback(BrowserError("chromium exited"))
        self._pending.clear()
        shutil.rmtree(self.profile, ignore_errors=True)
        self.ended.callback(None)

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> defer.Deferred[dict[str, Any]]:
        ident, self._next = self._next, self._next + 1
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._pending[ident] = waiter
        self._transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return waiter

    async def page(self, url: str) -> str:
        """A new tab showing ``url`` (loaded); its session id."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session: str = attached["sessionId"]
        await self.send("Page.enable", session=session)
        await self.send("Page.navigate", {"url": url}, session)
        for _ in range(200):  # until the page's document is there
            ready = await self.evaluate(session, "document.readyState")
            if ready == "complete":
                break
            await deferLater(0.05)
        return session

    async def evaluate(self, session: str, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited if it is a promise)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session,
        )
        if "exceptionDetails" in result:
            raise BrowserError(json.dumps(result["exceptionDetails"])[:500])
        return result["result"].get("value")

    def close(self) -> defer.Deferred[None]:
        if not self.ended.called:
            self._transport.signalProcess("KILL")
        return self.ended


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def start_chromium(testcase: unittest.TestCase, *extra: str) -> Chromium:
    """Chromium for this test (skipped where it is not installed, failed in CI); closed at
    cleanup."""
    executable = os.environ.get("CHROMIUM") or require_tool(testcase, "chromium")
    browser = Chromium(executable, extra)
    testcase.addCleanup(browser.close)
    return browser
