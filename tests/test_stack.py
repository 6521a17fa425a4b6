"""The README's run command, end to end, on the real embedded default model.

``make run`` is ``etc/dev/stack``: inference on the embedded default model (SmolLM2-135M-Instruct)
over a UNIX socket, the router in front of it, and one ``llmrouter-client chat`` with the
README's question. Here it runs with ``--demo`` (stop after the chat) on free ports and a private
run directory, and the answer must come back through the whole chain on protocol v2 (client ->
HPKE -> router -> UNIX socket -> the node's gate -> llama.cpp -> sealed SSE -> router -> client)
and be on topic.

The stack watches both daemons for the whole session: an inference daemon that dies of SIGSEGV
at start (in its self-test decode, as on the AMX hosts of issue 18) or after its first answer
(tests/faults.py puts the fault in, nothing else changes) must be named with its signal and
its last log lines, the router stopped and the stack's exit non-zero. The quick path loads no
model: a v2 gate (``twistd inference --front``) fronts an OpenAI-compatible server the developer
already runs (here our cached llama-server serving the same default model), still on v2.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task, utils
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from inference import embedded
from tests.daemons import Daemon
from tests.faults import twistd_on_path
from tests.llama_server import binary as llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "etc" / "dev" / "stack"
QUESTION = "In one sentence, what is end-to-end encryption?"  # etc/dev/stack's and the README's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_environment(run: Path, fault: str | None = None, **extra: str) -> dict[str, str]:
    """``make run``'s environment on free ports and a private run directory; with ``fault``, a
    ``twistd`` that injects it into the inference daemon comes first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    if fault is not None:
        path = f"{twistd_on_path(run / 'bin', fault).parent}:{path}"
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LLMROUTER_", "INFERENCE_"))},
        "PATH": path,
        "LLMROUTER_RUN_DIR": str(run / "run"),
        "LLMROUTER_KEYS_DIR": str(run / "keys"),
        "LLMROUTER_NODE_KEYS_DIR": str(run / "node-keys"),
        "LLMROUTER_OPERATOR_KEY": str(run / "operator.key"),
        "LLMROUTER_PORT": str(free_port()),
        "LLMROUTER_METRICS_PORT": str(free_port()),
        "INFERENCE_MAX_TOKENS": "64",
        **extra,
    }


class Stack(ProcessProtocol):
    """``etc/dev/stack`` running (without ``--demo``): its output so far, its exit code."""

    def __init__(self, env: dict[str, str]) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.env = env
        self.transport: Any = reactor.spawnProcess(
            self, str(STACK), [str(STACK)], env=env, path=str(ROOT)
        )

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    @defer.inlineCallbacks
    def wait_output(self, text: bytes, timeout: float = 600) -> Any:
        for _ in range(int(timeout / 0.1)):
            if text in self.out or self.ended.called:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        if text not in self.out:
            raise AssertionError(f"no {text!r} from the stack:\n{self.out!r}\n{self.err!r}")

    def stop(self) -> defer.Deferred[int | None]:
        if not self.ended.called:
            self.transport.signalProcess("INT")
        return self.ended


def listening(port: str) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", int(port))) == 0


class StackTests(TestCase):
    timeout = 900  # the first run assembles the default model from its package

    @defer.inlineCallbacks
    def test_make_run_demo_on_default_model(self) -> Any:
        run = Path(tempfile.mkdtemp(prefix="llmr-stack-"))
        self.addCleanup(shutil.rmtree, run, True)
        env = stack_environment(run)
        out, err, code = yield utils.getProcessOutputAndValue(
            str(STACK), ["--demo"], env=env, path=str(ROOT)
        )
        logs = "".join(p.read_text(errors="replace") for p in (run / "run").glob("*.log"))
        self.assertEqual(code, 0, f"stdout={out!r}\nstderr={err!r}\nlogs:\n{logs[-4000:]}")
        self.assertIn(QUESTION.encode(), out)
        self.assertIn(b"(protocol v2, operator pin ", out)  # the node opened it, not the router
        text = out.split(b"llmrouter-client chat", 1)[1].split(b"\n", 1)[1].decode()
        # a sensible answer: on topic (the greedy answer of this model is a sentence about
        # encryption), not the prompt echoed nor a repeated token
        self.assertIn("encrypt", text.lower())
        self.assertNotIn(QUESTION, text)
        self.assertGreater(len(set(text.split())), 5)
        self.assertRegex(err, rb"finish_reason=stop prompt_tokens=[1-9]")
        # Nothing of the prompt or the answer in either daemon's log, nor in the key directory.
        self.assertNotIn(QUESTION, logs)
        self.assertNotIn(text.strip()[:40], logs)
        for path in [*(run / "keys").rglob("*"), *(run / "node-keys").rglob("*")]:
            if path.is_file():
                self.assertNotIn(QUESTION.encode(), path.read_bytes())

    def died(self, err: bytes, env: dict[str, str]) -> str:
        """The stack's report of a dead inference daemon, checked; the router is gone too."""
        text = err.decode(errors="replace")
        self.assertRegex(
            text,
            r"stack: inference \(pid \d+\) was killed by signal 11 \(SIGSEGV\)\. The last lines"
            rf" of {re.escape(env['LLMROUTER_RUN_DIR'])}/inference\.log:",
        )
        self.assertIn("stack: stopping the other daemon; nothing is running now.", text)
        self.assertFalse(listening(env["LLMROUTER_PORT"]))
        return text

    @defer.inlineCallbacks
    def test_inference_dies_at_start(self) -> Any:
        run = Path(tempfile.mkdtemp(prefix="llmr-stack-"))
        self.addCleanup(shutil.rmtree, run, True)
        env = stack_environment(run, "segfault-at-start")
        out, err, code = yield utils.getProcessOutputAndValue(
            str(STACK), ["--demo"], env=env, path=str(ROOT)
        )
        self.assertEqual(code, 1, f"stdout={out!r}\nstderr={err!r}")
        text = self.died(err, env)
        # the log's last lines show where it crashed: the self-test's decode
        self.assertIn("Fatal Python error: Segmentation fault", text)
        self.assertRegex(text, r"inference/model\.py\", line \d+ in self_test")
        self.assertNotIn(b"ready", out)
        self.assertNotIn(b"stack: running", out + err)

    @defer.inlineCallbacks
    def test_inference_dies_after_the_first_answer(self) -> Any:
        run = Path(tempfile.mkdtemp(prefix="llmr-stack-"))
        self.addCleanup(shutil.rmtree, run, True)
        env = stack_environment(run, "segfault-on-request:2")
        stack = Stack(env)
        self.addCleanup(stack.stop)
        yield stack.wait_output(b"stack: running: inference router (logs in")
        self.assertIn(b"encrypt", stack.out.lower())  # the first answer came
        pin = re.search(rb"LLMROUTER_PIN=(\S+)", stack.out)
        assert pin is not None
        client = Path(sys.executable).parent / "llmrouter-client"
        asked = yield utils.getProcessOutputAndValue(
            str(client),
            ["chat", "--temperature", "0", "Hello"],
            env={
                **env,
                "LLMROUTER_URL": f"http://127.0.0.1:{env['LLMROUTER_PORT']}",
                "LLMROUTER_PIN": pin.group(1).decode(),
            },
        )
        self.assertNotEqual(asked[2], 0, asked)  # the second request met the crash
        code = yield stack.ended
        self.assertEqual(code, 1, f"stdout={stack.out!r}\nstderr={stack.err!r}")
        text = self.died(stack.err, env)
        self.assertIn("in submit_or_crash", text)  # tests/faults.py's crash, in the log's tail
        self.assertEqual(stack.out.count(b"stack: running:"), 1)

    @defer.inlineCallbacks
    def test_quick_path_against_a_server_already_running(self) -> Any:
        """``make run BACKEND=...``: no model loaded here; a v2 gate (``twistd inference
        --front``) in front of llama-server (a real OpenAI-compatible server on loopback TCP)
        serving the default model, the router in front of the gate; the demo chat answers
        through them on protocol v2, and no llama.cpp is loaded by our daemons."""
        server = llama_server_binary()
        model = embedded.MODELS[embedded.DEFAULT]()
        port = free_port()
        llama = Daemon(
            "llama-server",
            [
                "-m",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--jinja",
                "--no-webui",
                "--threads",
                "1",
                "--parallel",
                "1",
                "--ctx-size",
                "2048",
            ],
            command=[str(server)],
            health=f"http://127.0.0.1:{port}",
            env={"LD_LIBRARY_PATH": str(server.parent)},
        )
        self.addCleanup(llama.stop)
        yield llama.start()
        run = Path(tempfile.mkdtemp(prefix="llmr-stack-"))
        self.addCleanup(shutil.rmtree, run, True)
        backend = f"http://127.0.0.1:{port} kind=llama-server"
        env = stack_environment(run, "segfault-at-start", LLMROUTER_BACKEND=backend)
        out, err, code = yield utils.getProcessOutputAndValue(
            str(STACK), ["--demo"], env=env, path=str(ROOT)
        )
        self.assertEqual(code, 0, f"stdout={out!r}\nstderr={err!r}")
        self.assertIn(
            f"stack: no model here; a v2 gate on unix:{run / 'run' / 'inference.sock'} opens"
            f" requests for the server at {backend}",
            out.decode(),
        )
        self.assertIn(b"(protocol v2, operator pin ", out)
        text = out.split(b"llmrouter-client chat", 1)[1].split(b"\n", 1)[1].decode()
        self.assertIn("encrypt", text.lower())
        # the crashing twistd first on PATH would have killed a daemon that decodes: the gate
        # loads no model, so it ran on
        logs = sorted(p.name for p in (run / "run").glob("*.log"))
        self.assertEqual(logs, ["gate.log", "router.log"])
        self.assertNotIn("llama.cpp", (run / "run" / "gate.log").read_text())


class MakefileTests(TestCase):
    def test_quick_path_skips_the_llama_cpp_build(self) -> None:
        def plan(*args: str) -> str:
            return subprocess.run(
                ["make", "-n", "-B", "run", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        full, quick = plan(), plan("BACKEND=http://127.0.0.1:11434 kind=ollama model=m")
        # the full setup installs the node's dependencies and builds llama.cpp (bin/install-release
        # dev: dev.lock, llmrouter-llama-build); the quick path only the router's
        self.assertIn("bin/install-release dev .venv", full)
        self.assertIn("llamabuild.py --check", full)
        self.assertIn("bin/install-release dev-router .venv", quick)
        self.assertNotIn("llamabuild", quick)
        self.assertNotIn("install-release dev .venv", quick)
        self.assertIn("LLMROUTER_BACKEND='http://127.0.0.1:11434 kind=ollama model=m'", quick)
        self.assertIn("etc/dev/stack", quick)
