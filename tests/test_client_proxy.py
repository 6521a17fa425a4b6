"""``llmrouter-client proxy``: the official ``openai`` client, through the proxy, to a real router.

The proxy runs as its own process (``python -m llmrouter.client proxy``), in front of a real
``twistd llmrouter`` and ``twistd inference`` on the tiny model. The ``openai`` client is
synchronous, so it runs in a thread while the reactor keeps serving the test's helpers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmrouter.client.proxy import OpenAIError, parse_listen, to_request
from llmrouter.protocol import b64u_encode
from tests.daemons import Daemon, start_inference, start_router_daemon
from tests.router_support import http, key_document, metric_value, short_tempdir
from tests.test_router_e2e import inference_metrics, sleep, wait_metric


class _Proxy(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.url: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.url.called and b"/v1 -> " in self.output:
            line = self.output.split(b"/v1 -> ")[0].split(b" ")[-1]
            self.url.callback(line.decode() + "/v1")

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", 0) or 0
        if not self.url.called:
            self.url.errback(Failure(RuntimeError(self.output.decode(errors="replace"))))
        self.ended.callback(code)


def run_proxy(testcase: TestCase, *args: str) -> _Proxy:
    """``llmrouter-client proxy ARGS``; killed at cleanup."""
    protocol = _Proxy()
    argv = [sys.executable, "-m", "llmrouter.client", "proxy", *args]
    transport = reactor.spawnProcess(protocol, sys.executable, argv, env=None)  # type: ignore[attr-defined]

    def stop() -> defer.Deferred[int]:
        if not protocol.ended.called:
            transport.signalProcess("TERM")
        return protocol.ended

    testcase.addCleanup(stop)
    return protocol


class ProxyEndToEnd(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def stack(self) -> Any:
        self.inference = yield start_inference(self, extra_args=["--parallel", "2"])
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{self.inference.socket}"])
        yield router.start()
        self.router_url = f"unix:{directory / 'router.sock'}"
        self.metrics_url = f"unix:{directory / 'metrics.sock'}"
        document = yield key_document(self.router_url)
        self.pin = b64u_encode(document.signing_key)
        proxy = run_proxy(
            self, "--listen", "127.0.0.1:0", "--url", self.router_url, "--pin", self.pin
        )
        url = yield proxy.url
        return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

    @defer.inlineCallbacks
    def test_openai_client_streaming_and_not(self) -> Any:
        client = yield self.stack()
        models = yield threads.deferToThread(client.models.list)
        self.assertEqual([m.id for m in models.data], ["llmrouter"])

        messages: Any = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello through the proxy"},
        ]
        completion = yield threads.deferToThread(
            client.chat.completions.create, model="llmrouter", messages=messages, max_tokens=6
        )
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.choices[0].finish_reason, "length")
        self.assertTrue(completion.choices[0].message.content)
        self.assertEqual(completion.usage.completion_tokens, 6)
        self.assertEqual(
            completion.usage.total_tokens,
            completion.usage.prompt_tokens + completion.usage.completion_tokens,
        )

        def stream() -> list[Any]:
            chunks = client.chat.completions.create(
                model="llmrouter",
                messages=messages,
                max_completion_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(chunks)

        chunks = yield threads.deferToThread(stream)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertTrue(text)
        self.assertEqual(chunks[-2].choices[0].finish_reason, "length")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 5)
        self.assertEqual(len({c.id for c in chunks}), 1)

        # What protocol v1 cannot carry is refused by name, never dropped.
        def refused(**extra: Any) -> Exception:
            try:
                client.chat.completions.create(
                    **{"model": "llmrouter", "messages": messages, **extra}
                )
            except openai.APIStatusError as e:
                return e
            raise AssertionError("accepted")

        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        error = yield threads.deferToThread(refused, tools=tools)
        self.assertIsInstance(error, openai.BadRequestError)
        self.assertEqual((error.code, error.param), ("unsupported_parameter", "tools"))
        self.assertIn("tools", error.message)
        error = yield threads.deferToThread(refused, response_format={"type": "json_object"})
        self.assertEqual(error.param, "response_format")
        error = yield threads.deferToThread(refused, model="gpt-4o")
        self.assertIsInstance(error, openai.NotFoundError)
        self.assertEqual(error.code, "model_not_found")
        error = yield threads.deferToThread(refused, temperature=5)
        self.assertEqual((error.status_code, error.code), (400, "invalid_value"))

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_upstream(self) -> Any:
        client = yield self.stack()
        text = yield inference_metrics(self.inference)
        cancelled = metric_value(text, "inference_requests_total", 'outcome="cancelled"')

        def read_one_and_leave() -> str:
            chunks = client.chat.completions.create(
                model="llmrouter",
                messages=[{"role": "user", "content": "a very long story"}],
                max_tokens=1000,
                stream=True,
            )
            first = [next(chunks), next(chunks)]
            chunks.close()  # the HTTP connection to the proxy goes away
            return "".join(c.choices[0].delta.content or "" for c in first)

        text = yield threads.deferToThread(read_one_and_leave)
        self.assertTrue(text)
        yield wait_metric(
            self.inference,
            "inference_requests_total",
            'outcome="cancelled"',
            lambda v: v == cancelled + 1,
        )
        for _ in range(200):
            _, _, body = yield http(self.metrics_url, path="/metrics")
            if metric_value(body.decode(), "llmrouter_active_streams") == 0:
                break
            yield sleep(0.05)
        self.assertEqual(metric_value(body.decode(), "llmrouter_active_streams"), 0)


class ProxyStartup(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def refused(self, *args: str) -> Any:
        proxy = run_proxy(self, "--listen", "127.0.0.1:0", *args)
        code = yield proxy.ended
        proxy.url.addErrback(lambda _: None)  # it never served
        self.assertEqual(code, 1)
        output: str = proxy.output.decode()
        self.assertNotIn("/v1 ->", output)
        return output

    @defer.inlineCallbacks
    def router(self) -> Any:
        inference = yield start_inference(self)
        directory = short_tempdir(self)
        daemon: Daemon = start_router_daemon(self, directory, [f"unix:{inference.socket}"])
        yield daemon.start()
        url = f"unix:{directory / 'router.sock'}"
        document = yield key_document(url)
        return url, b64u_encode(document.signing_key)

    @defer.inlineCallbacks
    def test_bad_pin_refuses_to_start(self) -> Any:
        url, pin = yield self.router()
        wrong = b64u_encode(bytes(32))
        output = yield self.refused("--url", url, "--pin", wrong)
        self.assertIn("not signed by the pinned key", output)
        output = yield self.refused("--url", url, "--pin", "not-a-key")
        self.assertIn("--pin must be", output)
        output = yield self.refused("--url", url)
        self.assertIn("--pin SIGNING_KEY", output)

        # Trust on first use: the key is kept, and a different one is refused later.
        tofu = Path(self.mktemp())
        proxy = run_proxy(self, "--listen", "127.0.0.1:0", "--url", url, "--tofu", str(tofu))
        yield proxy.url
        self.assertEqual(tofu.read_text().strip(), pin)
        self.assertEqual(tofu.stat().st_mode & 0o777, 0o600)
        tofu.write_text(wrong + "\n")
        output = yield self.refused("--url", url, "--tofu", str(tofu))
        self.assertIn("not signed by the pinned key", output)

    @defer.inlineCallbacks
    def test_remote_listen_needs_allow_remote(self) -> Any:
        pin = b64u_encode(bytes(32))
        proxy = run_proxy(self, "--listen", "0.0.0.0:0", "--url", "unix:/nonexistent", "--pin", pin)
        code = yield proxy.ended
        proxy.url.addErrback(lambda _: None)
        self.assertEqual(code, 1)
        self.assertIn("--allow-remote", proxy.output.decode())


class RequestMappingTests(SynchronousTestCase):
    def map(self, **body: Any) -> Any:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return to_request(json.dumps(body).encode(), "llmrouter")

    def refused(self, code: str, param: str | None, **body: Any) -> OpenAIError:
        e = self.assertRaises(OpenAIError, self.map, **body)
        self.assertEqual((e.code, e.param), (code, param))
        return e

    def test_carried_fields(self) -> None:
        request, draft = self.map(
            model="llmrouter",
            messages=[
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "ok", "name": None},
            ],
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            stop="\n",
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            presence_penalty=0,
            frequency_penalty=0,
            logprobs=False,
            seed=None,
        )
        self.assertEqual([m.role for m in request.messages], ["system", "user", "assistant"])
        self.assertEqual(request.messages[1].content, "a\nb")
        self.assertEqual((request.max_tokens, request.temperature, request.top_p), (7, 0.5, 0.9))
        self.assertEqual(request.stop, ("\n",))
        self.assertTrue(draft.stream and draft.include_usage)

    def test_refused_by_name(self) -> None:
        for name, value in [
            ("tools", []),
            ("tool_choice", "auto"),
            ("response_format", {"type": "text"}),
            ("seed", 1),
            ("logit_bias", {}),
            ("user", "u1"),
            ("reasoning_effort", "low"),
        ]:
            e = self.refused("unsupported_parameter", name, **{name: value})
            self.assertEqual(e.status, 400)
        self.refused("unsupported_parameter", "n other than 1", n=2)
        self.refused("unsupported_parameter", "presence_penalty other than 0", presence_penalty=1)
        self.refused(
            "unsupported_parameter",
            "messages[].name",
            messages=[{"role": "user", "content": "x", "name": "bob"}],
        )
        self.refused(
            "unsupported_parameter",
            "messages[].content[].type=image_url",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        )
        self.refused(
            "unsupported_parameter",
            "messages[].role (only system, developer, user, assistant)",
            messages=[{"role": "tool", "content": "x"}],
        )
        self.refused(
            "invalid_value", "max_completion_tokens", max_tokens=3, max_completion_tokens=4
        )
        self.refused("invalid_value", "stream_options", stream_options={"include_usage": True})
        e = self.refused("invalid_value", None, top_p=0)
        self.assertIn("top_p", e.message)
        self.refused("model_not_found", "model", model="gpt-4o")
        self.assertRaises(OpenAIError, to_request, b"[]", "llmrouter")
        self.assertRaises(OpenAIError, to_request, b"{", "llmrouter")

    def test_listen_addresses(self) -> None:
        self.assertEqual(parse_listen("127.0.0.1:8000", False), ("127.0.0.1", 8000))
        self.assertEqual(parse_listen("[::1]:0", False), ("::1", 0))
        self.assertEqual(parse_listen("localhost:9", False), ("127.0.0.1", 9))
        self.assertEqual(parse_listen("0.0.0.0:80", True), ("0.0.0.0", 80))
        for bad in ("0.0.0.0:80", "192.168.1.2:80", "example.com:80", "127.0.0.1", "[::1]:x"):
            self.assertRaises(ValueError, parse_listen, bad, False)
