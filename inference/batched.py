"""Continuous batching: every running sequence advances in the same ``llama_decode`` call.

One worker thread owns the llama.cpp context. Each step it frees the slots of cancelled
generations, admits waiting ones into slots (one KV-cache sequence id per slot), then builds
one batch holding the next token of every running sequence plus as much pending prompt as fits,
decodes it once, and samples each sequence with its own sampler chain (logit bias, grammar,
penalties, top-k/top-p/temperature; logprobs read from the raw logits). Paused sequences simply
sit out of the batch, which is how a slow HTTP client pauses its generation without buffering.
Output goes to the reactor with ``callFromThread``; the reactor side only flips flags and
notifies the worker's condition variable.

Prompt cache: a finished sequence's KV cache stays in its slot, labelled with the request's
cache key (a keyed digest; requests without one leave nothing behind). The next request with the
same key takes the slot whose cached tokens share the longest prefix with its prompt and decodes
only the rest. Never across keys, so a cache hit tells nobody anything about another's prompts.
An idle slot is forgotten after ``cache_ttl`` seconds, and the least recently used one is
cleared when new work needs a slot.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from inference.chat_template import ChatTemplate
from inference.interfaces import (
    IGeneration,
    IScheduler,
    ITokenSink,
    Overloaded,
    Sampling,
    TokenLogprob,
    Usage,
)
from inference.model import LlamaModel

TOP_K = 40  # llama.cpp's default first sampler: keeps sampling cheap on 256k vocabularies


@implementer(IGeneration)
class Generation:
    """Reactor-side handle; the flags are read by the worker at every step."""

    def __init__(
        self, scheduler: BatchedScheduler, prompt: list[int], sampling: Sampling, sink: ITokenSink
    ):
        self._scheduler = scheduler
        self.prompt = prompt
        self.sampling = sampling
        self.sink = sink
        self.paused = False
        self.cancelled = False
        self.done = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._scheduler.wake()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._scheduler.wake()


class StopFilter:
    """Holds back text that might be the start of a stop string; cuts at the first stop."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class _Slot:
    """A KV-cache sequence id and what it holds while no generation uses it."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.key: bytes | None = None
        self.tokens: list[int] = []  # the tokens in the KV cache, positions 0..n-1
        self.used = 0.0  # monotonic time it was last released


class _Sequence:
    """Worker-thread state of one generation holding ``slot``."""

    def __init__(self, gen: Generation, slot: _Slot, model: LlamaModel, reused: int):
        self.gen = gen
        self.slot = slot
        self.seq_id = slot.seq_id
        self.prompt = gen.prompt
        self.tokens = list(gen.prompt[:reused])  # tokens decoded into the KV cache
        self.fed = reused  # prompt tokens already in the KV cache
        self.reused = reused
        self.pending: int | None = None  # sampled token not yet decoded
        self.generated = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopFilter(gen.sampling.stop)
        self.sampler = _sampler_chain(gen.sampling, model)
        self.logprobs: list[TokenLogprob] = []
        self.model = model

    @property
    def pos(self) -> int:
        return self.fed + self.generated - (1 if self.pending is not None else 0)

    def usage(self) -> Usage:
        return Usage(len(self.prompt), self.generated, self.reused)

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


def _sampler_chain(sampling: Sampling, model: LlamaModel) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))()
        for i, (token, bias) in enumerate(sampling.logit_bias):
            biases[i].token = llama_cpp.llama_token(token)
            biases[i].bias = bias
        add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
    if sampling.grammar is not None:
        grammar = model.grammar_sampler(sampling.grammar)
        assert grammar is not None, "grammars are checked before they are submitted"
        add(grammar)
    if sampling.presence_penalty or sampling.frequency_penalty:
        add(
            llama_cpp.llama_sampler_init_penalties(
                model.n_vocab,
                sampling.max_tokens,
                1.0,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            )
        )
    if sampling.temperature <= 0.0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_top_k(TOP_K))
    if sampling.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def _logprob(model: LlamaModel, index: int, token: int, top: int) -> TokenLogprob:
    """The sampled token's log-probability under the model (raw logits, before sampling) and
    the ``top`` most likely tokens."""
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, index)
    logits = np.ctypeslib.as_array(pointer, shape=(model.n_vocab,)).astype(np.float64)
    peak = float(logits.max())
    total = peak + float(np.log(np.exp(logits - peak).sum()))
    best: tuple[tuple[bytes, float], ...] = ()
    if top:
        candidates = np.argpartition(-logits, top - 1)[:top]
        ranked = candidates[np.argsort(-logits[candidates])]
        best = tuple((model.output_piece(int(t)), float(logits[t]) - total) for t in ranked)
    return TokenLogprob(model.output_piece(token), float(logits[token]) - total, best)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@implementer(IScheduler)
class BatchedScheduler:
    """``--parallel`` slots decoded together; ``--queue`` more may wait for a slot.

    ``model_path`` is called in the worker thread, so assembling the default model (which reads
    and hashes a few hundred megabytes) does not delay the reactor either. ``on_prompt`` is
    told, per admitted generation, how many prompt tokens it decodes and how many it reused.
    """

    def __init__(
        self,
        reactor: Any,
        model_path: Callable[[], Path],
        *,
        parallel: int,
        queue: int,
        ctx: int,
        threads: int,
        batch: int,
        gpu_layers: int = 0,
        flash_attn: int = -1,
        kv_unified: bool = False,
        cache_ttl: float = 300.0,
        load_delay: float = 0.0,
        on_token: Callable[[int], None] = lambda n: None,
        on_prompt: Callable[[int, int], None] = lambda decoded, reused: None,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._reactor = reactor
        self._model_path = model_path
        self._parallel = parallel
        self._queue_limit = queue
        self._ctx = ctx
        self._threads = threads
        self._batch = batch
        self._gpu_layers = gpu_layers
        self._flash_attn = flash_attn
        self._kv_unified = kv_unified
        self._cache_ttl = cache_ttl
        self._load_delay = load_delay
        self._on_token = on_token
        self._on_prompt = on_prompt
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._active: dict[int, _Sequence] = {}
        self._idle = [_Slot(i) for i in range(parallel)]  # slots no generation holds
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred[None] = defer.Deferred()
        self.crashed: defer.Deferred[str] = defer.Deferred()
        self._outbox: list[tuple[Generation, Callable[..., None], tuple[Any, ...]]] = []
        self._sampled = 0
        self.model: LlamaModel | None = None
        self.loaded = False

    # -- reactor side -----------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def cached(self) -> int:
        """Idle slots holding a reusable KV cache."""
        return sum(1 for slot in self._idle if slot.key is not None)

    @property
    def parallel(self) -> int:
        return self._parallel

    @property
    def template(self) -> ChatTemplate:
        assert self.model is not None
        return self.model.template

    @property
    def n_vocab(self) -> int:
        assert self.model is not None
        return self.model.n_vocab

    def start(self) -> defer.Deferred[int]:
        """Load the model and run its self-test (:meth:`LlamaModel.self_test`) in the worker
        thread; fires with the number of tokens the self-test decoded."""
        loaded: defer.Deferred[int] = defer.Deferred()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name="llama-worker")
        self._thread.daemon = True
        self._thread.start()
        return loaded

    def stop(self) -> defer.Deferred[None]:
        if self._thread is None:
            return defer.succeed(None)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        return self._stopped

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def tokenize(self, text: str, chat: bool) -> list[int]:
        assert self.model is not None
        return self.model.tokenize_chat(text) if chat else self.model.tokenize(text, False)

    def check_grammar(self, grammar: str) -> bool:
        assert self.model is not None
        sampler = self.model.grammar_sampler(grammar)
        if sampler is None:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def submit(self, prompt: list[int], sampling: Sampling, sink: ITokenSink) -> Generation:
        with self._cond:
            busy = len(self._active) + len(self._waiting)
            if self._stopping or busy >= self._parallel + self._queue_limit:
                raise Overloaded()
            gen = Generation(self, prompt, sampling, sink)
            self._waiting.append(gen)
            self._cond.notify()
        return gen

    def _deliver(
        self, items: list[tuple[Generation, Callable[..., None], tuple[Any, ...]]]
    ) -> None:
        for gen, call, args in items:
            if gen.done:
                continue
            if call == gen.sink.finished or call == gen.sink.failed:
                gen.done = True
            call(*args)

    def _crash(self, error: str) -> None:
        self.loaded = False
        self.crashed.callback(error)

    # -- worker thread ----------------------------------------------------------------------
    def _to_reactor(self, gen: Generation, call: Callable[..., None], *args: Any) -> None:
        """Queue a sink call; ``_flush`` hands a whole step's calls over in one wake-up."""
        self._outbox.append((gen, call, args))

    def _flush(self) -> None:
        if self._sampled:
            self._on_token(self._sampled)
            self._sampled = 0
        if self._outbox:
            self._reactor.callFromThread(self._deliver, self._outbox)
            self._outbox = []

    def _run(self, loaded: defer.Deferred[int]) -> None:
        model = None
        try:
            if self._load_delay:
                time.sleep(self._load_delay)
            model = LlamaModel(
                self._model_path(),
                n_ctx_seq=self._ctx,
                n_seq=self._parallel,
                threads=self._threads,
                batch=self._batch,
                gpu_layers=self._gpu_layers,
                flash_attn=self._flash_attn,
                kv_unified=self._kv_unified,
            )
            decoded = model.self_test()
        except Exception as e:
            if model is not None:
                model.close()
            self._reactor.callFromThread(loaded.errback, Failure(e))
            self._reactor.callFromThread(self._stopped.callback, None)
            return
        self.model = model
        self._reactor.callFromThread(self._mark_loaded, loaded, decoded)
        try:
            self._loop(model)
        except Exception as e:
            # Only the type: a message might quote model output.
            self._reactor.callFromThread(self._crash, type(e).__name__)
        finally:
            for seq in list(self._active.values()):
                self._release(seq, keep=False)
                self._to_reactor(seq.gen, seq.gen.sink.failed, "shutting_down", seq.usage())
            with self._cond:
                for gen in self._waiting:
                    self._to_reactor(
                        gen, gen.sink.failed, "shutting_down", Usage(len(gen.prompt), 0)
                    )
                self._waiting.clear()
                for slot in self._idle:
                    self._forget(slot)
            self._flush()
            model.close()
            self._reactor.callFromThread(self._stopped.callback, None)

    def _mark_loaded(self, loaded: defer.Deferred[int], decoded: int) -> None:
        self.loaded = True
        loaded.callback(decoded)

    def _runnable(self) -> bool:
        if self._waiting and (self._idle or any(g.cancelled for g in self._waiting)):
            return True
        return any(s.gen.cancelled or not s.gen.paused for s in self._active.values())

    def _forget(self, slot: _Slot) -> None:
        """Clear a slot's KV cache (worker thread)."""
        if slot.tokens:
            assert self.model is not None
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        slot.key = None
        slot.tokens = []

    def _release(self, seq: _Sequence, keep: bool = True) -> None:
        """Free a sequence's slot; its KV cache stays for the same cache key, if it has one."""
        slot = seq.slot
        seq.free()
        slot.key = seq.gen.sampling.cache_key if keep and self._cache_ttl > 0 else None
        slot.tokens = seq.tokens[: seq.pos]
        if slot.key is None:
            self._forget(slot)
        slot.used = self._monotonic()
        with self._cond:
            del self._active[seq.seq_id]
            self._idle.append(slot)

    def _expire(self) -> float | None:
        """Forget idle caches past their TTL; returns seconds until the next one expires."""
        now = self._monotonic()
        nearest: float | None = None
        for slot in self._idle:
            if slot.key is None:
                continue
            left = slot.used + self._cache_ttl - now
            if left <= 0:
                self._forget(slot)
            elif nearest is None or left < nearest:
                nearest = left
        return nearest

    def _take_slot(self, gen: Generation) -> tuple[_Slot, int]:
        """The slot for ``gen`` and how many of its prompt tokens that slot already holds."""
        key = gen.sampling.cache_key
        best, reused = None, 0
        if key is not None:
            for slot in self._idle:
                if slot.key == key:
                    n = common_prefix(slot.tokens, gen.prompt)
                    if best is None or n > reused:
                        best, reused = slot, n
        empty = [slot for slot in self._idle if slot.key is None]
        # A new conversation shares only a system prompt with this key's other conversations:
        # it takes a free slot rather than cutting another conversation's cache short.
        if best is not None and reused * 2 < len(best.tokens) and empty:
            best = None
        if best is None or reused == 0:
            if empty:  # the lowest id: running sequences stay consecutive (see _fill)
                best = min(empty, key=lambda slot: slot.seq_id)
            else:
                best = min(self._idle, key=lambda slot: slot.used)
            reused = 0
        self._idle.remove(best)
        if reused:
            reused = self._trim(best, min(reused, len(gen.prompt) - 1))
        else:
            self._forget(best)
        return best, reused

    def _trim(self, slot: _Slot, keep: int) -> int:
        """Drop a slot's cache beyond ``keep`` tokens; returns how many stay usable."""
        assert self.model is not None
        memory = self.model.memory
        if keep < len(slot.tokens) and self.model.n_swa > 0:
            # a sliding-window cache no longer holds the window before the end (llama-server
            # makes the same check)
            if llama_cpp.llama_memory_seq_pos_min(memory, slot.seq_id) > max(
                0, keep - self.model.n_swa
            ):
                keep = 0
        if keep <= 0 or not llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, keep, -1):
            self._forget(slot)
            return 0
        slot.tokens = slot.tokens[:keep]
        return keep

    def _admit(self, model: LlamaModel) -> None:
        self._flush()
        with self._cond:
            while not self._stopping and not self._runnable():
                timeout = self._expire()
                self._cond.wait(timeout)
            if self._stopping:
                return
            self._expire()
            kept: deque[Generation] = deque()
            while self._waiting:
                gen = self._waiting.popleft()
                if gen.cancelled:
                    self._to_reactor(gen, gen.sink.finished, "cancelled", Usage(len(gen.prompt), 0))
                elif self._idle:
                    slot, reused = self._take_slot(gen)
                    seq = _Sequence(gen, slot, model, reused)
                    self._active[seq.seq_id] = seq
                    self._on_prompt(len(gen.prompt) - reused, reused)
                    self._to_reactor(gen, gen.sink.started)
                else:
                    kept.append(gen)
            self._waiting = kept

    def _loop(self, model: LlamaModel) -> None:
        capacity = model.n_batch
        batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        try:
            while True:
                self._admit(model)
                if self._stopping:
                    return
                for seq in [s for s in self._active.values() if s.gen.cancelled]:
                    self._release(seq)
                    self._to_reactor(seq.gen, seq.gen.sink.finished, "cancelled", seq.usage())
                outputs = self._fill(batch, capacity)
                if not outputs:
                    continue
                status = llama_cpp.llama_decode(model.ctx, batch)
                if status != 0:
                    for seq, _ in outputs:
                        self._release(seq, keep=False)
                        self._to_reactor(seq.gen, seq.gen.sink.failed, "internal", seq.usage())
                    continue
                for seq, index in outputs:
                    if index >= 0:
                        self._sample(model, seq, index)
        finally:
            llama_cpp.llama_batch_free(batch)

    def _fill(self, batch: Any, capacity: int) -> list[tuple[_Sequence, int]]:
        """Put decode tokens first, then prompt chunks; returns (sequence, output index or -1)."""
        n = 0
        outputs: list[tuple[_Sequence, int]] = []

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq_id
            batch.logits[n] = logits
            n += 1

        # in sequence id order: with a KV cache stream per sequence, llama.cpp puts only runs of
        # consecutive sequence ids into one micro-batch
        running = sorted(
            (s for s in self._active.values() if not s.gen.paused and not s.gen.cancelled),
            key=lambda s: s.seq_id,
        )
        for seq in running:
            if seq.pending is not None and n < capacity:
                add(seq.pending, seq.pos, seq.seq_id, True)
                seq.tokens.append(seq.pending)
                seq.pending = None
                outputs.append((seq, n - 1))
        for seq in running:
            remaining = len(seq.prompt) - seq.fed
            if remaining <= 0 or n >= capacity:
                continue
            take = min(remaining, capacity - n)
            for i in range(seq.fed, seq.fed + take):
                add(seq.prompt[i], i, seq.seq_id, i == len(seq.prompt) - 1)
            seq.tokens.extend(seq.prompt[seq.fed : seq.fed + take])
            seq.fed += take
            outputs.append((seq, n - 1 if seq.fed == len(seq.prompt) else -1))
        batch.n_tokens = n
        return outputs

    def _sample(self, model: LlamaModel, seq: _Sequence, index: int) -> None:
        token = int(llama_cpp.llama_sampler_sample(seq.sampler, model.ctx, index))
        gen = seq.gen
        if model.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        self._sampled += 1
        if gen.sampling.logprobs is not None:
            seq.logprobs.append(_logprob(model, index, token, gen.sampling.logprobs))
        text, stopped = seq.stops.feed(seq.decoder.decode(model.output_piece(token)))
        if text or seq.logprobs:
            self._to_reactor(gen, gen.sink.text, text, tuple(seq.logprobs))
            seq.logprobs = []
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated >= gen.sampling.max_tokens or seq.fed + seq.generated >= model.n_ctx_seq:
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True) -> None:
        if flush:
            rest = seq.stops.feed(seq.decoder.decode(b"", final=True))[0] + seq.stops.flush()
            if rest:
                self._to_reactor(seq.gen, seq.gen.sink.text, rest, ())
        self._release(seq)
        self._to_reactor(seq.gen, seq.gen.sink.finished, reason, seq.usage())
