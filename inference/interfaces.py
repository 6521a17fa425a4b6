"""The seams between the HTTP layer and the engine.

The HTTP layer sees a scheduler it can submit tokenized prompts to and a handle per generation it
can pause, resume and cancel; the engine sees a sink it reports to. Every sink method is called on
the reactor thread. ``inference.batched.BatchedScheduler`` is the implementation (continuous
batching); anything providing ``IScheduler`` can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Sampling:
    """Per-request generation parameters, already validated."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class Overloaded(Exception):
    """Every slot is busy and the waiting queue is full."""


class ITokenSink(Interface):
    """Receives one generation's output on the reactor thread."""

    def started() -> None:
        """The generation got a slot and its prompt is being processed."""

    def text(delta: str) -> None:
        """More completion text (never empty)."""

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

    def start() -> object:
        """Load the model in a worker thread; returns a Deferred that fires when it is loaded."""

    def stop() -> object:
        """Cancel everything and stop the worker; returns a Deferred fired once it has exited."""

    def tokenize(text: str, chat: bool) -> list[int]:
        """Tokenize a rendered chat (control tokens parsed) or a plain prompt (thread-safe)."""

    def format_chat(messages: list[dict[str, str]]) -> str:
        """Render messages with the model's chat template."""

    def submit(prompt: list[int], sampling: Sampling, sink: ITokenSink) -> IGeneration:
        """Queue a generation or raise ``Overloaded``."""
