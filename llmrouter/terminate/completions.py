"""OpenAI chat completion event streams (``stream: true``), parsed into what a call relays.

A :class:`CompletionStream` is the body protocol of one upstream response: it parses the SSE
events, bounds every field it relays, and reports content, reasoning, tool-call fragments and
logprobs to its :class:`CompletionEvents` (a :class:`~llmrouter.terminate.upstream.ChatCall`),
each kind only if the request asked for it (``relay_*``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from llmrouter.protocol import logprob_entries
from llmrouter.sse import SSEError, SSEParser
from llmrouter.terminate.errors import UpstreamError

__all__ = ["CompletionEvents", "CompletionStream", "finish_reason"]

_MAX_SSE_LINE = 1 << 20
_MAX_TOOL_INDEX = 63
_MAX_ID_CHARS = 256


class CompletionEvents(TypingProtocol):
    """What a :class:`CompletionStream` reports to (a ChatCall)."""

    relay_reasoning: bool
    relay_tool_calls: bool
    relay_logprobs: bool

    def stream_attached(self, stream: CompletionStream) -> None: ...

    def content(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None: ...

    def reasoning_content(self, text: str, logprobs: list[dict[str, Any]] | None) -> None: ...

    def tool_call_fragment(
        self, index: int, call_id: str | None, name: str | None, arguments: str
    ) -> None: ...

    def stream_ended(self, stream: CompletionStream, reason: Failure) -> None: ...


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    deltas: int = 0
    finish_reason: str | None = None


class CompletionStream(Protocol):
    """Parses an OpenAI chat completion event stream into token / finish callbacks."""

    def __init__(self, call: CompletionEvents) -> None:
        self._call = call
        self._parser = SSEParser(_MAX_SSE_LINE)
        self.usage = _Usage()
        self.saw_done = False
        self.broken: UpstreamError | None = None

    def connectionMade(self) -> None:
        self._call.stream_attached(self)

    def dataReceived(self, data: bytes) -> None:
        if self.saw_done or self.broken is not None:
            return
        try:
            events = self._parser.feed(data)
        except SSEError:
            self._break(UpstreamError("upstream_failed", "malformed upstream event stream"))
            return
        for _, payload in events:
            if payload.strip() == "[DONE]":
                self.saw_done = True
                return
            try:
                doc = json.loads(payload)
            except ValueError:
                self._break(UpstreamError("upstream_failed", "malformed upstream event"))
                return
            if not self._handle(doc):
                return

    def _handle(self, doc: Any) -> bool:
        if not isinstance(doc, dict):
            self._break(UpstreamError("upstream_failed", "malformed upstream event"))
            return False
        if "error" in doc:
            self._break(UpstreamError("upstream_failed", "the inference backend failed"))
            return False
        usage = doc.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.usage.prompt_tokens, self.usage.completion_tokens = prompt, completion
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                # The common case first: a delta of text alone (every v1 token).
                if len(delta) == 1 and isinstance(text, str) and not self._call.relay_logprobs:
                    if text:
                        self.usage.deltas += 1
                        self._call.content(text)
                elif not self._delta(choice, delta):
                    return False
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.usage.finish_reason = reason
        return True

    def _delta(self, choice: dict[str, Any], delta: dict[str, Any]) -> bool:
        """Reasoning, then content, then tool calls, as the backend's event carries them;
        logprobs ride with the text they belong to. False when the event is malformed."""
        call = self._call
        logprobs = None
        if call.relay_logprobs:
            raw = choice.get("logprobs")
            if isinstance(raw, dict) and raw.get("content") is not None:
                try:
                    logprobs = logprob_entries(raw["content"])
                except ValueError:
                    self._break(UpstreamError("upstream_failed", "malformed upstream logprobs"))
                    return False
        content = delta.get("content")
        text = content if isinstance(content, str) else ""
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")  # Ollama, newer vLLM
        if isinstance(reasoning, str) and reasoning:
            self.usage.deltas += 1
            call.reasoning_content(reasoning, None if text else logprobs)
            if not text:
                logprobs = None
        if text or logprobs:
            if text:
                self.usage.deltas += 1
            call.content(text, logprobs)
        calls = delta.get("tool_calls")
        if calls is not None:
            fragments = _tool_fragments(calls)
            if fragments is None:
                self._break(UpstreamError("upstream_failed", "malformed upstream tool call"))
                return False
            for fragment in fragments:
                call.tool_call_fragment(*fragment)
        return True

    def _break(self, error: UpstreamError) -> None:
        self.broken = error
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._call.stream_ended(self, reason)


def _tool_fragments(raw: Any) -> list[tuple[int, str | None, str | None, str]] | None:
    """OpenAI ``delta.tool_calls`` as (index, id, name, arguments) fragments; None if malformed."""
    if not isinstance(raw, list):
        return None
    fragments = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        index, call_id = item.get("index", 0), item.get("id")
        function = item.get("function") or {}
        if not isinstance(function, dict):
            return None
        name, arguments = function.get("name"), function.get("arguments") or ""
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index <= _MAX_TOOL_INDEX
            or not (call_id is None or (isinstance(call_id, str) and len(call_id) <= _MAX_ID_CHARS))
            or not (name is None or (isinstance(name, str) and len(name) <= _MAX_ID_CHARS))
            or not isinstance(arguments, str)
        ):
            return None
        fragments.append((index, call_id, name, arguments))
    return fragments


def finish_reason(reason: str | None, tools: bool) -> str:
    if reason in ("stop", "length") or (reason == "tool_calls" and tools):
        return reason
    return "stop"
