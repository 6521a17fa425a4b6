"""End to end on the real embedded models, started without a model file.

The default (SmolLM2-135M-Instruct, no ``--model``): greedy output of the daemon's batched
engine must equal llama-cpp-python's own high-level ``Llama.create_completion`` on the same
prompt (the same tokens, not merely some text); chat answers make sense; JSON mode and a JSON
schema give parseable, valid JSON from a real model; the prompt cache reuses a conversation for
the same key. Gemma 3 270M stays available by name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
from twisted.internet import defer, threads
from twisted.trial import unittest

from inference import embedded
from tests.daemons import Daemon, open_stream

PROMPT = "The capital of France is"


def reference_completion(prompt: str, max_tokens: int) -> str:
    import llama_cpp

    path = embedded.MODELS[embedded.DEFAULT]()
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        out: Any = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return str(out["choices"][0]["text"])
    finally:
        llm.close()


@defer.inlineCallbacks
def start(testcase: unittest.TestCase, *args: str) -> Any:
    directory = Path(tempfile.mkdtemp(prefix="llmr-"))
    testcase.addCleanup(shutil.rmtree, directory, True)
    sock = directory / "inference.sock"
    daemon = Daemon(
        "inference",
        ["--listen", f"unix:{sock}:mode=600", "--threads", "1", *args],
        health=f"unix:{sock}",
        directory=directory,
        ready_timeout=300,
    )
    testcase.addCleanup(daemon.stop)
    yield daemon.start()
    return daemon


@defer.inlineCallbacks
def post(daemon: Daemon, path: str, body: dict[str, Any], **headers: bytes) -> Any:
    status, _, data = yield daemon.request(
        b"POST",
        path,
        json.dumps(body).encode(),
        headers={k.replace("_", "-").encode(): [v] for k, v in headers.items()},
    )
    assert status == 200, data
    return json.loads(data)


class DefaultModelTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_default_model_end_to_end(self) -> Any:
        daemon = yield start(self, "--parallel", "2")
        _, _, data = yield daemon.request(b"GET", "/v1/models")
        self.assertEqual(json.loads(data)["data"][0]["id"], "smollm2-135m-instruct")

        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        ours = (yield post(daemon, "/v1/completions", body))["choices"][0]["text"]
        expected = yield threads.deferToThread(reference_completion, PROMPT, 16)
        self.assertEqual(ours, expected)
        self.assertIn("Paris", ours)

        question = "In one sentence, what is end-to-end encryption?"  # the README's
        chat = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 40,
            "temperature": 0,
        }
        whole = (yield post(daemon, "/v1/chat/completions", chat))["choices"][0]["message"]
        self.assertIn("encrypt", whole["content"].lower())
        status, _, reader = yield open_stream(
            daemon, "/v1/chat/completions", json.dumps({**chat, "stream": True}).encode()
        )
        self.assertEqual(status, 200)
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertEqual(streamed, whole["content"])
        self.assertIn(chunks[-1]["choices"][0]["finish_reason"], ("stop", "length"))

    @defer.inlineCallbacks
    def test_json_from_a_real_model(self) -> Any:
        daemon = yield start(self)
        ask = [{"role": "user", "content": "Give the name and the capital of France as JSON."}]

        def answer(response_format: dict[str, Any]) -> Any:
            body = {"messages": ask, "max_tokens": 200, "temperature": 0}
            return post(
                daemon, "/v1/chat/completions", {**body, "response_format": response_format}
            )

        result = yield answer({"type": "json_object"})
        self.assertEqual(result["choices"][0]["finish_reason"], "stop")
        self.assertIsInstance(json.loads(result["choices"][0]["message"]["content"]), dict)
        schema = {
            "type": "object",
            "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
            "required": ["country", "capital"],
            "additionalProperties": False,
        }
        result = yield answer(
            {"type": "json_schema", "json_schema": {"name": "country", "schema": schema}}
        )
        answer = json.loads(result["choices"][0]["message"]["content"])
        jsonschema.validate(answer, schema)
        self.assertIn("Paris", answer["capital"])

    @defer.inlineCallbacks
    def test_multi_turn_reuses_the_conversation(self) -> Any:
        daemon = yield start(self)
        key = {"x_llmrouter_cache_key": b"device-digest-for-this-test-0001"}
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours."},
        ]
        first = yield post(
            daemon,
            "/v1/chat/completions",
            {"messages": messages, "max_tokens": 20, "temperature": 0},
            **key,
        )
        messages += [
            first["choices"][0]["message"],
            {"role": "user", "content": "And three animals?"},
        ]
        second = yield post(
            daemon,
            "/v1/chat/completions",
            {"messages": messages, "max_tokens": 20, "temperature": 0},
            **key,
        )
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        # everything up to the new turn (the answer re-rendered by the template) is reused
        self.assertGreaterEqual(cached, first["usage"]["prompt_tokens"])


class GemmaByNameTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_gemma_3_270m_by_name(self) -> Any:
        daemon = yield start(self, "--model", "gemma-3-270m", "--parallel", "1")
        _, _, data = yield daemon.request(b"GET", "/v1/models")
        self.assertEqual(json.loads(data)["data"][0]["id"], "gemma-3-270m")
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        result = yield post(daemon, "/v1/completions", body)
        self.assertIn("France", result["choices"][0]["text"])
