"""The engine's request path, shared by every way a request reaches it.

The HTTP API (:class:`inference.api.InferenceAPI`) and the v2 gate's in-process call
(:mod:`inference.gate.engine`) answer differently (OpenAI's shapes over HTTP, or the sealed
stream's token sink), but a generation starts the same way for both: a validated request is
checked against the scheduler, prepared in a worker thread, checked against the context size,
submitted once per choice with the keyed prompt-cache key, and handed to its ``IReply`` with the
time budget; a refusal (``APIError``) is counted and answered by that reply. Nothing from a
request is ever logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from inference.guardrails import APIError, ChatInput, CompletionInput, invalid
from inference.interfaces import IGeneration, IReply, IScheduler, Overloaded
from inference.metrics import Metrics
from inference.prepare import Prepared, prepare

__all__ = ["Generator"]

log = Logger()

_CACHE_KEY = re.compile(rb"[A-Za-z0-9._~+/=-]{16,256}")


class Generator:
    """Starts generations on ``scheduler`` (see the module docstring). The prompt-cache key a
    request brings is hashed again under a key of this process before the scheduler sees it."""

    def __init__(
        self,
        scheduler: IScheduler,
        metrics: Metrics,
        *,
        ctx: int,
        time_budget: float,
        pool: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.ctx = ctx
        self.time_budget = time_budget
        self._pool = pool or (lambda f: threads.deferToThread(f))
        self._cache_salt = secrets.token_bytes(32)

    def check(self, parsed: ChatInput | CompletionInput) -> None:
        """What a valid request may still be refused for here (``APIError``)."""
        if parsed.n > self.scheduler.parallel:
            raise invalid(
                "invalid_n",
                f"n must not exceed {self.scheduler.parallel} (the server's parallel slots).",
                "n",
            )
        if not self.scheduler.loaded:
            raise APIError(503, "loading", "The model is still loading.", retry_after=5)

    def cache_key(self, value: bytes | None) -> bytes | None:
        """The scheduler's key for a request's cache key (None: no reuse)."""
        if value is None:
            return None
        if not _CACHE_KEY.fullmatch(value):
            raise invalid(
                "invalid_cache_key",
                "X-LLMRouter-Cache-Key must be one value of 16-256 URL-safe characters.",
            )
        return hashlib.blake2b(value, key=self._cache_salt, digest_size=16).digest()

    def rejected(self, error: APIError) -> None:
        """Count a refusal."""
        self.metrics.outcome("rejected" if error.status in (413, 503) else "invalid")

    def start(
        self, parsed: ChatInput | CompletionInput, reply: IReply, cache_key: bytes | None
    ) -> None:
        """Prepare ``parsed`` in the pool, then submit it; ``reply`` gets the output or the
        refusal."""
        d = self._pool(lambda: prepare(self.scheduler, parsed))
        d.addCallback(self._submit, reply, parsed, cache_key)
        d.addErrback(self._refuse, reply)

    def _submit(
        self,
        prepared: Prepared,
        reply: IReply,
        parsed: ChatInput | CompletionInput,
        cache_key: bytes | None,
    ) -> None:
        if reply.gone:
            self.metrics.outcome("cancelled")
            return
        prompt, sampling = prepared.prompt, prepared.sampling
        room = self.ctx - len(prompt)
        given = parsed.max_tokens_given
        if room < 1 or (given and sampling.max_tokens > room):
            raise invalid(
                "context_length_exceeded",
                f"The prompt ({len(prompt)} tokens) plus max_tokens exceed the context "
                f"size of {self.ctx} tokens.",
            )
        sampling = dataclasses.replace(
            sampling, max_tokens=min(sampling.max_tokens, room), cache_key=cache_key
        )
        choices = reply.add_choices([prepared.parser() for _ in range(parsed.n)])
        generations: list[IGeneration] = []
        try:
            for choice in choices:
                seed = None if sampling.seed is None else sampling.seed + choice.index
                each = dataclasses.replace(sampling, seed=seed)
                generations.append(self.scheduler.submit(prompt, each, choice))
        except Overloaded:
            reply.abandon()
            for generation in generations:
                generation.cancel()
            raise APIError(
                503, "overloaded", "All generation slots and the queue are busy.", retry_after=1
            ) from None
        reply.begin(generations, self.time_budget)

    def _refuse(self, failure: Failure, reply: IReply) -> None:
        if failure.check(APIError):
            error = failure.value
            assert isinstance(error, APIError)
            self.rejected(error)
        else:
            # Only the exception type: its message or traceback could carry request content.
            log.error("generation setup failed: {kind}", kind=type(failure.value).__name__)
            self.metrics.outcome("error")
            error = APIError(500, "internal", "Internal error.")
        reply.refuse(error)
