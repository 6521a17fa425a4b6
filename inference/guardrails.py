"""Validation of OpenAI-style request bodies into plain values, before any tokenization.

Each violation raises ``APIError`` with a specific code and a fixed message that never quotes the
request. Fields we do not know are ignored, as OpenAI servers do. Checks that need the model
(prompt length against the context size) happen later, in ``inference.api``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inference.interfaces import Sampling

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4
MAX_STOP_LENGTH = 128
MAX_MESSAGES = 1024


class APIError(Exception):
    """An HTTP error answer: ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message, "type": "invalid_request_error"}
        return json.dumps({"error": error}).encode()


def invalid(code: str, message: str) -> APIError:
    return APIError(400, code, message)


@dataclass(frozen=True)
class ChatInput:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: Sampling
    stream: bool
    max_tokens_given: bool


@dataclass(frozen=True)
class CompletionInput:
    prompt: str
    sampling: Sampling
    stream: bool
    max_tokens_given: bool


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


def _common(data: dict[str, Any], max_tokens_cap: int) -> tuple[Sampling, bool, bool]:
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("invalid_stream", "stream must be a boolean.")
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("unsupported_n", "Only n = 1 is supported.")
    raw = data.get("max_completion_tokens", data.get("max_tokens"))
    given = raw is not None
    if raw is None:
        max_tokens = max_tokens_cap
    elif isinstance(raw, bool) or not isinstance(raw, int):
        raise invalid("invalid_max_tokens", "max_tokens must be an integer.")
    elif raw < 1:
        raise invalid("invalid_max_tokens", "max_tokens must be at least 1.")
    elif raw > max_tokens_cap:
        raise invalid(
            "max_tokens_exceeded", f"max_tokens must not exceed {max_tokens_cap} on this server."
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
    sampling = Sampling(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed
    )
    return sampling, stream, given


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


def parse_chat(data: dict[str, Any], max_tokens_cap: int, force_stream: bool = False) -> ChatInput:
    messages = data.get("messages")
    if messages is None:
        raise invalid("missing_messages", "messages is required.")
    if not isinstance(messages, list) or not messages:
        raise invalid("invalid_messages", "messages must be a non-empty list.")
    if len(messages) > MAX_MESSAGES:
        raise invalid("invalid_messages", f"At most {MAX_MESSAGES} messages.")
    parsed = []
    for message in messages:
        if not isinstance(message, dict):
            raise invalid("invalid_messages", "Each message must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid("invalid_role", "role must be one of " + ", ".join(ROLES) + ".")
        if "content" not in message or message["content"] is None:
            raise invalid("invalid_content", "Each message needs content.")
        parsed.append(("system" if role == "developer" else role, _content(message["content"])))
    sampling, stream, given = _common(data, max_tokens_cap)
    return ChatInput(tuple(parsed), sampling, stream or force_stream, given)


def parse_completion(data: dict[str, Any], max_tokens_cap: int) -> CompletionInput:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise invalid("missing_prompt", "prompt is required.")
    if not isinstance(prompt, str):
        raise invalid("invalid_prompt", "prompt must be a string.")
    sampling, stream, given = _common(data, max_tokens_cap)
    return CompletionInput(prompt, sampling, stream, given)
