"""``llmrouter-client proxy``: the official ``openai`` client, through the proxy, to a real router.

The proxy runs as its own process (``python -m llmrouter.client proxy``), in front of a real
``twistd llmrouter`` and ``twistd inference`` on the tiny model, or stock llama-servers on it with
real chat templates (protocol v1.1: tool calls, JSON schema output, reasoning, logprobs; see
tests/test_router_llama_server.py for how a random model is made to call a tool). The ``openai``
client is synchronous, so it runs in a thread while the reactor keeps serving the test's helpers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import openai
import pydantic
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmrouter import protocol as p
from llmrouter.client.proxy import MAX_BODY, OpenAIError, parse_listen, to_request
from llmrouter.protocol import b64u_encode
from tests.browser import start_chromium
from tests.client_handlers import V2Handler
from tests.daemons import Daemon, start_inference, start_router_daemon
from tests.llama_server import HERMES, QWQ, start_llama_server
from tests.router_support import http, key_document, metric_value, short_tempdir
from tests.test_router_e2e import inference_metrics, sleep, wait_metric
from tests.tools import RawClient, files_open_under


class _Proxy(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.url: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.token = ""
        self.pid = 0
        self.args: tuple[str, ...] = ()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        started = re.search(
            rb"proxy: (\S+) -> .*\n(API key \(Authorization: Bearer\): (\S+))?", self.output
        )
        if not self.url.called and started and (started[2] or "--no-token" in self.args):
            self.token = (started[3] or b"").decode()
            self.url.callback(started[1].decode())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", 0) or 0
        if not self.url.called:
            self.url.errback(Failure(RuntimeError(self.output.decode(errors="replace"))))
        self.ended.callback(code)


def run_proxy(testcase: TestCase, *args: str, env: dict[str, str] | None = None) -> _Proxy:
    """``llmrouter-client proxy ARGS`` (with a token file of the test's unless ARGS name one);
    killed at cleanup. ``url`` fires with its base URL once it listens, ``token`` is its key."""
    protocol = _Proxy()
    if "--token-file" not in args and "--no-token" not in args:
        args = (*args, "--token-file", str(Path(testcase.mktemp())))
    protocol.args = args
    argv = [sys.executable, "-m", "llmrouter.client", "proxy", *args]
    environment = None if env is None else {**os.environ, **env}
    transport = reactor.spawnProcess(protocol, sys.executable, argv, env=environment)  # type: ignore[attr-defined]
    protocol.pid = transport.pid

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
        client, directory, _ = yield proxied_router(self, [f"unix:{self.inference.socket}"])
        self.metrics_url = f"unix:{directory / 'metrics.sock'}"
        return client

    @defer.inlineCallbacks
    def test_openai_client_streaming_and_not(self) -> Any:
        client = yield self.stack()
        models = yield threads.deferToThread(client.models.list)
        # the proxy's name for the router's default, then the router's own (the daemon's)
        self.assertEqual([m.id for m in models.data], ["llmrouter", "tiny"])

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

        # What protocol v1.1 cannot carry is refused by name, never dropped.
        def refused(**extra: Any) -> Exception:
            try:
                client.chat.completions.create(
                    **{"model": "llmrouter", "messages": messages, **extra}
                )
            except openai.APIStatusError as e:
                return e
            raise AssertionError("accepted")

        error = yield threads.deferToThread(refused, logit_bias={"1": 5})
        self.assertIsInstance(error, openai.BadRequestError)
        self.assertEqual((error.code, error.param), ("unsupported_parameter", "logit_bias"))
        self.assertIn("logit_bias", error.message)
        error = yield threads.deferToThread(refused, model="gpt-4o")
        self.assertIsInstance(error, openai.NotFoundError)
        self.assertEqual(error.code, "model_not_found")
        error = yield threads.deferToThread(refused, temperature=5)
        self.assertEqual((error.status_code, error.code), (400, "invalid_value"))
        # The backend's own refusal keeps its reason: its code and the parameter it named
        # (issue 19: it was "the inference backend refused the request", param null).
        error = yield threads.deferToThread(refused, max_tokens=5000)  # over the daemon's cap
        self.assertIsInstance(error, openai.BadRequestError)
        self.assertEqual((error.code, error.param), ("max_tokens_exceeded", "max_tokens"))
        self.assertIn("max_tokens_exceeded", error.message)
        error = yield threads.deferToThread(refused, n=2)
        self.assertEqual((error.code, error.param), ("unsupported_parameter", "n"))

    @defer.inlineCallbacks
    def test_structured_output_and_tool_call_from_our_daemon(self) -> Any:
        """Our daemon's grammars, through router and proxy: the openai package's own
        structured output (a strict schema from a pydantic model, validated by the package)
        and a forced tool call, streamed as OpenAI's tool-call deltas."""
        client = yield self.stack()
        completion = yield threads.deferToThread(
            client.chat.completions.parse,
            model="tiny",
            messages=[{"role": "user", "content": "Weather?"}],
            response_format=Weather,
            max_tokens=100,
        )
        self.assertIsInstance(completion.choices[0].message.parsed, Weather)
        self.assertEqual(completion.choices[0].finish_reason, "stop")

        def stream() -> list[Any]:
            chunks = client.chat.completions.create(
                model="tiny",
                messages=[QUESTION],
                tools=[WEATHER],
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0,
                max_tokens=200,
                stream=True,
            )
            return list(chunks)

        chunks = yield threads.deferToThread(stream)
        fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or ()]
        self.assertEqual({f.index for f in fragments}, {0})
        self.assertEqual(
            (fragments[0].function.name, fragments[0].type), ("get_weather", "function")
        )
        self.assertTrue(fragments[0].id)
        arguments = "".join(f.function.arguments or "" for f in fragments)
        self.assertIn(json.loads(arguments)["city"], CITY["enum"])
        self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")

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


@defer.inlineCallbacks
def proxied_router(testcase: TestCase, backends: list[str], extra: tuple[str, ...] = ()) -> Any:
    """A router in front of ``backends`` and the proxy in front of it: an ``openai`` client,
    the router's directory and the proxy."""
    directory = short_tempdir(testcase)
    router = start_router_daemon(testcase, directory, backends, extra)
    yield router.start()
    url = f"unix:{directory / 'router.sock'}"
    document = yield key_document(url)
    pin = b64u_encode(document.signing_key)
    proxy = run_proxy(
        testcase, "--listen", "127.0.0.1:0", "--url", url, "--pin", pin, "--protocol", "1"
    )
    base_url = yield proxy.url
    client = openai.OpenAI(base_url=base_url, api_key=proxy.token, max_retries=0, timeout=60)
    return client, directory, proxy


CITY = {"type": "string", "enum": ["Paris", "Oslo"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = {"role": "user", "content": "Weather in Oslo?"}
PREFILL = {"role": "assistant", "content": "<tool_call>\n"}  # puts the model inside a call


class Weather(pydantic.BaseModel):
    city: Literal["Paris", "Oslo"]
    sunny: bool


class ProxyProtocolV11(TestCase):
    """Tool calls, JSON schema output, reasoning and logprobs through the proxy, in OpenAI's
    shapes, from llama-servers with real chat templates (QwQ thinks, Hermes calls tools)."""

    timeout = 240

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        thinker = yield start_llama_server(self, "thinker", QWQ)
        tools = yield start_llama_server(self, "tools", HERMES)
        backends = [f"unix:{thinker.socket}", f"unix:{tools.socket}"]
        self.client, _, self.proxy = yield proxied_router(
            self, backends, ("--default-model", "thinker")
        )

    def assertNotPrinted(self, *texts: str) -> None:
        """Nothing of the conversation reaches the proxy's output (it logs nothing of it)."""
        for text in texts:
            self.assertTrue(text)
            self.assertNotIn(text.encode(), self.proxy.output)

    def call(self, f: Any, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(f, *args, **kw)

    @defer.inlineCallbacks
    def test_models(self) -> Any:
        models = yield self.call(self.client.models.list)
        self.assertEqual([m.id for m in models.data], ["llmrouter", "thinker", "tools"])
        model = yield self.call(self.client.models.retrieve, "tools")
        self.assertEqual((model.id, model.object), ("tools", "model"))
        e = yield self.assertFailure(self.call(self.client.models.retrieve, "nope"), Exception)
        self.assertIsInstance(e, openai.NotFoundError)

    @defer.inlineCallbacks
    def test_forced_tool_call(self) -> Any:
        """Not streamed, then streamed (fragments assembled as OpenAI's clients do), then the
        call and its result go back in the history as the openai package hands them over."""
        request: dict[str, Any] = {
            "model": "tools",
            "messages": [QUESTION, PREFILL],
            "tools": [WEATHER],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 60,
        }
        completion = yield self.call(self.client.chat.completions.create, **request)
        choice = completion.choices[0]
        call = choice.message.tool_calls[0]  # the grammar lets it go on calling until max_tokens
        self.assertEqual((call.type, call.function.name), ("function", "get_weather"))
        self.assertTrue(call.id)
        self.assertIn(json.loads(call.function.arguments)["city"], CITY["enum"])
        self.assertIsNone(choice.message.content)
        self.assertIn(choice.finish_reason, ("tool_calls", "length"))

        def stream() -> list[Any]:
            return list(self.client.chat.completions.create(**request, stream=True))

        chunks = yield self.call(stream)
        calls: dict[int, dict[str, Any]] = {}
        for chunk in chunks:
            for fragment in chunk.choices[0].delta.tool_calls or ():
                entry = calls.setdefault(fragment.index, {"arguments": ""})
                if fragment.id:
                    self.assertNotIn("id", entry)  # id and name come once, first
                    entry.update(id=fragment.id, name=fragment.function.name)
                entry["arguments"] += fragment.function.arguments or ""
        self.assertEqual(calls[0]["name"], "get_weather")
        self.assertIn(json.loads(calls[0]["arguments"])["city"], CITY["enum"])
        self.assertIn(chunks[-1].choices[0].finish_reason, ("tool_calls", "length"))

        assistant = choice.message.model_dump(exclude_none=True)
        assistant["tool_calls"] = assistant["tool_calls"][:1]
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'}
        answer = yield self.call(
            self.client.chat.completions.create,
            model="tools",
            messages=[QUESTION, assistant, result],
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=5,
        )
        self.assertEqual(answer.choices[0].finish_reason, "length")
        self.assertIsNone(answer.choices[0].message.tool_calls)
        self.assertTrue(answer.choices[0].message.content)
        self.assertNotPrinted("Weather in Oslo", call.function.arguments, '"temperature": 3')

    @defer.inlineCallbacks
    def test_json_schema(self) -> Any:
        """The openai package's own structured output: it sends a strict JSON schema made from
        a pydantic model and validates the answer against that model."""
        completion = yield self.call(
            self.client.chat.completions.parse,
            model="tools",
            messages=[{"role": "user", "content": "Weather?"}],
            response_format=Weather,
            max_tokens=200,
        )
        parsed = completion.choices[0].message.parsed
        self.assertIsInstance(parsed, Weather)
        self.assertIn(parsed.city, CITY["enum"])
        self.assertEqual(completion.choices[0].finish_reason, "stop")

    @defer.inlineCallbacks
    def test_reasoning_apart(self) -> Any:
        """The default model (the proxy's name for it) thinks: its reasoning comes as
        ``reasoning_content``, never as content; ``include_reasoning: false`` leaves it out."""
        messages = [{"role": "user", "content": "Why?"}]
        completion = yield self.call(
            self.client.chat.completions.create, model="llmrouter", messages=messages, max_tokens=12
        )
        message = completion.choices[0].message
        self.assertEqual(message.content, "")
        self.assertTrue(message.model_extra["reasoning_content"])
        self.assertEqual(completion.usage.completion_tokens, 12)

        def stream(**extra: Any) -> list[Any]:
            chunks = self.client.chat.completions.create(
                model="llmrouter", messages=messages, max_tokens=12, stream=True, **extra
            )
            return list(chunks)

        chunks = yield self.call(stream)
        reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks]
        self.assertTrue("".join(r for r in reasoning if r))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), "")
        chunks = yield self.call(stream, extra_body={"include_reasoning": False})
        self.assertEqual(
            [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks],
            [None] * len(chunks),
        )
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
        self.assertNotPrinted(message.model_extra["reasoning_content"])

    @defer.inlineCallbacks
    def test_logprobs(self) -> Any:
        completion = yield self.call(
            self.client.chat.completions.create,
            model="tools",
            messages=[{"role": "user", "content": "Hi"}],
            logprobs=True,
            top_logprobs=2,
            max_tokens=8,
            temperature=0,
        )
        entries = completion.choices[0].logprobs.content
        self.assertTrue(0 < len(entries) <= 8)
        for entry in entries:
            self.assertLessEqual(entry.logprob, 0)
            self.assertEqual(len(entry.top_logprobs), 2)

        def stream() -> list[Any]:
            chunks = self.client.chat.completions.create(
                model="tools",
                messages=[{"role": "user", "content": "Hi"}],
                logprobs=True,
                max_tokens=8,
                stream=True,
            )
            return list(chunks)

        chunks = yield self.call(stream)
        streamed = [
            e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        self.assertTrue(0 < len(streamed) <= 8)


class ProxyProtocolTwo(TestCase):
    """The proxy on protocol 2 (its default): the ``openai`` client through it to a handler made
    of llmrouter.v2's router and node functions (tests/client_handlers.py). The real router and
    node are in the v2 end-to-end tests."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from twisted.web import server

        self.handler = V2Handler()
        site = server.Site(self.handler)
        directory = short_tempdir(self)
        port = reactor.listenUNIX(str(directory / "router.sock"), site)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        pin = b64u_encode(self.handler.pin)
        url = f"unix:{directory / 'router.sock'}"
        self.proxy = run_proxy(self, "--listen", "127.0.0.1:0", "--url", url, "--pin", pin)
        base_url = yield self.proxy.url
        self.client = openai.OpenAI(
            base_url=base_url, api_key=self.proxy.token, max_retries=0, timeout=30
        )

    def call(self, f: Any, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(f, *args, **kw)

    @defer.inlineCallbacks
    def test_chat_streaming_and_not(self) -> Any:
        models = yield self.call(self.client.models.list)
        # the models of the verified key document (not the router's unsigned /api/models)
        self.assertEqual([m.id for m in models.data], ["llmrouter", "m1", "m2"])
        messages: Any = [{"role": "user", "content": "canary-5be2 one two"}]
        completion = yield self.call(
            self.client.chat.completions.create, model="m2", messages=messages
        )
        self.assertEqual(completion.choices[0].message.content, "two one canary-5be2 ")
        self.assertEqual(self.handler.requests[-1].model, "m2")
        self.assertEqual(self.handler.seen_nodes[-1], ("node-b", "node-c"))

        def stream() -> str:
            chunks = self.client.chat.completions.create(
                model="llmrouter", messages=messages, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        text = yield self.call(stream)
        self.assertEqual(text, "two one canary-5be2 ")
        self.assertEqual(self.handler.requests[-1].model, "m1")  # the document's default
        self.assertNotIn(b"canary", b"".join(self.handler.posted))
        self.assertNotIn(b"canary", self.proxy.output)

    @defer.inlineCallbacks
    def test_sealed_refusals_become_openai_errors(self) -> Any:
        messages: Any = [{"role": "user", "content": "x"}]
        self.handler.refuse_with = p.ProtocolError("device_rate_limited", "slow", retry_after=4)
        error = yield self.assertFailure(
            self.call(self.client.chat.completions.create, model="m1", messages=messages),
            openai.RateLimitError,
        )
        self.assertEqual(error.code, "device_rate_limited")
        self.assertEqual(error.response.headers["retry-after"], "4")
        self.handler.refuse_with = None
        error = yield self.assertFailure(
            self.call(self.client.chat.completions.create, model="m9", messages=messages),
            openai.NotFoundError,
        )
        self.assertEqual(error.code, "model_not_found")
        self.handler.cut_after = 0
        self.handler.router_breaks = True
        error = yield self.assertFailure(
            self.call(self.client.chat.completions.create, model="m1", messages=messages),
            openai.APIStatusError,
        )
        self.assertEqual((error.status_code, error.code), (502, "upstream_failed"))


class ProxyStartup(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def refused(self, *args: str, status: int = 1) -> Any:
        proxy = run_proxy(self, "--listen", "127.0.0.1:0", "--protocol", "1", *args)
        code = yield proxy.ended
        proxy.url.addErrback(lambda _: None)  # it never served
        self.assertEqual(code, status)
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
        # neither, or both: a usage error (exit 2), as for every llmrouter-client command
        output = yield self.refused("--url", url, status=2)
        self.assertIn("--pin SIGNING_KEY", output)
        self.assertIn("--tofu FILE", output)
        both = ("--pin", pin, "--tofu", str(Path(self.mktemp())))
        output = yield self.refused("--url", url, *both, status=2)
        self.assertIn("exclude each other", output)

        # Trust on first use: the key is kept, and a different one is refused later.
        tofu = Path(self.mktemp())
        proxy = run_proxy(
            self, "--listen", "127.0.0.1:0", "--url", url, "--tofu", str(tofu), "--protocol", "1"
        )
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
                {"role": "assistant", "content": "ok", "name": None, "tool_calls": []},
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
        self.assertEqual(request.messages[1].content, ("a", "b"))
        self.assertEqual(request.messages[2].tool_calls, ())
        self.assertEqual((request.max_tokens, request.temperature, request.top_p), (7, 0.5, 0.9))
        self.assertEqual(request.stop, ("\n",))
        self.assertEqual((request.model, draft.model), (None, "llmrouter"))  # the default
        self.assertTrue(draft.stream and draft.include_usage)
        self.assertTrue(request.include_reasoning)  # as reasoning_content, unless asked not to

    def test_carried_v11_fields(self) -> None:
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        schema = {"name": "out", "schema": {"type": "object"}, "strict": True}
        request, draft = self.map(
            model="small",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "f"}},
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": schema},
            logprobs=True,
            top_logprobs=3,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            reasoning_effort="low",
            include_reasoning=False,
        )
        self.assertEqual((request.model, draft.model), ("small", "small"))
        self.assertEqual(request.messages[1].tool_calls[0].id, "c1")
        self.assertEqual(request.messages[2].tool_call_id, "c1")
        self.assertEqual(request.tool_choice, "f")
        self.assertEqual(request.response_format.to_json()["json_schema"], schema)
        fields = (request.parallel_tool_calls, request.logprobs, request.top_logprobs, request.seed)
        self.assertEqual(fields, (False, True, 3, 7))
        penalties = (request.presence_penalty, request.frequency_penalty, request.reasoning_effort)
        self.assertEqual(penalties, (0.5, -0.5, "low"))
        self.assertFalse(request.include_reasoning)

    def test_refused_by_name(self) -> None:
        for name, value in [
            ("logit_bias", {}),
            ("user", "u1"),
            ("functions", []),
            ("function_call", "auto"),
            ("store", True),
            ("modalities", ["text"]),
            ("web_search_options", {}),
        ]:
            e = self.refused("unsupported_parameter", name, **{name: value})
            self.assertEqual(e.status, 400)
        e = self.refused("unsupported_parameter", "n", n=2)  # the field, as OpenAI's param
        self.assertIn("n other than 1", e.message)
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
            "messages[].role",
            messages=[{"role": "function", "content": "x"}],
        )
        self.refused(
            "unsupported_parameter",
            "messages[].role",
            messages=[{"role": ["user"], "content": "x"}],  # not even hashable
        )
        # reasoning is not sent back: a history that carries it is refused, not stripped
        reasoned = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
        self.refused(
            "unsupported_parameter",
            "messages[].reasoning_content",
            messages=[{"role": "user", "content": "x"}, reasoned],
        )
        self.refused(
            "unsupported_parameter",
            "messages[].tool_call_id",
            messages=[{"role": "user", "content": "x", "tool_call_id": "c"}],
        )
        # the router's own checks of v1.1 fields, before anything is sent
        for body in (
            {"tools": []},
            {"tool_choice": "auto"},
            {"top_logprobs": 2},
            {"reasoning_effort": "minimal"},
            {"response_format": {"type": "xml"}},
            {"messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}]},
        ):
            self.refused("invalid_value", None, **body)
        self.refused(
            "invalid_value", "max_completion_tokens", max_tokens=3, max_completion_tokens=4
        )
        self.refused("invalid_value", "stream_options", stream_options={"include_usage": True})
        e = self.refused("invalid_value", None, top_p=0)
        self.assertIn("top_p", e.message)
        self.refused("model_not_found", "model", model="bad name")
        self.assertEqual(self.map(model="gpt-4o")[0].model, "gpt-4o")  # the router decides
        self.assertRaises(OpenAIError, to_request, b"[]", "llmrouter")
        self.assertRaises(OpenAIError, to_request, b"{", "llmrouter")

    def test_listen_addresses(self) -> None:
        self.assertEqual(parse_listen("127.0.0.1:8000", False), ("127.0.0.1", 8000))
        self.assertEqual(parse_listen("[::1]:0", False), ("::1", 0))
        self.assertEqual(parse_listen("localhost:9", False), ("127.0.0.1", 9))
        self.assertEqual(parse_listen("0.0.0.0:80", True), ("0.0.0.0", 80))
        for bad in ("0.0.0.0:80", "192.168.1.2:80", "example.com:80", "127.0.0.1", "[::1]:x"):
            self.assertRaises(ValueError, parse_listen, bad, False)


# A web page as the attacker (issue 19): it sends "simple" requests (no preflight) to the proxy,
# and, with DNS rebinding, same-origin requests that reach the proxy with the page's Host.
ATTACK_PAGE = b"""<!doctype html><title>a page the user visits</title><script>
const body = JSON.stringify({model: 'llmrouter', max_tokens: 2,
                             messages: [{role: 'user', content: 'a page speaks'}]});
async function attempt(url, init) {
  try {
    const response = await fetch(url, init);
    return response.type === 'opaque' ? 'opaque' : response.status + ' ' + await response.text();
  } catch (e) {
    return 'blocked';
  }
}
async function attack(proxy) {
  const out = {};
  // Another origin: a simple text/plain POST goes out without a preflight (its answer is opaque).
  out.simple = [];
  for (let i = 0; i < 3; i++) {
    out.simple.push(await attempt(proxy + '/v1/chat/completions',
                                  {method: 'POST', mode: 'no-cors', body}));
  }
  // Another origin, as an OpenAI client would send it: the preflight is refused.
  out.cors = await attempt(proxy + '/v1/chat/completions', {method: 'POST', body,
      headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer guess'}});
  // DNS rebinding: the page's own origin now reaches the proxy, so the page reads answers.
  out.rebound = await attempt('/v1/chat/completions',
      {method: 'POST', body, headers: {'Content-Type': 'application/json'}});
  out.rebound_plain = await attempt('/v1/chat/completions', {method: 'POST', body});
  out.rebound_models = await attempt('/v1/models', {});
  return out;
}
</script>"""


class _Relay(Protocol):
    def __init__(self, other: Protocol) -> None:
        self.other = other

    def dataReceived(self, data: bytes) -> None:
        self.other.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.other.transport.loseConnection()  # type: ignore[union-attr]


class _Rebinding(Protocol):
    """The attacker's server: ``/attack.html`` is its page; any other request is relayed to the
    proxy, as if the page's host name now resolved to 127.0.0.1 (what DNS rebinding does)."""

    def __init__(self, proxy_port: int) -> None:
        self.proxy_port = proxy_port
        self.buffer = b""
        self.peer: _Relay | None = None
        self.connecting = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        if self.connecting or b"\r\n" not in self.buffer:
            return
        transport: Any = self.transport
        if self.buffer.startswith(b"GET /attack.html "):
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(ATTACK_PAGE) + ATTACK_PAGE
            )
            transport.loseConnection()
            return
        self.connecting = True
        transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        connectProtocol(endpoint, _Relay(self)).addCallback(self._connected)

    def _connected(self, relay: _Relay) -> None:
        self.peer = relay
        relay.transport.write(self.buffer)  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.peer is not None:
            self.peer.transport.loseConnection()  # type: ignore[union-attr]


class ProxyAccessTests(TestCase):
    """Who may use the proxy: the proxy itself named as Host, no foreign Origin, JSON bodies and
    its bearer token; a web page in a real Chromium gets nothing and spends nothing."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.tmp = Path(self.mktemp()).resolve()
        self.tmp.mkdir()
        self.inference = yield start_inference(self)
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{self.inference.socket}"])
        yield router.start()
        self.router_url = f"unix:{directory / 'router.sock'}"
        document = yield key_document(self.router_url)
        self.pin = b64u_encode(document.signing_key)
        self.proxy = run_proxy(
            self,
            "--listen",
            "127.0.0.1:0",
            "--url",
            self.router_url,
            "--pin",
            self.pin,
            "--protocol",
            "1",  # the router's own key: this router is not certified for v2
            env={"TMPDIR": str(self.tmp)},
        )
        self.base = yield self.proxy.url
        self.port = int(self.base.split(":")[2].split("/")[0])
        self.origin = f"http://127.0.0.1:{self.port}"

    @defer.inlineCallbacks
    def answered(self) -> Any:
        """How many chat requests the inference daemon has seen (each spends budget)."""
        text = yield inference_metrics(self.inference)
        return sum(
            value
            for line in text.splitlines()
            if line.startswith("inference_requests_total{")
            for value in [float(line.split()[-1])]
        )

    def post(self, headers: dict[bytes, list[bytes]], body: bytes | None = None) -> Any:
        chat = json.dumps({"model": "llmrouter", "max_tokens": 2, "messages": [QUESTION]})
        return http(self.origin, b"POST", "/v1/chat/completions", body or chat.encode(), headers)

    @defer.inlineCallbacks
    def test_host_origin_content_type_and_token(self) -> Any:
        token = self.proxy.token.encode()
        good = {
            b"Content-Type": [b"application/json"],
            b"Authorization": [b"Bearer " + token],
        }
        status, _, body = yield self.post(good)
        self.assertEqual(status, 200, body)  # the control: a local client with the key
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        before = yield self.answered()
        refusals = [
            ({b"Host": [b"attacker.example"]}, 403, "forbidden_host"),
            ({b"Host": [b"127.0.0.1:1"]}, 403, "forbidden_host"),
            ({b"Origin": [b"http://attacker.example"]}, 403, "forbidden_origin"),
            ({b"Origin": [b"null"]}, 403, "forbidden_origin"),
            ({b"Authorization": []}, 401, "invalid_api_key"),
            ({b"Authorization": [b"Bearer " + token[:-1]]}, 401, "invalid_api_key"),
            ({b"Content-Type": [b"text/plain"]}, 415, "unsupported_media_type"),
            ({b"Content-Type": []}, 415, "unsupported_media_type"),
        ]
        for change, code, name in refusals:
            headers = {**good, **change}
            status, _, body = yield self.post({k: v for k, v in headers.items() if v})
            self.assertEqual((status, json.loads(body)["error"]["code"]), (code, name), change)
        for host in (b"localhost:%d" % self.port, b"LOCALHOST:%d" % self.port):
            origin = b"http://" + host
            status, _, _ = yield http(
                self.origin,
                path="/v1/models",
                headers={**good, b"Host": [host], b"Origin": [origin]},
            )
            self.assertEqual(status, 200)
        status, _, body = yield http(self.origin, path="/v1/models")  # no key: not even this
        self.assertEqual(status, 401)
        after = yield self.answered()
        self.assertEqual(after, before)

    @defer.inlineCallbacks
    def test_a_web_page_can_neither_get_an_answer_nor_spend_the_budget(self) -> Any:
        """Real headless Chromium, a page from another origin (``attacker.example``, resolved to
        127.0.0.1 by the browser) whose server turns into the proxy for every request but the
        page itself: simple cross-origin POSTs, a CORS request, and same-origin requests with the
        page's Host after "rebinding". Before issue 19 each simple POST was answered (and spent
        the device's budget), and the rebound page read the answers."""
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Factory.forProtocol(lambda: _Rebinding(self.port)), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        page_port = listening.getHost().port
        before = yield self.answered()
        browser = start_chromium(self, "--host-resolver-rules=MAP attacker.example 127.0.0.1")
        session = yield defer.Deferred.fromCoroutine(
            browser.page(f"http://attacker.example:{page_port}/attack.html")
        )
        proxy = f"http://127.0.0.1:{self.port}"
        out = yield defer.Deferred.fromCoroutine(
            browser.evaluate(session, f"attack({json.dumps(proxy)})")
        )
        self.assertEqual(out["simple"], ["opaque"] * 3)  # sent, as browsers do; unreadable
        self.assertEqual(out["cors"], "blocked")  # its preflight got no CORS answer
        for name in ("rebound", "rebound_plain", "rebound_models"):
            self.assertTrue(out[name].startswith("403 "), out[name])
            self.assertIn("forbidden_host", out[name])
        after = yield self.answered()
        self.assertEqual(after, before)  # nothing reached the router, nothing was spent
        self.assertNotIn(b"a page speaks", self.proxy.output)

    @defer.inlineCallbacks
    def test_a_large_body_is_never_spooled_to_disk(self) -> Any:
        """Twisted's default request wrote a body of 100 KB or more to a temporary file: the
        conversation on disk (issue 19, reproduced with 150 KB). While such a body arrives the
        proxy holds no file in its temporary directory."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        peer = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(peer.transport.loseConnection)
        body = json.dumps({"messages": [{"role": "user", "content": "word " * 30_000}]}).encode()
        peer.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n"
            % (self.port, self.proxy.token.encode(), len(body))
            + body[:-1000]
        )
        yield sleep(0.5)
        self.assertEqual(files_open_under(self.proxy.pid, str(self.tmp)), [])
        # One byte over the bound is refused by its Content-Length. Over a raw connection: the
        # proxy may answer and close while the body is still being sent, which an HTTP client
        # reports as a failed transmission instead of the answer.
        over = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(over.transport.loseConnection)
        over.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n" % (self.port, self.proxy.token.encode(), MAX_BODY + 1)
        )
        for _ in range(100):
            if b"body_too_large" in over.data:
                break
            yield sleep(0.1)
        self.assertTrue(over.data.startswith(b"HTTP/1.1 413 "), over.data[:100])
        self.assertIn(b'"body_too_large"', over.data)


class ProxyUnixSocketTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_no_token_only_on_a_unix_socket(self) -> Any:
        pin = b64u_encode(bytes(32))
        proxy = run_proxy(
            self, "--listen", "127.0.0.1:0", "--no-token", "--url", "unix:/x.sock", "--pin", pin
        )
        code = yield proxy.ended
        proxy.url.addErrback(lambda _: None)
        self.assertEqual(code, 1)
        self.assertIn("--no-token only with a unix:", proxy.output.decode())

        inference = yield start_inference(self)
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{inference.socket}"])
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        document = yield key_document(url)
        socket = directory / "proxy.sock"
        proxy = run_proxy(
            self,
            "--listen",
            f"unix:{socket}",
            "--no-token",
            "--url",
            url,
            "--pin",
            b64u_encode(document.signing_key),
            "--protocol",
            "1",
        )
        base = yield proxy.url
        self.assertEqual(base, f"unix:{socket}")
        self.assertEqual(socket.stat().st_mode & 0o777, 0o600)
        chat = json.dumps({"max_tokens": 2, "messages": [QUESTION]}).encode()
        headers = {b"Content-Type": [b"application/json"]}
        status, _, body = yield http(base, b"POST", "/v1/chat/completions", chat, headers)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 2)
