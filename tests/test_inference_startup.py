"""The inference daemon proves its model works before it says it is ready.

At start it refuses a llama.cpp build that would crash here (ggml's AMX kernels without the
operator's opt-in), loads the model, then decodes a fixed prompt and a few tokens for real
(:meth:`inference.model.LlamaModel.self_test`). Only then does ``/health`` answer 200 and
systemd hear ``READY=1`` (``Type=notify``): a self-test that fails or crashes is a failed start,
never the first user's failed request. Each test runs the real daemon on the tiny model with one
fault injected by tests/faults.py; the control runs without.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from inference.model import SELF_TEST_TOKENS
from llmrouter import sdnotify
from llmrouter.ops.llamabuild import host_cpu_flags
from tests.daemons import Daemon, start_inference


class NotifySocket:
    """A datagram socket standing for systemd's ``NOTIFY_SOCKET``; ``messages`` in order."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        directory = Path(tempfile.mkdtemp(prefix="llmr-notify-"))
        testcase.addCleanup(shutil.rmtree, directory, True)
        self.path = directory / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.setblocking(False)
        testcase.addCleanup(self._sock.close)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def ready(self) -> bool:
        return any("READY=1" in m.splitlines() for m in self.read())

    @defer.inlineCallbacks
    def wait_ready(self, daemon: Daemon, timeout: float = 120.0) -> Any:
        for _ in range(int(timeout / 0.05)):
            if self.ready():
                return
            if daemon.exit_code is not None:
                raise AssertionError(f"exited {daemon.exit_code}:\n{daemon.log_text()[-3000:]}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"no READY=1 in {timeout}s; got {self.messages}")


@defer.inlineCallbacks
def wait_for(condition: Any, timeout: float = 120.0) -> Any:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out")


class ReadinessTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_ready_only_after_the_self_test(self) -> Any:
        notify = NotifySocket(self)
        daemon = yield start_inference(
            self, env={"NOTIFY_SOCKET": str(notify.path)}, wait=False, fault="slow-self-test:4"
        )
        # the model is loaded and the self-test is held back: not ready, by either signal
        yield wait_for(lambda: "the self-test waits" in daemon.log_text())
        status, _, body = yield daemon.request(b"GET", "/health")
        self.assertEqual((status, json.loads(body)), (503, {"status": "loading"}))
        self.assertFalse(notify.ready(), notify.messages)
        self.assertIn("STATUS=loading the model and decoding its self-test", notify.messages)

        yield notify.wait_ready(daemon)
        log = daemon.log_text()
        decoded = int(log.split("its self-test decoded ", 1)[1].split()[0])
        self.assertGreater(decoded, SELF_TEST_TOKENS)  # the prompt, then the tokens
        status, _, _ = yield daemon.request(b"GET", "/health")
        self.assertEqual(status, 200)
        self.assertIn("llama.cpp: CPU : ", log)  # what loaded, for whoever reads the log
        # the self-test's sequence is forgotten: a request decodes from an empty cache
        status, _, body = yield daemon.request(
            b"POST", "/v1/completions", json.dumps({"prompt": "a b", "max_tokens": 3}).encode()
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 3)
        yield daemon.stop()
        self.assertIn("STOPPING=1", notify.read())

    @defer.inlineCallbacks
    def test_control_without_a_fault(self) -> Any:
        notify = NotifySocket(self)
        daemon = yield start_inference(
            self, env={"NOTIFY_SOCKET": str(notify.path)}, wait=False, fault="none"
        )
        yield notify.wait_ready(daemon)
        self.assertEqual(notify.messages[-1], "READY=1\nSTATUS=serving")


class FailedStartTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def start_with(self, fault: str, env: dict[str, str] | None = None) -> Any:
        notify = NotifySocket(self)
        daemon = yield start_inference(
            self, env={"NOTIFY_SOCKET": str(notify.path), **(env or {})}, wait=False, fault=fault
        )
        code = yield daemon.wait_exit(120)
        self.assertFalse(notify.ready(), notify.messages)  # never said it was ready
        return code, daemon.log_text()

    @defer.inlineCallbacks
    def test_decode_error_fails_the_start(self) -> Any:
        code, log = yield self.start_with("decode-error")
        self.assertEqual(code, 1)
        self.assertIn("model failed to load: self-test: llama_decode failed after 0 tokens", log)

    @defer.inlineCallbacks
    def test_crash_in_the_self_test_fails_the_start(self) -> Any:
        """As on the AMX hosts of issue 18, but at start: the process dies of SIGSEGV."""
        code, log = yield self.start_with("segfault-at-start")
        self.assertEqual(code, -11)
        self.assertNotIn("model loaded", log)

    @defer.inlineCallbacks
    def test_amx_build_refused_without_opt_in(self) -> Any:
        code, log = yield self.start_with("amx-build")
        self.assertEqual(code, 1)
        lines = [line for line in log.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, log)
        self.assertIn("ggml's AMX kernels are compiled in", lines[0])
        self.assertIn("LLMROUTER_LLAMA_AMX=1", lines[0])
        self.assertIn("llmrouter-llama-build", lines[0])

    @defer.inlineCallbacks
    def test_amx_build_with_opt_in(self) -> Any:
        """The opt-in lifts the refusal on a CPU with AMX; on one without it the build is
        still refused, as one made for another CPU."""
        notify = NotifySocket(self)
        env = {"NOTIFY_SOCKET": str(notify.path), "LLMROUTER_LLAMA_AMX": "1"}
        daemon = yield start_inference(self, env=env, wait=False, fault="amx-build")
        if {"amx_tile", "amx_int8"} <= host_cpu_flags():
            yield notify.wait_ready(daemon)
            self.assertIn("AMX_INT8 = 1", daemon.log_text())
        else:
            code = yield daemon.wait_exit(120)
            self.assertEqual(code, 1)
            self.assertIn(
                "it was built for another CPU (AMX_INT8: not on this one)", daemon.log_text()
            )
            self.assertNotIn("ggml's AMX kernels are compiled in", daemon.log_text())


class NotifyTests(unittest.TestCase):
    def test_sends_to_a_path_or_the_abstract_namespace(self) -> None:
        notify = NotifySocket(self)
        self.assertTrue(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(notify.path)}))
        self.assertEqual(notify.read(), ["READY=1"])
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
            abstract.bind(b"\0llmr-notify-test")
            self.assertTrue(sdnotify.notify("STATUS=x", {"NOTIFY_SOCKET": "@llmr-notify-test"}))
            self.assertEqual(abstract.recv(64), b"STATUS=x")

    def test_nothing_outside_systemd(self) -> None:
        self.assertFalse(sdnotify.notify("READY=1", {}))
        self.assertFalse(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:9"}))
        # a socket that is gone is not an error that stops the daemon
        self.assertFalse(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}))
