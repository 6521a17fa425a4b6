"""The request plaintext of protocol v1.1: the OpenAI chat fields, validated and bounded.

Both sides use it: the client builds a :class:`ChatRequest` and seals ``to_plaintext()``; the router
validates what it decrypted with :func:`parse_request` and builds the backend's body with
``to_openai()``. Protocol v1 requests are the subset without any v1.1 field, and serialize to
exactly the bytes v1 did.

Every refusal is a :class:`RequestError` whose message is a fixed sentence naming the field (our
name for it, never the peer's), never a value. Sizes are bounded (messages, tools, schemas: bytes,
nesting depth, repetition counts, ``$ref`` targets) so a request cannot make the router, or the
grammar compiler of a backend, do unbounded work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = [
    "FIELDS",
    "MAX_MESSAGES",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_COUNT",
    "MAX_SCHEMA_DEPTH",
    "MAX_STOP_SEQUENCES",
    "MAX_TOOLS",
    "MAX_TOOLS_BYTES",
    "MODEL_NAME",
    "ChatRequest",
    "Message",
    "RequestError",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "parse_request",
]

MAX_MESSAGES = 1024
MAX_PARTS = 64
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 128
MAX_MAX_TOKENS = (1 << 31) - 1
MAX_SEED = (1 << 32) - 1
MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 * 1024
MAX_TOOL_CALLS = 64
MAX_ID_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_COUNT = 1024
MAX_PATTERN_CHARS = 512
MAX_TOP_LOGPROBS = 20

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
EFFORTS = ("low", "medium", "high")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# JSON Schema keywords whose number a grammar compiler expands into that many copies.
_COUNTS = (
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
# OpenAI fields we deliberately do not carry: refused by name (any other name is not repeated).
_UNSUPPORTED = frozenset(
    {
        "n",
        "logit_bias",
        "user",
        "stream",
        "stream_options",
        "functions",
        "function_call",
        "store",
        "metadata",
        "service_tier",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
    }
)
FIELDS = frozenset(
    {
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "model",
        "max_completion_tokens",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logprobs",
        "top_logprobs",
        "reasoning_effort",
        "include_reasoning",
    }
)
_MESSAGE_FIELDS = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}


class RequestError(ValueError):
    """The plaintext is not a valid chat request; the message is safe to return and log."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, repr=False)
class ToolCall:
    """A call the model made (in an assistant message of the history)."""

    id: str
    name: str
    arguments: str

    def __repr__(self) -> str:
        return f"ToolCall(<{len(self.arguments)} chars of arguments>)"

    def to_json(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, repr=False)
class Message:
    """``content`` is text, a tuple of text parts, or None (an assistant message of tool calls)."""

    role: str
    content: str | tuple[str, ...] | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __repr__(self) -> str:
        if isinstance(self.content, tuple):
            size = sum(len(part) for part in self.content)
        else:
            size = len(self.content or "")
        return f"Message(role={self.role!r}, content=<{size} chars>)"

    def to_json(self) -> dict[str, Any]:
        content: Any = self.content
        if isinstance(content, tuple):
            content = [{"type": "text", "text": part} for part in content]
        doc: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            doc["tool_calls"] = [call.to_json() for call in self.tool_calls]
        if self.tool_call_id is not None:
            doc["tool_call_id"] = self.tool_call_id
        return doc


@dataclass(frozen=True, repr=False)
class Tool:
    """A function the model may call; ``parameters`` is its JSON Schema."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool | None = None

    def __repr__(self) -> str:
        return "Tool(<redacted>)"

    def to_json(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


@dataclass(frozen=True, repr=False)
class ResponseFormat:
    """``text``, ``json_object``, or ``json_schema`` with a schema (and a name, as OpenAI wants)."""

    type: str
    schema: Mapping[str, Any] | None = None
    name: str = "response"
    strict: bool | None = None
    description: str | None = None

    def __repr__(self) -> str:
        return f"ResponseFormat({self.type!r})"

    def to_json(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        inner: dict[str, Any] = {"name": self.name, "schema": self.schema}
        if self.strict is not None:
            inner["strict"] = self.strict
        if self.description is not None:
            inner["description"] = self.description
        return {"type": "json_schema", "json_schema": inner}


@dataclass(frozen=True, repr=False)
class ChatRequest:
    """One chat request. The first five fields are protocol v1; the rest are v1.1."""

    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    model: str | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: str | None = None  # none, auto, required, or the name of one of the tools
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None

    def __repr__(self) -> str:
        return f"ChatRequest(<{len(self.messages)} messages>, max_tokens={self.max_tokens})"

    def __post_init__(self) -> None:
        """``tool_choice`` may also be given in OpenAI's shape, ``{"type": "function",
        "function": {"name": NAME}}``: it is kept as the name."""
        choice: Any = self.tool_choice
        if isinstance(choice, Mapping):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise ValueError(
                    "tool_choice is none, auto, required, a tool's name or"
                    ' {"type": "function", "function": {"name": NAME}}'
                )
            object.__setattr__(self, "tool_choice", name)

    @classmethod
    def from_prompt(cls, prompt: str, **params: Any) -> ChatRequest:
        return cls(messages=(Message("user", prompt),), **params)

    # What the request asks of the backend and of the response stream.

    def features(self) -> frozenset[str]:
        """The v1.1 fields that need a backend that implements them (see the router's dialects)."""
        wanted = set()
        for name in ("seed", "presence_penalty", "frequency_penalty", "reasoning_effort"):
            if getattr(self, name) is not None:
                wanted.add(name)
        if self.response_format is not None and self.response_format.type != "text":
            wanted.add("response_format")
        if self.tools is not None or any(m.tool_calls or m.role == "tool" for m in self.messages):
            wanted.add("tools")
        if self.parallel_tool_calls is not None:
            wanted.add("parallel_tool_calls")
        if self.logprobs:
            wanted.add("logprobs")
        return frozenset(wanted)

    @property
    def wants_tool_calls(self) -> bool:
        """Tool-call chunks (and finish_reason ``tool_calls``) only for a request with tools."""
        return self.tools is not None

    @property
    def wants_reasoning(self) -> bool:
        return bool(self.include_reasoning)

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    # Serialization.

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.stop is not None:
            params["stop"] = list(self.stop)
        return params

    def _v11(self) -> dict[str, Any]:
        """The v1.1 fields as OpenAI spells them (``model`` and ``include_reasoning`` aside)."""
        params: dict[str, Any] = {}
        for name in ("seed", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.response_format is not None:
            params["response_format"] = self.response_format.to_json()
        if self.tools is not None:
            params["tools"] = [tool.to_json() for tool in self.tools]
        if self.tool_choice is not None:
            params["tool_choice"] = _tool_choice_json(self.tool_choice)
        for name in ("parallel_tool_calls", "logprobs", "top_logprobs", "reasoning_effort"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        return params

    def to_plaintext(self) -> dict[str, Any]:
        """What the client seals. A request without v1.1 fields is exactly a v1 plaintext."""
        doc = {"messages": [m.to_json() for m in self.messages], **self._params()}
        if self.model is not None:
            doc["model"] = self.model
        doc.update(self._v11())
        if self.include_reasoning is not None:
            doc["include_reasoning"] = self.include_reasoning
        return doc

    def to_openai(
        self, model: str | None = None, max_tokens_field: str = "max_tokens"
    ) -> dict[str, Any]:
        """The body of a streaming ``POST /v1/chat/completions`` for any OpenAI-style backend."""
        body = {"messages": [m.to_json() for m in self.messages], **self._params()}
        if max_tokens_field != "max_tokens" and "max_tokens" in body:
            body[max_tokens_field] = body.pop("max_tokens")
        body.update(self._v11())
        format_ = body.get("response_format")
        if format_ is not None and format_["type"] == "text":
            del body["response_format"]  # the default: one field fewer for the backend to know
        body.update(stream=True, stream_options={"include_usage": True})
        if model is not None:
            body["model"] = model
        return body


def _tool_choice_json(choice: str) -> Any:
    if choice in TOOL_CHOICES:
        return choice
    return {"type": "function", "function": {"name": choice}}


# Validation.


def parse_request(doc: Any) -> ChatRequest:
    """Validate a decoded plaintext (``RequestError`` on the first problem)."""
    if not isinstance(doc, dict):
        raise RequestError("request plaintext must be a JSON object")
    for name in doc:
        if name not in FIELDS:
            if name in _UNSUPPORTED:
                raise RequestError(f"{name} is not supported")
            raise RequestError("request has a field protocol v1.1 does not define")
    messages = _messages(doc.get("messages"))
    if "max_tokens" in doc and "max_completion_tokens" in doc:
        raise RequestError("give max_tokens or max_completion_tokens, not both")
    max_tokens = _max_tokens(doc, "max_tokens") or _max_tokens(doc, "max_completion_tokens")
    temperature = doc.get("temperature")
    if temperature is not None and (not _number(temperature) or not 0 <= temperature <= 2):
        raise RequestError("temperature must be a number from 0 to 2")
    top_p = doc.get("top_p")
    if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
        raise RequestError("top_p must be a number above 0 and at most 1")
    tools = _tools(doc.get("tools"))
    logprobs = _optional_bool(doc, "logprobs")
    top_logprobs = doc.get("top_logprobs")
    if top_logprobs is not None:
        if not _int(top_logprobs) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        if not logprobs:
            raise RequestError("top_logprobs needs logprobs set to true")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(doc.get("stop")),
        model=_model(doc.get("model")),
        seed=_seed(doc.get("seed")),
        presence_penalty=_penalty(doc, "presence_penalty"),
        frequency_penalty=_penalty(doc, "frequency_penalty"),
        response_format=_response_format(doc.get("response_format")),
        tools=tools,
        tool_choice=_tool_choice(doc.get("tool_choice"), tools),
        parallel_tool_calls=_needs_tools(doc, "parallel_tool_calls", tools),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        reasoning_effort=_reasoning_effort(doc.get("reasoning_effort")),
        include_reasoning=_optional_bool(doc, "include_reasoning"),
    )


def _messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list")
    if len(raw) > MAX_MESSAGES:
        raise RequestError(f"messages may hold at most {MAX_MESSAGES} messages")
    messages = []
    open_calls: set[str] | None = None  # ids of the latest assistant tool calls not yet answered
    for item in raw:
        if not isinstance(item, dict):
            raise RequestError("each message must be an object")
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError("message role must be system, user, assistant or tool")
        if not _MESSAGE_FIELDS[role].issuperset(item):
            if "name" in item:
                raise RequestError("message name is not supported")
            raise RequestError(f"a {role} message has a field protocol v1.1 does not define")
        if role == "assistant":
            message = _assistant(item)
            open_calls = {call.id for call in message.tool_calls} or None
        elif role == "tool":
            call_id = item.get("tool_call_id")
            if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_ID_CHARS:
                raise RequestError("a tool message needs a tool_call_id string")
            if open_calls is None or call_id not in open_calls:
                raise RequestError(
                    "a tool message must answer a tool call of the assistant message before it"
                )
            open_calls.discard(call_id)
            message = Message("tool", _content(item.get("content"), role), (), call_id)
        else:
            open_calls = None
            message = Message(role, _content(item.get("content"), role))
        messages.append(message)
    return tuple(messages)


def _content(raw: Any, role: str) -> str | tuple[str, ...]:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and raw:
        if len(raw) > MAX_PARTS:
            raise RequestError(f"message content may hold at most {MAX_PARTS} parts")
        parts = []
        for part in raw:
            if (
                not isinstance(part, dict)
                or set(part) != {"type", "text"}
                or part["type"] != "text"
                or not isinstance(part["text"], str)
            ):
                raise RequestError("content parts must be text parts: type text and a text string")
            parts.append(part["text"])
        return tuple(parts)
    raise RequestError(f"{role} message content must be a string or a list of text parts")


def _assistant(item: dict[str, Any]) -> Message:
    raw_calls = item.get("tool_calls")
    if raw_calls is None:
        return Message("assistant", _content(item.get("content"), "assistant"))
    if not isinstance(raw_calls, list) or not 0 < len(raw_calls) <= MAX_TOOL_CALLS:
        raise RequestError(f"tool_calls must be a list of 1 to {MAX_TOOL_CALLS} calls")
    calls = []
    for raw in raw_calls:
        function = raw.get("function") if isinstance(raw, dict) else None
        if (
            not isinstance(raw, dict)
            or set(raw) != {"id", "type", "function"}
            or raw["type"] != "function"
            or not isinstance(function, dict)
            or set(function) != {"name", "arguments"}
        ):
            raise RequestError(
                "each tool call must have id, type function and function with name and arguments"
            )
        call_id = raw["id"]
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_ID_CHARS:
            raise RequestError(f"a tool call id must be a string of 1 to {MAX_ID_CHARS} chars")
        if not isinstance(function["name"], str) or not _NAME.fullmatch(function["name"]):
            raise RequestError("a tool call name must be 1 to 64 letters, digits, _ or -")
        if not isinstance(function["arguments"], str):
            raise RequestError("tool call arguments must be a string")
        calls.append(ToolCall(call_id, function["name"], function["arguments"]))
    if len({call.id for call in calls}) != len(calls):
        raise RequestError("tool call ids must be unique within a message")
    content = item.get("content")
    return Message(
        "assistant", None if content is None else _content(content, "assistant"), tuple(calls)
    )


def _max_tokens(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not _int(value) or not 1 <= value <= MAX_MAX_TOKENS:
        raise RequestError(f"{name} must be an integer from 1 to {MAX_MAX_TOKENS}")
    return value


def _stop(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in raw)
    ):
        raise RequestError(
            f"stop must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings"
            f" of at most {MAX_STOP_CHARS} characters"
        )
    return tuple(raw)


def _model(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not MODEL_NAME.fullmatch(raw):
        raise RequestError("model must be a model name (letters, digits and ._:/@+-)")
    return raw


def _seed(raw: Any) -> int | None:
    if raw is not None and (not _int(raw) or not 0 <= raw <= MAX_SEED):
        raise RequestError(f"seed must be an integer from 0 to {MAX_SEED}")
    return raw


def _penalty(doc: dict[str, Any], name: str) -> float | None:
    value = doc.get(name)
    if value is not None and (not _number(value) or not -2 <= value <= 2):
        raise RequestError(f"{name} must be a number from -2 to 2")
    return value


def _optional_bool(doc: dict[str, Any], name: str) -> bool | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false")
    return value


def _reasoning_effort(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or raw not in EFFORTS:
        raise RequestError("reasoning_effort must be low, medium or high")
    return raw


def _response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in FORMATS:
        raise RequestError(
            "response_format must be an object with type text, json_object or json_schema"
        )
    kind = raw["type"]
    if kind != "json_schema":
        if set(raw) != {"type"}:
            raise RequestError(f"response_format of type {kind} takes no other field")
        return ResponseFormat(kind)
    inner = raw.get("json_schema")
    if set(raw) != {"type", "json_schema"} or not isinstance(inner, dict):
        raise RequestError("response_format json_schema needs a json_schema object")
    if "schema" not in inner or not {"name", "schema", "strict", "description"}.issuperset(inner):
        raise RequestError("response_format json_schema takes schema, name, strict, description")
    name = inner.get("name", "response")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(
            "response_format json_schema name must be 1 to 64 letters, digits, _ or -"
        )
    strict = inner.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError("response_format json_schema strict must be true or false")
    description = _description(inner.get("description"), "response_format json_schema")
    _check_schema(inner["schema"], "response_format schema")
    return ResponseFormat("json_schema", inner["schema"], name, strict, description)


def _description(raw: Any, what: str) -> str | None:
    if raw is not None and (not isinstance(raw, str) or len(raw) > MAX_DESCRIPTION_CHARS):
        raise RequestError(
            f"{what} description must be a string of at most {MAX_DESCRIPTION_CHARS} chars"
        )
    return raw


def _tools(raw: Any) -> tuple[Tool, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TOOLS:
        raise RequestError(f"tools must be a list of 1 to {MAX_TOOLS} tools")
    tools = []
    for item in raw:
        function = item.get("function") if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or set(item) != {"type", "function"}
            or item["type"] != "function"
            or not isinstance(function, dict)
            or "name" not in function
            or not {"name", "description", "parameters", "strict"}.issuperset(function)
        ):
            raise RequestError(
                "each tool must be type function with a function of name, description,"
                " parameters and strict"
            )
        name = function["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError("a tool name must be 1 to 64 letters, digits, _ or -")
        description = _description(function.get("description"), "a tool")
        parameters = function.get("parameters")
        if parameters is not None:
            _check_schema(parameters, "tool parameters")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError("a tool's strict must be true or false")
        tools.append(Tool(name, description, parameters, strict))
    if len({tool.name for tool in tools}) != len(tools):
        raise RequestError("tool names must be unique")
    # measured once every part is known to be shallow (serializing recurses)
    if len(_dumps(raw).encode("utf-8")) > MAX_TOOLS_BYTES:
        raise RequestError(f"tools exceed {MAX_TOOLS_BYTES} bytes")
    return tuple(tools)


def _tool_choice(raw: Any, tools: tuple[Tool, ...] | None) -> str | None:
    if raw is None:
        return None
    if tools is None:
        raise RequestError("tool_choice needs tools")
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            raise RequestError("tool_choice must be none, auto, required or a named function")
        return raw
    function = raw.get("function") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or set(raw) != {"type", "function"}
        or raw["type"] != "function"
        or not isinstance(function, dict)
        or set(function) != {"name"}
        or not isinstance(function["name"], str)
    ):
        raise RequestError("tool_choice must be none, auto, required or a named function")
    if function["name"] not in {tool.name for tool in tools}:
        raise RequestError("tool_choice names a function that is not in tools")
    if function["name"] in TOOL_CHOICES:  # would read as the mode of that name
        raise RequestError("tool_choice cannot name a function none, auto or required")
    name: str = function["name"]
    return name


def _needs_tools(doc: dict[str, Any], name: str, tools: tuple[Tool, ...] | None) -> bool | None:
    value = _optional_bool(doc, name)
    if value is not None and tools is None:
        raise RequestError(f"{name} needs tools")
    return value


def _check_schema(schema: Any, what: str) -> None:
    """Bound a JSON Schema: bytes, nesting, repetition counts, patterns, local ``$ref`` only.

    Grammar compilers (llama.cpp's among them) expand ``maxItems: n`` or ``a{n}`` into n copies,
    and some resolve remote ``$ref`` URLs: neither may be left to a request.
    """
    if not isinstance(schema, dict):
        raise RequestError(f"{what} must be a JSON object")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    children: Iterable[Any]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise RequestError(f"{what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
                raise RequestError(f"{what} may only use local $ref (starting with #)")
            for key in _COUNTS:
                count = node.get(key)
                # Any number counts (5000.0 and 1e9 expand like 5000 and 10**9); other types are
                # the schema's own problem, refused or ignored by the backend's converter.
                if _number(count) and not 0 <= count <= MAX_SCHEMA_COUNT:
                    raise RequestError(f"{what} {key} must be from 0 to {MAX_SCHEMA_COUNT}")
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                _check_pattern(pattern, what)
            patterns = node.get("patternProperties")
            if isinstance(patterns, dict):
                for key in patterns:
                    _check_pattern(key, what)
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    # measured once it is known to be shallow (serializing recurses)
    if len(_dumps(schema).encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise RequestError(f"{what} exceeds {MAX_SCHEMA_BYTES} bytes")


def _check_pattern(pattern: str, what: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RequestError(f"{what} patterns must be at most {MAX_PATTERN_CHARS} characters")
    for low, high in _QUANTIFIER.findall(pattern):
        if int(low) > MAX_SCHEMA_COUNT or (high and int(high) > MAX_SCHEMA_COUNT):
            raise RequestError(f"{what} pattern repetitions must be at most {MAX_SCHEMA_COUNT}")
