"""The HTTP API: OpenAI-compatible completions, health, models and metrics.

A generation request is validated (``inference.guardrails``) and started by the generation
core shared with the v2 gate's in-process path (``inference.generate.Generator``: prepared in a
worker thread, submitted to the scheduler once per choice), and answered by an
``inference.reply.Reply``. Nothing from a request body or header is ever logged.

The prompt cache key comes in the ``X-LLMRouter-Cache-Key`` header (the router sends a keyed
hash of the device; direct API users may send a secret of their own). It is hashed again with a
key of this process before the scheduler sees it; without it, nothing is reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from inference.generate import Generator
from inference.guardrails import (
    APIError,
    ChatInput,
    CompletionInput,
    invalid,
    parse_chat,
    parse_completion,
    parse_json,
)
from inference.interfaces import IScheduler
from inference.metrics import Metrics
from inference.reply import CHAT, COMPLETION, Reply, error_response, json_response
from llmrouter.bodies import InMemoryRequest

log = Logger()

CACHE_KEY_HEADER = b"x-llmrouter-cache-key"


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
        self.max_tokens = max_tokens
        self.max_body = max_body
        self.generator = Generator(scheduler, metrics, ctx=ctx, time_budget=time_budget, pool=pool)

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
                return error_response(request, APIError(405, "method_not_allowed", "Use GET."))
            return gets[path](request)
        if path in posts:
            if method != b"POST":
                return error_response(request, APIError(405, "method_not_allowed", "Use POST."))
            return self._generate(request, posts[path], force_stream=path == b"/inference")
        return error_response(request, APIError(404, "not_found", "No such endpoint."))

    def _health(self, request: server.Request) -> bytes:
        if not self.scheduler.loaded:
            return json_response(request, 503, {"status": "loading"})
        return json_response(request, 200, {"status": "ok"})

    def _models(self, request: server.Request) -> bytes:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "llmrouter"}
        return json_response(request, 200, {"object": "list", "data": [model]})

    def _metrics(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()

    # -- generation -------------------------------------------------------------------------
    def _generate(self, request: server.Request, kind: str, force_stream: bool) -> bytes | int:
        arrived = self.clock.seconds()
        try:
            parsed = self._validate(request, kind, force_stream)
            cache_key = self._cache_key(request)
        except APIError as e:
            self.generator.rejected(e)
            return error_response(request, e)
        reply = Reply(
            request, kind, parsed.stream, self.model_name, self.metrics, self.clock, arrived
        )
        request.notifyFinish().addErrback(lambda _: reply.client_gone())
        self.generator.start(parsed, reply, cache_key)
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
        self.generator.check(parsed)
        return parsed

    def _cache_key(self, request: server.Request) -> bytes | None:
        values = request.requestHeaders.getRawHeaders(CACHE_KEY_HEADER)
        if not values:
            return None
        if len(values) != 1:
            raise invalid(
                "invalid_cache_key",
                "X-LLMRouter-Cache-Key must be one value of 16-256 URL-safe characters.",
            )
        return self.generator.cache_key(values[0])


class QuietSite(server.Site):
    """A Site without the access log (paths, user agents and referrers are not ours to keep),
    whose request bodies (plaintext prompts, v2's sealed ones) stay in memory, bounded by
    ``max_body``: Twisted's default request spools a body of 100 KB or more to a temporary
    file. Every listener of the daemon serves through one (the API, the v2 gate in front of
    it, the gate of a fronting node)."""

    displayTracebacks = False
    requestFactory = InMemoryRequest

    def __init__(self, resource: Resource, max_body: int, metrics: Metrics, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self._metrics = metrics

    def too_large_body(self) -> bytes:
        self._metrics.outcome("rejected")
        return APIError(413, "body_too_large", f"The body exceeds {self.max_body} bytes.").body()

    def log(self, request: Any) -> None:
        pass
