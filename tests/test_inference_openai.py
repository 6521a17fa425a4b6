"""The official ``openai`` client against a real ``twistd inference`` on tiny models.

Structured output, tool calls (streamed and whole), logprobs, separated reasoning, penalties, n,
the prompt cache and refusals, as an app developer's OpenAI code sees them. The tiny models are
random, so answers that must have a shape get it the way production does: from a grammar (a
JSON schema, a forced tool call, or the llama-server ``grammar`` field for reasoning). The
client is synchronous; it runs in a thread while the daemon runs in its own process.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import jsonschema
import openai
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.daemons import Daemon, start_inference
from tests.test_inference_api import metric
from tests.test_inference_flow import sleep
from tests.tinymodel import tiny_model_path

T = TypeVar("T")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
# a JSON schema in every enforced shape (pattern, integer, enum array, enum, boolean)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,10}$"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "kind": {"enum": ["a", "b"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "kind", "ok"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A daemon on a tiny model variant and an ``openai.OpenAI`` client for it."""

    def __init__(self, daemon: Daemon, port: int):
        self.daemon = daemon
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
        )

    def call(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return threads.deferToThread(f, *args, **kwargs)

    def chat(self, **kwargs: Any) -> defer.Deferred[Any]:
        kwargs.setdefault("model", "tiny")
        kwargs.setdefault("messages", USER)
        return self.call(self.client.chat.completions.create, **kwargs)

    def stream(self, **kwargs: Any) -> defer.Deferred[list[Any]]:
        def run() -> list[Any]:
            kwargs.setdefault("model", "tiny")
            kwargs.setdefault("messages", USER)
            return list(self.client.chat.completions.create(stream=True, **kwargs))

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def metric(self, name: str) -> Any:
        _, _, text = yield self.daemon.request(b"GET", "/metrics")
        return metric(text, name)


@defer.inlineCallbacks
def serve(
    testcase: unittest.TestCase, variant: str = "plain", extra: list[str] | None = None
) -> Any:
    port = free_port()
    daemon = yield start_inference(
        testcase,
        model=tiny_model_path(variant),
        listen=[f"tcp:{port}:interface=127.0.0.1"],
        extra_args=["--model-name", "tiny", *(extra or [])],
    )
    return Server(daemon, port)


def assemble_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """Tool calls from streamed deltas, the way OpenAI's documentation assembles them."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                    call["type"] = delta.type
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)]


class StructuredOutputTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_json_schema_whole_and_streamed(self) -> Any:
        server = yield serve(self)
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        }
        for seed in (1, 2, 3):
            result = yield server.chat(
                response_format=response_format, max_tokens=200, seed=seed, temperature=1.0
            )
            choice = result.choices[0]
            self.assertEqual(choice.finish_reason, "stop")
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        chunks = yield server.stream(response_format=response_format, max_tokens=200, seed=4)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), SCHEMA)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

    @defer.inlineCallbacks
    def test_json_after_a_prompt_that_opened_think(self) -> Any:
        """DeepSeek-R1's generation prompt opens ``<think>``, but a JSON grammar leaves the
        model no way to close it: what it writes is the answer, not reasoning."""
        server = yield serve(self, "deepseek-r1")
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        }
        result = yield server.chat(response_format=response_format, max_tokens=200, seed=1)
        message = result.choices[0].message
        jsonschema.validate(json.loads(message.content), SCHEMA)
        self.assertIsNone(getattr(message, "reasoning_content", None))
        forced = yield server.chat(
            tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=200
        )
        (call,) = forced.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    @defer.inlineCallbacks
    def test_unsupported_schema_and_fields_are_refused_by_name(self) -> Any:
        server = yield serve(self)
        bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
        with self.assertRaises(openai.BadRequestError) as caught:
            yield server.chat(
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
            )
        self.assertEqual(caught.exception.code, "unsupported_schema")
        self.assertIn("'minimum'", caught.exception.message)
        for extra, name in (
            ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
            ({"extra_body": {"mirostat": 2}}, "mirostat"),
            ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ):
            with self.assertRaises(openai.BadRequestError) as caught:
                yield server.chat(**extra)
            self.assertEqual(caught.exception.code, "unsupported_field")
            self.assertEqual(caught.exception.param, name)

    @defer.inlineCallbacks
    def test_bad_grammar_is_refused_without_logging_it(self) -> Any:
        server = yield serve(self)
        marker = "zebra-grammar-marker"
        with self.assertRaises(openai.BadRequestError) as caught:
            yield server.chat(extra_body={"grammar": f'root ::= "{marker}" ( oops'})
        self.assertEqual(caught.exception.code, "invalid_grammar")
        result = yield server.chat(max_tokens=4)
        self.assertEqual(result.usage.completion_tokens, 4)
        yield server.daemon.stop()
        self.assertNotIn(marker, server.daemon.log_text())


class ToolCallTests(unittest.TestCase):
    timeout = 180

    def check_call(self, call: Any, names: tuple[str, ...] = ("get_weather",)) -> None:
        self.assertIn(call["name"], names)
        self.assertTrue(call["id"].startswith("call_"))
        schema = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), schema["function"]["parameters"])

    @defer.inlineCallbacks
    def forced(self, variant: str, **extra: Any) -> Any:
        server = yield serve(self, variant)
        # one call: with parallel calls a random model may go on calling until max_tokens
        kwargs = {
            "tools": [WEATHER, TIME],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "temperature": 0,
            **extra,
        }
        whole = yield server.chat(max_tokens=300, **kwargs)
        choice = whole.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls
        ]
        for call in calls:
            self.check_call(call, ("get_weather", "get_time"))
        self.assertIsNone(choice.message.content)

        chunks = yield server.stream(max_tokens=300, **kwargs)
        streamed = assemble_calls(chunks)
        self.assertEqual(
            [(c["name"], c["arguments"]) for c in streamed],
            [(c["name"], c["arguments"]) for c in calls],
        )
        self.assertEqual({c["type"] for c in streamed}, {"function"})
        self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")
        first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
        delta = first.choices[0].delta.tool_calls[0]
        self.assertEqual((delta.index, delta.type), (0, "function"))
        self.assertTrue(delta.function.name)

        named = yield server.chat(
            **{k: v for k, v in extra.items()},
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
            max_tokens=300,
        )
        (call,) = named.choices[0].message.tool_calls
        self.check_call(
            {"id": call.id, "name": call.function.name, "arguments": call.function.arguments},
            ("get_time",),
        )
        return server

    def test_hermes_qwen3(self) -> Any:
        return self.forced("qwen3")

    def test_llama3(self) -> Any:
        return self.forced("llama3")

    def test_gpt_oss_harmony(self) -> Any:
        # The grammar lets the model reason first (analysis text up to a "<"); a random model
        # would reason until max_tokens, so "<" (token 287) is made likely.
        return self.forced("gpt-oss", logit_bias={"287": 100})

    def test_generic_for_a_template_without_tools(self) -> Any:
        return self.forced("plain")

    @defer.inlineCallbacks
    def test_tool_history_accepted(self) -> Any:
        """A conversation with an assistant call and the tool's answer renders and runs."""
        server = yield serve(self, "qwen3")
        messages = [
            *USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
        ]
        result = yield server.chat(messages=messages, tools=[WEATHER], max_tokens=5)
        self.assertEqual(result.usage.completion_tokens, 5)


class ReasoningTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def split(self, variant: str, grammar: str, reasoning: str, content: str) -> Any:
        server = yield serve(self, variant)
        result = yield server.chat(extra_body={"grammar": grammar}, max_tokens=100)
        message = result.choices[0].message
        self.assertEqual((message.reasoning_content, message.content), (reasoning, content))
        chunks = yield server.stream(extra_body={"grammar": grammar}, max_tokens=100)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        self.assertEqual(
            "".join(getattr(d, "reasoning_content", None) or "" for d in deltas), reasoning
        )
        self.assertEqual("".join(d.content or "" for d in deltas), content)
        self.assertTrue(
            all(not (getattr(d, "reasoning_content", None) and d.content) for d in deltas)
        )
        raw = yield server.chat(
            extra_body={"grammar": grammar, "reasoning_format": "none"}, max_tokens=100
        )
        self.assertIsNone(getattr(raw.choices[0].message, "reasoning_content", None))
        return server

    def test_gpt_oss_channels(self) -> Any:
        grammar = (
            'root ::= "<|channel|>analysis<|message|>" "The user says hi." "<|end|>"'
            ' "<|start|>assistant<|channel|>final<|message|>" "Hello there."'
        )
        return self.split("gpt-oss", grammar, "The user says hi.", "Hello there.")

    def test_qwen3_think(self) -> Any:
        grammar = 'root ::= "<think>" "Short." "</think>" "Fine."'
        return self.split("qwen3", grammar, "Short.", "Fine.")

    def test_deepseek_prompt_opened_think(self) -> Any:
        grammar = 'root ::= "Just count." "</think>" "Three."'
        return self.split("deepseek-r1", grammar, "Just count.", "Three.")


class SamplingTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_logprobs(self) -> Any:
        server = yield serve(self)
        result = yield server.chat(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
        entries = result.choices[0].logprobs.content
        self.assertEqual(len(entries), 8)
        # the tiny model emits byte tokens, so compare bytes (a token may be half a character)
        self.assertEqual(
            b"".join(bytes(e.bytes) for e in entries).decode(errors="replace"),
            result.choices[0].message.content,
        )
        for entry in entries:
            self.assertLessEqual(entry.logprob, 0.0)
            self.assertEqual(bytes(entry.bytes).decode(errors="replace"), entry.token)
            self.assertEqual(len(entry.top_logprobs), 3)
            # greedy: the chosen token is the most likely one
            self.assertEqual(entry.top_logprobs[0].token, entry.token)
            self.assertAlmostEqual(entry.top_logprobs[0].logprob, entry.logprob, places=4)
            ranked = [t.logprob for t in entry.top_logprobs]
            self.assertEqual(ranked, sorted(ranked, reverse=True))
        chunks = yield server.stream(max_tokens=8, temperature=0, logprobs=True, top_logprobs=1)
        streamed = [
            e.token
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
        self.assertEqual(streamed, [e.token for e in entries])

        completion = yield server.call(
            server.client.completions.create,
            model="tiny",
            prompt="Once upon",
            max_tokens=5,
            temperature=0,
            logprobs=2,
        )
        logprobs = completion.choices[0].logprobs
        self.assertEqual(len(logprobs.tokens), 5)
        self.assertEqual(len(logprobs.token_logprobs), 5)
        self.assertEqual(len(logprobs.top_logprobs[0]), 2)
        self.assertEqual(logprobs.text_offset[0], 0)

    @defer.inlineCallbacks
    def test_penalties_logit_bias_and_n(self) -> Any:
        server = yield serve(self)
        # Greedy, the tiny model soon repeats one token; penalties make it repeat less.
        repeats = []
        for penalty in ({}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
            result = yield server.chat(max_tokens=200, temperature=0, logprobs=True, **penalty)
            tokens = [bytes(e.bytes) for e in result.choices[0].logprobs.content]
            repeats.append(max(tokens.count(t) for t in tokens))
        plain, frequency, presence = repeats
        self.assertLess(frequency, plain)
        self.assertLess(presence, plain)

        biased = yield server.chat(
            max_tokens=6, temperature=0, logit_bias={str(ord("Q") - 0x21 + 260): 100}
        )
        self.assertEqual(biased.choices[0].message.content.strip(), "Q" * 6)

        several = yield server.chat(max_tokens=7, n=3, temperature=1.0, seed=5)
        self.assertEqual([c.index for c in several.choices], [0, 1, 2])
        self.assertEqual(several.usage.completion_tokens, 21)
        self.assertEqual(len({c.message.content for c in several.choices}), 3)
        chunks = yield server.stream(max_tokens=7, n=2)
        finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(sorted(finished), [0, 1])
        self.assertEqual(chunks[-1].usage.completion_tokens, 14)


class PromptCacheTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_reuse_only_for_the_same_key(self) -> Any:
        server = yield serve(self, extra=["--parallel", "3"])
        history = [
            {"role": "system", "content": "You are a terse assistant. " * 10},
            {"role": "user", "content": "First question about the weather, please."},
        ]
        alice = {"X-LLMRouter-Cache-Key": "alice-device-digest-0001"}
        bob = {"X-LLMRouter-Cache-Key": "bob-device-digest-000002"}
        first = yield server.chat(
            messages=history, max_tokens=6, temperature=0, extra_headers=alice
        )
        self.assertEqual(first.usage.prompt_tokens_details.cached_tokens, 0)
        answer = first.choices[0].message.content
        follow = [
            *history,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And tomorrow?"},
        ]
        # another key, the same prefix: nothing reused
        other = yield server.chat(messages=follow, max_tokens=3, extra_headers=bob)
        self.assertEqual(other.usage.prompt_tokens_details.cached_tokens, 0)
        reused_before = yield server.metric("inference_prompt_tokens_reused_total")
        self.assertEqual(reused_before, 0)
        # no key: nothing reused either
        anonymous = yield server.chat(messages=follow, max_tokens=3)
        self.assertEqual(anonymous.usage.prompt_tokens_details.cached_tokens, 0)
        # the same key: the whole earlier conversation is reused
        again = yield server.chat(messages=follow, max_tokens=3, extra_headers=alice)
        cached = again.usage.prompt_tokens_details.cached_tokens
        self.assertGreater(cached, first.usage.prompt_tokens)
        self.assertLess(cached, again.usage.prompt_tokens)
        reused = yield server.metric("inference_prompt_tokens_reused_total")
        self.assertEqual(reused, cached)
        # greedy output is the same with and without reuse
        fresh = yield server.chat(messages=follow, max_tokens=3, temperature=0)
        cached_again = yield server.chat(
            messages=follow, max_tokens=3, temperature=0, extra_headers=bob
        )
        self.assertGreater(cached_again.usage.prompt_tokens_details.cached_tokens, 0)
        self.assertEqual(cached_again.choices[0].message.content, fresh.choices[0].message.content)

    @defer.inlineCallbacks
    def test_a_new_conversation_keeps_the_old_one(self) -> Any:
        """The same key (device), a second conversation with the same system prompt: it takes a
        free slot, and the first conversation's next turn still reuses its whole history."""
        server = yield serve(self, extra=["--parallel", "2"])
        key = {"X-LLMRouter-Cache-Key": "dana-device-digest-0004"}
        system = {"role": "system", "content": "You are a terse assistant. " * 10}

        def turn(messages: list[dict[str, str]]) -> Any:
            return server.chat(messages=messages, max_tokens=4, temperature=0, extra_headers=key)

        first = [system, {"role": "user", "content": "First conversation, first question. " * 12}]
        answer = yield turn(first)
        other = yield turn([system, {"role": "user", "content": "Another conversation."}])
        # the shared system prompt is not worth cutting the first conversation's cache for
        self.assertEqual(other.usage.prompt_tokens_details.cached_tokens, 0)
        follow = [
            *first,
            {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": "And a follow-up."},
        ]
        again = yield turn(follow)
        self.assertGreater(
            again.usage.prompt_tokens_details.cached_tokens, answer.usage.prompt_tokens
        )

    @defer.inlineCallbacks
    def test_ttl_and_bad_key(self) -> Any:
        server = yield serve(self, extra=["--cache-ttl", "0.2"])
        key = {"X-LLMRouter-Cache-Key": "carol-device-digest-003"}
        yield server.chat(max_tokens=2, extra_headers=key)
        slots = yield server.metric("inference_cached_slots")
        self.assertEqual(slots, 1)
        for _ in range(100):
            slots = yield server.metric("inference_cached_slots")
            if slots == 0:
                break
            yield sleep(0.05)
        self.assertEqual(slots, 0)
        later = yield server.chat(max_tokens=2, extra_headers=key)
        self.assertEqual(later.usage.prompt_tokens_details.cached_tokens, 0)
        with self.assertRaises(openai.BadRequestError) as caught:
            yield server.chat(extra_headers={"X-LLMRouter-Cache-Key": "short"})
        self.assertEqual(caught.exception.code, "invalid_cache_key")
