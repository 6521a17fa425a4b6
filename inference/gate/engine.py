"""The model server behind the gate: a fronted one over HTTP, or our own engine in process.

A fronting node (``--front``) reaches llama-server, vLLM, Ollama or another OpenAI-style server
over HTTP (:class:`FrontedServer`: :mod:`llmrouter.terminate`'s pool and ``ChatCall``). Our own
daemon's gate shares the process and reactor with the engine, so :class:`LocalEngine` feeds the
sealed stream straight from the scheduler: the engine's generation core
(:class:`inference.generate.Generator`, the HTTP API's own) starts the request, and an
:class:`EngineReply` turns each choice's output events into the stream's token sink calls, with
no SSE framing or parsing in between.

What the gate sees is what the HTTP hop gave it: the request is the ``llmrouter`` dialect's body
(fields refused by name as before), the per-device prompt-cache key is the value the header
carried, an engine refusal is the same sealed ``upstream_refused`` (the engine's status, code and
param) or ``upstream_failed``, and logprobs come in the shape the event stream's parser checked
them into (:func:`llmrouter.protocol.logprob_entries`), so sealed chunks carry the same content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from inference.generate import Generator
from inference.guardrails import APIError, parse_chat
from inference.interfaces import IReply, TokenLogprob
from inference.metrics import Metrics
from inference.output import Content, Event, Reasoning, ToolArgs, ToolStart
from inference.reply import Answer, Choice, chat_logprobs
from llmrouter.chat import ChatRequest
from llmrouter.protocol import logprob_entries
from llmrouter.terminate.backends import (
    BackendPool,
    Route,
    model_unavailable,
    model_unknown,
    unsupported_field,
)
from llmrouter.terminate.cachekey import HEADER as CACHE_HEADER
from llmrouter.terminate.chats import Call, ChatSettings, http_calls
from llmrouter.terminate.completions import finish_reason
from llmrouter.terminate.config import TerminateMetrics
from llmrouter.terminate.dialects import DIALECTS
from llmrouter.terminate.errors import UpstreamError
from llmrouter.terminate.upstream import TokenSink, failed_status, is_refusal, refused

__all__ = ["EngineCall", "EngineReply", "FrontedServer", "IModelServer", "LocalEngine"]

OURS = DIALECTS["llmrouter"]
_MAX_TOOL_INDEX = 63  # as the event stream's parser bounds it


class IModelServer(Interface):
    """What the gate answers opened requests with."""

    name = Attribute("A label for metrics (never request data).")

    def ready() -> bool:
        """Requests can be served (the model is loaded, the server healthy)."""

    def route(model: str | None, features: frozenset[str]) -> Route:
        """The route for ``model`` with ``features``; a ``ProtocolError`` to seal if none."""

    def call(
        chat: ChatRequest,
        sink: TokenSink,
        deadline: float,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
    ) -> Call:
        """The call that will answer ``chat`` into ``sink`` (not started)."""

    def start() -> None:
        """Start health probes, if any."""

    def stop() -> Deferred[Any]:
        """Stop them; fires when connections are closed."""


@implementer(IModelServer)
class FrontedServer:
    """A model server in another process, over HTTP (``--front``)."""

    name = "front"

    def __init__(
        self,
        clock: IReactorTime,
        pool: BackendPool,
        settings: ChatSettings,
        metrics: TerminateMetrics,
    ) -> None:
        self.pool = pool
        self._calls = http_calls(clock, pool, settings, metrics)

    def ready(self) -> bool:
        return self.pool.ready()

    def route(self, model: str | None, features: frozenset[str]) -> Route:
        return self.pool.route(model, features)

    def call(
        self,
        chat: ChatRequest,
        sink: TokenSink,
        deadline: float,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
    ) -> Call:
        return self._calls(chat, sink, deadline, route, headers)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> Deferred[Any]:
        return self.pool.stop()


@implementer(IModelServer)
class LocalEngine:
    """Our engine, in this process: requests go to ``generator`` without an HTTP hop."""

    name = "engine"

    def __init__(
        self,
        generator: Generator,
        clock: IReactorTime,
        metrics: TerminateMetrics,
        *,
        model_name: str,
        max_tokens: int,
    ) -> None:
        self._generator = generator
        self._clock = clock
        self._metrics = metrics
        self.model_name = model_name
        self._max_tokens = max_tokens

    def ready(self) -> bool:
        return bool(self._generator.scheduler.loaded)

    def route(self, model: str | None, features: frozenset[str]) -> Route:
        """As the pool routes to one backend of the ``llmrouter`` kind serving our model."""
        model = model or self.model_name
        if model != self.model_name:
            raise model_unknown()
        if not features <= OURS.features:
            raise unsupported_field(sorted(features - OURS.features)[0])
        if not self.ready():
            raise model_unavailable(1)
        return Route(model, ())

    def call(
        self,
        chat: ChatRequest,
        sink: TokenSink,
        deadline: float,
        route: Route | None,
        headers: Mapping[bytes, list[bytes]] | None,
    ) -> Call:
        key = (headers or {}).get(CACHE_HEADER)
        return EngineCall(
            self._generator,
            self._clock,
            self._metrics,
            chat,
            sink,
            model=self.model_name if route is None or route.model is None else route.model,
            max_tokens=self._max_tokens,
            cache_key=key[0] if key else None,
        )

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[Any]:
        return succeed(None)


class EngineCall:
    """One opened request answered by our engine in process: the stream's upstream control
    (cancel, pause, resume reach the generations directly)."""

    def __init__(
        self,
        generator: Generator,
        clock: IReactorTime,
        metrics: TerminateMetrics,
        chat: ChatRequest,
        sink: TokenSink,
        *,
        model: str,
        max_tokens: int,
        cache_key: bytes | None,
    ) -> None:
        self._generator = generator
        self._chat = chat
        self._model = model
        self._max_tokens = max_tokens
        self._cache_key = cache_key
        self.reply = EngineReply(
            sink,
            generator.metrics,
            clock,
            clock.seconds(),
            upstream=metrics,
            reasoning=chat.wants_reasoning,
            tool_calls=chat.wants_tool_calls,
            logprobs=chat.wants_logprobs,
        )

    def start(self) -> None:
        try:
            # exactly the body the HTTP hop carried: the llmrouter dialect's, as JSON decodes it
            doc = json.loads(OURS.body(self._chat, self._model))
            parsed = parse_chat(doc, self._max_tokens)
            self._generator.check(parsed)
            cache_key = self._generator.cache_key(self._cache_key)
        except APIError as e:
            self._generator.rejected(e)
            self.reply.refuse(e)
            return
        self._generator.start(parsed, self.reply, cache_key)

    def cancel(self) -> None:
        """The client went away (or the stream's deadline passed): stop generating."""
        self.reply.client_gone()

    def pause(self) -> None:
        self.reply.pause()

    def resume(self) -> None:
        self.reply.resume()


@implementer(IReply)
class EngineReply(Answer):
    """The choice's output into a :class:`TokenSink` as the event stream's parser and a
    ``ChatCall`` would have relayed it (see the module docstring). One choice: a v2 request
    has no ``n``."""

    def __init__(
        self,
        sink: TokenSink,
        metrics: Metrics,
        clock: IReactorTime,
        arrived: float,
        *,
        upstream: TerminateMetrics,
        reasoning: bool,
        tool_calls: bool,
        logprobs: bool,
    ) -> None:
        super().__init__(True, metrics, clock, arrived)
        self._sink = sink
        self._upstream = upstream
        self._relay_reasoning = reasoning
        self._relay_tool_calls = tool_calls
        self._relay_logprobs = logprobs
        self._deltas = 0

    def refuse(self, error: Exception) -> None:
        assert isinstance(error, APIError)
        self._end()
        if self.gone:
            return
        if is_refusal(error.status):
            self._fail(refused(error.status, error.code, error.param))
        else:
            self._fail(
                UpstreamError("upstream_failed", "the inference backend refused the request")
            )

    def send_delta(self, choice: Choice, event: Event, logprobs: list[TokenLogprob]) -> None:
        if self.gone or self.done:
            return
        try:
            entries = self._entries(logprobs)
        except ValueError:
            self._broken("malformed upstream logprobs")
            return
        sink = self._sink
        if isinstance(event, Reasoning):
            if event.text:
                self._deltas += 1
                if self._relay_reasoning:
                    sink.reasoning(event.text, entries)
                else:
                    sink.progress()
            elif entries:
                sink.token("", entries)
            return
        text = event.text if isinstance(event, Content) else ""
        if text or entries:
            if text:
                self._deltas += 1
            sink.token(text, entries)
        if isinstance(event, ToolStart | ToolArgs):
            if event.index > _MAX_TOOL_INDEX:
                self._broken("malformed upstream tool call")
                return
            if not self._relay_tool_calls:
                sink.progress()
            elif isinstance(event, ToolStart):
                sink.tool_call(event.index, event.id, event.name, "")
            else:
                sink.tool_call(event.index, None, None, event.text)

    def choice_finished(self, choice: Choice) -> None:
        if self.done:
            return
        if not self.gone:
            try:
                entries = self._entries(choice.take_pending())
            except ValueError:
                self._broken("malformed upstream logprobs")
                return
            if entries:
                self._sink.token("", entries)
        self._end()
        self._observe()
        if self.gone:
            self.metrics.outcome("cancelled")
            return
        self.metrics.outcome("timeout" if self.timed_out else "ok")
        usage = choice.usage
        self._sink.finished(
            finish_reason(choice.reason, self._relay_tool_calls),
            usage.prompt_tokens,
            usage.completion_tokens or self._deltas,
        )

    def choice_failed(self, code: str) -> None:
        if self.done:
            return
        self._each(lambda g: g.cancel())
        self._end()
        self._observe()
        self.metrics.outcome("cancelled" if self.gone else "error")
        if not self.gone:
            self._fail(UpstreamError("upstream_failed", "the inference backend failed"))

    def _entries(self, logprobs: list[TokenLogprob]) -> list[dict[str, Any]] | None:
        """The sink's logprobs for these tokens (None: none to relay); ValueError beyond the
        bounds the event stream's parser holds them to."""
        if not self._relay_logprobs or not logprobs:
            return None
        return logprob_entries(chat_logprobs(logprobs))

    def _broken(self, message: str) -> None:
        """Output the event stream's parser would have refused: fail as it made the call."""
        self._each(lambda g: g.cancel())
        self._end()
        self._observe()
        self.metrics.outcome("error")
        self._fail(UpstreamError("upstream_failed", message))

    def _observe(self) -> None:
        elapsed = self.clock.seconds() - self.arrived
        self._upstream.upstream_duration.labels(LocalEngine.name).observe(elapsed)

    def _fail(self, error: UpstreamError) -> None:
        self._sink.failed(error.code, error.message, failed_status(error.code), error.detail)
