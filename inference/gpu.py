"""GPU offload: whether this build can do what the settings ask, and how many layers it does.

A GPU node upgraded with a llama-cpp-python built without CUDA (a plain ``pip install``) used to
run on the CPU, healthy, forty times slower. So layers asked for on a build that cannot offload
stop the daemon at start with a message saying what to do, unless the operator allows the CPU
fallback explicitly (``INFERENCE_ALLOW_CPU_FALLBACK=1``); and the layers offloaded are exported
next to the layers asked for, so that an alert fires whatever the setting.
"""

from __future__ import annotations

__all__ = ["offload_refusal", "offloaded_layers", "requested_layers"]


def offload_refusal(gpu_layers: int, can_offload: bool, allow_cpu_fallback: bool) -> str | None:
    """Why the daemon must not start (None: it may): layers asked for, no GPU to put them on."""
    if gpu_layers == 0 or can_offload or allow_cpu_fallback:
        return None
    return (
        f"twistd inference: --gpu-layers {gpu_layers} [INFERENCE_GPU_LAYERS], but this"
        " llama-cpp-python cannot offload to a GPU (built without CUDA or Vulkan, or no GPU"
        " device is visible to the service). Build it for the GPU with `llmrouter-llama-build"
        ' --cuda` (docs/deployment.md, "GPU nodes"), check the GPU drop-in'
        " (etc/systemd/inference-gpu.conf), or set INFERENCE_ALLOW_CPU_FALLBACK=1 to run every"
        " layer on the CPU on purpose."
    )


def requested_layers(gpu_layers: int, n_layer: int) -> int:
    """Layers the settings ask for, counted as llama.cpp counts them: the model's ``n_layer``
    repeating layers plus its output layer (so -1, "all", is ``n_layer + 1``)."""
    total = n_layer + 1
    return total if gpu_layers < 0 else min(gpu_layers, total)


def offloaded_layers(gpu_layers: int, n_layer: int, can_offload: bool) -> int:
    """Layers llama.cpp puts on a GPU: the ones asked for when a GPU device is there, else none
    (llama.cpp's ``load_tensors``: ``min(n_gpu_layers, n_layer + 1)`` when it has a device)."""
    return requested_layers(gpu_layers, n_layer) if can_offload else 0
