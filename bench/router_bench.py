"""Router benchmark: what does the encrypted front door cost, and how much can it carry?

Part 1 (same backend, same prompts, one run): tokens/s and time to first token through the
router (HPKE, padding, sealed SSE) divided by the same figures straight from the inference
daemon's OpenAI API; requests alternate direct / routed so both see the same machine load.

Part 2 (synthetic backend that streams as fast as the connection takes it): the router's sealed
chunks per second on one core (the router process is pinned with taskset), and how many
concurrent open streams it holds, with p50/p95/p99 per-chunk delay (backend send -> client
verified, the backend stamps CLOCK_MONOTONIC into each token). The load generator is this
script, on Twisted; everything is on loopback and bounded in count and time.

    .venv/bin/python bench/router_bench.py [--model PATH] [--streams 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http_headers import Headers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrouter.httpclient import agent_for  # noqa: E402
from llmrouter.protocol import (  # noqa: E402
    ChatRequest,
    Delta,
    ResponseOpener,
    seal_request,
    verify_key_document,
)
from llmrouter.sse import SSEParser  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash function is.",
    "List three uses of copper.",
    "Describe a sunrise in two sentences.",
]
TWISTD = "from twisted.scripts.twistd import run; run()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], cpu: str | None = None):
        if cpu and shutil.which("taskset"):
            argv = ["taskset", "-c", cpu, *argv]
        self.log = log
        self.popen = subprocess.Popen(
            argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.popen.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def wait_healthy(reactor: Any, url: str, proc: Proc, timeout: float = 180) -> None:
    agent, base = agent_for(reactor, url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.log.name} exited:\n{proc.log.read_text()[-3000:]}")
        try:
            response = await agent.request(b"GET", (base + "/health").encode())
            await readBody(response)
            if response.code == 200:
                return
        except Exception:
            pass
        await task.deferLater(reactor, 0.1, lambda: None)
    raise SystemExit(f"{proc.log.name} not healthy in time")


class _Body(Protocol):
    """Collects a streamed body, timestamping the first data and decoding events on the fly."""

    def __init__(self, on_data: Any) -> None:
        self.on_data = on_data
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _producer(body: bytes) -> FileBodyProducer:
    from io import BytesIO

    return FileBodyProducer(BytesIO(body))


class Router:
    """Client side of the router for the load generator."""

    def __init__(self, reactor: Any, url: str, pool: HTTPConnectionPool | None = None) -> None:
        self.reactor = reactor
        self.agent, self.base = agent_for(reactor, url, pool=pool)
        self.key: Any = None

    async def fetch_key(self) -> None:
        response = await self.agent.request(b"GET", (self.base + "/api/pubkey").encode())
        self.key = verify_key_document(await readBody(response), now=time.time()).current()

    async def stream(self, request: ChatRequest, on_delta: Any) -> tuple[float, int]:
        """Returns (ttft seconds, deltas); ``on_delta(text, t)`` for each verified delta."""
        env, state = seal_request(self.key, request, int(time.time()))
        started = time.monotonic()
        response = await self.agent.request(
            b"POST",
            (self.base + "/api/chat").encode(),
            Headers({b"Content-Type": [b"application/json"]}),
            _producer(json.dumps(env.to_json()).encode()),
        )
        if response.code != 200:
            body = await readBody(response)
            raise RuntimeError(f"router answered {response.code}: {body[:200]!r}")
        opener = ResponseOpener(state)
        first = [0.0]
        count = [0]

        def on_data(data: bytes) -> None:
            now = time.monotonic()
            for item in opener.feed(data):
                if isinstance(item, Delta) and item.text:
                    if not count[0]:
                        first[0] = now
                    count[0] += 1
                    on_delta(item.text, now)

        body = _Body(on_data)
        response.deliverBody(body)
        await body.done
        opener.close()
        return first[0] - started, count[0]


async def direct_stream(
    agent: Any, base: str, request: ChatRequest, on_delta: Any = None
) -> tuple[float, float, int]:
    """Straight to the backend's OpenAI API: (ttft, seconds from first to last token, tokens)."""
    started = time.monotonic()
    body = json.dumps(request.to_openai()).encode()
    response = await agent.request(
        b"POST",
        (base + "/v1/chat/completions").encode(),
        Headers({b"Content-Type": [b"application/json"]}),
        _producer(body),
    )
    parser = SSEParser()
    times: list[float] = []

    def on_data(data: bytes) -> None:
        now = time.monotonic()
        for _, payload in parser.feed(data):
            if payload.strip() == "[DONE]":
                continue
            doc = json.loads(payload)
            choices = doc.get("choices") or []
            text = (choices[0].get("delta") or {}).get("content") if choices else None
            if text:
                times.append(now)
                if on_delta is not None:
                    on_delta(text, now)

    collector = _Body(on_data)
    response.deliverBody(collector)
    await collector.done
    return times[0] - started, times[-1] - times[0], len(times)


async def concurrent(reactor: Any, args: argparse.Namespace, start: Any) -> dict[str, Any]:
    """``args.streams`` streams opened in steps of 50; per-chunk delay backend -> client."""
    delays: list[float] = []
    steady: list[float] = []
    state = {"streaming": 0, "max_streaming": 0, "errors": 0, "ramped": 0}
    error_kinds: dict[str, int] = {}

    async def one() -> None:
        request = ChatRequest.from_prompt("x", max_tokens=args.slow_tokens)
        seen = [False]

        def on_delta(text: str, now: float) -> None:
            if not seen[0]:
                seen[0] = True
                state["streaming"] += 1
                state["max_streaming"] = max(state["max_streaming"], state["streaming"])
                if state["max_streaming"] == args.streams:
                    state["ramped"] = 1
            for stamp in text.split():
                delay = now - float(stamp)
                delays.append(delay)
                if state["ramped"]:
                    steady.append(delay)

        try:
            await start(request, on_delta)
        except Exception as e:
            state["errors"] += 1
            kind = str(e)[:80] or type(e).__name__
            error_kinds[kind] = error_kinds.get(kind, 0) + 1
        finally:
            if seen[0]:
                state["streaming"] -= 1

    cpu0 = _self_cpu()
    wall0 = time.monotonic()
    running = []
    for i in range(args.streams):
        running.append(defer.Deferred.fromCoroutine(one()))
        if i % 50 == 49:
            await task.deferLater(reactor, 0.05, lambda: None)
    await defer.gatherResults(running)
    return {
        "seconds": time.monotonic() - wall0,
        "loadgen_cpu_seconds": _self_cpu() - cpu0,
        "max_streaming_at_once": state["max_streaming"],
        "errors": state["errors"],
        "error_kinds": error_kinds,
        "chunks": len(delays),
        "delay_p50_ms": percentile(delays, 50) * 1000,
        "delay_p95_ms": percentile(delays, 95) * 1000,
        "delay_p99_ms": percentile(delays, 99) * 1000,
        "steady_chunks": len(steady),
        "steady_delay_p50_ms": percentile(steady, 50) * 1000,
        "steady_delay_p95_ms": percentile(steady, 95) * 1000,
        "steady_delay_p99_ms": percentile(steady, 99) * 1000,
    }


def router_env(directory: Path, backend: str, port: int, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "LLMROUTER_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "KEYS_DIR": str(directory / "keys"),
            "INFERENCE_ENDPOINTS": backend,
            "LISTEN": f"tcp:{port}:interface=127.0.0.1:backlog=2048",
            "METRICS_LISTEN": f"tcp:{metrics_port}:interface=127.0.0.1",
            "RATE_LIMIT_PER_MINUTE": "10000000",
            "RATE_LIMIT_BURST": "1000000",
            "MAX_STREAMS": "4096",
            "POW_THRESHOLD_STREAMS": "0",
            "POW_THRESHOLD_RPS": "0",
            "HEALTH_INTERVAL_SECONDS": "1",
            "FIRST_TOKEN_TIMEOUT_SECONDS": "120",
            "IDLE_TIMEOUT_SECONDS": "60",
        }
    )
    return env


def start_router(directory: Path, backend: str, cpu: str | None) -> tuple[Proc, str]:
    port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile="]
    if os.environ.get("ROUTER_BENCH_PROFILE"):  # twistd's own profiler, stats to that file
        argv += [
            "--profile",
            os.environ["ROUTER_BENCH_PROFILE"],
            "--profiler=cprofile",
            "--savestats",
        ]
    argv.append("llmrouter")
    proc = Proc(
        argv, directory / "router.log", router_env(directory, backend, port, metrics_port), cpu
    )
    return proc, f"http://127.0.0.1:{port}"


async def part1(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    model = args.model
    if model is None:
        from tests.tinymodel import tiny_model_path

        model = str(tiny_model_path())
    socket_path = directory / "inference.sock"
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "inference"]
    argv += ["--listen", f"unix:{socket_path}", "--model", model, "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    inference = Proc(argv, directory / "inference.log", env)
    router, url = start_router(directory, f"unix:{socket_path}", None)
    try:
        await wait_healthy(reactor, f"unix:{socket_path}", inference)
        await wait_healthy(reactor, url, router)
        # Keep-alive on both paths, as in production (the TLS proxy keeps its connections to the
        # router open): neither side pays a connect, so the difference is the router's own work.
        client = Router(reactor, url, HTTPConnectionPool(reactor, persistent=True))
        await client.fetch_key()
        agent, base = agent_for(
            reactor, f"unix:{socket_path}", pool=HTTPConnectionPool(reactor, persistent=True)
        )
        direct: list[tuple[float, float, int]] = []
        routed: list[tuple[float, float, int]] = []
        for i in range(args.rounds):
            # Same prompt both ways, apart from a fixed-width counter that defeats prompt caching;
            # the order alternates so neither path always runs on a warmer machine.
            def request(n: int, i: int = i) -> ChatRequest:
                text = f"{PROMPTS[i % len(PROMPTS)]} (run {n:04d})"
                return ChatRequest.from_prompt(text, max_tokens=args.max_tokens, temperature=0.0)

            async def via_router(n: int) -> tuple[float, float, int]:
                times: list[float] = []
                ttft, _ = await client.stream(request(n), lambda text, t: times.append(t))
                return ttft, times[-1] - times[0], len(times)

            if i % 2 == 0:
                direct.append(await direct_stream(agent, base, request(2 * i)))
                routed.append(await via_router(2 * i + 1))
            else:
                routed.append(await via_router(2 * i))
                direct.append(await direct_stream(agent, base, request(2 * i + 1)))
    finally:
        router.stop()
        inference.stop()

    def rate(samples: list[tuple[float, float, int]]) -> float:
        return sum(n - 1 for _, _, n in samples) / sum(span for _, span, _ in samples)

    d_ttft = [t for t, _, _ in direct]
    r_ttft = [t for t, _, _ in routed]
    return {
        "rounds": args.rounds,
        "tokens_per_request": statistics.median(n for _, _, n in routed),
        "direct_tokens_per_s": rate(direct),
        "routed_tokens_per_s": rate(routed),
        "throughput_ratio": rate(routed) / rate(direct),
        "direct_ttft_p50_ms": statistics.median(d_ttft) * 1000,
        "routed_ttft_p50_ms": statistics.median(r_ttft) * 1000,
        "added_ttft_p50_ms": (statistics.median(r_ttft) - statistics.median(d_ttft)) * 1000,
        "added_ttft_paired_median_ms": statistics.median(
            (r - d) * 1000 for r, d in zip(r_ttft, d_ttft, strict=True)
        ),
        "ttft_ratio": statistics.median(r_ttft) / statistics.median(d_ttft),
    }


async def part2(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    synth_sock = directory / "synth.sock"
    synth_argv = [sys.executable, str(ROOT / "bench" / "router_synthetic_backend.py")]
    synth_argv += [
        "--listen",
        f"unix:{synth_sock}:backlog=4096",
        "--tokens",
        str(args.burst_tokens),
    ]
    synth = Proc(synth_argv, directory / "synth.log", dict(os.environ))
    slow_sock = directory / "slow.sock"
    slow_argv = [sys.executable, str(ROOT / "bench" / "router_synthetic_backend.py")]
    slow_argv += ["--listen", f"unix:{slow_sock}:backlog=4096", "--interval", str(args.interval)]
    slow = Proc(slow_argv, directory / "slow.log", dict(os.environ))
    results: dict[str, Any] = {}
    try:
        # 2a: throughput, router pinned to one core
        router, url = start_router(directory / "a", f"unix:{synth_sock}", args.pin_router)
        try:
            await wait_healthy(reactor, url, router)
            client = Router(reactor, url)
            await client.fetch_key()
            cpu0 = router.cpu_seconds()
            started = time.monotonic()
            outcomes = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(
                        client.stream(
                            ChatRequest.from_prompt("x", max_tokens=args.burst_tokens),
                            lambda text, t: None,
                        )
                    )
                    for _ in range(args.burst_streams)
                ]
            )
            elapsed = time.monotonic() - started
            cpu = router.cpu_seconds() - cpu0
            chunks = sum(n for _, n in outcomes)
            results["burst"] = {
                "streams": args.burst_streams,
                "chunks": chunks,
                "seconds": elapsed,
                "chunks_per_s": chunks / elapsed,
                "router_cpu_seconds": cpu,
                "chunks_per_router_cpu_s": chunks / cpu if cpu else float("nan"),
            }
        finally:
            router.stop()

        # 2b: concurrent open streams with per-chunk delay
        router, url = start_router(directory / "b", f"unix:{slow_sock}", args.pin_router)
        try:
            await wait_healthy(reactor, url, router)
            pool = HTTPConnectionPool(reactor, persistent=False)
            client = Router(reactor, url, pool)
            await client.fetch_key()
            cpu0 = router.cpu_seconds()
            routed = await concurrent(reactor, args, client.stream)
            cpu = router.cpu_seconds() - cpu0
            agent, base = agent_for(reactor, f"unix:{slow_sock}", pool=pool)
            direct = await concurrent(
                reactor,
                args,
                lambda request, on_delta: direct_stream(agent, base, request, on_delta),
            )
            results["concurrency"] = {
                "streams": args.streams,
                "tokens_per_stream": args.slow_tokens,
                "token_interval_s": args.interval,
                "router_cpu_seconds": cpu,
                "through_router": routed,
                "direct_baseline": direct,
            }
        finally:
            router.stop()
    finally:
        synth.stop()
        slow.stop()
    return results


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="GGUF for part 1 (default: the tiny test model)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--burst-streams", type=int, default=20)
    parser.add_argument("--burst-tokens", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--slow-tokens", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--skip-part1", action="store_true")
    parser.add_argument("--skip-part2", action="store_true")
    parser.add_argument("--pin-router", help="taskset CPU list for the router in part 2")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="llmr-bench-"))
    (directory / "a").mkdir()
    (directory / "b").mkdir()
    try:
        report: dict[str, Any] = {}
        if not args.skip_part1:
            report["part1_vs_direct"] = await part1(reactor, args, directory)
            print(json.dumps(report["part1_vs_direct"], indent=2), flush=True)
        if not args.skip_part2:
            report["part2_synthetic"] = await part2(reactor, args, directory)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
