"""The HTTP API: OpenAI-compatible completions, health, models and metrics.

Each generation is answered by a ``_Reply``, which is both the engine's token sink and the HTTP
response's push producer: when the transport's buffer fills, Twisted pauses the producer and the
reply pauses its generation; when the client goes away the generation is cancelled. Nothing from
a request body or header is ever logged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from inference.guardrails import (
    APIError,
    ChatInput,
    CompletionInput,
    invalid,
    parse_chat,
    parse_completion,
    parse_json,
)
from inference.interfaces import IGeneration, IScheduler, ITokenSink, Overloaded, Sampling, Usage
from inference.metrics import Metrics

log = Logger()

CHAT = "chat"
COMPLETION = "completion"


def _json(request: IRequest, status: int, value: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode()


def _error(request: IRequest, error: APIError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return error.body()


@implementer(ITokenSink, IPushProducer)
class _Reply:
    """One generation's HTTP response, streamed (SSE) or whole."""

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
        self.request = request
        self.kind = kind
        self.stream = stream
        self.model = model
        self.metrics = metrics
        self.clock = clock
        self.arrived = arrived
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.generation: IGeneration | None = None
        self.parts: list[str] = []
        self.last_text: float | None = None
        self.gone = False
        self.timed_out = False
        self.budget: IDelayedCall | None = None
        self.done = False

    # -- lifecycle driven by the resource ---------------------------------------------------
    def begin(self, generation: IGeneration, budget: float) -> None:
        self.generation = generation
        self.budget = self.clock.callLater(budget, self._out_of_time)
        if self.stream:
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-store")
            self.request.setHeader(b"x-accel-buffering", b"no")
            self.request.registerProducer(self, True)
            if self.kind == CHAT:
                self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def client_gone(self) -> None:
        self.gone = True
        if self.generation is not None:
            self.generation.cancel()

    def _out_of_time(self) -> None:
        self.budget = None
        self.timed_out = True
        if self.generation is not None:
            self.generation.cancel()

    # -- IPushProducer ----------------------------------------------------------------------
    def pauseProducing(self) -> None:
        if self.generation is not None:
            self.generation.pause()

    def resumeProducing(self) -> None:
        if self.generation is not None:
            self.generation.resume()

    def stopProducing(self) -> None:
        self.client_gone()

    # -- ITokenSink -------------------------------------------------------------------------
    def started(self) -> None:
        pass

    def text(self, delta: str) -> None:
        now = self.clock.seconds()
        if self.last_text is None:
            self.metrics.ttft.observe(now - self.arrived)
        else:
            self.metrics.token_latency.observe(now - self.last_text)
        self.last_text = now
        if self.gone:
            return
        if self.stream:
            content = {"content": delta} if self.kind == CHAT else delta
            self._event(self._chunk(content, None))
        else:
            self.parts.append(delta)

    def finished(self, reason: str, usage: Usage) -> None:
        self._end()
        if self.gone:
            self.metrics.outcome("cancelled")
            return
        if reason == "cancelled":
            reason = "length"  # only the time budget cancels a generation whose client is there
        self.metrics.outcome("timeout" if self.timed_out else "ok")
        usage_json = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
        if self.stream:
            final = self._chunk({} if self.kind == CHAT else "", reason)
            final["usage"] = usage_json
            self._event(final)
            self._write(b"data: [DONE]\n\n")
            self._close()
            return
        text = "".join(self.parts)
        if self.kind == CHAT:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json,
        }
        self._write(_json(self.request, 200, body))
        self._close()

    def failed(self, code: str, usage: Usage) -> None:
        self._end()
        self.metrics.outcome("cancelled" if self.gone else "error")
        if self.gone:
            return
        error = APIError(503 if code == "shutting_down" else 500, code, "Generation failed.")
        if self.stream:
            self._event({"error": {"code": error.code, "message": error.message}})
            self._write(b"data: [DONE]\n\n")
        else:
            self._write(_error(self.request, error))
        self._close()

    # -- output -----------------------------------------------------------------------------
    def _end(self) -> None:
        self.done = True
        if self.budget is not None and self.budget.active():
            self.budget.cancel()
        self.budget = None

    def _chunk(self, content: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == CHAT:
            choice: dict[str, Any] = {"index": 0, "delta": content, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
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


class InferenceAPI(Resource):
    """Routes by exact path; a leaf so that no child lookup ever sees request data."""

    isLeaf = True

    def __init__(
        self,
        scheduler: IScheduler,
        metrics: Metrics,
        clock: Any,
        *,
        model_name: str,
        ctx: int,
        max_tokens: int,
        time_budget: float,
        max_body: int,
        pool: Callable[[Callable[[], Any]], Any] | None = None,
    ):
        super().__init__()
        self.scheduler = scheduler
        self.metrics = metrics
        self.clock = clock
        self.model_name = model_name
        self.ctx = ctx
        self.max_tokens = max_tokens
        self.time_budget = time_budget
        self.max_body = max_body
        self._pool = pool or (lambda f: threads.deferToThread(f))

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.rstrip(b"/") or b"/"
        method = request.method
        gets: dict[bytes, Callable[[server.Request], bytes]] = {
            b"/health": self._health,
            b"/v1/models": self._models,
            b"/metrics": self._metrics,
        }
        posts = {b"/v1/chat/completions": CHAT, b"/v1/completions": COMPLETION, b"/inference": CHAT}
        if path in gets:
            if method not in (b"GET", b"HEAD"):
                return _error(request, APIError(405, "method_not_allowed", "Use GET."))
            return gets[path](request)
        if path in posts:
            if method != b"POST":
                return _error(request, APIError(405, "method_not_allowed", "Use POST."))
            return self._generate(request, posts[path], force_stream=path == b"/inference")
        return _error(request, APIError(404, "not_found", "No such endpoint."))

    def _health(self, request: server.Request) -> bytes:
        if not self.scheduler.loaded:
            return _json(request, 503, {"status": "loading"})
        return _json(request, 200, {"status": "ok"})

    def _models(self, request: server.Request) -> bytes:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "llmrouter"}
        return _json(request, 200, {"object": "list", "data": [model]})

    def _metrics(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()

    # -- generation -------------------------------------------------------------------------
    def _generate(self, request: server.Request, kind: str, force_stream: bool) -> bytes | int:
        arrived = self.clock.seconds()
        try:
            parsed = self._validate(request, kind, force_stream)
        except APIError as e:
            self.metrics.outcome("rejected" if e.status in (413, 503) else "invalid")
            return _error(request, e)
        reply = _Reply(
            request, kind, parsed.stream, self.model_name, self.metrics, self.clock, arrived
        )
        request.notifyFinish().addErrback(lambda _: reply.client_gone())
        d = self._pool(lambda: self._prepare(parsed))
        d.addCallback(self._submit, reply, parsed.sampling, parsed.max_tokens_given)
        d.addErrback(self._refuse, reply)
        return server.NOT_DONE_YET

    def _validate(
        self, request: server.Request, kind: str, force_stream: bool
    ) -> ChatInput | CompletionInput:
        body = request.content.read(self.max_body + 1) if request.content else b""
        if len(body) > self.max_body:
            raise APIError(413, "body_too_large", f"The body exceeds {self.max_body} bytes.")
        data = parse_json(body)
        if kind == CHAT:
            parsed: ChatInput | CompletionInput = parse_chat(data, self.max_tokens, force_stream)
        else:
            parsed = parse_completion(data, self.max_tokens)
        if not self.scheduler.loaded:
            raise APIError(503, "loading", "The model is still loading.", retry_after=5)
        return parsed

    def _prepare(self, parsed: ChatInput | CompletionInput) -> list[int]:
        """Runs in a worker thread: template rendering and tokenizing are CPU work."""
        if isinstance(parsed, ChatInput):
            messages = [{"role": role, "content": content} for role, content in parsed.messages]
            try:
                text = self.scheduler.format_chat(messages)
            except Exception:
                raise invalid(
                    "invalid_messages",
                    "The model's chat template rejected this conversation (check role order).",
                ) from None
            return self.scheduler.tokenize(text, True)
        return self.scheduler.tokenize(parsed.prompt, False)

    def _submit(self, prompt: list[int], reply: _Reply, sampling: Sampling, given: bool) -> None:
        if reply.gone:
            self.metrics.outcome("cancelled")
            return
        room = self.ctx - len(prompt)
        if room < 1 or (given and sampling.max_tokens > room):
            raise invalid(
                "context_length_exceeded",
                f"The prompt ({len(prompt)} tokens) plus max_tokens exceed the context "
                f"size of {self.ctx} tokens.",
            )
        if not given and sampling.max_tokens > room:
            sampling = Sampling(
                max_tokens=room,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=sampling.stop,
                seed=sampling.seed,
            )
        try:
            generation = self.scheduler.submit(prompt, sampling, reply)
        except Overloaded:
            raise APIError(
                503, "overloaded", "All generation slots and the queue are busy.", retry_after=1
            ) from None
        reply.begin(generation, self.time_budget)

    def _refuse(self, failure: Failure, reply: _Reply) -> None:
        if failure.check(APIError):
            error = failure.value
            assert isinstance(error, APIError)
            self.metrics.outcome("rejected" if error.status in (413, 503) else "invalid")
        else:
            # Only the exception type: its message or traceback could carry request content.
            log.error("generation setup failed: {kind}", kind=type(failure.value).__name__)
            self.metrics.outcome("error")
            error = APIError(500, "internal", "Internal error.")
        if reply.gone:
            return
        reply.request.write(_error(reply.request, error))
        reply.request.finish()


class QuietSite(server.Site):
    """A Site without the access log (paths, user agents and referrers are not ours to keep)."""

    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass
