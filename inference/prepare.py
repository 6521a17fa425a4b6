"""From a validated request to what the engine runs: prompt tokens, sampling, output parsers.

Runs in a worker thread (template rendering, grammar compilation and tokenizing are CPU work).
Chat requests are rendered with the model's own template (with the request's tools when the
template knows tools, otherwise with the generic tool instructions), and get a grammar when the
output must parse: ``response_format`` JSON, a forced tool call (``tool_choice`` ``required`` or a
named function, in the template's own call format) or the request's own ``grammar``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from inference.chat_template import TemplateError
from inference.grammars import (
    SchemaError,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from inference.guardrails import ChatInput, CompletionInput, invalid
from inference.interfaces import IScheduler, Sampling
from inference.output import OutputParser


@dataclass(frozen=True)
class Prepared:
    prompt: list[int]
    sampling: Sampling
    parser: Callable[[], OutputParser | None]  # one per choice


def _no_parser() -> None:
    return None


def prepare(scheduler: IScheduler, parsed: ChatInput | CompletionInput) -> Prepared:
    sampling = parsed.sampling
    if isinstance(parsed, CompletionInput):
        prompt = scheduler.tokenize(parsed.prompt, False)
        parser: Callable[[], OutputParser | None] = _no_parser
    else:
        prompt, sampling, parser = _chat(scheduler, parsed)
    if sampling.grammar is not None and not scheduler.check_grammar(sampling.grammar):
        raise invalid("invalid_grammar", "The grammar is not valid GBNF.", "grammar")
    if any(token >= scheduler.n_vocab for token, _ in sampling.logit_bias):
        raise invalid("invalid_logit_bias", "logit_bias names a token id beyond the vocabulary.")
    return Prepared(prompt, sampling, parser)


def _chat(
    scheduler: IScheduler, parsed: ChatInput
) -> tuple[list[int], Sampling, Callable[[], OutputParser | None]]:
    template = scheduler.template
    fmt = template.format
    tools = parsed.tools
    use_tools = tools.choice != "none"
    try:
        text = template.render(
            parsed.messages,
            tools=tools.tools if use_tools else None,
            **{"enable_thinking": True, **dict(parsed.template_kwargs)},  # as llama-server
        )
    except TemplateError:
        raise invalid(
            "invalid_messages",
            "The model's chat template rejected this conversation (check role order).",
        ) from None
    grammar = parsed.sampling.grammar
    try:
        if parsed.response_format == "json_object":
            grammar = json_object_grammar()
        elif parsed.response_format == "json_schema":
            grammar = json_schema_grammar(parsed.schema)
        elif tools.forced:
            style = fmt.tool_style if fmt.knows_tools else "generic"
            grammar = tool_call_grammar(tools.forced, style, tools.parallel)
    except SchemaError as e:
        raise invalid("unsupported_schema", f"Unsupported JSON Schema: {e}.") from None
    sampling = dataclasses.replace(parsed.sampling, grammar=grammar)
    # reasoning_format none: <think> stays in the text, harmony's analysis goes to content
    split = parsed.split_reasoning
    # A JSON or forced-call grammar admits no </think>: after a prompt that opened <think>
    # (DeepSeek-R1, QwQ) the constrained output is the answer, not reasoning that never ends.
    constrained = parsed.response_format != "text" or bool(tools.forced)
    in_think = split and not constrained and text.rstrip().endswith("<think>")

    def parser() -> OutputParser:
        return OutputParser(
            harmony=fmt.harmony,
            think=split and parsed.response_format == "text",
            in_think=in_think,
            tools=use_tools,
            parallel_tools=tools.parallel,
            reasoning_as_content=not parsed.split_reasoning,
        )

    return scheduler.tokenize(text, True), sampling, parser
