"""The inference daemon's HTTP API against a real ``twistd inference`` on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.daemons import open_stream, start_inference
from tests.tools import RawClient, files_open_under


def chat(content: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **extra}).encode()


def metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"metric {name} not found")


class StreamingTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_chat_stream(self) -> Any:
        """SSE in OpenAI's chunk format: role first, content deltas, finish + usage, [DONE]."""
        daemon = yield start_inference(self)
        status, headers, reader = yield open_stream(
            daemon, "/v1/chat/completions", chat(max_tokens=12, stream=True)
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        ids = {c["id"] for c in chunks}
        self.assertEqual(len(ids), 1)
        self.assertTrue(ids.pop().startswith("chatcmpl-"))
        for c in chunks:
            self.assertEqual(c["object"], "chat.completion.chunk")
            self.assertEqual(c["model"], "tiny")
        for c in chunks[1:-1]:
            self.assertIsNone(c["choices"][0]["finish_reason"])
            self.assertIsInstance(c["choices"][0]["delta"]["content"], str)
        last = chunks[-1]
        self.assertEqual(last["choices"][0]["finish_reason"], "length")
        self.assertEqual(last["usage"]["completion_tokens"], 12)
        self.assertGreater(last["usage"]["prompt_tokens"], 0)
        self.assertEqual(
            last["usage"]["total_tokens"],
            last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"],
        )
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertTrue(text)

    @defer.inlineCallbacks
    def test_inference_endpoint_always_streams(self) -> Any:
        daemon = yield start_inference(self)
        status, headers, reader = yield open_stream(
            daemon, "/inference", chat(max_tokens=5, stream=False)
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(json.loads(events[-2])["usage"]["completion_tokens"], 5)

    @defer.inlineCallbacks
    def test_completions_stream_and_whole(self) -> Any:
        daemon = yield start_inference(self)
        body = json.dumps({"prompt": "Once upon", "max_tokens": 7, "stream": True}).encode()
        status, _, reader = yield open_stream(daemon, "/v1/completions", body)
        self.assertEqual(status, 200)
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertTrue(all(c["object"] == "text_completion" for c in chunks))
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 7)

        body = json.dumps({"prompt": "Once upon", "max_tokens": 7}).encode()
        status, _, data = yield daemon.request(b"POST", "/v1/completions", body)
        self.assertEqual(status, 200)
        result = json.loads(data)
        self.assertEqual(result["object"], "text_completion")
        self.assertEqual(result["choices"][0]["finish_reason"], "length")
        self.assertIsInstance(result["choices"][0]["text"], str)
        self.assertEqual(result["usage"]["completion_tokens"], 7)

    @defer.inlineCallbacks
    def test_chat_whole(self) -> Any:
        """Non-streaming: one JSON object; greedy decoding is reproducible."""
        daemon = yield start_inference(self)
        body = chat("the same prompt", max_tokens=9, temperature=0)
        answers = []
        for _ in range(2):
            status, headers, data = yield daemon.request(b"POST", "/v1/chat/completions", body)
            self.assertEqual(status, 200)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            result = json.loads(data)
            self.assertEqual(result["object"], "chat.completion")
            self.assertEqual(result["choices"][0]["message"]["role"], "assistant")
            self.assertEqual(result["choices"][0]["finish_reason"], "length")
            self.assertEqual(result["usage"]["completion_tokens"], 9)
            answers.append(result["choices"][0]["message"]["content"])
        self.assertEqual(answers[0], answers[1])

    @defer.inlineCallbacks
    def test_concurrent_streams(self) -> Any:
        """Several streams at once, all complete with their own lengths."""
        daemon = yield start_inference(self, extra_args=["--parallel", "3"])
        opened = yield defer.gatherResults(
            [
                open_stream(
                    daemon, "/v1/chat/completions", chat(f"n{n}", max_tokens=20 + n, stream=True)
                )
                for n in range(5)
            ]
        )
        results = yield defer.gatherResults([reader.done for _, _, reader in opened])
        for n, events in enumerate(results):
            usage = json.loads(events[-2])["usage"]
            self.assertEqual(usage["completion_tokens"], 20 + n)
        _, _, text = yield daemon.request(b"GET", "/metrics")
        self.assertEqual(metric(text, "inference_active_generations"), 0)
        self.assertEqual(metric(text, "inference_tokens_generated_total"), sum(range(20, 25)))

    @defer.inlineCallbacks
    def test_stop_string(self) -> Any:
        """Generation ends at a stop string, which is not part of the text."""
        daemon = yield start_inference(self)
        body = chat("x", max_tokens=60, temperature=0)
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", body)
        full = json.loads(data)["choices"][0]["message"]["content"]
        stop = full[10:12]
        self.assertEqual(len(stop), 2)
        body = chat("x", max_tokens=60, temperature=0, stop=[stop])
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", body)
        result = json.loads(data)
        self.assertEqual(result["choices"][0]["finish_reason"], "stop")
        self.assertEqual(result["choices"][0]["message"]["content"], full[: full.index(stop)])


class InfoTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_gpu_layers_on_a_cpu_build_refuse_to_start(self) -> Any:
        """A GPU node upgraded with a CPU-only llama-cpp-python must not serve, healthy, from
        the CPU: --gpu-layers on a build that cannot offload stops the daemon at start, saying
        what to do (this machine's build is CPU-only, like that upgrade's)."""
        daemon = yield start_inference(self, extra_args=["--gpu-layers", "-1"], wait=False)
        code = yield daemon.wait_exit()
        self.assertNotEqual(code, 0)
        log = daemon.log_text()
        self.assertIn("cannot offload to a GPU", log)
        self.assertIn("llmrouter-llama-build --cuda", log)
        self.assertIn("INFERENCE_ALLOW_CPU_FALLBACK=1", log)
        self.assertNotIn("Traceback", log)

    @defer.inlineCallbacks
    def test_gpu_options_with_cpu_fallback_allowed(self) -> Any:
        """With the fallback allowed explicitly, --gpu-layers and --flash-attn reach llama.cpp
        (tests.test_inference_units checks the parameters), the daemon serves from the CPU and
        its metrics show the layers asked for and none offloaded (the alert's input)."""
        daemon = yield start_inference(
            self,
            extra_args=["--gpu-layers", "-1", "--flash-attn", "on"],
            env={"INFERENCE_ALLOW_CPU_FALLBACK": "1"},
        )
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", chat(max_tokens=4))
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 4)
        self.assertIn("cannot offload to a GPU; every layer runs on the CPU", daemon.log_text())
        _, _, text = yield daemon.request(b"GET", "/metrics")
        metrics = text.decode()
        requested = re.search(r"(?m)^inference_gpu_layers_requested (\S+)$", metrics)
        assert requested is not None, metrics
        self.assertGreater(float(requested.group(1)), 1)  # every layer, and the output layer
        self.assertIn("\ninference_gpu_layers_offloaded 0.0\n", metrics)

    @defer.inlineCallbacks
    def test_health_models_metrics(self) -> Any:
        daemon = yield start_inference(self, extra_args=["--model-name", "tiny-test"])
        status, _, data = yield daemon.request(b"GET", "/health")
        self.assertEqual((status, json.loads(data)), (200, {"status": "ok"}))
        status, _, data = yield daemon.request(b"GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in json.loads(data)["data"]], ["tiny-test"])
        status, headers, text = yield daemon.request(b"GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        for name in (
            "inference_tokens_generated_total",
            "inference_queue_depth",
            "inference_active_generations",
            "inference_model_loaded",
            "inference_time_to_first_token_seconds_count",
            "inference_token_latency_seconds_count",
        ):
            metric(text, name)
        self.assertEqual(metric(text, "inference_model_loaded"), 1)
        self.assertIn('inference_requests_total{outcome="ok"} 0.0', text.decode())

        status, _, data = yield daemon.request(b"GET", "/nope")
        self.assertEqual((status, json.loads(data)["error"]["code"]), (404, "not_found"))
        status, _, data = yield daemon.request(b"GET", "/v1/chat/completions")
        self.assertEqual(status, 405)
        self.assertEqual(json.loads(data)["error"]["code"], "method_not_allowed")

    @defer.inlineCallbacks
    def test_a_large_prompt_is_never_spooled_to_disk(self) -> Any:
        """Twisted's default request wrote a body of 100 KB or more to a temporary file: the
        router's plaintext prompts (up to ~190 KB) landed on the inference host's disk (issue
        19). While such a body arrives, the daemon holds no file in its temporary directory."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        daemon = yield start_inference(self, env={"TMPDIR": str(tmp.resolve())})
        body = chat("word " * 30_000, max_tokens=1)  # 150 KB
        peer = yield connectProtocol(UNIXClientEndpoint(reactor, str(daemon.socket)), RawClient())
        self.addCleanup(peer.transport.loseConnection)
        peer.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-1000]
        )
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(files_open_under(daemon.pid, str(tmp.resolve())), [])
        peer.transport.write(body[-1000:])
        for _ in range(600):
            if b"\r\n\r\n" in peer.data:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 "))  # it was read and answered
        self.assertEqual(files_open_under(daemon.pid, str(tmp.resolve())), [])
        # Over --max-body: refused as announced, before it is read.
        status, _, data = yield daemon.request(b"POST", "/v1/chat/completions", b" " * (2 << 20))
        self.assertEqual((status, json.loads(data)["error"]["code"]), (413, "body_too_large"))

    @defer.inlineCallbacks
    def test_no_prompt_or_completion_in_logs(self) -> Any:
        """Neither the prompt nor the generated text reaches the log, nor does an access log."""
        daemon = yield start_inference(self)
        secret = "zebra-violet-secret-prompt"
        body = chat(secret, max_tokens=30, temperature=0)
        _, _, data = yield daemon.request(
            b"POST", "/v1/chat/completions", body, headers={b"user-agent": [b"agent-marker"]}
        )
        completion = json.loads(data)["choices"][0]["message"]["content"]
        yield daemon.request(b"POST", "/v1/chat/completions", b'{"messages": "' + b"q" * 40)
        yield daemon.stop()
        log = daemon.log_text()
        self.assertIn("model loaded", log)
        self.assertNotIn(secret, log)
        self.assertNotIn("agent-marker", log)
        self.assertNotIn("/v1/chat/completions", log)
        self.assertNotIn("q" * 40, log)
        self.assertNotIn(completion.strip()[:12], log)
