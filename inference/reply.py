"""One request's HTTP answer in OpenAI's shapes, streamed (SSE) or whole.

A ``Reply`` holds one ``Choice`` per generation (``n``); each choice is the engine's token sink
for its generation and runs the model's output through an ``OutputParser``, so answer text,
``reasoning_content`` and ``tool_calls`` come out as llama-server and OpenAI send them:

- streamed: ``delta.content`` / ``delta.reasoning_content`` / ``delta.tool_calls`` (the first
  fragment of a call carries index, id, type and the function name, later ones argument text),
  each chunk with the ``logprobs`` of the tokens sampled since the previous one;
- whole: ``message.content`` (null when the answer is only tool calls),
  ``message.reasoning_content``, ``message.tool_calls``, ``logprobs.content``;
- ``finish_reason`` ``tool_calls`` when the model ended after calling tools.

The reply is also the HTTP response's push producer: when the transport's buffer fills, Twisted
pauses it and it pauses every generation; when the client goes away they are cancelled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.web import server
from twisted.web.iweb import IRequest
from zope.interface import implementer

from inference.guardrails import APIError
from inference.interfaces import IGeneration, IReply, ITokenSink, TokenLogprob, Usage
from inference.metrics import Metrics
from inference.output import Content, Event, OutputParser, Reasoning, ToolStart

CHAT = "chat"
COMPLETION = "completion"


def json_response(request: IRequest, status: int, value: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode()


def error_response(request: IRequest, error: APIError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return error.body()


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries."""
    return [
        {
            "token": _text(t.piece),
            "logprob": t.logprob,
            "bytes": list(t.piece),
            "top_logprobs": [
                {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}
                for piece, logprob in t.top
            ],
        }
        for t in tokens
    ]


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``offset`` is the text length before."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(_text(t.piece))
    return {
        "tokens": [_text(t.piece) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_text(piece): lp for piece, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _delta(event: Event) -> dict[str, Any]:
    if isinstance(event, Content):
        return {"content": event.text}
    if isinstance(event, Reasoning):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolStart):
        call = {"name": event.name, "arguments": ""}
        return {
            "tool_calls": [
                {"index": event.index, "id": event.id, "type": "function", "function": call}
            ]
        }
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


@implementer(ITokenSink)
class Choice:
    """One generation of the reply; its sink methods run on the reactor thread."""

    def __init__(self, reply: Answer, index: int, parser: OutputParser | None):
        self.reply = reply
        self.index = index
        self.parser = parser
        self.generation: IGeneration | None = None
        self.done = False
        self.reason = ""
        self.usage = Usage(0, 0)
        # whole answers
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.logprobs: list[TokenLogprob] = []
        self.text_length = 0
        self._pending: list[TokenLogprob] = []  # streamed: sampled, not yet sent

    def started(self) -> None:
        pass

    def text(self, delta: str, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if delta:
            self.reply.saw_text()
        events: list[Event]
        if self.parser is None:
            events = [Content(delta)] if delta else []
        else:
            events = self.parser.feed(delta)
        self._out(events, logprobs)

    def finished(self, reason: str, usage: Usage) -> None:
        if reason == "cancelled":
            reason = "length"  # only the time budget cancels a generation whose client is there
        if self.parser is not None:
            self._out(self.parser.finish(), ())
            if self.parser.tool_calls and reason == "stop":
                reason = "tool_calls"
        self.done = True
        self.reason = reason
        self.usage = usage
        self.reply.choice_finished(self)

    def failed(self, code: str, usage: Usage) -> None:
        self.done = True
        self.usage = usage
        self.reply.choice_failed(code)

    def _out(self, events: list[Event], logprobs: tuple[TokenLogprob, ...]) -> None:
        if self.reply.stream:
            self._pending.extend(logprobs)
            for event in events:
                self.reply.send_delta(self, event, self.take_pending())
            return
        self.logprobs.extend(logprobs)
        for event in events:
            if isinstance(event, Content):
                self.content.append(event.text)
            elif isinstance(event, Reasoning):
                self.reasoning.append(event.text)
            elif isinstance(event, ToolStart):
                function = {"name": event.name, "arguments": ""}
                self.calls.append({"id": event.id, "type": "function", "function": function})
            else:
                self.calls[event.index]["function"]["arguments"] += event.text

    def take_pending(self) -> list[TokenLogprob]:
        """The logprobs of tokens sampled but not yet sent (streaming)."""
        taken, self._pending = self._pending, []
        return taken


class Answer:
    """What every reply of one request shares (the HTTP API's :class:`Reply`, the v2 gate's
    in-process one): its choices and their generations, the time budget, the asker going away,
    flow control and the time-to-first-token metrics. Subclasses provide the rest of
    ``IReply`` (where the output goes)."""

    def __init__(self, stream: bool, metrics: Metrics, clock: Any, arrived: float):
        self.stream = stream
        self.metrics = metrics
        self.clock = clock
        self.arrived = arrived
        self.choices: list[Choice] = []
        self.last_text: float | None = None
        self.gone = False
        self.timed_out = False
        self.budget: IDelayedCall | None = None
        self.done = False
        self.paused = False  # paused before the generations began: they begin paused

    def add_choices(self, parsers: Sequence[OutputParser | None]) -> list[Choice]:
        self.choices = [Choice(self, i, parser) for i, parser in enumerate(parsers)]
        return self.choices

    def begin(self, generations: Sequence[IGeneration], budget: float) -> None:
        for choice, generation in zip(self.choices, generations, strict=True):
            choice.generation = generation
        self.budget = self.clock.callLater(budget, self._out_of_time)
        if self.paused:
            self._each(lambda g: g.pause())

    def abandon(self) -> None:
        """The request was answered otherwise (refused): nothing more is written."""
        self._end()

    def _each(self, action: Callable[[IGeneration], None]) -> None:
        for choice in self.choices:
            if choice.generation is not None and not choice.done:
                action(choice.generation)

    def client_gone(self) -> None:
        self.gone = True
        self._each(lambda g: g.cancel())

    def _out_of_time(self) -> None:
        self.budget = None
        self.timed_out = True
        self._each(lambda g: g.cancel())

    def pause(self) -> None:
        self.paused = True
        self._each(lambda g: g.pause())

    def resume(self) -> None:
        self.paused = False
        self._each(lambda g: g.resume())

    def saw_text(self) -> None:
        now = self.clock.seconds()
        if self.last_text is None:
            self.metrics.ttft.observe(now - self.arrived)
        else:
            self.metrics.token_latency.observe(now - self.last_text)
        self.last_text = now

    def send_delta(self, choice: Choice, event: Event, logprobs: list[TokenLogprob]) -> None:
        raise NotImplementedError

    def choice_finished(self, choice: Choice) -> None:
        raise NotImplementedError

    def choice_failed(self, code: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        self.done = True
        if self.budget is not None and self.budget.active():
            self.budget.cancel()
        self.budget = None


@implementer(IReply, IPushProducer)
class Reply(Answer):
    """All choices of one request, and the HTTP response they are written to."""

    def __init__(
        self,
        request: server.Request,
        kind: str,
        stream: bool,
        model: str,
        metrics: Metrics,
        clock: Any,
        arrived: float,
    ):
        super().__init__(stream, metrics, clock, arrived)
        self.request = request
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    # -- lifecycle driven by the generation core --------------------------------------------
    def begin(self, generations: Sequence[IGeneration], budget: float) -> None:
        super().begin(generations, budget)
        if self.stream:
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-store")
            self.request.setHeader(b"x-accel-buffering", b"no")
            self.request.registerProducer(self, True)
            if self.kind == CHAT:
                for choice in self.choices:
                    self._event(self._chunk(choice, {"role": "assistant", "content": ""}))

    def refuse(self, error: Exception) -> None:
        assert isinstance(error, APIError)
        if self.gone:
            return
        self.request.write(error_response(self.request, error))
        self.request.finish()

    # -- IPushProducer ----------------------------------------------------------------------
    def pauseProducing(self) -> None:
        self.pause()

    def resumeProducing(self) -> None:
        self.resume()

    def stopProducing(self) -> None:
        self.client_gone()

    # -- from the choices -------------------------------------------------------------------
    def send_delta(self, choice: Choice, event: Event, logprobs: list[TokenLogprob]) -> None:
        if self.gone or self.done:
            return
        if self.kind == CHAT:
            chunk = self._chunk(choice, _delta(event))
            if logprobs:
                chunk["choices"][0]["logprobs"] = {"content": chat_logprobs(logprobs)}
        else:
            assert isinstance(event, Content)
            chunk = self._chunk(choice, event.text)
            if logprobs:
                chunk["choices"][0]["logprobs"] = completion_logprobs(logprobs, choice.text_length)
            choice.text_length += len(event.text)
        self._event(chunk)

    def choice_finished(self, choice: Choice) -> None:
        if self.done:  # another choice failed, or the request was refused
            return
        if self.stream and not self.gone:
            final = self._chunk(choice, {} if self.kind == CHAT else "", choice.reason)
            pending = choice.take_pending()
            if pending:
                final["choices"][0]["logprobs"] = (
                    {"content": chat_logprobs(pending)}
                    if self.kind == CHAT
                    else completion_logprobs(pending, choice.text_length)
                )
            if all(c.done for c in self.choices):
                final["usage"] = self._usage()
            self._event(final)
        if all(c.done for c in self.choices):
            self._all_finished()

    def choice_failed(self, code: str) -> None:
        if self.done:
            return
        self._each(lambda g: g.cancel())
        self._end()
        self.metrics.outcome("cancelled" if self.gone else "error")
        if self.gone:
            return
        error = APIError(503 if code == "shutting_down" else 500, code, "Generation failed.")
        if self.stream:
            self._event({"error": {"code": error.code, "message": error.message}})
            self._write(b"data: [DONE]\n\n")
        else:
            self._write(error_response(self.request, error))
        self._close()

    # -- the end ------------------------------------------------------------------------------
    def _all_finished(self) -> None:
        if self.done:
            return
        self._end()
        if self.gone:
            self.metrics.outcome("cancelled")
            return
        self.metrics.outcome("timeout" if self.timed_out else "ok")
        if self.stream:
            self._write(b"data: [DONE]\n\n")
            self._close()
            return
        body = {
            "id": self.id,
            "object": "chat.completion" if self.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._whole(c) for c in self.choices],
            "usage": self._usage(),
        }
        self._write(json_response(self.request, 200, body))
        self._close()

    def _whole(self, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.content)
        if self.kind == COMPLETION:
            logprobs = completion_logprobs(choice.logprobs, 0) if choice.logprobs else None
            return {
                "index": choice.index,
                "text": text,
                "finish_reason": choice.reason,
                "logprobs": logprobs,
            }
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if choice.calls and not text else text,
        }
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        if choice.calls:
            message["tool_calls"] = choice.calls
        return {
            "index": choice.index,
            "message": message,
            "finish_reason": choice.reason,
            "logprobs": {"content": chat_logprobs(choice.logprobs)} if choice.logprobs else None,
        }

    def _usage(self) -> dict[str, Any]:
        first = self.choices[0].usage
        completion = sum(c.usage.completion_tokens for c in self.choices)
        cached = max(c.usage.cached_tokens for c in self.choices)
        return {
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _chunk(
        self, choice: Choice, content: Any, finish_reason: str | None = None
    ) -> dict[str, Any]:
        if self.kind == CHAT:
            entry: dict[str, Any] = {
                "index": choice.index,
                "delta": content,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion.chunk"
        else:
            entry = {
                "index": choice.index,
                "text": content,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [entry],
        }

    def _event(self, value: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(value, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    def _close(self) -> None:
        if self.gone:
            return
        if self.stream:
            self.request.unregisterProducer()
        self.request.finish()
