"""The daemon's settings as one frozen value, built by ``inference.tap`` from options and env."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "unix:/run/llmrouter/inference.sock:mode=660"

# --flash-attn values -> llama.cpp's enum llama_flash_attn_type
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


@dataclass(frozen=True)
class Settings:
    """Everything the service needs; ``ctx`` is the context size of each concurrent sequence."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    model: Path | None = None
    embedded: str = "smollm2-135m-instruct"  # used when model is None (inference.embedded)
    model_name: str | None = None
    threads: int = 2
    ctx: int = 4096
    parallel: int = 4
    max_tokens: int = 1024
    queue: int = 16
    time_budget: float = 300.0
    cache_ttl: float = 300.0
    gpu_layers: int = 0
    allow_cpu_fallback: bool = False  # run GPU-asked layers on the CPU instead of refusing
    flash_attn: str = "auto"
    kv_unified: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    batch: int = 512
    load_delay: float = 0.0  # fault injection for tests (INFERENCE_TEST_LOAD_DELAY)
    max_body: int = 1024 * 1024
    # Protocol v2 (inference.gate): the node's key directory; with front, no model is loaded
    # and the gate opens requests for that model server (its kind: dialect) instead.
    keys_dir: Path | None = None
    front: str | None = None
    dialect: str = "llmrouter"
    stream_cadence_ms: int = 0
    pad_bytes: int = 64
    max_streams: int = 256
