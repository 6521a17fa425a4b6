"""A tiny random-weight GGUF model for tests.

Real llama.cpp code paths (loading, tokenizing, batching, sampling) without the cost of a real
model: a 2-layer llama with a 64-wide residual stream and a byte-level SentencePiece vocabulary,
about half a megabyte, loaded by llama-cpp-python in milliseconds. The output rows of the control
tokens are zero while every other row is large, so the model practically never emits end-of-
sequence: generations run until ``max_tokens``, which tests about cancellation and backpressure
rely on.

Variants carry a real model's chat template (``tests/data/templates/``) and the special tokens that
template and the model's answers use, with the same token types the real GGUF gives them:
``gpt-oss`` (harmony), ``qwen3`` (``<think>``, ``<tool_call>``), ``llama3`` and
``deepseek-r1``. Their special tokens are never sampled on their own either, only where a grammar
requires them.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

import gguf
import numpy as np

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 4096
SEED = 20261123

_lock = threading.Lock()
_cached: dict[tuple[str, str | None], Path] = {}

BAR = "\uff5c"  # DeepSeek's special tokens use a full-width vertical bar
DEEPSEEK_EOS = f"<{BAR}end\u2581of\u2581sentence{BAR}>"
_CONTROL = gguf.TokenType.CONTROL
_USER = gguf.TokenType.USER_DEFINED
# variant -> (template file, special tokens with their types, end-of-sequence token)
VARIANTS: dict[str, tuple[str, tuple[tuple[str, int], ...], str]] = {
    "gpt-oss": (
        "openai-gpt-oss-120b.jinja",
        tuple(
            (t, _CONTROL)
            for t in (
                "<|start|>",
                "<|end|>",
                "<|message|>",
                "<|channel|>",
                "<|constrain|>",
                "<|return|>",
                "<|call|>",
            )
        ),
        "<|return|>",
    ),
    "qwen3": (
        "Qwen-Qwen3-0.6B.jinja",
        (
            ("<|im_start|>", _CONTROL),
            ("<|im_end|>", _CONTROL),
            ("<think>", _USER),
            ("</think>", _USER),
            ("<tool_call>", _USER),
            ("</tool_call>", _USER),
        ),
        "<|im_end|>",
    ),
    "llama3": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        tuple(
            (t, _CONTROL)
            for t in (
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            )
        ),
        "<|eot_id|>",
    ),
    "deepseek-r1": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        (
            (f"<{BAR}User{BAR}>", _USER),
            (f"<{BAR}Assistant{BAR}>", _USER),
            (DEEPSEEK_EOS, _CONTROL),
            ("<think>", _USER),
            ("</think>", _USER),
        ),
        DEEPSEEK_EOS,
    ),
}


def _vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    # Printable ASCII as whole pieces (and the SentencePiece space) so text decodes as text.
    for char in ["\u2581", *(chr(c) for c in range(0x21, 0x7F))]:
        tokens.append(char.encode())
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(
    path: Path, variant: str = "plain", *, chat_template: str | None = None
) -> Path:
    """Write the tiny model to ``path`` (deterministic weights) and return it: a ``variant``'s
    template and special tokens, with ``chat_template`` (any template) in place of its own."""
    tokens, scores, types = _vocabulary()
    template, eos = CHAT_TEMPLATE, 2
    if variant != "plain":
        name, specials, eos_text = VARIANTS[variant]
        template = (TEMPLATES / name).read_text()
        for text, kind in specials:
            tokens.append(text.encode())
            scores.append(0.0)
            types.append(int(kind))
        eos = [t.decode() for t in tokens].index(eos_text)
    if chat_template is not None:
        template = chat_template
    n_vocab = len(tokens)
    rng = np.random.default_rng(SEED)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llmrouter-test-tiny")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)
    if variant != "plain":
        # like the real models' BPE vocabularies: no space inserted after each special token
        writer.add_add_space_prefix(False)

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(prefix + name + ".weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(prefix + "ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = weight(n_vocab, N_EMBD, scale=3.0)
    output[:3] = 0.0  # <unk>, <s>, </s>: logit 0 against a wide spread of the others
    output[len(_vocabulary()[0]) :] = 0.0  # the variant's special tokens too
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model_path(variant: str = "plain", *, chat_template: str | None = None) -> Path:
    """Build a tiny model once per process, variant and template (in a temp dir removed at
    exit) and return its path."""
    with _lock:
        key = (variant, chat_template)
        cached = _cached.get(key)
        if cached is None or not cached.exists():
            directory = Path(tempfile.mkdtemp(prefix="llmrouter-tinymodel-"))
            atexit.register(shutil.rmtree, directory, True)
            name = "tiny.gguf" if variant == "plain" else f"tiny-{variant}.gguf"
            cached = _cached[key] = write_tiny_model(
                directory / name, variant, chat_template=chat_template
            )
        return cached
