"""The README's run command, end to end, on the real embedded default model.

``make run`` is ``etc/dev/stack``: inference on the embedded default model (SmolLM2-135M-Instruct)
over a UNIX socket, the router in front of it, and one ``llmrouter-client chat`` with the
README's question. Here it runs with ``--demo`` (stop after the chat) on free ports and a private
run directory, and the answer must come back through the whole chain on protocol v2 (client ->
HPKE -> router -> UNIX socket -> the node's gate -> llama.cpp -> sealed SSE -> router -> client)
and be on topic.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, utils
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "In one sentence, what is end-to-end encryption?"  # etc/dev/stack's and the README's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackTests(TestCase):
    timeout = 900  # the first run assembles the default model from its package

    @defer.inlineCallbacks
    def test_make_run_demo_on_default_model(self) -> Any:
        run = Path(tempfile.mkdtemp(prefix="llmr-stack-"))
        self.addCleanup(shutil.rmtree, run, True)
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "LLMROUTER_RUN_DIR": str(run / "run"),
            "LLMROUTER_KEYS_DIR": str(run / "keys"),
            "LLMROUTER_NODE_KEYS_DIR": str(run / "node-keys"),
            "LLMROUTER_OPERATOR_KEY": str(run / "operator.key"),
            "LLMROUTER_PORT": str(free_port()),
            "LLMROUTER_METRICS_PORT": str(free_port()),
            "INFERENCE_MAX_TOKENS": "64",
        }
        out, err, code = yield utils.getProcessOutputAndValue(
            str(ROOT / "etc" / "dev" / "stack"), ["--demo"], env=env, path=str(ROOT)
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
