"""Parameter guardrails: every violation is a 400 with its own JSON error code.

One daemon answers all the bad requests of a test, and afterwards still serves a good one:
nobody's bad input costs anybody else anything.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from inference.guardrails import APIError, parse_chat, parse_completion
from tests.daemons import start_inference

USER = [{"role": "user", "content": "hi"}]

CHAT_CASES: list[tuple[object, str]] = [
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    ({}, "missing_messages"),
    ({"messages": []}, "invalid_messages"),
    ({"messages": "hi"}, "invalid_messages"),
    ({"messages": ["hi"]}, "invalid_messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_role"),
    ({"messages": [{"role": 3, "content": "hi"}]}, "invalid_role"),
    ({"messages": [{"role": "user"}]}, "invalid_content"),
    ({"messages": [{"role": "user", "content": 42}]}, "invalid_content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "invalid_content",
    ),
    ({"messages": USER, "max_tokens": 0}, "invalid_max_tokens"),
    ({"messages": USER, "max_tokens": "5"}, "invalid_max_tokens"),
    ({"messages": USER, "max_tokens": True}, "invalid_max_tokens"),
    ({"messages": USER, "max_tokens": 65}, "max_tokens_exceeded"),
    ({"messages": USER, "max_completion_tokens": 65}, "max_tokens_exceeded"),
    ({"messages": USER, "temperature": 2.5}, "invalid_temperature"),
    ({"messages": USER, "temperature": -0.1}, "invalid_temperature"),
    ({"messages": USER, "temperature": "hot"}, "invalid_temperature"),
    ({"messages": USER, "top_p": 1.5}, "invalid_top_p"),
    ({"messages": USER, "top_p": 0}, "invalid_top_p"),
    ({"messages": USER, "stream": "yes"}, "invalid_stream"),
    ({"messages": USER, "stop": 5}, "invalid_stop"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "invalid_stop"),
    ({"messages": USER, "n": 0}, "invalid_n"),
    ({"messages": USER, "n": 5}, "invalid_n"),  # more than the slots (--parallel 4)
    ({"messages": USER, "whatever": [1]}, "unsupported_field"),
    ({"messages": USER, "functions": []}, "unsupported_field"),
    ({"messages": USER, "store": True}, "unsupported_field"),
    ({"messages": USER, "presence_penalty": 3}, "invalid_presence_penalty"),
    ({"messages": USER, "frequency_penalty": "x"}, "invalid_frequency_penalty"),
    ({"messages": USER, "logprobs": 1}, "invalid_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "invalid_top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "invalid_top_logprobs"),
    ({"messages": USER, "logit_bias": {"x": 1}}, "invalid_logit_bias"),
    ({"messages": USER, "logit_bias": {"5": 101}}, "invalid_logit_bias"),
    ({"messages": USER, "logit_bias": {"99999": 1}}, "invalid_logit_bias"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "invalid_response_format"),
    (
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 3}},
            },
        },
        "unsupported_schema",
    ),
    ({"messages": USER, "grammar": "root ::= ("}, "invalid_grammar"),
    ({"messages": USER, "tools": [{"type": "web_search"}]}, "invalid_tools"),
    ({"messages": USER, "tool_choice": "required"}, "invalid_tool_choice"),
    (
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "invalid_tool_choice",
    ),
    (
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
        },
        "unsupported_combination",
    ),
    ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "invalid_tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "unsupported_field"),
    ({"messages": USER, "reasoning_effort": "max"}, "invalid_reasoning_effort"),
    ({"messages": USER, "chat_template_kwargs": {"messages": 1}}, "invalid_chat_template_kwargs"),
    ({"messages": USER, "seed": 1.5}, "invalid_seed"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, "context_length_exceeded"),
    (
        {"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 64},
        "context_length_exceeded",
    ),
]

COMPLETION_CASES: list[tuple[object, str]] = [
    ({}, "missing_prompt"),
    ({"prompt": 12}, "invalid_prompt"),
    ({"prompt": ["a", "b"]}, "invalid_prompt"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens_exceeded"),
    ({"prompt": "x" * 600}, "context_length_exceeded"),
    ({"prompt": "hi", "echo": True}, "unsupported_field"),
    ({"prompt": "hi", "best_of": 3}, "unsupported_field"),
    ({"prompt": "hi", "logprobs": 21}, "invalid_logprobs"),
    ({"prompt": "hi", "tools": []}, "unsupported_field"),
]


def encode(body: object) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


class GuardrailTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def check(self, path: str, cases: list[tuple[object, str]]) -> Any:
        daemon = yield start_inference(self, extra_args=["--ctx", "256", "--max-tokens", "64"])
        for body, code in cases:
            status, headers, data = yield daemon.request(b"POST", path, encode(body))
            self.assertEqual(status, 400, code)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            error = json.loads(data)["error"]
            self.assertEqual(error["code"], code)
            self.assertIsInstance(error["message"], str)
        _, _, text = yield daemon.request(b"GET", "/metrics")
        self.assertEqual(metric_with(text, "invalid"), len(cases))
        return daemon

    @defer.inlineCallbacks
    def test_chat_violations(self) -> Any:
        daemon = yield self.check("/v1/chat/completions", CHAT_CASES)
        body = {"messages": USER, "max_tokens": 3, "user": "u1", "logit_bias": {}, "store": False}
        status, _, data = yield daemon.request(b"POST", "/v1/chat/completions", encode(body))
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 3)

    @defer.inlineCallbacks
    def test_completion_violations(self) -> Any:
        daemon = yield self.check("/v1/completions", COMPLETION_CASES)
        status, _, data = yield daemon.request(
            b"POST", "/v1/completions", encode({"prompt": ["hi"], "max_tokens": 2})
        )
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 2)

    @defer.inlineCallbacks
    def test_body_too_large(self) -> Any:
        daemon = yield start_inference(self)
        body = json.dumps({"messages": [{"role": "user", "content": "x" * (1024 * 1024)}]})
        status, _, data = yield daemon.request(b"POST", "/v1/chat/completions", body.encode())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(data)["error"]["code"], "body_too_large")
        _, _, text = yield daemon.request(b"GET", "/metrics")
        self.assertEqual(metric_with(text, "rejected"), 1)

    @defer.inlineCallbacks
    def test_without_max_tokens_the_rest_of_the_context_is_used(self) -> Any:
        daemon = yield start_inference(self, extra_args=["--ctx", "128", "--max-tokens", "500"])
        body = {"prompt": "abc"}
        status, _, data = yield daemon.request(b"POST", "/v1/completions", encode(body))
        self.assertEqual(status, 200)
        usage = json.loads(data)["usage"]
        self.assertEqual(usage["prompt_tokens"] + usage["completion_tokens"], 128)


def metric_with(text: bytes, outcome: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(f'inference_requests_total{{outcome="{outcome}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(outcome)


class ParseTests(unittest.TestCase):
    """The parser alone: values it accepts, and that errors never quote the request."""

    def test_accepts_and_normalises(self) -> None:
        parsed = parse_chat(
            {
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    },
                ],
                "stop": "END",
                "temperature": 0,
                "top_p": 0.5,
                "seed": 7,
            },
            100,
        )
        self.assertEqual(
            parsed.messages,
            ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}),
        )
        self.assertEqual(parsed.sampling.stop, ("END",))
        self.assertEqual(parsed.sampling.max_tokens, 100)
        self.assertFalse(parsed.max_tokens_given)
        self.assertEqual((parsed.sampling.temperature, parsed.sampling.top_p), (0.0, 0.5))
        self.assertTrue(parse_chat({"messages": USER}, 10, force_stream=True).stream)
        self.assertEqual(
            parse_completion({"prompt": "p", "max_tokens": 4}, 10).sampling.max_tokens, 4
        )

    def test_messages_never_quote_input(self) -> None:
        marker = "secret-marker-123"
        for data in (
            {"messages": [{"role": marker, "content": "x"}]},
            {"messages": USER, "temperature": marker},
            {"messages": USER, "max_tokens": marker},
            {"messages": USER, "stop": [marker] * 9},
            {"messages": USER, f"{marker} !": 1},
            {"messages": [{"role": "user", "content": "x", f"{marker}?": 1}]},
            {"messages": USER, "tools": [{"type": "function", "function": {"name": marker + "!"}}]},
            {"messages": USER, "chat_template_kwargs": {marker: [1]}},
        ):
            with self.assertRaises(APIError) as caught:
                parse_chat(data, 10)
            self.assertNotIn(marker, caught.exception.body().decode())

    def test_unsupported_fields_are_named(self) -> None:
        for data, name in (
            ({"messages": USER, "logit_bias_v2": {}}, "logit_bias_v2"),
            ({"messages": USER, "functions": []}, "functions"),
            ({"messages": USER, "prediction": {"type": "content"}}, "prediction"),
            ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
        ):
            with self.assertRaises(APIError) as caught:
                parse_chat(data, 10)
            error = json.loads(caught.exception.body())["error"]
            self.assertEqual((error["code"], error["param"]), ("unsupported_field", name))
            self.assertIn(repr(name), error["message"])

    def test_schema_errors_name_the_keyword_only(self) -> None:
        from inference.grammars import SchemaError, json_schema_grammar

        schema = {
            "type": "object",
            "properties": {"secret-marker": {"type": "integer", "maximum": 3}},
        }
        with self.assertRaises(SchemaError) as caught:
            json_schema_grammar(schema)
        self.assertIn("'maximum'", str(caught.exception))
        self.assertNotIn("secret-marker", str(caught.exception))

    def test_patterns_the_converter_would_loop_on(self) -> None:
        """llama-cpp-python's converter never returns on a ']' or '}' that closes nothing (the
        fuzzer found "^type]{1,9}0$") and writes repeated literals out in full: refused before it
        runs; the same inside a class, escaped or in a quantifier is fine."""
        from inference.grammars import SchemaError, check_schema, json_schema_grammar

        # check_schema alone: were the check gone, the converter would hang this test
        # "[]a]": the converter ends the class at the first ']', as most regex engines do not
        refused = ("^type]{1,9}0$", "^a]$", "^a}$", "^[a-z]]$", "^a{2}}$", "^[]a]$")
        # and repetitions it would write out in full
        for pattern in (*refused, "^a{99999999}$", "^(ab){1,300}$", "^[x]{2,257}$"):
            with self.assertRaises(SchemaError, msg=pattern):
                check_schema({"type": "string", "pattern": pattern})
        for pattern in ("^[\\]]$", "^a\\]$", "^\\}{2}$", "^(ab|c){1,3}[x-z]$", "^a{256}$"):
            json_schema_grammar({"type": "string", "pattern": pattern})

    def test_tool_history_for_templates(self) -> None:
        """Assistant calls' arguments become objects (templates' convention), content "" when
        null, and a tool message keeps its call id."""
        parsed = parse_chat(
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "refusal": None,
                        "reasoning_content": "think",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "w", "arguments": '{"city": "Oslo"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
                ],
            },
            10,
        )
        assistant, tool = parsed.messages[1], parsed.messages[2]
        self.assertEqual(assistant["content"], "")
        self.assertEqual(assistant["tool_calls"][0]["function"]["arguments"], {"city": "Oslo"})
        self.assertEqual((assistant["reasoning_content"], assistant["thinking"]), ("think",) * 2)
        self.assertEqual(tool, {"role": "tool", "content": "cold", "tool_call_id": "call_1"})
