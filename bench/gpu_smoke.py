"""GPU smoke test: a CUDA build, the daemon under the GPU unit's sandbox, every layer offloaded.

What a GPU node's operator (or a release check on a GPU machine) runs to see that the GPU path
works end to end, and how much it brings:

1. builds llama-cpp-python with CUDA into a virtualenv of its own (``llmrouter-llama-build
   --cuda``, the same command as docs/deployment.md's "GPU nodes"; the locked dependencies and
   this checkout installed with it), unless ``--venv`` names one already built;
2. starts ``twistd inference`` as the unit does (``--listen systemd:domain=UNIX:index=0``) under
   the sandbox of ``inference.service`` with ``etc/systemd/inference-gpu.conf`` merged in, through
   the launcher of tests/test_systemd_sandbox.py (root needed: namespaces, seccomp), with
   ``INFERENCE_GPU_LAYERS=-1`` and no CPU fallback, so a build or sandbox that cannot reach the
   GPU makes the daemon refuse to start (and this script fail);
3. streams a greedy chat completion of ``--tokens`` tokens through the socket, after a warm-up,
   and reads ``inference_gpu_layers_offloaded``/``_requested`` from the daemon's metrics;
4. does the same with ``--gpu-layers 0`` (every layer on the CPU, same build, same sandbox) as
   the baseline measured in the same run, and prints the GPU / CPU ratio of decode tokens/s.

    sudo .venv/bin/python bench/gpu_smoke.py [--model PATH.gguf] [--tokens 256] [--venv DIR]

``--cpu-check`` skips the CUDA build and runs both phases on this venv's build with the CPU
fallback allowed: it checks the script's own plumbing on a machine without a GPU (offloaded
layers 0), nothing about GPUs. Results and the command go to docs/benchmarks.md, "GPU smoke".
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TWISTD = "from twisted.scripts.twistd import run; run()"
PROMPT = (
    "Write a long, detailed account of how a city's water supply works, from the reservoir "
    "through treatment, pumping and distribution to the tap, one step after another."
)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 600) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def run(command: list[str], **kw: object) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kw)  # type: ignore[call-overload]


def build_venv(directory: Path) -> Path:
    """A virtualenv with the locked dependencies, this checkout and a CUDA llama-cpp-python."""
    python = directory / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(directory)])
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    run([*pip, "--require-hashes", "--no-deps", "-r", str(ROOT / "requirements" / "node.lock")])
    run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    run([str(python), str(ROOT / "llmrouter" / "ops" / "modelwheel.py"), str(directory / "wheels")])
    wheels = str(directory / "wheels")
    run([*pip, "--no-deps", "--no-index", "--find-links", wheels, "llmrouter-smollm2"])
    run([str(directory / "bin" / "llmrouter-llama-build"), "--cuda", "--python", str(python)])
    return python


def merged_unit(directory: Path) -> Path:
    """inference.service with the GPU drop-in, merged as systemd merges a drop-in (and its
    socket unit beside it, which the launcher reads)."""
    units = ROOT / "etc" / "systemd"
    service, dropin = (units / "inference.service"), (units / "inference-gpu.conf")
    path = directory / "inference.service"
    path.write_text(service.read_text() + "\n" + dropin.read_text())
    shutil.copy(units / "inference.socket", directory / "inference.socket")
    return path


def start(
    python: Path, unit: Path, base: Path, model: str, layers: int, fallback: bool
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    from tests.test_systemd_sandbox import sandbox_argv

    state = base / f"state-{layers}"
    state.mkdir()
    os.chown(state, 65534, 65534)
    sock = base / f"inference-{layers}.sock"
    log = base / f"inference-{layers}.log"
    argv = [str(python), "-c", TWISTD, "-n", "--pidfile=", "inference"]
    argv += ["--listen", "systemd:domain=UNIX:index=0", "--gpu-layers", str(layers)]
    if model:
        argv += ["--model", model]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    if fallback:
        env["INFERENCE_ALLOW_CPU_FALLBACK"] = "1"
    with log.open("wb") as out:
        process = subprocess.Popen(
            sandbox_argv(str(unit), [state], argv, sock),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=state,
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"the daemon exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            if get(sock, "/health")[0] == 200:
                return process, sock, log
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the daemon did not become healthy:\n{log.read_text()[-3000:]}")


def get(sock: Path, path: str) -> tuple[int, bytes]:
    connection = UnixHTTPConnection(str(sock), timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def stream(sock: Path, tokens: int) -> dict[str, float]:
    """One greedy streamed chat completion; decode tokens/s after the first token."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    connection = UnixHTTPConnection(str(sock))
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"chat: {response.status} {response.read()[:500]!r}")
    first = last = 0.0
    pieces = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            now = time.perf_counter()
            first = first or now
            last = now
            pieces += 1
    decode = (pieces - 1) / (last - first) if pieces > 1 and last > first else 0.0
    return {"chunks": pieces, "ttft_s": first - started, "decode_tok_s": decode}


def gauges(sock: Path) -> dict[str, float]:
    text = get(sock, "/metrics")[1].decode()
    found = re.findall(r"(?m)^inference_gpu_layers_(offloaded|requested) (\S+)$", text)
    return {f"layers_{name}": float(value) for name, value in found}


def phase(
    python: Path, unit: Path, base: Path, args: argparse.Namespace, layers: int, fallback: bool
) -> dict[str, float]:
    process, sock, log = start(python, unit, base, args.model, layers, fallback)
    try:
        stream(sock, 16)  # warm-up: CUDA kernels load, caches fill
        results = [stream(sock, args.tokens) for _ in range(args.rounds)]
        best = max(results, key=lambda r: r["decode_tok_s"])
        return {**best, **gauges(sock)}
    finally:
        process.terminate()
        process.wait(60)
        if os.environ.get("GPU_SMOKE_LOGS"):
            print(log.read_text()[-4000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="GGUF file (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=None, help="a venv with a CUDA build")
    parser.add_argument("--cpu-check", action="store_true", help="plumbing check without a GPU")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("gpu_smoke: run as root (the sandbox launcher needs namespaces)")
    if args.cpu_check:
        python = Path(sys.executable)
    elif args.venv is not None and (args.venv / "bin" / "python").exists():
        python = args.venv / "bin" / "python"
    else:
        python = build_venv(args.venv or ROOT / ".venv-gpu")
    if args.model:
        os.chmod(args.model, 0o644)  # the service user reads it
    base = Path(tempfile.mkdtemp(prefix="gpu-smoke-", dir=ROOT))
    os.chmod(base, 0o755)
    try:
        unit = merged_unit(base)
        gpu = phase(python, unit, base, args, -1, fallback=args.cpu_check)
        cpu = phase(python, unit, base, args, 0, fallback=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = gpu["decode_tok_s"] / cpu["decode_tok_s"] if cpu["decode_tok_s"] else 0.0
    report = {"gpu_all_layers": gpu, "cpu_baseline": cpu, "decode_ratio_gpu_over_cpu": ratio}
    print(json.dumps(report, indent=2))
    if not args.cpu_check and gpu.get("layers_offloaded", 0) < gpu.get("layers_requested", 1):
        print("gpu_smoke: FAILED: not every layer was offloaded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
