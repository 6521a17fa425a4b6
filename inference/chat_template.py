"""The model's chat template, rendered the way Hugging Face transformers renders it.

Jinja in an immutable sandbox (request data only ever reaches the template as values), with the
helpers real templates call: ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text, ``{% break %}``/``{% continue %}`` and a pass-through ``{% generation %}``.
The template also tells how the model writes its answer (``ChatFormat``): gpt-oss's harmony
channels, ``<think>`` reasoning, Hermes/Qwen ``<tool_call>`` blocks or Llama 3 JSON calls, and
whether it knows tools at all; a template that does not gets the tools described in a system
message instead (llama-server's generic fallback).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no chat template (the embedded Gemma 3 270M has none): Gemma's turn
# format for Gemma models, ChatML (llama-server's fallback too) for anything else.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens the output parser must see as text: llama.cpp renders control tokens as nothing
# unless asked, and gpt-oss's <|end|> is one.
MARKERS = (
    "<|channel|>",
    "<|message|>",
    "<|start|>",
    "<|end|>",
    "<|constrain|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|python_tag|>",
)


class TemplateError(Exception):
    """The template refused the conversation (its own message is not passed on: it may quote)."""


@dataclass(frozen=True)
class ChatFormat:
    """How the model's output is structured, read from its template."""

    harmony: bool  # gpt-oss: <|channel|>analysis / final / commentary to=functions.NAME
    tool_style: str  # "harmony", "hermes", "llama3" or "generic"
    knows_tools: bool  # the template renders `tools` itself

    @classmethod
    def of(cls, source: str) -> ChatFormat:
        harmony = "<|channel|>" in source
        if harmony:
            style = "harmony"
        elif "<tool_call>" in source:
            style = "hermes"
        elif "<|python_tag|>" in source or (
            "<|start_header_id|>" in source and '"parameters"' in source
        ):
            style = "llama3"
        else:
            style = "generic"
        return cls(harmony=harmony, tool_style=style, knows_tools="tools" in source)


class _IgnoreGeneration(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` marks training targets; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str):
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = _tojson
        environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.source = source
        self.format = ChatFormat.of(source)
        self._template = environment.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt for ``messages`` with the generation prompt appended.

        ``kwargs`` become template variables (``reasoning_effort``, ``enable_thinking``, ...).
        """
        if tools and not self.format.knows_tools:
            messages = with_tool_instructions(messages, tools)
            tools = None
        variables = {**kwargs, **self._tokens}
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=True,
                **variables,
            )
        except TemplateError:
            raise
        except Exception as e:  # jinja2 errors, and whatever a template's own code raises
            raise TemplateError(type(e).__name__) from None


GENERIC_TOOL_INSTRUCTIONS = (
    "You can call the following tools (JSON Schema of each tool's arguments):\n{tools}\n\n"
    "To call tools, reply with only this JSON object and nothing else:\n"
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<the arguments>}}}}]}}\n'
    "Otherwise, answer the user directly."
)


def with_tool_instructions(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """For templates without tools: describe the tools and the generic JSON call format in the
    system message, and show earlier calls in that same format."""
    listed = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    instructions = GENERIC_TOOL_INSTRUCTIONS.format(tools=listed)
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message["tool_calls"]
            ]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            message = {"role": "assistant", "content": text}
        out.append(message)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out
