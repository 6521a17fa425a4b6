"""Our inference daemon against llama-server, same model, same threads, same slots.

Builds nothing: run ``bench/build-llama-server`` first (llama.cpp from the sdist of the pinned
llama-cpp-python, with the CMake arguments ``llmrouter-llama-build`` gives ours, so both sides run
the same ggml code built the same way; ``make llama-server`` caches it in
``~/.cache/llmrouter/``, pass that with ``--llama-server``). Each run prints the CPU features both
libraries report, and says so if they differ. Both servers listen on loopback TCP and
get identical raw-prompt ``/v1/completions`` streams with greedy sampling; every request gets a
distinct prompt and llama-server's prompt cache is off, so neither side reuses a previous prompt.
Rounds alternate between the two servers and the median of each figure is reported, which keeps
the comparison fair on a machine with other load. Prints ours / llama-server ratios:

  single-stream tokens/s (decode rate after the first token), time to first token (a ratio below
  1 means ours is faster), aggregate tokens/s at 4 and 8 concurrent streams.

    .venv/bin/python bench/inference_vs_llama_server.py [--threads 2] [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TWISTD = "from twisted.scripts.twistd import run; run()"

PROMPT = (
    "Request {n}. The following is a detailed history of the city of Paris, from its founding as "
    "a small settlement on an island in the Seine through the Roman period, the Middle Ages, the "
    "Renaissance, the Revolution and the modern era. It describes the people, the buildings, "
    "the streets and the politics of each period in turn, beginning with"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    extra: dict[str, object]

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Result:
    tokens: int
    ttft: float
    decode_rate: float
    started: float
    ended: float


def stream_once(server: Server, n: int, tokens: int) -> Result:
    body = {
        "prompt": PROMPT.format(n=n),
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.extra,
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"{server.name}: HTTP {response.status} {response.read()[:200]!r}")
    first = last = None
    count = 0
    usage_tokens = None
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
    ended = time.perf_counter()
    conn.close()
    total = usage_tokens or count
    assert first is not None and last is not None, f"{server.name} produced no text"
    rate = (total - 1) / (last - first) if last > first else float("nan")
    return Result(total, first - started, rate, started, ended)


def concurrent(server: Server, streams: int, tokens: int, base: int) -> float:
    results: list[Result] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        r = stream_once(server, base + i, tokens)
        with lock:
            results.append(r)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = max(r.ended for r in results) - min(r.started for r in results)
    return sum(r.tokens for r in results) / wall


def default_model() -> Path:
    from inference import embedded

    return embedded.MODELS[embedded.DEFAULT]()


def start_ours(
    model: Path, threads: int, parallel: int, ctx: int, log: Path, kv_unified: bool = False
) -> Server:
    port = free_port()
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "inference"]
    argv += ["--listen", f"tcp:{port}:interface=127.0.0.1", "--model", str(model)]
    argv += ["--threads", str(threads), "--parallel", str(parallel), "--ctx", str(ctx)]
    argv += ["--max-tokens", str(ctx), "--queue", "64"]
    argv += ["--kv-unified"] if kv_unified else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    return Server("ours", port, process, {})


def start_llama_server(
    binary: Path,
    model: Path,
    threads: int,
    parallel: int,
    ctx: int,
    log: Path,
    prompt_cache: bool = False,
    kv_unified: bool = False,
) -> Server:
    """llama-server with the same slots and KV layout; ``prompt_cache`` leaves its prompt
    caches as shipped (slot reuse and the host-memory cache), otherwise both are off."""
    port = free_port()
    argv = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads)]
    argv += ["-c", str(ctx * parallel), "-np", str(parallel)]
    argv += ["-kvu"] if kv_unified else []
    argv += [] if prompt_cache else ["-cram", "0"]
    argv += ["--no-webui", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server("llama-server", port, process, {} if prompt_cache else {"cache_prompt": False})


def server_arguments(parser: argparse.ArgumentParser, ctx: int) -> None:
    """The options both benchmarks share: model, threads, context, llama-server, KV layout."""
    parser.add_argument(
        "--model", type=Path, default=None, help="GGUF (default: the embedded default model)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=ctx)
    parser.add_argument("--llama-server", type=Path, default=HERE / "vendor" / "llama-server")
    parser.add_argument(
        "--kv-unified",
        action="store_true",
        help="one KV buffer for all slots on both sides (default: one per slot, both defaults)",
    )


def start_both(
    args: argparse.Namespace, parallel: int, name: str, prompt_cache: bool = False
) -> tuple[Path, Path, list[Server]]:
    """(model, log directory, [ours, llama-server]) started with the same settings."""
    if not args.llama_server.exists():
        raise SystemExit(f"{args.llama_server} missing: run bench/build-llama-server first")
    model = args.model or default_model()
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    servers = [
        start_ours(model, args.threads, parallel, args.ctx, logs / "ours.log", args.kv_unified),
        start_llama_server(
            args.llama_server,
            model,
            args.threads,
            parallel,
            args.ctx,
            logs / "llama-server.log",
            prompt_cache=prompt_cache,
            kv_unified=args.kv_unified,
        ),
    ]
    return model, logs, servers


def ours_features(log: Path) -> str:
    """The ``CPU : SSE3 = 1 | ...`` report our daemon logged at start."""
    for line in log.read_text(errors="replace").splitlines():
        if "llama.cpp: CPU : " in line:
            return line[line.index("CPU : ") :].strip()
    return "(not in the log)"


def llama_server_features(binary: Path) -> str:
    """``llama_print_system_info()`` of the libllama next to ``binary`` (llama-server does not
    print it), in a child process so that this one never loads a second llama.cpp."""
    library = binary.resolve().parent / "libllama.so"
    code = (
        "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]);"
        " lib.llama_print_system_info.restype = ctypes.c_char_p;"
        " print(lib.llama_print_system_info().decode())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(library)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or f"(cannot read {library})"


def print_builds(args: argparse.Namespace, logs: Path) -> None:
    """What each side's llama.cpp was compiled with, so a comparison never mixes builds."""
    ours, theirs = ours_features(logs / "ours.log"), llama_server_features(args.llama_server)
    print(f"ours:         {ours}\nllama-server: {theirs}")
    recorded = args.llama_server.parent / "cmake-args"  # bench/build-llama-server writes it
    if recorded.exists():
        print(f"llama-server built with: {recorded.read_text().strip()}")
    if ours != theirs:
        print("WARNING: the two llama.cpp builds differ; the ratios compare builds, not servers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    server_arguments(parser, ctx=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, logs, servers = start_both(args, 8, "inference")
    try:
        for s in servers:
            s.wait_ready()
        print_builds(args, logs)
        for s in servers:  # warm-up: first decode allocations, page cache
            stream_once(s, 0, 16)
        figures: dict[str, dict[str, list[float]]] = {
            s.name: {"tps": [], "ttft": [], "agg4": [], "agg8": []} for s in servers
        }
        n = 1
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for s in order:
                single = stream_once(s, n, args.tokens)
                n += 1
                figures[s.name]["tps"].append(single.decode_rate)
                figures[s.name]["ttft"].append(single.ttft)
                figures[s.name]["agg4"].append(concurrent(s, 4, args.tokens, n))
                n += 4
                figures[s.name]["agg8"].append(concurrent(s, 8, args.tokens, n))
                n += 8
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    ours, theirs = figures["ours"], figures["llama-server"]
    print(
        f"model {model.name}, threads {args.threads}, {args.tokens} tokens per stream, "
        f"{args.rounds} rounds (medians), KV {'unified' if args.kv_unified else 'per slot'}"
    )
    print(f"{'figure':<32}{'ours':>12}{'llama-server':>14}{'ratio':>9}   per-round ratios")
    rows = [
        ("single-stream tokens/s", "tps"),
        ("time to first token (s)", "ttft"),
        ("aggregate tokens/s, 4 streams", "agg4"),
        ("aggregate tokens/s, 8 streams", "agg8"),
    ]
    for label, key in rows:
        a, b = statistics.median(ours[key]), statistics.median(theirs[key])
        spread = " ".join(f"{x / y:.2f}" for x, y in zip(ours[key], theirs[key], strict=True))
        print(f"{label:<32}{a:>12.3f}{b:>14.3f}{a / b:>9.3f}   {spread}")
    print(f"(server logs in {logs})")


if __name__ == "__main__":
    main()
