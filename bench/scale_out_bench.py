"""Scale-out benchmark: several routers sharing state in Redis (issue 10).

Part 1, admission latency: the same admission (real HPKE decryption, device auth, every check)
run in-process against the in-memory store and against a real ``redis-server`` on a UNIX
socket, one request at a time: p50/p99 of ``Admission.admit`` and the Redis round trips per
admission (server-side command counts). Then 32 at a time: admissions per second.

Part 2, throughput: the synthetic backend streaming as fast as the connection takes it, Caddy
(etc/caddy/Caddyfile with the scale-out settings) in front of one router, then of two routers
(each pinned to its own core with taskset), both sharing Redis: aggregate sealed chunks per
second through Caddy, and each process's CPU time. Configurations alternate round by round so
both see the same machine load. The load generator counts the sealed events of every stream
and opens (decrypts and verifies) one stream per round in full.

    .venv/bin/python bench/scale_out_bench.py [--rounds 3] [--streams 40] [--tokens 2000]

Everything runs on loopback and is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.web.client import HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from router_bench import (  # noqa: E402
    TWISTD,
    Proc,
    _Body,
    _producer,
    _self_cpu,
    free_port,
    percentile,
    wait_healthy,
)

from llmrouter.httpclient import agent_for  # noqa: E402
from llmrouter.protocol import (  # noqa: E402
    ChatRequest,
    Delta,
    ResponseOpener,
    seal_request,
    verify_key_document,
)

CADDYFILE = ROOT / "etc" / "caddy" / "Caddyfile"


def start_redis(directory: Path) -> tuple[Proc, str]:
    sock = directory / "redis.sock"
    argv = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    argv += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
    proc = Proc(argv, directory / "redis.log", dict(os.environ))
    for _ in range(500):
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
                return proc, str(sock)
        except OSError:
            time.sleep(0.01)
    raise SystemExit("redis-server did not start")


def redis_calls(sock: str) -> dict[str, int]:
    """Calls of each command the server received from clients (INFO commandstats also counts
    the commands scripts run, so only the client-facing ones are kept)."""
    argv = ["redis-cli", "-s", sock, "INFO", "commandstats"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    calls = {}
    for line in out.splitlines():
        name = line.split(":")[0].removeprefix("cmdstat_")
        if name in ("eval", "evalsha", "zrem", "set"):
            calls[name] = int(line.split("calls=")[1].split(",")[0])
            calls[name + "_usec"] = int(line.split("usec=")[1].split(",")[0])
    return calls


# Part 1: admission in-process.


class _Routes:
    def route(self, model: str | None, features: frozenset[str] = frozenset()) -> Any:
        from llmrouter.terminate.backends import Route

        return Route(model, ())


async def admissions(
    reactor: Any, directory: Path, state_url: str, redis_sock: str | None, count: int
) -> dict[str, Any]:
    from llmrouter import hpke
    from llmrouter.keystore import KeyStore
    from llmrouter.router.admission import Admission
    from llmrouter.router.metrics import RouterMetrics
    from llmrouter.router.settings import Settings
    from llmrouter.router.tap import store_for

    settings = Settings(
        keys_dir=directory / "keys",
        state_url=state_url,
        rate_limit_per_minute=1e7,
        rate_limit_burst=1_000_000,
        device_rate_limit_per_minute=1e7,
        device_rate_limit_burst=1_000_000,
        new_device_pow_difficulty=0,
        epsilon_total=1e6,
        max_streams=100_000,
    )
    keys = KeyStore.open(settings.keys_dir, reactor)
    metrics = RouterMetrics()
    store = store_for(settings, reactor, reactor, keys, metrics)
    store.start()
    while not store.available:
        await task.deferLater(reactor, 0.01, lambda: None)
    admission = Admission(settings, reactor, keys, store, _Routes(), metrics)
    key = next(k for k in keys.published() if k.status == "current")
    from llmrouter.protocol import PublishedKey

    published = PublishedKey(key.kid, key.pk, key.status, key.not_before, key.not_after)
    devices = [hpke.generate_key_pair() for _ in range(64)]
    request = ChatRequest.from_prompt("x", max_tokens=8)
    await task.deferLater(reactor, 1.1, lambda: None)  # timestamps after the start second

    def body(i: int) -> bytes:
        envelope, _ = seal_request(published, request, int(time.time()), devices[i % 64])
        return json.dumps(envelope.to_json()).encode()

    async def one(i: int, data: bytes) -> float:
        started = time.perf_counter()
        admitted = await admission.admit(data, f"198.51.100.{i % 250}", None)
        elapsed = time.perf_counter() - started
        admitted.release()
        return elapsed

    for i in range(200):  # warm up: devices known, scripts loaded, code paths hot
        await one(i, body(i))
    bodies = [body(i) for i in range(count)]
    calls0 = redis_calls(redis_sock) if redis_sock else {}
    latencies = [await one(i, data) for i, data in enumerate(bodies)]
    await task.deferLater(reactor, 0.2, lambda: None)  # lease releases reach Redis
    calls1 = redis_calls(redis_sock) if redis_sock else {}
    calls = {name: (n - calls0.get(name, 0)) / count for name, n in calls1.items()}
    bodies = [body(i) for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, 32):
        await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(one(i, data))
                for i, data in enumerate(bodies[start : start + 32], start)
            ]
        )
    rate = count / (time.perf_counter() - started)
    await task.deferLater(reactor, 0.2, lambda: None)  # lease releases reach Redis
    stopped = store.stop()
    if stopped is not None:
        await stopped
    keys.close()
    return {
        "admissions": count,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": sum(latencies) / len(latencies) * 1000,
        # round trips: the scripts (EVALSHA, EVAL the first time on a connection) are on the
        # admission's path; the ZREM releasing the stream's lease (here right after each
        # admission) is not
        "round_trips_per_admission": calls.get("evalsha", 0) + calls.get("eval", 0),
        "lease_releases_per_admission": calls.get("zrem", 0),
        "redis_script_us_per_admission": calls.get("evalsha_usec", 0) + calls.get("eval_usec", 0),
        "admissions_per_s_32_at_a_time": rate,
    }


async def part1(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    redis, sock = start_redis(directory)
    try:
        results: dict[str, Any] = {"memory": [], "redis": []}
        for round_ in range(args.rounds):
            for kind in ("memory", "redis") if round_ % 2 == 0 else ("redis", "memory"):
                where = directory / f"p1-{kind}-{round_}"
                where.mkdir()
                url = f"unix://{sock}" if kind == "redis" else ""
                results[kind].append(
                    await admissions(
                        reactor, where, url, sock if kind == "redis" else None, args.admissions
                    )
                )
                print(kind, json.dumps(results[kind][-1]), flush=True)
        return results
    finally:
        redis.stop()


# Part 2: throughput through Caddy.


def start_caddy(directory: Path, upstreams: list[str]) -> tuple[Proc, str]:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "XDG_DATA_HOME": str(directory / "data"),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "LLMROUTER_SITE": f"http://127.0.0.1:{port}",
        "CADDY_ADMIN": "off",
        "LLMROUTER_UPSTREAM": " ".join(upstreams),
        "LLMROUTER_HEALTH_URI": "/health",
    }
    argv = ["caddy", "run", "--adapter", "caddyfile", "--config", str(CADDYFILE)]
    proc = Proc(argv, directory / "caddy.log", env)
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    raise SystemExit("caddy did not start: " + (directory / "caddy.log").read_text())


def start_router(
    directory: Path, keys: Path, backend: str, state_url: str, role: str, cpu: str | None
) -> tuple[Proc, str]:
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "router.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "LLMROUTER_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "KEYS_DIR": str(keys),
            "KEYS_ROLE": role,
            "STATE_URL": state_url,
            "TRUSTED_PROXIES": "unix",
            "INFERENCE_ENDPOINTS": backend,
            "LISTEN": f"unix:{sock}:backlog=2048",
            "METRICS_LISTEN": f"unix:{directory / 'metrics.sock'}",
            "RATE_LIMIT_PER_MINUTE": "10000000",
            "RATE_LIMIT_BURST": "1000000",
            "MAX_STREAMS": "4096",
            "HEALTH_INTERVAL_SECONDS": "1",
            "FIRST_TOKEN_TIMEOUT_SECONDS": "120",
            "IDLE_TIMEOUT_SECONDS": "60",
        }
    )
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "llmrouter"]
    proc = Proc(argv, directory / "router.log", env, cpu)
    return proc, f"unix:{sock}"


async def burst(reactor: Any, url: str, streams: int, tokens: int) -> tuple[int, float, bool]:
    """``streams`` concurrent streams of ``tokens`` through ``url``: (sealed events, seconds,
    whether the one stream opened in full verified)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent, base = agent_for(reactor, url, pool=pool)
    response = await agent.request(b"GET", (base + "/api/pubkey").encode())
    key = verify_key_document(await readBody(response), now=time.time()).current()
    verified = [False]

    async def one(i: int) -> int:
        request = ChatRequest.from_prompt("x", max_tokens=tokens)
        envelope, state = seal_request(key, request, int(time.time()))
        response = await agent.request(
            b"POST",
            (base + "/api/chat").encode(),
            Headers({b"Content-Type": [b"application/json"]}),
            _producer(json.dumps(envelope.to_json()).encode()),
        )
        if response.code != 200:
            raise RuntimeError(f"{response.code}: {(await readBody(response))[:200]!r}")
        count = [0]
        opener = ResponseOpener(state) if i == 0 else None
        deltas = [0]

        def on_data(data: bytes) -> None:
            count[0] += data.count(b"\n\n")
            if opener is not None:
                deltas[0] += sum(1 for item in opener.feed(data) if isinstance(item, Delta))

        body = _Body(on_data)
        response.deliverBody(body)
        await body.done
        if opener is not None:
            opener.close()
            verified[0] = deltas[0] >= tokens
        return count[0]

    started = time.monotonic()
    counts = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(one(i)) for i in range(streams)]
    )
    return sum(counts), time.monotonic() - started, verified[0]


async def tokens_streamed(reactor: Any, router_url: str) -> float:
    """The router's llmrouter_tokens_streamed_total (its metrics listener is beside its socket)."""
    metrics = router_url.replace("router.sock", "metrics.sock")
    agent, base = agent_for(reactor, metrics)
    response = await agent.request(b"GET", (base + "/metrics").encode())
    for line in (await readBody(response)).decode().splitlines():
        if line.startswith("llmrouter_tokens_streamed_total "):
            return float(line.split()[1])
    return 0.0


async def part2(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    redis, sock = start_redis(directory)
    state_url = f"unix://{sock}"
    synth_sock = directory / "synth.sock"
    synth_argv = [sys.executable, str(ROOT / "bench" / "router_synthetic_backend.py")]
    synth_argv += ["--listen", f"unix:{synth_sock}:backlog=4096", "--tokens", str(args.tokens)]
    synth_argv += ["--hold", str(args.streams), "--static"]
    synth = Proc(synth_argv, directory / "synth.log", dict(os.environ))
    keys = directory / "keys"
    procs: list[Proc] = [redis, synth]
    results: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
    try:
        routers = []
        for i in range(2):
            role = "leader" if i == 0 else "follower"
            proc, url = start_router(
                directory / f"r{i}", keys, f"unix:{synth_sock}", state_url, role, str(i)
            )
            procs.append(proc)
            await wait_healthy(reactor, url, proc)
            routers.append((proc, url))
        fronts = {}
        for kind, members in (("one", routers[:1]), ("two", routers)):
            upstreams = ["unix/" + url.removeprefix("unix:") for _, url in members]
            caddy_dir = directory / f"caddy-{kind}"
            caddy_dir.mkdir()
            caddy, front = start_caddy(caddy_dir, upstreams)
            procs.append(caddy)
            await wait_healthy(reactor, front, caddy)
            fronts[kind] = (caddy, front, members)
        # warm up both routers and Caddys (the backend holds each burst until all have come)
        await burst(reactor, fronts["two"][1], args.streams, 200)
        await burst(reactor, fronts["one"][1], args.streams, 200)
        for round_ in range(args.rounds):
            for kind in ("one", "two") if round_ % 2 == 0 else ("two", "one"):
                caddy, front, members = fronts[kind]
                watched = {
                    "routers": [p for p, _ in members],
                    "caddy": [caddy],
                    "backend": [synth],
                    "redis": [redis],
                }
                cpu0 = {k: sum(p.cpu_seconds() for p in v) for k, v in watched.items()}
                tokens0 = [await tokens_streamed(reactor, url) for _, url in members]
                own0 = _self_cpu()
                chunks, seconds, verified = await burst(reactor, front, args.streams, args.tokens)
                cpu = {
                    f"{k}_cpu_s": round(sum(p.cpu_seconds() for p in v) - cpu0[k], 2)
                    for k, v in watched.items()
                }
                load = os.getloadavg()[0]
                split = [
                    round(await tokens_streamed(reactor, url) - before)
                    for (_, url), before in zip(members, tokens0, strict=True)
                ]
                result = {
                    "sealed_chunks": chunks,
                    "seconds": round(seconds, 3),
                    "chunks_per_s": round(chunks / seconds),
                    "verified_one_stream": verified,
                    **cpu,
                    "loadgen_cpu_s": round(_self_cpu() - own0, 2),
                    "chunks_per_router_cpu_s": round(chunks / cpu["routers_cpu_s"]),
                    "tokens_per_router": split,
                    "load_average_1m": load,
                }
                results[kind].append(result)
                print(kind, json.dumps(result), flush=True)
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--admissions", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--skip-part1", action="store_true")
    parser.add_argument("--skip-part2", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("redis-server", "redis-cli", "caddy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (etc/dev/ci-deps installs it)")
    directory = Path(tempfile.mkdtemp(prefix="llmr-scale-"))
    report: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    try:
        if not args.skip_part1:
            report["admission"] = await part1(reactor, args, directory)
        if not args.skip_part2:
            report["throughput"] = await part2(reactor, args, directory)
        report["load_average_after"] = os.getloadavg()
        print(json.dumps(report, indent=2))
    finally:
        if not os.environ.get("SCALE_OUT_BENCH_KEEP"):  # the processes' logs are in there
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
