"""Protocol v1.1 end to end through the real router to a stock llama-server.

``twistd llmrouter`` (a subprocess) in front of llama-server processes on the tiny GGUF, each with
a real chat template (``tests/llama_server.py``): QwQ (reasoning: its generation prompt opens
``<think>``), Hermes 2 Pro (``<tool_call>`` JSON tool calls), gpt-oss (harmony channels) and the
tiny model's own template (no tools). The router finds the models (``--alias``) and what each
template can do from llama-server's ``/v1/models`` and ``/props``.

A random-weight model calls no tool and writes no JSON by itself, so outputs are forced by
llama-server's own means: the grammar it builds for ``json_schema`` and for tool calls, and an
assistant prefill (``<tool_call>``) that puts the model inside a call, where the grammar leaves only
the tool's arguments (an enum) to choose. Every check is on what arrives through the router.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llmrouter.chat import ChatRequest, Message, ResponseFormat, Tool, ToolCall
from llmrouter.client import ChatError, Client
from llmrouter.protocol import Done, ResponseOpener, seal_request
from llmrouter.sse import SSEParser
from tests.daemons import start_router_daemon
from tests.llama_server import GPT_OSS, HERMES, QWQ, start_llama_server
from tests.router_support import (
    daemon_pin,
    direct_logprobs,
    http,
    key_document,
    post_chat,
    short_tempdir,
)

CITY = {"type": "string", "enum": ["Paris", "Oslo"]}
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": CITY},
        "required": ["city"],
        "additionalProperties": False,
    },
)


def tool_round_trip(call: ToolCall, model: str, tools: tuple[Tool, ...]) -> ChatRequest:
    """The question, the model's call and the tool's result: a request for the answer (5
    tokens of free text)."""
    return ChatRequest(
        (
            Message("user", "Weather in Oslo?"),
            Message("assistant", None, (call,)),
            Message("tool", '{"temperature": 3}', (), call.id),
        ),
        model=model,
        tools=tools,
        tool_choice="none",
        max_tokens=5,
    )


class LlamaServerTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        servers = []
        for alias, template in (
            ("thinker", QWQ),
            ("tools", HERMES),
            ("oss", GPT_OSS),
            ("plain", None),
        ):
            server = yield start_llama_server(self, alias, template)
            servers.append(server)
        self.servers = dict(zip(("thinker", "tools", "oss", "plain"), servers, strict=True))
        directory = short_tempdir(self)
        backends = [f"unix:{server.socket}" for server in servers]
        router = start_router_daemon(self, directory, backends, ["--default-model", "thinker"])
        yield router.start()
        self.router = router
        self.url = f"unix:{directory / 'router.sock'}"
        self.client = Client(reactor, self.url, pin=daemon_pin(directory), protocol=1)

    def complete(self, request: ChatRequest, **kw: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self.client.complete(request, **kw))

    @defer.inlineCallbacks
    def test_models_are_discovered(self) -> Any:
        status, _, body = yield http(self.url, path="/api/models")
        self.assertEqual(status, 200)
        doc = json.loads(body)
        self.assertEqual(
            ([m["id"] for m in doc["data"]], doc["default"]),
            (["thinker", "tools", "oss", "plain"], "thinker"),
        )
        e = yield self.assertFailure(
            self.complete(ChatRequest.from_prompt("hi", model="nope")), ChatError
        )
        self.assertEqual((e.code, e.status), ("model_unknown", 404))

    @defer.inlineCallbacks
    def test_reasoning_arrives_apart(self) -> Any:
        request = ChatRequest.from_prompt(
            "Why?", model="thinker", max_tokens=12, include_reasoning=True
        )
        reasoning: list[str] = []
        reply = yield self.complete(request, on_reasoning=reasoning.append)
        # the template opened <think> and the model never closes it: all of it is reasoning
        self.assertTrue(reply.reasoning)
        self.assertEqual("".join(reasoning), reply.reasoning)
        self.assertEqual((reply.text, reply.finish_reason), ("", "length"))
        self.assertEqual(reply.done.completion_tokens, 12)

    @defer.inlineCallbacks
    def test_v1_request_gets_no_new_chunk_types(self) -> Any:
        """The same thinking model, asked by a v1 client: the stream is v1 (no reasoning chunk)."""
        document = yield key_document(self.url)
        request = ChatRequest.from_prompt("Why?", max_tokens=12)  # no v1.1 field at all
        envelope, state = seal_request(document.current(), request, int(reactor.seconds()))
        status, _, raw = yield post_chat(self.url, json.dumps(envelope.to_json()).encode())
        self.assertEqual(status, 200)
        names = [name for name, _ in SSEParser().feed(raw)]
        self.assertEqual(names, ["init", "final"])  # the default model only thought
        (done,) = ResponseOpener(state).feed(raw)
        assert isinstance(done, Done)
        self.assertEqual((done.finish_reason, done.completion_tokens), ("length", 12))

    @defer.inlineCallbacks
    def test_forced_tool_call_then_answer(self) -> Any:
        prefill = Message("assistant", "<tool_call>\n")
        request = ChatRequest(
            (Message("user", "Weather in Oslo?"), prefill),
            model="tools",
            tools=(WEATHER,),
            tool_choice="required",
            temperature=0.0,
            max_tokens=60,
        )
        reply = yield self.complete(request)
        call = reply.tool_calls[0]  # the grammar then lets it go on calling until max_tokens
        self.assertEqual(call.name, "get_weather")
        self.assertTrue(call.id)
        self.assertIn(json.loads(call.arguments)["city"], CITY["enum"])
        # the call and its result go back as history; the model answers (in free text)
        answer = yield self.complete(tool_round_trip(call, "tools", (WEATHER,)))
        self.assertEqual((answer.tool_calls, answer.done.completion_tokens), ((), 5))
        self.assertTrue(answer.text)

    @defer.inlineCallbacks
    def test_json_schema_output(self) -> Any:
        schema = {
            "type": "object",
            "properties": {"city": CITY, "sunny": {"type": "boolean"}},
            "required": ["city", "sunny"],
            "additionalProperties": False,
        }
        request = ChatRequest.from_prompt(
            "Weather?",
            model="tools",
            response_format=ResponseFormat("json_schema", schema, "weather"),
            max_tokens=200,
        )
        reply = yield self.complete(request)
        value = json.loads(reply.text)
        self.assertEqual(set(value), {"city", "sunny"})
        self.assertIn(value["city"], CITY["enum"])
        self.assertIsInstance(value["sunny"], bool)
        self.assertEqual(reply.finish_reason, "stop")

    @defer.inlineCallbacks
    def test_logprobs(self) -> Any:
        """Greedy, so llama-server gives the same answer twice: the logprobs through the router
        are the ones it sends straight (for the tokens it reports them for), up to the numeric
        noise of a different batch and prompt cache (large for unlikely tokens)."""
        request = ChatRequest.from_prompt(
            "Hi", model="tools", logprobs=True, top_logprobs=2, max_tokens=8, temperature=0.0
        )
        reply = yield self.complete(request)
        expected = yield direct_logprobs(self.servers["tools"].socket, request, "tools")
        self.assertTrue(expected)
        self.assertEqual(len(reply.logprobs), len(expected))
        for entry, (token, logprob, raw, top) in zip(reply.logprobs, expected, strict=True):
            self.assertEqual(
                (entry.token, entry.bytes, entry.top_logprobs[0].token), (token, raw, top[0][0])
            )
            self.assertLess(abs(entry.logprob - logprob), 0.5)
            self.assertEqual(len(entry.top_logprobs), 2)

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        # the tiny model's own template knows no tools: llama-server would answer in free text
        e = yield self.assertFailure(
            self.complete(ChatRequest.from_prompt("hi", model="plain", tools=(WEATHER,))),
            ChatError,
        )
        self.assertEqual((e.code, e.status), ("unsupported_field", 400))
        self.assertIn("tools", e.message)
        # and neither template takes a reasoning effort
        e = yield self.assertFailure(
            self.complete(ChatRequest.from_prompt("hi", model="thinker", reasoning_effort="low")),
            ChatError,
        )
        self.assertEqual(e.code, "unsupported_field")
        # llama-server refuses logprobs with tools while streaming: its error, as plain JSON
        request = ChatRequest.from_prompt("hi", model="tools", tools=(WEATHER,), logprobs=True)
        e = yield self.assertFailure(self.complete(request), ChatError)
        self.assertEqual((e.code, e.status), ("upstream_refused", 400))

    @defer.inlineCallbacks
    def test_backend_failing_before_any_output(self) -> Any:
        """gpt-oss's parser rejects what the random model writes: llama-server sends an error
        event before any output, so the router retries, then answers with plain JSON."""
        e = yield self.assertFailure(
            self.complete(ChatRequest.from_prompt("hi", model="oss", max_tokens=30)), ChatError
        )
        self.assertEqual((e.code, e.status), ("upstream_failed", 502))
        self.assertNotIn("peg", e.message)  # llama-server's own message stays inside


LONG_PROMPT = " ".join(f"Item {n} of the list is a word about the weather." for n in range(40))


class PrivacyTests(TestCase):
    """What the router does so that a stock llama-server keeps its users apart as our daemon
    does (docs/inference.md, "Backends and privacy"), checked on a real llama-server:

    - its slots reuse an earlier prompt for whoever sends the same prefix (a timing side
      channel); the router sends ``cache_prompt: false``, so the second of two identical
      requests decodes its whole prompt again, as llama-server's own prompt-token counter
      shows; with the operator's opt-in (``LLAMA_SERVER_CACHE_PROMPT=1``) the same pair reuses
      it, which shows the measurement can tell;
    - its ``GET /slots`` (on by default) returns the prompts in its slots: a production router
      refuses to start against it, and starts against the same server run with --no-slots.
    """

    timeout = 300

    @defer.inlineCallbacks
    def prompt_tokens_per_request(self, env: dict[str, str]) -> Any:
        """Prompt tokens llama-server decoded for each of two identical chats via the router."""
        server = yield start_llama_server(self, "plain", extra=["--metrics"])
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{server.socket}"], env=env)
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        client = Client(reactor, url, pin=daemon_pin(directory), protocol=1)
        counts = []
        for _ in range(2):
            before = yield self.decoded(server)
            request = ChatRequest.from_prompt(LONG_PROMPT, max_tokens=2)
            yield defer.Deferred.fromCoroutine(client.complete(request))
            after = yield self.decoded(server)
            counts.append(after - before)
        return counts

    @defer.inlineCallbacks
    def decoded(self, server: Any) -> Any:
        status, _, body = yield http(f"unix:{server.socket}", path="/metrics")
        self.assertEqual(status, 200)
        for line in body.decode().splitlines():
            if line.startswith("llamacpp:prompt_tokens_total "):
                return float(line.split()[1])
        raise AssertionError("llama-server exports no llamacpp:prompt_tokens_total")

    @defer.inlineCallbacks
    def test_no_prompt_reuse_across_requests(self) -> Any:
        first, second = yield self.prompt_tokens_per_request({})
        self.assertGreater(first, 300)  # the whole prompt, template included
        self.assertEqual(second, first)  # decoded again: nothing reused

    @defer.inlineCallbacks
    def test_operator_opt_in_shares_the_prompt_cache(self) -> Any:
        first, second = yield self.prompt_tokens_per_request({"LLAMA_SERVER_CACHE_PROMPT": "1"})
        self.assertGreater(first, 300)
        self.assertLess(second, first / 4)  # the control: reuse is visible when allowed

    @defer.inlineCallbacks
    def test_production_refuses_a_llama_server_with_slots(self) -> Any:
        from tests.test_router_preflight import PRODUCTION

        exposed = yield start_llama_server(self, "plain")
        status, _, _ = yield http(f"unix:{exposed.socket}", path="/slots")
        self.assertEqual(status, 200)  # llama-server's default
        env = {"TRUSTED_PROXIES": "unix", "HEALTH_INTERVAL_SECONDS": "0.5"}
        extra = ["--env-file", str(PRODUCTION)]
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{exposed.socket}"], extra, env)
        router.spawn()
        code = yield router.wait_exit(60)
        self.assertEqual(code, 1, router.log_text()[-3000:])
        self.assertIn("refusing to start: backend-0 expose prompts", router.log_text())
        self.assertNotIn("Traceback", router.log_text())

        hidden = yield start_llama_server(self, "hidden", extra=["--no-slots"])
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{hidden.socket}"], extra, env)
        yield router.start()
        yield deferLater(reactor, 2, lambda: None)  # several probe rounds: still serving
        self.assertTrue(router.running)
        self.assertNotIn("refus", router.log_text())
