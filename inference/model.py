"""One GGUF model and its llama.cpp context, through llama-cpp-python's low-level API.

Loading is blocking and must happen off the reactor thread. After that, ``tokenize``,
``format_chat`` and ``piece`` only read the vocabulary and are safe from any thread; the context
itself belongs to the scheduler's worker thread.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp._logger import set_verbose
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

_backend_ready = False

# Used when a GGUF carries no chat template (the embedded Gemma 3 270M has none): Gemma's turn
# format for Gemma models, ChatML (llama-server's fallback too) for anything else.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelLoadError(Exception):
    """The file is missing or llama.cpp refused it (message carries only the path)."""


class LlamaModel:
    """The loaded model: vocabulary helpers plus a context for ``n_seq`` parallel sequences."""

    def __init__(self, path: Path, *, n_ctx_seq: int, n_seq: int, threads: int, batch: int):
        global _backend_ready
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        if not _backend_ready:
            set_verbose(False)  # llama.cpp's info logs: errors only, on stderr
            llama_cpp.llama_backend_init()
            _backend_ready = True
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._pieces: dict[int, bytes] = {}
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_seq_max = n_seq
        cparams.n_batch = max(batch, n_seq)
        cparams.n_ubatch = min(cparams.n_ubatch, cparams.n_batch)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.swa_full = False
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path}")
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
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self.vocab)),
            bos_token=self._special_text(llama_cpp.llama_vocab_bos(self.vocab)),
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

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        formatted: Any = self._formatter(messages=messages)  # type: ignore[arg-type]
        return str(formatted.prompt)

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

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
