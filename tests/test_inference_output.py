"""The output parser, driven by token sequences of tiny models carrying real templates' tokens.

Each answer text is tokenized by the tiny GGUF of that model family (its special tokens are real
vocabulary entries with the real token types, so llama.cpp renders them, or not, as it would for
the real model), then detokenized token by token as the engine does (``output_piece``) and fed
to the parser one token at a time; the same text fed whole must give the same result.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial import unittest

from inference.chat_template import ChatTemplate
from inference.model import LlamaModel
from inference.output import Content, Event, OutputParser, Reasoning, ToolArgs, ToolStart
from tests.tinymodel import TEMPLATES, tiny_model_path

_models: dict[str, LlamaModel] = {}


def model(variant: str) -> LlamaModel:
    if variant not in _models:
        _models[variant] = LlamaModel(
            tiny_model_path(variant), n_ctx_seq=64, n_seq=1, threads=1, batch=32
        )
    return _models[variant]


def collect(events: list[Event]) -> dict[str, Any]:
    out: dict[str, Any] = {"content": "", "reasoning": "", "calls": []}
    for event in events:
        if isinstance(event, Content):
            out["content"] += event.text
        elif isinstance(event, Reasoning):
            out["reasoning"] += event.text
        elif isinstance(event, ToolStart):
            out["calls"].append([event.name, "", event.id])
        else:
            assert isinstance(event, ToolArgs)
            out["calls"][event.index][1] += event.text
    for call in out["calls"]:
        call.pop()  # ids are random
    return out


def by_tokens(variant: str, text: str, **options: Any) -> dict[str, Any]:
    m = model(variant)
    tokens = m.tokenize(text, special=True)
    parser = OutputParser(**options)
    events: list[Event] = []
    fed = ""
    pending = b""
    for token in tokens:
        if m.is_eog(token):
            break
        pending += m.output_piece(token)
        try:
            piece = pending.decode()
        except UnicodeDecodeError:
            continue
        pending = b""
        fed += piece
        events += parser.feed(piece)
    events += parser.finish()
    expected = text.split("<|im_end|>")[0].split("<|return|>")[0].split("<|call|>")[0]
    assert fed == expected, (fed, expected)
    whole = OutputParser(**options)
    assert collect(events) == collect(whole.feed(fed) + whole.finish())
    return collect(events)


class HarmonyTests(unittest.TestCase):
    def test_analysis_is_reasoning_final_is_content(self) -> None:
        text = (
            "<|channel|>analysis<|message|>User greets. Answer briefly.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>"
        )
        self.assertEqual(
            by_tokens("gpt-oss", text, harmony=True),
            {
                "content": "Hello! How can I help?",
                "reasoning": "User greets. Answer briefly.",
                "calls": [],
            },
        )

    def test_tool_call_in_commentary_channel(self) -> None:
        text = (
            "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather"
            ' <|constrain|>json<|message|>{"location":"Tokyo"}<|call|>'
        )
        self.assertEqual(
            by_tokens("gpt-oss", text, harmony=True, tools=True),
            {
                "content": "",
                "reasoning": "Need the weather tool.",
                "calls": [["get_weather", '{"location":"Tokyo"}']],
            },
        )

    def test_recipient_before_channel(self) -> None:
        text = ' to=functions.lookup<|channel|>commentary json<|message|>{"q": "x"}<|call|>'
        result = by_tokens("gpt-oss", text, harmony=True, tools=True)
        self.assertEqual(result["calls"], [["lookup", '{"q": "x"}']])

    def test_end_token_is_seen(self) -> None:
        """<|end|> is a control token llama.cpp would render as nothing."""
        m = model("gpt-oss")
        (end,) = m.tokenize("<|end|>", special=True)
        self.assertFalse(m.is_eog(end))
        self.assertEqual(m.output_piece(end), b"<|end|>")

    def test_without_tools_a_call_is_not_parsed(self) -> None:
        text = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a":1}<|call|>'
        result = by_tokens("gpt-oss", text, harmony=True)
        self.assertEqual((result["content"], result["calls"]), ('{"a":1}', []))


class ThinkTests(unittest.TestCase):
    def test_qwen3_think_then_answer(self) -> None:
        text = "<think>\nThe user wants a number.\n</think>\n\n42<|im_end|>"
        self.assertEqual(
            by_tokens("qwen3", text),
            {"content": "42", "reasoning": "\nThe user wants a number.\n", "calls": []},
        )

    def test_deepseek_prompt_opens_think(self) -> None:
        text = "Count: one, two.\n</think>\n\nTwo."
        self.assertEqual(
            by_tokens("deepseek-r1", text, in_think=True),
            {"content": "Two.", "reasoning": "Count: one, two.\n", "calls": []},
        )

    def test_reasoning_format_none_keeps_text_in_content(self) -> None:
        text = "<think>why</think>because"
        result = by_tokens("qwen3", text, reasoning_as_content=True)
        self.assertEqual((result["content"], result["reasoning"]), ("whybecause", ""))

    def test_think_only_at_the_start(self) -> None:
        text = "Use <think> tags like this."
        self.assertEqual(by_tokens("qwen3", text)["content"], text)


class ToolCallTests(unittest.TestCase):
    def test_hermes_blocks(self) -> None:
        text = (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
            "</tool_call><|im_end|>"
        )
        result = by_tokens("qwen3", text, tools=True)
        self.assertEqual(result["content"], "Let me check.\n")
        self.assertEqual(
            result["calls"],
            [["get_weather", '{"city": "Oslo"}'], ["get_time", '{"tz": "CET"}']],
        )
        single = by_tokens("qwen3", text, tools=True, parallel_tools=False)
        self.assertEqual(single["calls"], [["get_weather", '{"city": "Oslo"}']])

    def test_llama3_json_call(self) -> None:
        text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "n": [1, 2]}}'
        self.assertEqual(
            by_tokens("llama3", text, tools=True)["calls"],
            [["get_weather", '{"city": "Oslo", "n": [1, 2]}']],
        )
        bare = '{"name": "f", "parameters": {"x": 1.5e3}}; {"name": "g", "parameters": {}}'
        self.assertEqual(
            by_tokens("llama3", bare, tools=True)["calls"], [["f", '{"x": 1.5e3}'], ["g", "{}"]]
        )

    def test_generic_json_calls(self) -> None:
        text = (
            '{"tool_calls": [{"name": "a", "arguments": {"k": "v"}},'
            ' {"name": "b", "arguments": "{\\"z\\": true}"}]}'
        )
        self.assertEqual(
            by_tokens("deepseek-r1", text, tools=True)["calls"],
            [["a", '{"k": "v"}'], ["b", '{"z": true}']],
        )

    def test_json_answer_that_is_not_a_call(self) -> None:
        text = ' {"answer": 42, "name": "x"}'
        result = by_tokens("qwen3", text, tools=True)
        self.assertEqual((result["content"], result["calls"]), (text, []))

    def test_arguments_stream_in_fragments(self) -> None:
        parser = OutputParser(tools=True, make_id=lambda: "call_1")
        events: list[Event] = []
        for piece in ['<tool_call>{"name": "f", ', '"arguments": {"a"', ": 1}}</tool_call>"]:
            events += parser.feed(piece)
        events += parser.finish()
        self.assertEqual(
            events,
            [ToolStart(0, "call_1", "f"), ToolArgs(0, '{"a"'), ToolArgs(0, ": 1}")],
        )


class TemplateTests(unittest.TestCase):
    """The real templates render with our formatter, tools and reasoning effort included."""

    def render(self, name: str, **kwargs: Any) -> str:
        template = ChatTemplate((TEMPLATES / name).read_text(), bos_token="<s>", eos_token="</s>")
        return template.render(**kwargs)

    TOOLS = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "City name"}},
                    "required": ["city"],
                },
            },
        }
    ]

    def test_gpt_oss(self) -> None:
        history = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "thinking": "Use the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        ]
        text = self.render(
            "openai-gpt-oss-120b.jinja",
            messages=history,
            tools=self.TOOLS,
            reasoning_effort="high",
        )
        self.assertIn("Reasoning: high", text)
        self.assertIn("# Instructions\n\nBe brief.", text)
        self.assertIn("// City name\ncity: string,", text)
        self.assertIn(
            "<|start|>assistant<|channel|>analysis<|message|>Use the tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
            '{"city": "Oslo"}<|call|>',
            text,
        )
        self.assertIn("<|start|>functions.get_weather to=assistant", text)
        self.assertTrue(text.endswith("<|start|>assistant"))

    def test_qwen3_tools_and_thinking_switch(self) -> None:
        messages = [{"role": "user", "content": "hi"}]
        text = self.render("Qwen-Qwen3-0.6B.jinja", messages=messages, tools=self.TOOLS)
        self.assertIn(json.dumps(self.TOOLS[0], ensure_ascii=False), text)
        off = self.render("Qwen-Qwen3-0.6B.jinja", messages=messages, enable_thinking=False)
        self.assertTrue(off.endswith("<think>\n\n</think>\n\n"))

    def test_llama3_and_hermes_tools(self) -> None:
        messages = [{"role": "user", "content": "hi"}]
        llama = self.render(
            "meta-llama-Llama-3.1-8B-Instruct.jinja", messages=messages, tools=self.TOOLS
        )
        self.assertIn('"name": "get_weather"', llama)
        hermes = self.render(
            "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", messages=messages, tools=self.TOOLS
        )
        self.assertIn("<tools>", hermes)
        self.assertIn("get_weather", hermes)

    def test_formats(self) -> None:
        def fmt(name: str) -> tuple[bool, str, bool]:
            template = ChatTemplate((TEMPLATES / name).read_text(), bos_token="", eos_token="")
            f = template.format
            return f.harmony, f.tool_style, f.knows_tools

        self.assertEqual(fmt("openai-gpt-oss-120b.jinja"), (True, "harmony", True))
        self.assertEqual(fmt("Qwen-Qwen3-0.6B.jinja"), (False, "hermes", True))
        self.assertEqual(
            fmt("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"), (False, "hermes", True)
        )
        self.assertEqual(fmt("meta-llama-Llama-3.1-8B-Instruct.jinja"), (False, "llama3", True))
        self.assertEqual(
            fmt("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"), (False, "generic", False)
        )

    def test_generic_tool_instructions(self) -> None:
        """A template without tools gets them in the system message, earlier calls as JSON."""
        template = ChatTemplate(
            (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(),
            bos_token="",
            eos_token="",
        )
        call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {}}}
        text = template.render(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "user", "content": "and?"},
            ],
            tools=self.TOOLS,
        )
        self.assertIn('"name": "get_weather"', text)
        self.assertIn('{"tool_calls": [{"name": "get_weather", "arguments": {}}]}', text)
