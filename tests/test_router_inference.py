"""Protocol v1.1 end to end through the real router to our own inference daemon.

``twistd llmrouter`` (a subprocess) in front of three ``twistd inference`` processes on tiny GGUF
variants with real chat templates and special tokens (``tests/tinymodel.py``): DeepSeek-R1
(``thinker``: its generation prompt opens ``<think>``), Qwen3 (``tools``: Hermes-style
``<tool_call>``) and the tiny model's own template (``plain``). The router finds the models and
their kind (``owned_by: llmrouter``) on each daemon's ``GET /v1/models``, as in production.

A random-weight model calls no tool and writes no JSON by itself, so outputs that must have a
shape get it the way production does: from the daemon's grammar for a forced tool call and for a
JSON schema. Every check is on what arrives, sealed, through the router; the daemon's own API is
tested in ``test_inference_openai`` and the same checks against llama-server are in
``test_router_llama_server``.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from llmrouter.chat import ChatRequest, Message, ResponseFormat, Tool
from llmrouter.client import Client
from llmrouter.protocol import (
    Delta,
    Done,
    Reasoning,
    ResponseOpener,
    ResponseSealer,
    ToolCallDelta,
    b64u_decode,
    seal_request,
)
from llmrouter.sse import SSEParser
from tests.daemons import start_inference, start_router_daemon
from tests.router_support import (
    daemon_pin,
    direct_logprobs,
    key_document,
    post_chat,
    refusal,
    remember,
    short_tempdir,
)
from tests.test_inference_openai import SCHEMA
from tests.test_router_llama_server import WEATHER, tool_round_trip
from tests.tinymodel import tiny_model_path

TIME = Tool(
    "get_time",
    None,
    {
        "type": "object",
        "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"],
    },
)
MODELS = {"thinker": "deepseek-r1", "tools": "qwen3", "plain": "plain"}


class InferenceTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.daemons = {}
        for name, variant in MODELS.items():
            self.daemons[name] = yield start_inference(
                self,
                model=tiny_model_path(variant),
                extra_args=["--model-name", name, "--max-tokens", "400"],
            )
        directory = short_tempdir(self)
        backends = [f"unix:{daemon.socket}" for daemon in self.daemons.values()]
        router = start_router_daemon(self, directory, backends, ["--default-model", "plain"])
        yield router.start()
        self.url = f"unix:{directory / 'router.sock'}"
        self.client = Client(reactor, self.url, pin=daemon_pin(directory), protocol=1)

    def complete(self, request: ChatRequest, **kw: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self.client.complete(request, **kw))

    @defer.inlineCallbacks
    def test_forced_tool_call_streamed_and_whole(self) -> Any:
        request = ChatRequest(
            (Message("user", "Weather in Oslo?"),),
            model="tools",
            tools=(WEATHER, TIME),
            tool_choice="required",
            parallel_tool_calls=False,  # a random model may otherwise go on calling
            temperature=0.0,
            max_tokens=300,
        )
        items: list[Any] = []
        reply = yield self.complete(request, on_item=items.append)
        self.assertEqual((reply.finish_reason, reply.text), ("tool_calls", ""))
        (call,) = reply.tool_calls
        self.assertTrue(call.id.startswith("call_"))
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.name].parameters
        jsonschema.validate(json.loads(call.arguments), schema)
        # streamed as sealed tool-call chunks: the first names the call, the arguments follow
        # in fragments as the model writes them
        *fragments, done = items
        self.assertIsInstance(done, Done)
        self.assertTrue(all(isinstance(item, ToolCallDelta) for item in fragments))
        self.assertEqual((fragments[0].index, fragments[0].id), (0, call.id))
        self.assertEqual(fragments[0].name, call.name)
        self.assertGreater(len([f for f in fragments if f.arguments]), 1)
        self.assertEqual("".join(f.arguments for f in fragments), call.arguments)
        self.assertEqual({f.index for f in fragments}, {0})

        named = yield self.complete(
            ChatRequest(
                request.messages,
                model="tools",
                tools=(WEATHER, TIME),
                tool_choice="get_time",
                parallel_tool_calls=False,
                max_tokens=300,
            )
        )
        (call,) = named.tool_calls
        self.assertEqual(call.name, "get_time")
        jsonschema.validate(json.loads(call.arguments), TIME.parameters)

        # the call and its result go back as history; the model answers in free text
        answer = yield self.complete(tool_round_trip(call, "tools", (WEATHER, TIME)))
        self.assertEqual((answer.tool_calls, answer.done.completion_tokens), ((), 5))
        self.assertTrue(answer.text)

    @defer.inlineCallbacks
    def test_json_schema_output(self) -> Any:
        for model, seed in (("plain", 1), ("plain", 2), ("tools", 3), ("thinker", 4)):
            request = ChatRequest.from_prompt(
                "Who?",
                model=model,
                response_format=ResponseFormat("json_schema", SCHEMA, "person"),
                temperature=1.0,
                seed=seed,
                presence_penalty=0.5,
                frequency_penalty=0.5,
                max_tokens=300,
            )
            reply = yield self.complete(request)
            jsonschema.validate(json.loads(reply.text), SCHEMA)
            self.assertEqual((reply.finish_reason, reply.reasoning), ("stop", ""))
        # a keyword the daemon cannot enforce is refused by name, never answered unconstrained
        bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
        request = ChatRequest.from_prompt(
            "N?", model="plain", response_format=ResponseFormat("json_schema", bounded, "n")
        )
        document = yield key_document(self.url)
        envelope, state = seal_request(document.current(), request, int(reactor.seconds()))
        sent = remember(json.dumps(envelope.to_json()).encode(), state)
        status, headers, body = yield post_chat(self.url, sent)
        status, error, was_sealed = refusal(sent, status, headers, body)  # sealed (issue 19)
        self.assertEqual(
            (status, error["code"], error["upstream_code"], was_sealed),
            (400, "upstream_refused", "unsupported_schema", True),
        )

    @defer.inlineCallbacks
    def test_reasoning_arrives_apart(self) -> Any:
        request = ChatRequest.from_prompt(
            "Why?", model="thinker", max_tokens=12, include_reasoning=True, reasoning_effort="high"
        )
        items: list[Any] = []
        reasoning: list[str] = []
        reply = yield self.complete(request, on_reasoning=reasoning.append, on_item=items.append)
        # the template opened <think> and the model never closes it: all of it is reasoning,
        # sealed as reasoning chunks
        self.assertTrue(reply.reasoning)
        self.assertEqual("".join(reasoning), reply.reasoning)
        *chunks, done = items
        self.assertIsInstance(done, Done)
        self.assertTrue(chunks)
        self.assertTrue(all(isinstance(item, Reasoning) for item in chunks))
        self.assertEqual((reply.text, reply.finish_reason), ("", "length"))
        self.assertEqual(reply.done.completion_tokens, 12)
        # a request that did not ask for reasoning gets none of it
        items.clear()
        quiet = yield self.complete(
            ChatRequest.from_prompt("Why?", model="thinker", max_tokens=12), on_item=items.append
        )
        self.assertEqual((quiet.reasoning, quiet.text, items), ("", "", [quiet.done]))
        self.assertEqual(quiet.done.completion_tokens, 12)

    @defer.inlineCallbacks
    def test_logprobs(self) -> Any:
        """Greedy: the logprobs through the router are the ones the daemon sends straight."""
        request = ChatRequest.from_prompt(
            "Hi", model="plain", logprobs=True, top_logprobs=2, max_tokens=8, temperature=0.0
        )
        reply = yield self.complete(request)
        expected = yield direct_logprobs(self.daemons["plain"].socket, request, "plain")
        self.assertEqual(len(expected), 8)
        self.assertEqual(len(reply.logprobs), 8)
        for entry, (token, logprob, raw, top) in zip(reply.logprobs, expected, strict=True):
            self.assertEqual((entry.token, entry.bytes), (token, raw))
            self.assertAlmostEqual(entry.logprob, logprob, places=3)
            self.assertEqual(
                [(t.token, round(t.logprob, 3)) for t in entry.top_logprobs],
                [(t, round(lp, 3)) for t, lp in top],
            )
        # byte tokens: compare bytes (a token may be half a character)
        text = b"".join(bytes(e.bytes) for e in reply.logprobs).decode(errors="replace")
        self.assertEqual(text, reply.text)

    @defer.inlineCallbacks
    def test_v1_request_gets_v1_bytes(self) -> Any:
        """A v1 client (no v1.1 field) gets exactly what the v1 sealer makes of the text."""
        document = yield key_document(self.url)
        request = ChatRequest.from_prompt("Hi", max_tokens=6)  # the default model: plain
        envelope, state = seal_request(document.current(), request, int(reactor.seconds()))
        status, _, raw = yield post_chat(self.url, json.dumps(envelope.to_json()).encode())
        self.assertEqual(status, 200)
        raw = raw.replace(b": keepalive\n\n", b"")
        events = SSEParser().feed(raw)
        self.assertEqual({name for name, _ in events[1:-1]}, {"chunk"})
        items = ResponseOpener(state).feed(raw)
        *deltas, done = items
        assert isinstance(done, Done)
        self.assertEqual((done.finish_reason, done.completion_tokens), ("length", 6))
        self.assertTrue(all(isinstance(d, Delta) and d.logprobs is None for d in deltas))
        nonce = b64u_decode(json.loads(events[0][1])["response_nonce"], "nonce", 32)
        v1 = ResponseSealer(state.secret, envelope.enc, response_nonce=nonce)
        expected = v1.init_event() + b"".join(v1.delta(d.text) for d in deltas)
        expected += v1.done("length", done.prompt_tokens, 6)
        self.assertEqual(raw, expected)
