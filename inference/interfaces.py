"""The seams between the HTTP layer and the engine.

The HTTP layer sees a scheduler it can submit tokenized prompts to and a handle per generation it
can pause, resume and cancel; the engine sees a sink it reports to. Every sink method is called on
the reactor thread. ``inference.batched.BatchedScheduler`` is the implementation (continuous
batching); anything providing ``IScheduler`` can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Sampling:
    """Per-request generation parameters, already validated.

    ``grammar`` is GBNF text (root rule ``root``) that every output must match; ``logprobs`` is
    None (none reported) or how many alternatives to report per token (0: the chosen one only);
    ``cache_key`` is the keyed digest that may reuse a finished sequence's KV cache (None: no
    reuse).
    """

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    logprobs: int | None = None
    cache_key: bytes | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its bytes, log-probability, and the most likely alternatives."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


class Overloaded(Exception):
    """Every slot is busy and the waiting queue is full."""


class ITokenSink(Interface):
    """Receives one generation's output on the reactor thread."""

    def started() -> None:
        """The generation got a slot and its prompt is being processed."""

    def text(delta: str, logprobs: tuple[TokenLogprob, ...]) -> None:
        """More completion text, and the tokens sampled since the last call if logprobs were
        asked for (the text may be empty while a stop string or a UTF-8 character is held)."""

    def finished(reason: str, usage: Usage) -> None:
        """The end: reason is stop, length or cancelled; the slot is already free."""

    def failed(code: str, usage: Usage) -> None:
        """The engine could not go on (e.g. out of KV cache); the slot is already free."""


class IGeneration(Interface):
    """A submitted generation, controlled from the reactor thread."""

    def pause() -> None:
        """Leave this sequence out of decode steps until resumed (its state stays in the cache)."""

    def resume() -> None:
        """Put it back into decode steps."""

    def cancel() -> None:
        """Stop at the next step and free the slot; the sink then gets ``finished("cancelled")``."""


class IScheduler(Interface):
    """Runs generations on the model, never on the reactor thread."""

    loaded = Attribute("True once the model is loaded and generations can run.")
    active = Attribute("Number of generations holding a slot.")
    waiting = Attribute("Number of generations waiting for a slot.")
    crashed = Attribute("Deferred fired with an error type name if the worker dies.")
    parallel = Attribute("Number of slots (sequences decoded together).")
    cached = Attribute("Number of idle slots holding a reusable prompt cache.")

    def start() -> object:
        """Load the model in a worker thread; returns a Deferred that fires when it is loaded."""

    def stop() -> object:
        """Cancel everything and stop the worker; returns a Deferred fired once it has exited."""

    def tokenize(text: str, chat: bool) -> list[int]:
        """Tokenize a rendered chat (control tokens parsed) or a plain prompt (thread-safe)."""

    template = Attribute("The model's inference.chat_template.ChatTemplate (once loaded).")
    n_vocab = Attribute("The vocabulary size (once loaded).")

    def check_grammar(grammar: str) -> bool:
        """Whether llama.cpp accepts GBNF ``grammar`` (thread-safe)."""

    def submit(prompt: list[int], sampling: Sampling, sink: ITokenSink) -> IGeneration:
        """Queue a generation or raise ``Overloaded``."""


class IReply(Interface):
    """One request's answer to its choices' output: the HTTP API's ``inference.reply.Reply``
    (OpenAI's shapes, streamed or whole) or the v2 gate's in-process one
    (``inference.gate.engine.EngineReply``, straight into the sealed stream). The generation
    core (``inference.generate.Generator``) drives its lifecycle; its ``Choice`` objects report
    to it. Every method is called on the reactor thread."""

    stream = Attribute("Whether each choice's output is sent as it comes (else kept whole).")
    gone = Attribute("Whether whoever asked has gone away (nothing more is sent).")

    def add_choices(parsers: Any) -> Any:
        """One ``Choice`` per output parser (``n``), the token sinks of their generations."""

    def begin(generations: Any, budget: float) -> None:
        """The generations were submitted; cancel them after ``budget`` seconds."""

    def abandon() -> None:
        """The request was refused after its choices were made: nothing more is sent."""

    def refuse(error: Exception) -> None:
        """Answer with ``error`` (an ``inference.guardrails.APIError``) instead."""

    def saw_text() -> None:
        """A choice produced text (time to first token, token latency)."""

    def send_delta(choice: Any, event: Any, logprobs: Any) -> None:
        """A streamed choice's output event and the logprobs of its tokens."""

    def choice_finished(choice: Any) -> None:
        """A choice ended (its ``reason`` and ``usage`` are set)."""

    def choice_failed(code: str) -> None:
        """A choice's generation failed: the request fails."""
