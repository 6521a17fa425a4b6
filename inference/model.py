"""One GGUF model and its llama.cpp context, through llama-cpp-python's low-level API.

Loading is blocking and must happen off the reactor thread. After that, ``tokenize``,
``template``, ``grammar_sampler`` and ``piece`` only read the vocabulary and are safe from any
thread; the context itself belongs to the scheduler's worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from inference.chat_template import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    MARKERS,
    ChatTemplate,
)

_backend_ready = False
_log_open = True  # llama.cpp's warnings and errors reach stderr only while a model loads
_log_shown = False
_WARN, _ERROR, _CONT = 3, 4, 5  # enum ggml_log_level


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """After loading, llama.cpp's log lines could quote a request (a grammar, a prompt piece)."""
    global _log_shown
    if level != _CONT:
        _log_shown = _log_open and level in (_WARN, _ERROR)
    if _log_shown:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """llama.cpp's grammar parser prints a rejected grammar, whole, with fprintf(stderr)."""
    with _stderr_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


def model_params(gpu_layers: int) -> Any:
    """llama_model_params: ``gpu_layers`` layers offloaded (-1: all), the rest on the CPU."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
    return params


def context_params(
    *,
    n_ctx_seq: int,
    n_seq: int,
    threads: int,
    batch: int,
    flash_attn: int,
    kv_unified: bool = False,
) -> Any:
    """llama_context_params for ``n_seq`` sequences of ``n_ctx_seq`` tokens each.

    By default every sequence has a KV cache stream of its own, so a token attends only to its
    own sequence's cells, however much other slots keep for the prompt cache; ``kv_unified``
    puts all sequences in one buffer (cheaper for many short, unrelated requests, but then each
    token's attention spans every cached conversation).
    """
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx_seq * n_seq
    cparams.n_seq_max = n_seq
    cparams.n_batch = max(batch, n_seq)
    cparams.n_ubatch = min(cparams.n_ubatch, cparams.n_batch)
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.flash_attn_type = flash_attn
    cparams.kv_unified = kv_unified
    cparams.swa_full = False
    cparams.no_perf = True
    return cparams


class ModelLoadError(Exception):
    """The file is missing or llama.cpp refused it (message carries only the path)."""


# The start-up self-test's prompt: long enough to be decoded as a batch of several tokens (the
# matrix kernels of prompt processing), then a few tokens one at a time (those of generation).
SELF_TEST_PROMPT = (
    "A short test of the model: count from one to ten, then name the colours of the rainbow"
    " and the days of the week, in order."
)
SELF_TEST_TOKENS = 4


class LlamaModel:
    """The loaded model: vocabulary helpers plus a context for ``n_seq`` parallel sequences."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx_seq: int,
        n_seq: int,
        threads: int,
        batch: int,
        gpu_layers: int = 0,
        flash_attn: int = -1,
        kv_unified: bool = False,
    ):
        global _backend_ready, _log_open
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        if not _backend_ready:
            llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
        _log_open = True
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), model_params(gpu_layers)
        )
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._pieces: dict[int, bytes] = {}
        cparams = context_params(
            n_ctx_seq=n_ctx_seq,
            n_seq=n_seq,
            threads=threads,
            batch=batch,
            flash_attn=flash_attn,
            kv_unified=kv_unified,
        )
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path}")
        _log_open = False
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model))
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.model))
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_ctx_seq = n_ctx_seq
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        template = self.metadata("tokenizer.chat_template")
        if not template:
            architecture = self.metadata("general.architecture") or ""
            template = GEMMA_TEMPLATE if architecture.startswith("gemma") else CHATML_TEMPLATE
        self.template = ChatTemplate(
            template,
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self.vocab)),
            bos_token=self._special_text(llama_cpp.llama_vocab_bos(self.vocab)),
        )
        # tokens written out as their text (the output parser needs them)
        self.markers = frozenset(
            tokens[0]
            for tokens in (self.tokenize(m, special=True) for m in MARKERS)
            if len(tokens) == 1 and not self.is_eog(tokens[0])
        )

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens and skips the implicit BOS."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        add_special = not special
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, special
        )
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, special
            )
        return list(tokens[:n])

    def tokenize_chat(self, text: str) -> list[int]:
        """Tokens of a rendered chat: control tokens parsed, BOS added if the template did not."""
        tokens = self.tokenize(text, special=True)
        if self.add_bos and self.bos >= 0 and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    def grammar_sampler(self, grammar: str) -> Any:
        """A grammar sampler for GBNF ``grammar`` (root rule ``root``), or None if it is invalid."""
        with _stderr_silenced():
            sampler = llama_cpp.llama_sampler_init_grammar(
                self.vocab, grammar.encode("utf-8"), b"root"
            )
        return sampler or None

    def output_piece(self, token: int) -> bytes:
        """A generated token's bytes, special tokens the output parser reads written out."""
        return self.piece(token, special=token in self.markers)

    def piece(self, token: int, special: bool = False) -> bytes:
        if not special:
            cached = self._pieces.get(token)
            if cached is not None:
                return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        piece = buf.raw[:n]
        if not special:
            self._pieces[token] = piece
        return piece

    def self_test(self, tokens: int = SELF_TEST_TOKENS) -> int:
        """Decode a fixed prompt and ``tokens`` greedy tokens on sequence 0, then forget them.

        Proves that llama.cpp runs this model here before the daemon says it is ready: a build
        whose kernels fault on this CPU kills the process now, at start (a failed start to the
        service manager), not on the first user's request; a decode error or non-finite logits
        raise ``ModelLoadError``. Returns the number of tokens decoded.
        """
        prompt = self.tokenize(SELF_TEST_PROMPT, special=False)
        prompt = prompt[: max(1, min(self.n_batch, self.n_ctx_seq - tokens - 1))]
        batch = llama_cpp.llama_batch_init(len(prompt), 0, 1)
        sampler = llama_cpp.llama_sampler_init_greedy()
        pending, pos = prompt, 0
        try:
            for _ in range(tokens + 1):
                for i, token in enumerate(pending):
                    batch.token[i] = token
                    batch.pos[i] = pos + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = i == len(pending) - 1
                batch.n_tokens = len(pending)
                if llama_cpp.llama_decode(self.ctx, batch) != 0:
                    raise ModelLoadError(f"self-test: llama_decode failed after {pos} tokens")
                pos += len(pending)
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)
                )
                if not np.isfinite(logits).all():
                    raise ModelLoadError(f"self-test: non-finite logits after {pos} tokens")
                pending = [int(llama_cpp.llama_sampler_sample(sampler, self.ctx, -1))]
        finally:
            llama_cpp.llama_sampler_free(sampler)
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
        return pos

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
