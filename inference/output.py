"""The model's raw output text split into answer, reasoning and tool calls, incrementally.

``OutputParser.feed`` takes text as the model produces it (special tokens the template uses
written out, see ``inference.chat_template.MARKERS``) and returns events: answer text
(``Content``), reasoning text (``Reasoning``), the start of a tool call (``ToolStart``: index, id,
name) and fragments of its JSON arguments (``ToolArgs``). Concatenated, a call's fragments are its
arguments as the model wrote them, so a streamed answer and a whole one are the same.

Recognised, as llama-server recognises them:
- reasoning: ``<think>...</think>`` at the start of the answer (or the whole output until
  ``</think>`` when the prompt already opened ``<think>``: DeepSeek-R1, Qwen3);
- gpt-oss harmony messages: ``<|channel|>analysis<|message|>...<|end|>`` is reasoning,
  ``final`` (and ``commentary`` without a recipient) is the answer, and
  ``<|channel|>commentary to=functions.NAME ...<|message|>{args}`` is a call of NAME;
- tool calls (only when the request has tools): Hermes/Qwen ``<tool_call>{json}</tool_call>``
  blocks anywhere, and an answer that is a bare JSON call: ``{"name": ..., "arguments"|
  "parameters": {...}}`` (Llama 3, optionally after ``<|python_tag|>``) or
  ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`` (the generic format).

Text that might be the start of a marker is held back until it is known not to be one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class ToolStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolArgs:
    index: int
    text: str


Event = Content | Reasoning | ToolStart | ToolArgs

THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
H_CHANNEL, H_MESSAGE, H_START, H_END = "<|channel|>", "<|message|>", "<|start|>", "<|end|>"
H_CALL, H_RETURN = "<|call|>", "<|return|>"
MAX_HEADER = 256  # harmony header text beyond this is not a header: it becomes answer text
_CALL_KEYS = ("name", "tool_calls")
_ARG_KEYS = ("arguments", "parameters")


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers``."""
    keep = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), keep, -1):
            if text.endswith(marker[:n]):
                keep = n
                break
    return keep


class _JsonCalls:
    """Reads one JSON value character by character, finding tool calls in it.

    A call is an object with a string ``name`` and an ``arguments`` (or ``parameters``) value,
    either the value itself or an element of its ``tool_calls`` array. The arguments value is
    passed on as raw text while it is read (or, when it is a string holding JSON, decoded at its
    end).
    """

    def __init__(self, on_start: Callable[[str], int], emit: Callable[[Event], None]):
        self._on_start = on_start
        self._emit = emit
        self.failed = False
        self.done = False
        self.decided: bool | None = None  # is this JSON a tool call? None: not known yet
        # parser state
        self._stack: list[list[object]] = []  # frames: [kind, key, expect]
        self._in_string = False
        self._escape = False
        self._string = ""
        self._string_is_key = False
        self._literal = False
        self._literal_ended = False
        self._first_key = True
        self._wrapper = False  # {"tool_calls": [call, ...]}
        # the call being read
        self._call_depth = -1
        self._name: str | None = None
        self._call: int | None = None  # its index once started
        self._args_depth = -1  # stack depth at which the arguments value started, or -1
        self._args_string = False
        self._args_raw = ""
        self._pending = ""  # argument text before the name is known
        self._had_args = False

    def _frame(self) -> list[object] | None:
        return self._stack[-1] if self._stack else None

    def _is_call_frame(self) -> bool:
        depth = len(self._stack)
        if depth == 1:
            return not self._wrapper
        return depth == 3 and self._wrapper and self._stack[1][0] == "array"

    def feed(self, text: str) -> str:
        """Consume ``text`` up to the end of the JSON value; returns what is left over."""
        for i, ch in enumerate(text):
            before = self._args_depth >= 0
            self._literal_ended = False
            self._char(ch)
            after = self._args_depth >= 0
            if after or (before and not self._literal_ended):
                if self._args_string:
                    self._args_raw += ch
                else:
                    self._send(ch)
            if before and not after:
                self._args_complete()
            if self.done or self.failed:
                return text[i + 1 :]
        return ""

    def _send(self, text: str) -> None:
        if self._call is not None:
            self._emit(ToolArgs(self._call, text))
        else:
            self._pending += text

    def _args_complete(self) -> None:
        if not self._args_string:
            return
        self._args_string = False
        try:
            decoded = json.loads(self._args_raw)
        except ValueError:
            decoded = None
        self._args_raw = ""
        self._send(decoded if isinstance(decoded, str) and decoded else "{}")

    def _char(self, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
                self._string += "\\" + ch
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self._string_done()
            else:
                self._string += ch
            return
        if self._literal:
            if ch.isalnum() or ch in "+-.":
                return
            self._literal = False
            # a literal that was the arguments value ends before this character
            self._literal_ended = self._args_depth == len(self._stack)
            self._value_done()
            if self.done or self.failed:
                return
        if ch in " \t\r\n":
            return
        frame = self._frame()
        if frame is None:
            if ch == "{":
                self._stack.append(["object", None, "key"])
            else:
                self.failed = True
            return
        expect = frame[2]
        if expect == "key":
            if ch == '"':
                self._start_string(key=True)
            elif ch == "}" and frame[0] == "object":
                self._close()
            else:
                self.failed = True
        elif expect == "colon":
            if ch == ":":
                frame[2] = "value"
            else:
                self.failed = True
        elif expect == "value":
            self._start_value(ch, frame)
        elif expect == "comma":
            if ch == ",":
                frame[2] = "key" if frame[0] == "object" else "value"
            elif (ch == "}" and frame[0] == "object") or (ch == "]" and frame[0] == "array"):
                self._close()
            else:
                self.failed = True

    def _start_value(self, ch: str, frame: list[object]) -> None:
        if frame[0] == "array" and ch == "]":
            self._close()
            return
        if (
            self._is_call_frame()
            and frame[0] == "object"
            and frame[1] in _ARG_KEYS
            and self._args_depth < 0
            and not self._had_args
        ):
            self._args_depth = len(self._stack)
            self._args_string = ch == '"'
            self._had_args = True
        if ch == "{":
            self._stack.append(["object", None, "key"])
        elif ch == "[":
            self._stack.append(["array", None, "value"])
        elif ch == '"':
            self._start_string(key=False)
        elif ch.isalnum() or ch == "-":
            self._literal = True
        else:
            self.failed = True

    def _start_string(self, key: bool) -> None:
        self._in_string = True
        self._string = ""
        self._string_is_key = key

    def _string_done(self) -> None:
        frame = self._frame()
        assert frame is not None
        if self._string_is_key:
            key = json.loads('"' + self._string + '"')
            frame[1] = key
            frame[2] = "colon"
            if len(self._stack) == 1 and self._first_key:
                self._first_key = False
                self._wrapper = key == "tool_calls"
                if self.decided is None:
                    self.decided = key in _CALL_KEYS or key in _ARG_KEYS
                    if not self.decided:
                        self.failed = True
            if self._is_call_frame() and self._call_depth < 0 and frame[0] == "object":
                self._call_depth = len(self._stack)
            return
        if self._is_call_frame() and frame[1] == "name" and self._name is None:
            self._name = json.loads('"' + self._string + '"')
            self._call = self._on_start(self._name)
            if self._pending:
                self._emit(ToolArgs(self._call, self._pending))
                self._pending = ""
        self._value_done()

    def _value_done(self) -> None:
        frame = self._frame()
        if frame is None:
            return
        frame[2] = "comma"
        if self._args_depth == len(self._stack):
            self._args_depth = -1

    def _close(self) -> None:
        closing_call = self._is_call_frame() and self._frame() is not None
        depth = len(self._stack)
        self._stack.pop()
        if closing_call and self._call_depth == depth:
            self._finish_call()
        if not self._stack:
            self.done = True
            return
        self._value_done()

    def _finish_call(self) -> None:
        if self._call is not None and not self._had_args:
            self._emit(ToolArgs(self._call, "{}"))
        self._call_depth = -1
        self._name = None
        self._call = None
        self._pending = ""
        self._had_args = False


class OutputParser:
    """See the module docstring. ``tools``: parse tool calls; ``think``: split reasoning."""

    def __init__(
        self,
        *,
        harmony: bool = False,
        think: bool = True,
        in_think: bool = False,
        tools: bool = False,
        parallel_tools: bool = True,
        reasoning_as_content: bool = False,
        make_id: Callable[[], str] = call_id,
    ):
        self._harmony = harmony
        self._tools = tools
        self._parallel = parallel_tools
        self._reasoning_as_content = reasoning_as_content
        self._make_id = make_id
        self._buffer = ""
        self._events: list[Event] = []
        self.tool_calls = 0
        self._json: _JsonCalls | None = None
        self._json_held = ""  # text of a bare JSON answer while it is not known to be a call
        if harmony:
            self._state = "header"
        elif in_think:
            self._state = "think"
        elif think:
            self._state = "start"
        else:
            self._state = "answer-start"
        self._header = ""
        self._call_index = -1
        self._body_kind = "content"  # harmony body: content, reasoning or tool
        self._dropping = False  # calls beyond the first when parallel calls are off

    # -- public ------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        self._run(final=True)
        if self._state == "header" and "<|" not in self._header:
            self._content(self._header)  # never became a harmony message
            self._header = ""
        if self._json is not None and self._json.decided is not True:
            self._content(self._json_held)
        self._json = None
        return self._take()

    # -- events ------------------------------------------------------------------------------
    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        merged: list[Event] = []
        for event in events:
            last = merged[-1] if merged else None
            if isinstance(event, Content) and isinstance(last, Content):
                merged[-1] = Content(last.text + event.text)
            elif isinstance(event, Reasoning) and isinstance(last, Reasoning):
                merged[-1] = Reasoning(last.text + event.text)
            elif (
                isinstance(event, ToolArgs)
                and isinstance(last, ToolArgs)
                and last.index == event.index
            ):
                merged[-1] = ToolArgs(event.index, last.text + event.text)
            else:
                merged.append(event)
        return merged

    def _content(self, text: str) -> None:
        if text:
            self._events.append(Content(text))

    def _reasoning(self, text: str) -> None:
        if text:
            self._events.append(Content(text) if self._reasoning_as_content else Reasoning(text))

    def _emit(self, event: Event) -> None:
        if isinstance(event, ToolArgs) and self._dropping:
            return
        self._events.append(event)

    def _start_call(self, name: str) -> int:
        if self.tool_calls and not self._parallel:
            self._dropping = True
            return -1
        index = self.tool_calls
        self.tool_calls += 1
        self._events.append(ToolStart(index, self._make_id(), name))
        return index

    # -- the state machine ---------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while True:
            before = (self._state, len(self._buffer))
            getattr(self, "_state_" + self._state.replace("-", "_"))(final)
            if (self._state, len(self._buffer)) == before:
                return

    def _upto(self, markers: tuple[str, ...], final: bool) -> tuple[str, str | None]:
        """Text before the first of ``markers`` and that marker (consumed), or all text that
        cannot be the start of a marker and None."""
        buffer = self._buffer
        found = [(buffer.find(m), m) for m in markers]
        hits = [(i, m) for i, m in found if i >= 0]
        if hits:
            i, marker = min(hits)
            self._buffer = buffer[i + len(marker) :]
            return buffer[:i], marker
        keep = 0 if final else _held(buffer, markers)
        self._buffer = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def _expect(self, marker: str, final: bool) -> bool | None:
        """Is ``marker`` next, after optional whitespace? (True: consumed; None: cannot tell yet)"""
        stripped = self._buffer.lstrip()
        if stripped.startswith(marker):
            self._buffer = stripped[len(marker) :]
            return True
        if final or (stripped and not marker.startswith(stripped)):
            return False
        return None

    def _state_start(self, final: bool) -> None:
        found = self._expect(THINK, final)
        if found is not None:
            self._state = "think" if found else "answer-start"

    def _state_think(self, final: bool) -> None:
        text, marker = self._upto((END_THINK,), final)
        self._reasoning(text)
        if marker:
            self._state = "after-think"

    def _state_after_think(self, final: bool) -> None:
        self._buffer = self._buffer.lstrip()
        if self._buffer or final:
            self._state = "answer-start"

    def _state_answer_start(self, final: bool) -> None:
        if not self._tools:
            self._state = "answer"
            return
        found = self._expect(PYTHON_TAG, final)
        stripped = self._buffer.lstrip()
        if found:
            self._start_json(held="")
        elif found is False and stripped.startswith("{"):
            lead = self._buffer[: len(self._buffer) - len(stripped)]
            self._buffer = stripped
            self._start_json(held=lead)
        elif found is False:
            self._state = "answer"

    def _start_json(self, held: str) -> None:
        self._json = _JsonCalls(self._start_call, self._emit)
        self._json_held = held
        self._state = "json"

    def _state_json(self, final: bool) -> None:
        scanner = self._json
        assert scanner is not None
        text = self._buffer
        rest = scanner.feed(text)
        consumed = text[: len(text) - len(rest)]
        self._buffer = rest
        if scanner.decided is not True:
            self._json_held += consumed
        if scanner.failed and scanner.decided is not True:
            # not a call after all: what was held is answer text
            self._buffer = self._json_held + self._buffer
            self._json_held = ""
            self._json = None
            self._state = "answer"
            return
        if scanner.failed or scanner.done:
            self._json = None
            self._json_held = ""
            self._state = "after-json"

    def _state_after_json(self, final: bool) -> None:
        """After a bare JSON call: another one (``;`` or whitespace between), or answer text."""
        stripped = self._buffer.lstrip(" \t\r\n;")
        if stripped.startswith("{"):
            self._buffer = stripped
            self._start_json(held="")
            self._json_held = ""
        elif stripped or final:
            self._buffer = stripped
            self._state = "answer"

    def _state_answer(self, final: bool) -> None:
        markers = (TOOL_CALL,) if self._tools else ()
        if not markers:
            self._content(self._buffer)
            self._buffer = ""
            return
        text, marker = self._upto(markers, final)
        self._content(text)
        if marker == TOOL_CALL:
            self._json = _JsonCalls(self._start_call, self._emit)
            self._json.decided = True
            self._state = "tool-block"

    def _state_tool_block(self, final: bool) -> None:
        scanner = self._json
        assert scanner is not None
        self._buffer = scanner.feed(self._buffer)
        if scanner.done or scanner.failed:
            self._json = None
            self._state = "tool-block-end"

    def _state_tool_block_end(self, final: bool) -> None:
        if self._expect(END_TOOL_CALL, final) is not None:
            self._state = "after-call"

    def _state_after_call(self, final: bool) -> None:
        """Whitespace between and after calls is not part of the answer."""
        self._buffer = self._buffer.lstrip()
        if self._buffer or final:
            self._state = "answer"

    # harmony: [<|start|>assistant] [to=R] <|channel|>C [to=R] [<|constrain|>json] <|message|> ...
    def _state_header(self, final: bool) -> None:
        text, marker = self._upto((H_MESSAGE,), final)
        self._header += text
        if marker is None:
            if len(self._header) > MAX_HEADER:
                self._content(self._header)
                self._header = ""
                self._state = "answer"
            return
        header, self._header = self._header, ""
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=([^\s<]+)", header)
        name = recipient.group(1) if recipient else ""
        if name.startswith("functions.") and self._tools:
            self._call_index = self._start_call(name[len("functions.") :])
            self._body_kind = "tool"
        elif channel is not None and channel.group(1) == "analysis":
            self._body_kind = "reasoning"
        else:
            self._body_kind = "content"
        self._state = "body"

    def _state_body(self, final: bool) -> None:
        text, marker = self._upto((H_END, H_START, H_CHANNEL, H_CALL, H_RETURN), final)
        if self._body_kind == "tool":
            if text and self._call_index >= 0:
                self._emit(ToolArgs(self._call_index, text))
        elif self._body_kind == "reasoning":
            self._reasoning(text)
        else:
            self._content(text)
        if marker is None:
            return
        if marker == H_CHANNEL:
            self._header = H_CHANNEL
            self._state = "header"
        elif marker == H_START:
            self._state = "header"
        else:
            self._state = "between"

    def _state_between(self, final: bool) -> None:
        _, marker = self._upto((H_START, H_CHANNEL), final)
        if marker == H_CHANNEL:
            self._header = H_CHANNEL
            self._state = "header"
        elif marker == H_START:
            self._state = "header"
