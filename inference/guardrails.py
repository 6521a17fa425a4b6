"""Validation of OpenAI-style request bodies into plain values, before any tokenization.

Each violation raises ``APIError`` with a specific code and a fixed message that never quotes the
request's content. A field we do not support is refused by name (``unsupported_field``), never
silently ignored: a client asking for something must not get a 200 without it. Checks that need
the model (prompt length against the context size, grammars, token ids) happen later, in
``inference.api``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from inference.interfaces import Sampling

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_STOP_LENGTH = 128
MAX_MESSAGES = 1024
MAX_TOOLS = 64
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_GRAMMAR = 32 * 1024
MAX_N = 16
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_COMMON_FIELDS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "user",
        "grammar",
    }
)
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "reasoning_format",
    "chat_template_kwargs",
    "store",
    "modalities",
    "service_tier",
}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
# Fields that are fine with the value that asks for nothing.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "store": (False, None),
    "modalities": (["text"], None),
    "service_tier": ("auto", "default", None),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
}
_HINTS = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "prompt_cache_key": "send the X-LLMRouter-Cache-Key header",
}
_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
)
_MESSAGE_EMPTY_KEYS = frozenset({"refusal", "audio", "function_call", "annotations"})
_TEMPLATE_RESERVED = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)


class APIError(Exception):
    """An HTTP error answer: ``{"error": {"code": ..., "message": ..., "param": ...}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        param: str | None = None,
    ):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.param = param

    def body(self) -> bytes:
        error = {
            "code": self.code,
            "message": self.message,
            "type": "invalid_request_error",
            "param": self.param,
        }
        return json.dumps({"error": error}).encode()


def invalid(code: str, message: str, param: str | None = None) -> APIError:
    return APIError(400, code, message, param=param)


@dataclass(frozen=True)
class Tools:
    """The request's tools (OpenAI ``{"type": "function", "function": {...}}`` objects)."""

    tools: tuple[dict[str, Any], ...]
    choice: str  # auto, none, required, or function (the one named ``name``)
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> tuple[dict[str, Any], ...]:
        """The tools a forced call chooses from (empty unless required or named)."""
        if self.choice == "required":
            return self.tools
        if self.choice == "function":
            return tuple(t for t in self.tools if t["function"]["name"] == self.name)
        return ()


NO_TOOLS = Tools((), "none")


@dataclass(frozen=True)
class ChatInput:
    messages: tuple[dict[str, Any], ...]  # as the chat template expects them
    sampling: Sampling
    stream: bool
    max_tokens_given: bool
    n: int = 1
    tools: Tools = NO_TOOLS
    response_format: str = "text"  # text, json_object or json_schema
    schema: Any = None
    split_reasoning: bool = True
    template_kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class CompletionInput:
    prompt: str
    sampling: Sampling
    stream: bool
    max_tokens_given: bool
    n: int = 1


def _field_name(name: object) -> str | None:
    return name if isinstance(name, str) and _IDENTIFIER.fullmatch(name) else None


def check_fields(data: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse, by name, any field we would otherwise ignore."""
    for name, value in data.items():
        if name in _NEUTRAL and value in _NEUTRAL[name]:
            continue
        if name in allowed and name not in _NEUTRAL:
            continue
        param = _field_name(name)
        if param is None:
            raise invalid("unsupported_field", "The request has a field that is not supported.")
        hint = _HINTS.get(name)
        message = f"The field {param!r} is not supported by this server" + (
            f" ({hint})." if hint else "."
        )
        if name in _NEUTRAL:
            message = f"The field {param!r} is supported only with its default value."
        raise invalid("unsupported_field", message, param=param)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid("bad_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise invalid("bad_json", "The request body must be a JSON object.")
    return data


def _number(data: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"invalid_{name}", f"{name} must be a number.")
    if not low <= value <= high:
        raise invalid(f"invalid_{name}", f"{name} must be between {low:g} and {high:g}.")
    return float(value)


def _integer(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"invalid_{name}", f"{name} must be an integer from {low} to {high}.", name)
    return value


def _common(
    data: dict[str, Any], max_tokens_cap: int, logprobs: int | None
) -> tuple[Sampling, bool, bool, int]:
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("invalid_stream", "stream must be a boolean.")
    options = data.get("stream_options")
    if options is not None and (
        not isinstance(options, dict)
        or not set(options) <= {"include_usage"}
        or not isinstance(options.get("include_usage", True), bool)
    ):
        raise invalid(
            "invalid_stream_options", "stream_options may only hold include_usage (a boolean)."
        )
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
        raise invalid("invalid_n", f"n must be an integer from 1 to {MAX_N}.", "n")
    raw = data.get("max_completion_tokens", data.get("max_tokens"))
    given = raw is not None
    if raw is None:
        max_tokens = max_tokens_cap
    elif isinstance(raw, bool) or not isinstance(raw, int):
        raise invalid("invalid_max_tokens", "max_tokens must be an integer.", "max_tokens")
    elif raw < 1:
        raise invalid("invalid_max_tokens", "max_tokens must be at least 1.", "max_tokens")
    elif raw > max_tokens_cap:
        raise invalid(
            "max_tokens_exceeded",
            f"max_tokens must not exceed {max_tokens_cap} on this server.",
            "max_tokens",
        )
    else:
        max_tokens = raw
    temperature = _number(data, "temperature", 0.0, 2.0, 0.8)
    top_p = _number(data, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise invalid("invalid_top_p", "top_p must be greater than 0.")
    stop = data.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise invalid("invalid_stop", "stop must be a string or a list of strings.")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise invalid(
            "invalid_stop",
            f"At most {MAX_STOPS} stop strings of at most {MAX_STOP_LENGTH} characters.",
        )
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("invalid_seed", "seed must be an integer.")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("invalid_user", "user must be a string.")
    grammar = data.get("grammar")
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
        raise invalid("invalid_grammar", "grammar must be a non-empty GBNF string.", "grammar")
    if grammar is not None and len(grammar) > MAX_GRAMMAR:
        raise invalid(
            "invalid_grammar", f"grammar must not exceed {MAX_GRAMMAR} characters.", "grammar"
        )
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stops,
        seed=seed,
        presence_penalty=_number(data, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(data, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(data.get("logit_bias")),
        grammar=grammar,
        logprobs=logprobs,
    )
    return sampling, stream, given, n or 1


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    message = f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers from -100 to 100."
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid("invalid_logit_bias", message, "logit_bias")
    out = []
    for key, bias in value.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 9:
            raise invalid("invalid_logit_bias", message, "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid("invalid_logit_bias", message, "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid("invalid_content", "Only text content parts are supported.")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid("invalid_content", "A text content part needs a string text.")
            parts.append(text)
        return "".join(parts)
    raise invalid("invalid_content", "Message content must be a string or a list of text parts.")


def _arguments(text: str) -> Any:
    """Templates expect a call's arguments as an object (transformers' convention)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _tool_calls(value: Any) -> list[dict[str, Any]]:
    message = "tool_calls must be a list of function calls (id, type, function name, arguments)."
    if not isinstance(value, list) or not value:
        raise invalid("invalid_tool_calls", message)
    calls = []
    for call in value:
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise invalid("invalid_tool_calls", message)
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("invalid_tool_calls", message)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise invalid("invalid_tool_calls", message)
        identifier = call.get("id", "")
        if not isinstance(identifier, str):
            raise invalid("invalid_tool_calls", message)
        calls.append(
            {
                "id": identifier,
                "type": "function",
                "function": {"name": function["name"], "arguments": _arguments(arguments)},
            }
        )
    return calls


def _message(message: Any) -> dict[str, Any]:
    """One message, as templates expect it: content always a string, calls' arguments objects."""
    if not isinstance(message, dict):
        raise invalid("invalid_messages", "Each message must be an object.")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid("invalid_role", "role must be one of " + ", ".join(ROLES) + ".")
    for key, value in message.items():
        if key in _MESSAGE_KEYS or (key in _MESSAGE_EMPTY_KEYS and not value):
            continue
        name = _field_name(key)
        raise invalid(
            "unsupported_field",
            f"The message field {name!r} is not supported."
            if name
            else "A message has a field that is not supported.",
            param=name,
        )
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise invalid("invalid_tool_calls", "Only assistant messages carry tool_calls.")
        out["tool_calls"] = _tool_calls(calls)
    content = message.get("content")
    if content is None and calls is None:
        raise invalid("invalid_content", "Each message needs content.")
    out["content"] = "" if content is None else _content(content)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid("invalid_tool_call_id", "A tool message needs its tool_call_id.")
        out["tool_call_id"] = call_id
    for key in ("name", "reasoning_content"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise invalid("invalid_messages", f"A message's {key} must be a string.")
            out[key] = value
    if "reasoning_content" in out:
        out["thinking"] = out["reasoning_content"]  # gpt-oss's template calls it thinking
    return out


def _tools(data: dict[str, Any]) -> Tools:
    raw = data.get("tools")
    choice = data.get("tool_choice")
    parallel = data.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise invalid("invalid_parallel_tool_calls", "parallel_tool_calls must be a boolean.")
    if raw is None or raw == []:
        if choice not in (None, "none"):
            raise invalid("invalid_tool_choice", "tool_choice needs tools.", "tool_choice")
        return NO_TOOLS
    shape = "tools must be a list of {type: function, function: {name, description, parameters}}."
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise invalid("invalid_tools", f"At most {MAX_TOOLS} tools; " + shape, "tools")
    tools: list[dict[str, Any]] = []
    for tool in raw:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid("invalid_tools", "Only function tools are supported; " + shape, "tools")
        function = tool.get("function")
        if not isinstance(function, dict) or not set(function) <= {
            "name",
            "description",
            "parameters",
            "strict",
        }:
            raise invalid("invalid_tools", shape, "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise invalid(
                "invalid_tools", "A function name is 1-64 letters, digits, _ or -.", "tools"
            )
        if not isinstance(function.get("description", ""), str):
            raise invalid("invalid_tools", shape, "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid("invalid_tools", "parameters must be a JSON Schema object.", "tools")
        # templates print the description (gpt-oss's fails on a missing one)
        tools.append({"type": "function", "function": {"description": "", **function}})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise invalid("invalid_tools", "Tool names must be distinct.", "tools")
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(tuple(tools), choice or "auto", None, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name in names:
            return Tools(tuple(tools), "function", name, parallel)
    raise invalid(
        "invalid_tool_choice",
        "tool_choice must be auto, none, required or {type: function, function: {name}} naming"
        " one of the tools.",
        "tool_choice",
    )


def _response_format(data: dict[str, Any]) -> tuple[str, Any]:
    value = data.get("response_format")
    if value is None:
        return "text", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object") and set(value) == {"type"}:
        return kind, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict | bool):
            if set(spec) <= {"name", "description", "schema", "strict"}:
                return "json_schema", spec.get("schema", {})
    raise invalid(
        "invalid_response_format",
        "response_format must be {type: text}, {type: json_object} or"
        " {type: json_schema, json_schema: {name, schema, strict}}.",
        "response_format",
    )


def _template_kwargs(data: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    kwargs: dict[str, Any] = {}
    raw = data.get("chat_template_kwargs")
    if raw is not None:
        if not isinstance(raw, dict) or len(raw) > 16:
            raise invalid(
                "invalid_chat_template_kwargs",
                "chat_template_kwargs must be an object of at most 16 entries.",
                "chat_template_kwargs",
            )
        for key, value in raw.items():
            if (
                _field_name(key) is None
                or key in _TEMPLATE_RESERVED
                or not isinstance(value, str | int | float | bool)
            ):
                raise invalid(
                    "invalid_chat_template_kwargs",
                    "chat_template_kwargs holds identifiers (not messages, tools or special"
                    " tokens) with string, number or boolean values.",
                    "chat_template_kwargs",
                )
            kwargs[key] = value
    effort = data.get("reasoning_effort")
    if effort is not None:
        if effort not in ("minimal", "low", "medium", "high"):
            raise invalid(
                "invalid_reasoning_effort",
                "reasoning_effort must be minimal, low, medium or high.",
                "reasoning_effort",
            )
        kwargs["reasoning_effort"] = effort
    return tuple(sorted(kwargs.items()))


def parse_chat(data: dict[str, Any], max_tokens_cap: int, force_stream: bool = False) -> ChatInput:
    check_fields(data, CHAT_FIELDS)
    messages = data.get("messages")
    if messages is None:
        raise invalid("missing_messages", "messages is required.")
    if not isinstance(messages, list) or not messages:
        raise invalid("invalid_messages", "messages must be a non-empty list.")
    if len(messages) > MAX_MESSAGES:
        raise invalid("invalid_messages", f"At most {MAX_MESSAGES} messages.")
    parsed = tuple(_message(m) for m in messages)
    logprobs = data.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid("invalid_logprobs", "logprobs must be a boolean.", "logprobs")
    top = _integer(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise invalid("invalid_top_logprobs", "top_logprobs needs logprobs: true.", "top_logprobs")
    sampling, stream, given, n = _common(data, max_tokens_cap, (top or 0) if logprobs else None)
    tools = _tools(data)
    response_format, schema = _response_format(data)
    reasoning_format = data.get("reasoning_format")
    if reasoning_format not in (None, "auto", "deepseek", "none"):
        raise invalid(
            "invalid_reasoning_format",
            "reasoning_format must be auto, deepseek or none.",
            "reasoning_format",
        )
    constrained = [
        name
        for name, used in (
            ("grammar", sampling.grammar is not None),
            ("response_format", response_format != "text"),
            ("tools", tools.choice != "none"),
        )
        if used
    ]
    if len(constrained) > 1:
        raise invalid(
            "unsupported_combination",
            " and ".join(constrained) + " cannot be combined in one request (each constrains the"
            " whole output); use tool_choice none for an answer in a format.",
            constrained[-1],
        )
    return ChatInput(
        parsed,
        sampling,
        stream or force_stream,
        given,
        n=n,
        tools=tools,
        response_format=response_format,
        schema=schema,
        split_reasoning=reasoning_format != "none",
        template_kwargs=_template_kwargs(data),
    )


def parse_completion(data: dict[str, Any], max_tokens_cap: int) -> CompletionInput:
    check_fields(data, COMPLETION_FIELDS)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise invalid("missing_prompt", "prompt is required.")
    if not isinstance(prompt, str):
        raise invalid("invalid_prompt", "prompt must be a string.")
    logprobs = _integer(data, "logprobs", 0, MAX_TOP_LOGPROBS)
    sampling, stream, given, n = _common(data, max_tokens_cap, logprobs)
    return CompletionInput(prompt, sampling, stream, given, n=n)
