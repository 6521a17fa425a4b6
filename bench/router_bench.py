"""Router benchmark: what does the encrypted front door cost, and how much can it carry?

Part 1 (same backend, same prompts, one run): tokens/s and time to first token through the
router (HPKE, padding, sealed SSE) divided by the same figures straight from the inference
daemon's OpenAI API; requests alternate direct / routed so both see the same machine load.

Part 2 (synthetic backend that streams as fast as the connection takes it): the router's sealed
chunks per second on one core (the router process is pinned with taskset), and how many
concurrent open streams it holds, with p50/p95/p99 per-chunk delay (backend send -> client
verified, the backend stamps CLOCK_MONOTONIC into each token). The load generator is this
script, on Twisted; everything is on loopback and bounded in count and time.

Each part runs for each protocol of ``--protocols`` (default ``1.1,2``), alternating them
round by round so both see the same machine load. Protocol 1.1: the router opens the request and
seals every chunk. Protocol 2: an operator key made here certifies the router and a node
(``twistd inference --keys-dir``: our daemon's gate in part 1, ``--front`` in front of the
synthetic backend in part 2); the router relays the node's sealed bytes, so part 2 counts the
node's sealed chunks the router relayed per router CPU-second. The concurrent streams come from
``--addresses`` loopback addresses (127.0.0.1 and up), as many clients would, so the router's
per-address connection cap (64) limits none of them.

    .venv/bin/python bench/router_bench.py [--model PATH] [--streams 1000] [--protocols 1.1,2]
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
from llmrouter.v2 import certs as v2certs  # noqa: E402
from llmrouter.v2 import request as v2request  # noqa: E402
from llmrouter.v2 import response as v2response  # noqa: E402

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


def loopback_agents(reactor: Any, url: str, pool: HTTPConnectionPool, count: int) -> list[Any]:
    """Agents for ``url`` whose connections come from 127.0.0.1, .2, ... (``count`` of them)."""
    from twisted.web.client import Agent

    if not url.startswith("http://127.0.0.1:") or count <= 1:
        return [agent_for(reactor, url, pool=pool)[0]]
    return [
        Agent(reactor, pool=pool, bindAddress=(f"127.0.{n // 250}.{n % 250 + 1}", 0))
        for n in range(count)
    ]


class Router:
    """Client side of the router for the load generator (protocol 1.1)."""

    protocol = "1.1"

    def __init__(
        self, reactor: Any, url: str, pool: HTTPConnectionPool | None = None, addresses: int = 1
    ) -> None:
        self.reactor = reactor
        self.agent, self.base = agent_for(reactor, url, pool=pool)
        self._agents = (
            loopback_agents(reactor, url, pool, addresses) if pool is not None else [self.agent]
        )
        self._next = 0
        self.key: Any = None

    def next_agent(self) -> Any:
        agent = self._agents[self._next % len(self._agents)]
        self._next += 1
        return agent

    async def fetch_key(self) -> None:
        response = await self.agent.request(b"GET", (self.base + "/api/pubkey").encode())
        self.key = verify_key_document(await readBody(response), now=time.time()).current()

    def seal(self, request: ChatRequest) -> tuple[str, bytes, bytes, Any]:
        """(path, content type, body, the response's opener) of one sealed request."""
        env, state = seal_request(self.key, request, int(time.time()))
        body = json.dumps(env.to_json()).encode()
        return "/api/chat", b"application/json", body, ResponseOpener(state)

    def check_end(self, final: object) -> None:
        """v1.1's opener raises on a bad ending itself."""

    async def stream(self, request: ChatRequest, on_delta: Any) -> tuple[float, int]:
        """Returns (ttft seconds, deltas); ``on_delta(text, t)`` for each verified delta."""
        path, content_type, body, opener = self.seal(request)
        started = time.monotonic()
        response = await self.next_agent().request(
            b"POST",
            (self.base + path).encode(),
            Headers({b"Content-Type": [content_type]}),
            _producer(body),
        )
        if response.code != 200:
            text = await readBody(response)
            raise RuntimeError(f"router answered {response.code}: {text[:200]!r}")
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

        collector = _Body(on_data)
        response.deliverBody(collector)
        await collector.done
        self.check_end(opener.close())
        return first[0] - started, count[0]


class RouterV2(Router):
    """Client side of the router for the load generator (protocol 2): the key document is
    verified under the operator's pin, requests are sealed to the nodes, as an app does."""

    protocol = "2"

    def __init__(self, *args: Any, pin: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pin = pin

    async def fetch_key(self) -> None:
        for _ in range(200):  # until the router's probe has listed the node
            response = await self.agent.request(b"GET", (self.base + "/api/v2/keys").encode())
            body = await readBody(response)
            if response.code == 200:
                self.key = v2certs.verify_key_document_v2(body, self.pin, now=time.time())
                if self.key.nodes:
                    return
            await task.deferLater(self.reactor, 0.1, lambda: None)
        raise SystemExit("the router never listed the node")

    def seal(self, request: ChatRequest) -> tuple[str, bytes, bytes, Any]:
        model = self.key.default_model or self.key.models()[0]
        body, state = v2request.seal_request(self.key, request, model=model, device_sk=None)
        content_type = v2request.CONTENT_TYPE.encode()
        return "/api/v2/chat", content_type, body, v2response.ResponseOpener(state)

    def check_end(self, final: object) -> None:
        if not isinstance(final, v2response.Done):
            raise RuntimeError(f"the stream ended with {final.code}")  # type: ignore[attr-defined]


class Operator:
    """The operator key of protocol 2 (made for the run) and its certificates."""

    def __init__(self) -> None:
        import nacl.signing

        self.key = nacl.signing.SigningKey.generate()
        self.pin = bytes(self.key.verify_key)

    def certify(self, keys_dir: Path, kind: str, models: Sequence[str] = ()) -> None:
        from llmrouter.protocol import b64u_decode

        state = json.loads((keys_dir / "state.json").read_text())
        now = int(time.time())
        certificate = v2certs.issue_certificate(
            bytes(self.key),
            type=kind,
            name=f"bench-{kind}",
            key=b64u_decode(state["signing_key"], "signing_key", 32),
            models=models,
            not_before=now - 3600,
            not_after=now + 86400,
        )
        (keys_dir / f"{kind}.cert").write_text(json.dumps(certificate))


def node_keys(directory: Path) -> Path:
    """A node's key directory, as ``twistd inference --keys-dir`` makes it."""
    from twisted.internet.task import Clock

    from llmrouter.keystore import KeyStore

    clock = Clock()
    clock.advance(time.time())
    keys = directory / "node-keys"
    KeyStore.open(keys, clock, node=True).close()
    return keys


async def certified_router(
    reactor: Any, operator: Operator, directory: Path, backend: str, cpu: str | None
) -> tuple[Proc, str]:
    """A router whose key directory has the operator's router.cert."""
    router, url = start_router(directory, backend, cpu)
    await wait_healthy(reactor, url, router)
    operator.certify(directory / "keys", "router")
    return router, url


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
    # MAX_CONNECTIONS_PER_ADDRESS stays at its default (64): the concurrent streams come from
    # many loopback addresses (--addresses), as they would from many clients.
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
            "NEW_DEVICE_POW_DIFFICULTY": "0",
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


async def _routed(client: Router, request: ChatRequest) -> tuple[float, float, int]:
    """(ttft, seconds from first to last token, tokens) through the router."""
    times: list[float] = []
    ttft, _ = await client.stream(request, lambda text, t: times.append(t))
    return ttft, times[-1] - times[0], len(times)


def _rate(samples: list[tuple[float, float, int]]) -> float:
    return sum(n - 1 for _, _, n in samples) / sum(span for _, span, _ in samples)


async def _served_model(reactor: Any, url: str) -> str:
    agent, base = agent_for(reactor, url)
    response = await agent.request(b"GET", (base + "/v1/models").encode())
    return str(json.loads(await readBody(response))["data"][0]["id"])


async def part1(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    model = args.model
    if model is None:
        from tests.tinymodel import tiny_model_path

        model = str(tiny_model_path())
    socket_path = directory / "inference.sock"
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "inference"]
    argv += ["--listen", f"unix:{socket_path}", "--model", model, "--threads", "1"]
    operator = Operator() if "2" in args.protocols else None
    if operator is not None:  # the node's gate (protocol 2) in front of the same engine
        keys = node_keys(directory)
        argv += ["--keys-dir", str(keys)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    inference = Proc(argv, directory / "inference.log", env)
    router, url = start_router(directory, f"unix:{socket_path}", None)
    try:
        await wait_healthy(reactor, f"unix:{socket_path}", inference)
        await wait_healthy(reactor, url, router)
        # Keep-alive on every path, as in production (the TLS proxy keeps its connections to the
        # router open): nobody pays a connect, so the difference is the router's (and gate's)
        # own work.
        clients: dict[str, Router] = {}
        if "1.1" in args.protocols:
            clients["1.1"] = Router(reactor, url, HTTPConnectionPool(reactor, persistent=True))
        if operator is not None:
            operator.certify(keys, "node", [await _served_model(reactor, f"unix:{socket_path}")])
            operator.certify(directory / "keys", "router")
            pool = HTTPConnectionPool(reactor, persistent=True)
            clients["2"] = RouterV2(reactor, url, pool, pin=operator.pin)
        for client in clients.values():
            await client.fetch_key()
        agent, base = agent_for(
            reactor, f"unix:{socket_path}", pool=HTTPConnectionPool(reactor, persistent=True)
        )
        paths = ["direct", *clients]
        samples: dict[str, list[tuple[float, float, int]]] = {path: [] for path in paths}
        counter = 0
        for i in range(args.rounds):
            # Same prompt every way, apart from a fixed-width counter that defeats prompt
            # caching; the order rotates so no path always runs on a warmer machine.
            for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
                counter += 1
                text = f"{PROMPTS[i % len(PROMPTS)]} (run {counter:04d})"
                request = ChatRequest.from_prompt(text, max_tokens=args.max_tokens, temperature=0.0)
                if path == "direct":
                    samples[path].append(await direct_stream(agent, base, request))
                    continue
                samples[path].append(await _routed(clients[path], request))
    finally:
        router.stop()
        inference.stop()

    direct = samples["direct"]
    d_ttft = [t for t, _, _ in direct]
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "direct_tokens_per_s": _rate(direct),
        "direct_ttft_p50_ms": statistics.median(d_ttft) * 1000,
    }
    for path in clients:
        routed = samples[path]
        r_ttft = [t for t, _, _ in routed]
        result[f"protocol_{path}"] = {
            "tokens_per_request": statistics.median(n for _, _, n in routed),
            "routed_tokens_per_s": _rate(routed),
            "throughput_ratio": _rate(routed) / _rate(direct),
            "routed_ttft_p50_ms": statistics.median(r_ttft) * 1000,
            "added_ttft_p50_ms": (statistics.median(r_ttft) - statistics.median(d_ttft)) * 1000,
            "added_ttft_paired_median_ms": statistics.median(
                (r - d) * 1000 for r, d in zip(r_ttft, d_ttft, strict=True)
            ),
        }
    return result


def _synthetic(directory: Path, name: str, *options: str) -> tuple[Proc, Path]:
    sock = directory / f"{name}.sock"
    argv = [sys.executable, str(ROOT / "bench" / "router_synthetic_backend.py")]
    argv += ["--listen", f"unix:{sock}:backlog=4096", *options]
    return Proc(argv, directory / f"{name}.log", dict(os.environ)), sock


async def _front_node(
    reactor: Any, operator: Operator, directory: Path, name: str, backend: Path, streams: int
) -> tuple[Proc, Path]:
    """A node (``twistd inference --front``) in front of a synthetic backend."""
    home = directory / name
    home.mkdir()
    keys = node_keys(home)
    operator.certify(keys, "node", ["synthetic"])
    sock = home / "node.sock"
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "inference"]
    argv += ["--listen", f"unix:{sock}:backlog=4096", "--keys-dir", str(keys)]
    argv += ["--front", f"unix:{backend}", "--dialect", "openai", "--max-streams", str(streams)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    node = Proc(argv, home / "node.log", env)
    await wait_healthy(reactor, f"unix:{sock}", node)
    return node, sock


async def _burst(reactor: Any, args: argparse.Namespace, client: Router, router: Proc) -> Any:
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
    return {
        "streams": args.burst_streams,
        "chunks": chunks,
        "seconds": elapsed,
        "chunks_per_s": chunks / elapsed,
        "router_cpu_seconds": cpu,
        "chunks_per_router_cpu_s": chunks / cpu if cpu else float("nan"),
    }


async def part2(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    synth, synth_sock = _synthetic(directory, "synth", "--tokens", str(args.burst_tokens))
    slow, slow_sock = _synthetic(directory, "slow", "--interval", str(args.interval))
    operator = Operator()
    procs = [synth, slow]
    results: dict[str, Any] = {}
    try:
        await wait_healthy(reactor, f"unix:{synth_sock}", synth)
        await wait_healthy(reactor, f"unix:{slow_sock}", slow)
        backends = {"1.1": (synth_sock, slow_sock)}
        if "2" in args.protocols:
            streams = max(args.streams, args.burst_streams) + 64
            node, node_sock = await _front_node(
                reactor, operator, directory, "node", synth_sock, streams
            )
            slow_node, slow_node_sock = await _front_node(
                reactor, operator, directory, "slow-node", slow_sock, streams
            )
            procs += [node, slow_node]
            backends["2"] = (node_sock, slow_node_sock)

        def client_for(protocol: str, url: str, pool: Any = None, addresses: int = 1) -> Router:
            if protocol == "2":
                return RouterV2(reactor, url, pool, addresses, pin=operator.pin)
            return Router(reactor, url, pool, addresses)

        # 2a: throughput, router pinned to one core; protocols alternate, round by round
        bursts: dict[str, list[Any]] = {p: [] for p in args.protocols}
        run = 0
        for i in range(args.burst_rounds):
            for protocol in args.protocols[i % 2 :] + args.protocols[: i % 2]:
                run += 1
                home = directory / f"a{run}"
                home.mkdir()
                router, url = await certified_router(
                    reactor, operator, home, f"unix:{backends[protocol][0]}", args.pin_router
                )
                try:
                    client = client_for(protocol, url)
                    await client.fetch_key()
                    bursts[protocol].append(await _burst(reactor, args, client, router))
                finally:
                    router.stop()
        results["burst"] = {
            protocol: {
                "rounds": runs,
                "median_chunks_per_router_cpu_s": statistics.median(
                    r["chunks_per_router_cpu_s"] for r in runs
                ),
            }
            for protocol, runs in bursts.items()
        }
        if {"1.1", "2"} <= set(bursts):
            ratio = (
                results["burst"]["2"]["median_chunks_per_router_cpu_s"]
                / results["burst"]["1.1"]["median_chunks_per_router_cpu_s"]
            )
            results["burst"]["v2_over_v11"] = ratio

        # 2b: concurrent open streams with per-chunk delay, from many loopback addresses
        results["concurrency"] = {
            "streams": args.streams,
            "tokens_per_stream": args.slow_tokens,
            "token_interval_s": args.interval,
            "addresses": args.addresses,
        }
        for protocol in args.protocols:
            run += 1
            home = directory / f"b{run}"
            home.mkdir()
            router, url = await certified_router(
                reactor, operator, home, f"unix:{backends[protocol][1]}", args.pin_router
            )
            try:
                pool = HTTPConnectionPool(reactor, persistent=False)
                client = client_for(protocol, url, pool, args.addresses)
                await client.fetch_key()
                cpu0 = router.cpu_seconds()
                routed = await concurrent(reactor, args, client.stream)
                routed["router_cpu_seconds"] = router.cpu_seconds() - cpu0
                results["concurrency"][f"protocol_{protocol}"] = routed
            finally:
                router.stop()
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent, base = agent_for(reactor, f"unix:{slow_sock}", pool=pool)
        results["concurrency"]["direct_baseline"] = await concurrent(
            reactor,
            args,
            lambda request, on_delta: direct_stream(agent, base, request, on_delta),
        )
    finally:
        for proc in procs:
            proc.stop()
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
    parser.add_argument("--protocols", default="1.1,2", help="comma list of 1.1 and 2")
    parser.add_argument("--burst-rounds", type=int, default=3, help="part 2a runs per protocol")
    parser.add_argument(
        "--addresses", type=int, default=250, help="loopback addresses the streams come from"
    )
    args = parser.parse_args(argv)
    args.protocols = [p for p in args.protocols.split(",") if p]
    if not set(args.protocols) <= {"1.1", "2"}:
        parser.error("--protocols: 1.1 and/or 2")
    directory = Path(tempfile.mkdtemp(prefix="llmr-bench-"))
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
