"""Protocol v1.1 request plaintext: every field, its limits, and bad input (always bad_payload).

Parsing goes through ``protocol.parse_chat_request`` (bytes in, as the router sees them), so these
are the router's answers; a v1 request must serialize to exactly the v1 bytes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import chat
from llmrouter import protocol as p

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def parse(**fields: Any) -> p.ChatRequest:
    doc = {"messages": USER, **fields}
    return p.parse_chat_request(json.dumps(doc).encode())


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


class FieldTests(SynchronousTestCase):
    def refused(self, doc: Any, *names: str) -> str:
        """``doc`` is refused with bad_payload naming each of ``names``; returns the message."""
        with self.assertRaises(p.ProtocolError) as cm:
            p.parse_chat_request(json.dumps(doc).encode())
        error = cm.exception
        self.assertEqual((error.code, error.status), ("bad_payload", 400))
        for name in names:
            self.assertIn(name, error.message)
        return error.message

    def bad(self, *names: str, **fields: Any) -> None:
        self.refused({"messages": USER, **fields}, *names)

    def test_v1_fields_and_bytes(self) -> None:
        request = parse(max_tokens=16, temperature=0.5, top_p=0.9, stop=["\n"])
        self.assertEqual(request.features(), frozenset())
        # exactly the v1 plaintext: same keys, same order, nothing added
        self.assertEqual(
            json.dumps(request.to_plaintext(), separators=(",", ":")),
            '{"messages":[{"role":"user","content":"hi"}],"max_tokens":16,'
            '"temperature":0.5,"top_p":0.9,"stop":["\\n"]}',
        )

    def test_model(self) -> None:
        self.assertEqual(parse(model="gpt-oss-20b").model, "gpt-oss-20b")
        self.assertEqual(parse(model="org/Model:q4_K@v2+x").model, "org/Model:q4_K@v2+x")
        for bad in ("", " x", "a b", "x" * 129, 5, None and 1, ["m"], "mödel", "-x"):
            if bad is not None:
                self.bad("model", model=bad)

    def test_max_completion_tokens(self) -> None:
        self.assertEqual(parse(max_completion_tokens=7).max_tokens, 7)
        self.bad("max_completion_tokens", max_completion_tokens=0)
        self.bad("max_tokens", max_tokens=2**31)
        self.bad("max_tokens", "max_completion_tokens", max_tokens=3, max_completion_tokens=3)
        self.assertEqual(parse(max_tokens=2**31 - 1).max_tokens, 2**31 - 1)

    def test_sampling_fields(self) -> None:
        request = parse(seed=42, presence_penalty=-2, frequency_penalty=1.5)
        self.assertEqual(
            request.features(), frozenset({"seed", "presence_penalty", "frequency_penalty"})
        )
        for name, bad in (
            ("seed", -1),
            ("seed", 2**32),
            ("seed", 1.0),
            ("seed", True),
            ("presence_penalty", 2.5),
            ("frequency_penalty", "1"),
        ):
            self.bad(name, **{name: bad})
        self.bad("stop", stop=["x" * 129])

    def test_response_format(self) -> None:
        self.assertEqual(parse(response_format={"type": "text"}).features(), frozenset())
        request = parse(response_format={"type": "json_object"})
        self.assertEqual(request.features(), frozenset({"response_format"}))
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
        }
        request = parse(response_format=fmt)
        assert request.response_format is not None
        self.assertEqual(request.response_format.schema, SCHEMA)
        self.assertEqual(request.to_openai()["response_format"], fmt)
        for bad in (
            "json",
            {"type": "yaml"},
            {"type": "json_object", "schema": SCHEMA},
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"name": "w"}},
            {"type": "json_schema", "json_schema": {"schema": SCHEMA, "name": "a b"}},
            {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}},
            {"type": "json_schema", "json_schema": {"schema": [SCHEMA]}},
            {"type": "json_schema", "json_schema": {"schema": SCHEMA, "extra": 1}},
        ):
            self.bad("response_format", response_format=bad)

    def test_schema_limits(self) -> None:
        def with_schema(schema: Any) -> dict[str, Any]:
            return {"type": "json_schema", "json_schema": {"schema": schema}}

        parse(response_format=with_schema(nested(chat.MAX_SCHEMA_DEPTH // 2 - 1)))
        self.bad("nested", response_format=with_schema(nested(chat.MAX_SCHEMA_DEPTH)))
        big = {"type": "object", "description": "x" * chat.MAX_SCHEMA_BYTES}
        self.bad("bytes", response_format=with_schema(big))
        self.bad("maxItems", response_format=with_schema({"type": "array", "maxItems": 10**6}))
        for count in (5000.0, 1e9):  # a float expands like an integer
            self.bad("maxItems", response_format=with_schema({"type": "array", "maxItems": count}))
        self.bad("minLength", response_format=with_schema({"type": "string", "minLength": 5000}))
        self.bad("pattern", response_format=with_schema({"pattern": "a{100000}"}))
        self.bad("pattern", response_format=with_schema({"pattern": "a" * 600}))
        self.bad(
            "pattern",
            response_format=with_schema({"patternProperties": {"x{2000,}": {"type": "string"}}}),
        )
        self.bad("$ref", response_format=with_schema({"$ref": "https://evil.example/s.json"}))
        parse(response_format=with_schema({"$defs": {"a": {}}, "$ref": "#/$defs/a"}))
        # the same limits hold for tool parameters
        tool = {"type": "function", "function": {"name": "f", "parameters": nested(40)}}
        self.bad("tool parameters", tools=[tool])
        # as deep as JSON parsing allows, and deeper: refused, never a RecursionError
        for depth in (900, 5000):
            deep = '{"a":' * depth + "1" + "}" * depth
            for field in (
                f'"tools":[{{"type":"function","function":{{"name":"f","parameters":{deep}}}}}]',
                f'"response_format":{{"type":"json_schema","json_schema":{{"schema":{deep}}}}}',
            ):
                plaintext = f'{{"messages":[{{"role":"user","content":"x"}}],{field}}}'
                with self.assertRaises(p.ProtocolError) as cm:
                    p.parse_chat_request(plaintext.encode())
                self.assertEqual(cm.exception.code, "bad_payload")

    def test_tools(self) -> None:
        request = parse(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
        self.assertEqual(request.features(), frozenset({"tools", "parallel_tool_calls"}))
        self.assertTrue(request.wants_tool_calls)
        body = request.to_openai()
        self.assertEqual(body["tools"], [TOOL])
        self.assertEqual((body["tool_choice"], body["parallel_tool_calls"]), ("required", False))
        named = {"type": "function", "function": {"name": "get_weather"}}
        self.assertEqual(parse(tools=[TOOL], tool_choice=named).to_openai()["tool_choice"], named)
        self.assertFalse(parse().wants_tool_calls)

    def test_bad_tools(self) -> None:
        def tool(**function: Any) -> dict[str, Any]:
            return {"type": "function", "function": {"name": "f", **function}}

        for bad in (
            [],
            {},
            [TOOL] * 2,  # duplicate names
            [tool()] * 0 + [tool(name="a b")],
            [tool(name="x" * 65)],
            [{"type": "retrieval", "function": {"name": "f"}}],
            [tool(description=5)],
            [tool(description="d" * 5000)],
            [tool(parameters="{}")],
            [tool(strict="no")],
            [tool(extra=1)],
            [{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)],
        ):
            self.bad("tool", tools=bad)
        fat = [tool(name=f"f{i}", description="d" * 4000) for i in range(20)]
        self.bad("bytes", tools=fat)
        self.bad("tool_choice", tool_choice="auto")  # without tools
        self.bad("tool_choice", tools=[TOOL], tool_choice="sometimes")
        self.bad(
            "tool_choice",
            tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "other"}},
        )
        auto = {"type": "function", "function": {"name": "auto"}}
        self.bad("tool_choice", tools=[auto], tool_choice=auto)
        self.bad("parallel_tool_calls", parallel_tool_calls=True)  # without tools
        self.bad("parallel_tool_calls", tools=[TOOL], parallel_tool_calls="yes")

    def test_tool_messages(self) -> None:
        messages = [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees"},
        ]
        request = p.parse_chat_request(json.dumps({"messages": messages}).encode())
        self.assertEqual(request.features(), frozenset({"tools"}))  # the history needs them
        self.assertEqual(request.messages[1].tool_calls[0].name, "get_weather")
        self.assertEqual(request.to_plaintext()["messages"], messages)
        # a tool message must answer a call of the assistant message before it
        for bad in (
            [{"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            [*messages[:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
            [*messages[:3], {"role": "tool", "tool_call_id": "call_1", "content": "again"}],
            [*messages[:2], {"role": "user", "content": "x"}, messages[2]],
            [*messages[:2], {"role": "tool", "content": "x"}],
        ):
            self.refused({"messages": bad}, "tool")
        call = dict(CALL)
        for broken in (
            {**call, "id": ""},
            {**call, "type": "code"},
            {**call, "function": {"name": "a b", "arguments": "{}"}},
            {**call, "function": {"name": "f", "arguments": {}}},
            {**call, "extra": 1},
        ):
            doc = {"messages": [{"role": "assistant", "content": None, "tool_calls": [broken]}]}
            self.refused(doc, "tool call")
        doc = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call, call]}]}
        self.refused(doc, "unique")
        self.refused({"messages": [{"role": "assistant", "content": None}]}, "content")

    def test_content_parts(self) -> None:
        parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        doc = {"messages": [{"role": "user", "content": parts}]}
        request = p.parse_chat_request(json.dumps(doc).encode())
        self.assertEqual(request.messages[0].content, ("a", "b"))
        self.assertEqual(request.to_plaintext(), doc)
        image = {"type": "image_url", "image_url": {"url": "data:,x"}}
        for bad in ([image], [], [{"type": "text"}], [{"type": "text", "text": "a", "x": 1}]):
            self.refused({"messages": [{"role": "user", "content": bad}]}, "content")
        many = [{"type": "text", "text": "a"}] * 65
        self.refused({"messages": [{"role": "user", "content": many}]}, "parts")

    def test_logprobs_and_reasoning(self) -> None:
        request = parse(
            logprobs=True, top_logprobs=3, reasoning_effort="low", include_reasoning=True
        )
        self.assertEqual(request.features(), frozenset({"logprobs", "reasoning_effort"}))
        self.assertTrue(request.wants_logprobs and request.wants_reasoning)
        body = request.to_openai()
        self.assertNotIn("include_reasoning", body)  # a relay option, never sent upstream
        self.assertEqual((body["logprobs"], body["top_logprobs"]), (True, 3))
        self.bad("top_logprobs", top_logprobs=2)  # without logprobs
        self.bad("top_logprobs", logprobs=True, top_logprobs=21)
        self.bad("logprobs", logprobs=1)
        self.bad("reasoning_effort", reasoning_effort="extreme")
        self.bad("include_reasoning", include_reasoning="yes")
        self.assertEqual(parse(logprobs=False).features(), frozenset())

    def test_unknown_and_unsupported_fields(self) -> None:
        # OpenAI fields we do not carry are refused by name...
        for name in ("n", "logit_bias", "stream", "user", "functions"):
            self.bad(f"{name} is not supported", **{name: 1})
        # ...any other field is refused without repeating its name (it may be anything)
        message = self.refused({"messages": USER, "CANARYFIELD": 1})
        self.assertNotIn("CANARY", message)
        message = self.refused({"messages": [{"role": "user", "content": "x", "CANARY": 1}]})
        self.assertNotIn("CANARY", message)
        self.bad("name", messages=[{"role": "user", "content": "x", "name": "bob"}])

    def test_role_must_be_a_known_string(self) -> None:
        for role in (["user"], {"user": 1}, 1, None, "developer", "function"):
            self.refused({"messages": [{"role": role, "content": "x"}]}, "role")

    def test_message_count(self) -> None:
        many = USER * (chat.MAX_MESSAGES + 1)
        self.refused({"messages": many}, "messages")

    def test_openai_translation(self) -> None:
        request = parse(max_tokens=5, model="m")
        body = request.to_openai("m", "max_completion_tokens")
        self.assertEqual(body["max_completion_tokens"], 5)
        self.assertNotIn("max_tokens", body)
        self.assertEqual((body["model"], body["stream"]), ("m", True))

    def test_reprs_hide_content(self) -> None:
        request = parse(tools=[TOOL], response_format={"type": "json_object"})
        text = repr(request) + repr(request.messages) + repr(request.tools)
        text += repr(request.response_format) + repr(chat.ToolCall("i", "n", "SECRETARGS"))
        for secret in ("hi", "get_weather", "Weather", "SECRETARGS", "Paris"):
            self.assertNotIn(secret, text)


class NeverA500Tests(SynchronousTestCase):
    """Whatever JSON arrives, the answer is a valid request or bad_payload: no other exception."""

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
    keys = st.sampled_from([*sorted(chat.FIELDS), "role", "content", "tool_calls", "x"])

    # Shapes close to valid ones, with any JSON in their leaves.
    function = st.fixed_dictionaries(
        {"name": json_values | st.just("f")},
        optional={"parameters": json_values, "description": json_values, "arguments": json_values},
    )
    shaped = st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "json_schema", "text", "x"]) | json_values},
        optional={"function": function, "json_schema": st.dictionaries(keys, json_values)},
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(chat.ROLES) | json_values},
        optional={
            "content": json_values | st.lists(shaped, max_size=2),
            "tool_calls": st.lists(shaped | st.fixed_dictionaries({"id": json_values}), max_size=2),
            "tool_call_id": json_values,
        },
    )
    values = json_values | shaped | st.lists(shaped, max_size=3)

    @settings(max_examples=400, deadline=None)
    @given(st.dictionaries(keys, values, max_size=6), st.lists(message | json_values, max_size=3))
    def test_fuzz(self, fields: dict[str, Any], extra_messages: list[Any]) -> None:
        doc = {"messages": USER + extra_messages, **fields}
        try:
            p.parse_chat_request(json.dumps(doc).encode())
        except p.ProtocolError as e:
            self.assertEqual(e.code, "bad_payload")

    def test_unhashable_names(self) -> None:
        for fields in (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": ["x"]}}},
            {"tools": [{"type": "function", "function": {"name": {"a": 1}}}]},
            {"reasoning_effort": ["low"]},
            {"response_format": {"type": ["json_object"]}},
        ):
            with self.assertRaises(p.ProtocolError):
                parse(**fields)
