"""Hostile load: legitimate clients keep chatting while each attack on the router runs in turn.

A real ``twistd inference`` (the tiny test model) and a real ``twistd llmrouter`` (production
settings from ``etc/llmrouter/env.production``, device authentication required) run on loopback.
Legitimate clients, each from its own address (127.0.0.2, 127.0.0.3, ...) with its own device key,
chat every few seconds through every phase: first without an attack (the baseline), then with
each attack in turn, bounded in count and time:

* ``slowloris``: connections from one address trickling their headers a byte a second;
* ``zero_window``: the largest answers a request can ask for (1000 tokens with 20 logprobs each),
  opened through the trusted proxy's UNIX socket by devices that never read a byte;
* ``junk_one_address``: junk envelopes as fast as one address can send them;
* ``junk_many_addresses``: well-formed envelopes with junk ciphertext (each costs the router a
  decapsulation) from a new address each, through the trusted proxy's X-Forwarded-For;
* ``fresh_devices``: a new device key on every request, from many addresses;
* ``pow_replay``: one solved proof of work sent again and again with junk ciphertext;
* ``oversize``: bodies far over the limit, with and without a Content-Length.

For each phase it prints the legitimate clients' success rate and p95 time to first token
(from sending to the first verified token, proof of work included), what the attack got back,
and the router's resident memory. The target is at least 99 % legitimate success in every phase
with the router's memory bounded. Run it alone on the machine (``flock /tmp/bench.lock``):

    .venv/bin/python bench/hostile_load.py [--phase-seconds 20] [--clients 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from router_bench import TWISTD, Proc, free_port, percentile, wait_healthy  # noqa: E402

from llmrouter import hpke, pow  # noqa: E402
from llmrouter.protocol import (  # noqa: E402
    ChatRequest,
    Delta,
    Done,
    ResponseOpener,
    b64u_decode,
    b64u_encode,
    seal_request,
    verify_key_document,
)
from llmrouter.router.settings import read_env_file  # noqa: E402

PROXY = "127.0.0.250"  # the trusted proxy (as Caddy would be): attacks from many addresses
ATTACKER = "127.0.0.1"  # attacks from one address
SOCKET = "router.sock"  # the router's UNIX listener, in the run's directory
SOCKET_ENV = "LLMR_HOSTILE_ROUTER_SOCKET"  # how the attacking process learns where it is
ZERO_WINDOW_HOLD = 30.0  # seconds the zero_window phase lasts at least (see zero_window)
ZERO_WINDOW_DEVICES = 2  # each opens a stream every 2 s (at most 4 open per device)


@implementer(IAgentEndpointFactory)
class _From:
    """Connects from a chosen loopback address, so each client has an address of its own."""

    def __init__(self, reactor: Any, source: str) -> None:
        self._reactor, self._source = reactor, source

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(
            self._reactor, uri.host.decode(), uri.port, timeout=10, bindAddress=(self._source, 0)
        )


class Target:
    """What every client needs to know about the router under test."""

    def __init__(
        self, reactor: Any, port: int, metrics_port: int, pin: bytes, socket: str = ""
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.socket = socket  # the router's UNIX listener, the trusted proxy's way in
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.url = f"http://127.0.0.1:{port}"
        self.pin = pin
        self.key: Any = None
        self._agents: dict[str, Agent] = {}

    def agent(self, source: str) -> Agent:
        if source not in self._agents:
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            self._agents[source] = Agent.usingEndpointFactory(
                self.reactor, _From(self.reactor, source), pool=pool
            )
        return self._agents[source]

    async def counters(self) -> dict[str, float]:
        """The router's own view: streams open and dropped, connections dropped, by reason."""
        response = await self.agent("127.0.0.2").request(b"GET", self.metrics_url.encode())
        wanted = (
            "llmrouter_active_streams",
            "llmrouter_streams_dropped_total",
            "llmrouter_connections_dropped_total",
            "llmrouter_open_connections",
        )
        out = {}
        for line in (await readBody(response)).decode().splitlines():
            if line.startswith(wanted):
                name, value = line.rsplit(" ", 1)
                out[name.replace("llmrouter_", "")] = float(value)
        return out

    async def refresh_key(self) -> None:
        response = await self.agent("127.0.0.2").request(b"GET", f"{self.url}/api/pubkey".encode())
        document = verify_key_document(await readBody(response), self.pin, now=time.time())
        self.key = document.current()

    async def post(
        self, source: str, body: bytes, headers: dict[bytes, list[bytes]] | None = None
    ) -> Any:
        all_headers = Headers({b"Content-Type": [b"application/json"], **(headers or {})})
        return await self.agent(source).request(
            b"POST",
            f"{self.url}/api/chat".encode(),
            all_headers,
            FileBodyProducer(BytesIO(body), cooperator=_NOW),
        )


class _Immediate:
    """A cooperator that writes a small body at once (no 10 ms timer per request)."""

    def cooperate(self, iterator: Any) -> Any:
        for _ in iterator:
            pass

        class _Done:
            def whenDone(self) -> defer.Deferred[None]:
                return defer.succeed(None)

            def pause(self) -> None: ...

            def resume(self) -> None: ...

            def stop(self) -> None: ...

        return _Done()


_NOW = _Immediate()


class _Stream(Protocol):
    def __init__(self, opener: ResponseOpener, started: float) -> None:
        self.opener = opener
        self.started = started
        self.ttft: float | None = None
        self.final: Any = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for item in self.opener.feed(data):
            if isinstance(item, Delta) and self.ttft is None:
                self.ttft = time.monotonic() - self.started

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.final = self.opener.final
        self.ended.callback(None)


def _envelope(target: Target, device: hpke.KeyPair | None, text: str) -> tuple[bytes, Any, Any]:
    request = ChatRequest.from_prompt(text, max_tokens=8, temperature=0.0)
    envelope, state = seal_request(target.key, request, int(time.time()), device)
    return json.dumps(envelope.to_json()).encode(), envelope, state


class Legit:
    """One legitimate client: its own address and device, one chat every ``interval`` s."""

    def __init__(self, target: Target, source: str, interval: float) -> None:
        self.target = target
        self.source = source
        self.interval = interval
        self.device = hpke.generate_key_pair()
        self.results: list[tuple[str, bool, float | None, str]] = []  # phase, ok, ttft, code
        self.phase = "warmup"

    async def chat(self) -> tuple[bool, float | None, str]:
        """One chat as the app makes it: proof of work when asked, sealed again on
        ``key_unknown`` (after refetching the keys) or ``stale``."""
        started = time.monotonic()
        for _ in range(3):
            body, envelope, state = _envelope(self.target, self.device, "Say hello.")
            response = await self.target.post(self.source, body)
            if response.code == 401:
                error = json.loads(await readBody(response))["error"]
                if error.get("code") != "pow_required":
                    return False, None, str(error.get("code"))
                solution = await threads.deferToThread(pow.solve, error["challenge"], envelope.enc)
                headers = {pow.HEADER.encode(): [solution.encode()]}
                response = await self.target.post(self.source, body, headers)
            if response.code == 200:
                stream = _Stream(ResponseOpener(state), started)
                response.deliverBody(stream)
                await stream.ended
                ok = isinstance(stream.final, Done)
                return ok, stream.ttft, "ok" if ok else "truncated"
            code = str(json.loads(await readBody(response)).get("error", {}).get("code"))
            if code == "key_unknown":
                await self.target.refresh_key()
            elif code != "stale":
                return False, None, code
        return False, None, "gave_up"

    async def run(self, until: Callable[[], bool]) -> None:
        while not until():
            began = time.monotonic()
            try:
                ok, ttft, code = await self.chat()
            except Exception as e:  # a connection refused or reset counts as a failure
                ok, ttft, code = False, None, type(e).__name__
            self.results.append((self.phase, ok, ttft, code))
            await _sleep(self.target.reactor, max(0.0, self.interval - (time.monotonic() - began)))


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def _forwarded() -> dict[bytes, list[bytes]]:
    address = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    return {b"X-Forwarded-For": [address.encode()]}


async def _flood(
    target: Target, seconds: float, concurrency: int, one: Callable[[], Awaitable[int]]
) -> dict[str, int]:
    """Run ``one`` (returns an HTTP status, or 0) ``concurrency`` at a time for ``seconds``."""
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                statuses[str(await one())] += 1
            except Exception as e:
                statuses[type(e).__name__] += 1

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return dict(statuses)


async def _status(response: Any) -> int:
    await readBody(response)
    return int(response.code)


# Attacks. Each runs for ``seconds`` and returns what it got back.


async def slowloris(target: Target, seconds: float) -> dict[str, int]:
    class Trickle(Protocol):
        lost = False

        def connectionLost(self, reason: Failure | None = None) -> None:
            self.lost = True

    peers: list[Trickle] = []
    deadline = time.monotonic() + seconds
    endpoint = TCP4ClientEndpoint(
        target.reactor, "127.0.0.1", target.port, bindAddress=(ATTACKER, 0)
    )
    opened = 0
    while time.monotonic() < deadline:
        for _ in range(50):  # up to 50 new connections a second
            try:
                peer = await connectProtocol(endpoint, Trickle())
            except Exception:
                continue
            opened += 1
            assert peer.transport is not None
            peer.transport.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
            peers.append(peer)
        for peer in peers:
            if not peer.lost and peer.transport is not None:
                peer.transport.write(b"X")
        await _sleep(target.reactor, 1.0)
    alive = sum(not p.lost for p in peers)
    for peer in peers:
        if not peer.lost and peer.transport is not None:
            peer.transport.abortConnection()
    return {"opened": opened, "still_open_at_end": alive, "closed_by_router": opened - alive}


async def zero_window(target: Target, seconds: float) -> dict[str, int]:
    """Devices (each from its own forwarded address, through the proxy's UNIX socket) open long
    streams and never read them; the router must drop them after ``WRITE_STALL_SECONDS``."""

    class Stalled(Protocol):
        def __init__(self) -> None:
            self.lost = False
            self.status = ""

        def dataReceived(self, data: bytes) -> None:
            if not self.status:
                self.status = data[9:12].decode("latin-1")
                statuses[f"answered_{self.status}"] += 1
            assert self.transport is not None
            self.transport.pauseProducing()  # stop reading: the window closes

        def connectionLost(self, reason: Failure | None = None) -> None:
            self.lost = True

    streams: list[Stalled] = []
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    deadline = started + seconds
    devices = [(hpke.generate_key_pair(), _forwarded()) for _ in range(ZERO_WINDOW_DEVICES)]
    while time.monotonic() < deadline:
        for device, forwarded in devices:
            text = "Count from one to ten thousand, one number per line. " * 4
            # the largest answer a request can ask for: 1000 tokens, each with 20 alternatives'
            # logprobs (~1 MB sealed), far more than the socket and Twisted's buffer hold
            request = ChatRequest.from_prompt(text, max_tokens=1000, logprobs=True, top_logprobs=20)
            envelope, _ = seal_request(target.key, request, int(time.time()), device)
            body = json.dumps(envelope.to_json()).encode()
            # the device's first sight asks for work: the attacker pays it once per device
            response = await target.post(PROXY, body, forwarded)
            headers = forwarded
            if response.code == 401:
                error = json.loads(await readBody(response))["error"]
                solution = await threads.deferToThread(pow.solve, error["challenge"], envelope.enc)
                headers = {**forwarded, pow.HEADER.encode(): [solution.encode()]}
            else:
                await readBody(response)
                envelope, _ = seal_request(target.key, request, int(time.time()), device)
                body = json.dumps(envelope.to_json()).encode()
            raw = (
                b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"".join(k + b": " + v[0] + b"\r\n" for k, v in headers.items())
                + b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            # through the router's UNIX socket, as Caddy reaches it in production: a socket pair
            # whose buffers (net.core.wmem_default) fill after a few hundred chunks. Loopback TCP
            # never stalls: it autotunes the router's send buffer to ~3.9 MB at once (ss -tm).
            endpoint = UNIXClientEndpoint(target.reactor, target.socket)
            peer = await connectProtocol(endpoint, Stalled())
            assert peer.transport is not None
            peer.transport.write(raw)
            streams.append(peer)
            statuses["opened"] += 1
        await _sleep(target.reactor, 2.0)
    # Hold them long enough for the router to notice: the socket (~33 KiB of small writes) and
    # Twisted's 64 KiB buffer fill within seconds of a stream's start (cadence mode packs what
    # the backend made into each 50 ms chunk), then WRITE_STALL_SECONDS (10 here) pass. The
    # router's own counters (streams_dropped_total) say how many it dropped.
    await _sleep(target.reactor, max(0.0, started + ZERO_WINDOW_HOLD - time.monotonic()))
    for stream in streams:
        if not stream.lost and stream.transport is not None:
            stream.transport.abortConnection()
    return dict(statuses)


async def junk_one_address(target: Target, seconds: float) -> dict[str, int]:
    async def one() -> int:
        return await _status(await target.post(ATTACKER, b'{"v": 1, "junk": true}'))

    return await _flood(target, seconds, 16, one)


async def _paid_device(target: Target) -> tuple[hpke.KeyPair, dict[str, int]]:
    """A device key the router knows: its first request's proof of work, solved once."""
    device, forwarded = hpke.generate_key_pair(), _forwarded()
    body, envelope, _ = _envelope(target, device, "x")
    response = await target.post(PROXY, body, forwarded)
    if response.code == 401:
        error = json.loads(await readBody(response))["error"]
        solution = await threads.deferToThread(pow.solve, error["challenge"], envelope.enc)
        headers = {**forwarded, pow.HEADER.encode(): [solution.encode()]}
        response = await target.post(PROXY, body, headers)
    await readBody(response)
    return device, {"device_admitted": int(response.code == 200)}


async def junk_many_addresses(target: Target, seconds: float) -> dict[str, int]:
    """Envelopes of a known device whose ciphertext is junk: each costs a decapsulation."""
    device, paid = await _paid_device(target)

    async def one() -> int:
        body, envelope, _ = _envelope(target, device, "x")
        doc = json.loads(body)
        doc["ct"] = b64u_encode(os.urandom(len(envelope.ct)))
        return await _status(await target.post(PROXY, json.dumps(doc).encode(), _forwarded()))

    return {**paid, **await _flood(target, seconds, 16, one)}


async def fresh_devices(target: Target, seconds: float) -> dict[str, int]:
    async def one() -> int:
        body, _, _ = _envelope(target, hpke.generate_key_pair(), "Hello")
        return await _status(await target.post(PROXY, body, _forwarded()))

    return await _flood(target, seconds, 16, one)


async def pow_replay(target: Target, seconds: float) -> dict[str, int]:
    """Solve one proof of work (a new device's), then replay it with junk ciphertext."""
    device, forwarded = hpke.generate_key_pair(), _forwarded()
    body, envelope, _ = _envelope(target, device, "x")
    response = await target.post(PROXY, body, forwarded)
    error = json.loads(await readBody(response))["error"]
    solution = await threads.deferToThread(pow.solve, error["challenge"], envelope.enc)
    doc = json.loads(body)
    doc["ct"] = b64u_encode(os.urandom(len(envelope.ct)))
    junk = json.dumps(doc).encode()
    headers = {**forwarded, pow.HEADER.encode(): [solution.encode()]}

    async def one() -> int:
        return await _status(await target.post(PROXY, junk, headers))

    return await _flood(target, seconds, 8, one)


async def oversize(target: Target, seconds: float) -> dict[str, int]:
    big = b"{" + b" " * (8 * 1024 * 1024) + b"}"

    async def one() -> int:
        return await _status(await target.post(ATTACKER, big))

    return await _flood(target, seconds, 4, one)


ATTACKS: dict[str, Callable[[Target, float], Awaitable[dict[str, int]]]] = {
    "slowloris": slowloris,
    "zero_window": zero_window,
    "junk_one_address": junk_one_address,
    "junk_many_addresses": junk_many_addresses,
    "fresh_devices": fresh_devices,
    "pow_replay": pow_replay,
    "oversize": oversize,
}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def router_env(directory: Path, backend: str, port: int, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "LLMROUTER_"))}
    env.update(read_env_file(ROOT / "etc" / "llmrouter" / "env.production"))
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            # Production's preflight refuses a loopback listener whose clients are not behind a
            # trusted proxy; here the legitimate clients and most attacks reach the router
            # directly from their own loopback addresses. Every setting is still production's.
            "ENVIRONMENT": "development",
            "KEYS_DIR": str(directory / "keys"),
            "INFERENCE_ENDPOINTS": backend,
            # TCP for the clients that come straight from their own addresses; a UNIX socket for
            # what comes through the trusted proxy, as production's Caddy does (zero_window)
            "LISTEN": f"tcp:{port}:interface=127.0.0.1:backlog=1024 unix:{directory / SOCKET}",
            "METRICS_LISTEN": f"tcp:{metrics_port}:interface=127.0.0.1",
            "TRUSTED_PROXIES": f"{PROXY} unix",
            # Lower than production so that the flood phases reach them on a 2-core machine,
            # and so that the Python clients here solve proofs of work in milliseconds.
            "POW_THRESHOLD_RPS": "40",
            "POW_DIFFICULTY": "12",
            "NEW_DEVICE_POW_DIFFICULTY": "14",
            "NEW_DEVICES_PER_HOUR": "120",
            "NEW_DEVICE_BURST": "20",
            "WRITE_STALL_SECONDS": "10",
            "REQUEST_READ_SECONDS": "10",
        }
    )
    return env


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between chats")
    parser.add_argument("--only", action="append", choices=list(ATTACKS))
    parser.add_argument("--attacker", nargs=4, metavar=("ATTACK", "PORT", "PIN", "SECONDS"))
    args = parser.parse_args(argv)
    if args.attacker:  # the attacking process: one attack, its outcome as JSON on stdout
        name, port, pin, seconds = args.attacker
        socket_path = os.environ[SOCKET_ENV]
        target = Target(reactor, int(port), 0, b64u_decode(pin, "pin", 32), socket_path)
        await target.refresh_key()
        print(json.dumps(await ATTACKS[name](target, float(seconds))))
        return
    directory = Path(tempfile.mkdtemp(prefix="llmr-hostile-"))
    from tests.tinymodel import tiny_model_path

    socket_path = directory / "inference.sock"
    inference = Proc(
        [
            *(sys.executable, "-c", TWISTD, "-n", "--pidfile=", "inference", "--listen"),
            *(f"unix:{socket_path}", "--model", str(tiny_model_path())),
        ],
        directory / "inference.log",
        {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")},
    )
    port, metrics_port = free_port(), free_port()
    router = Proc(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "llmrouter"],
        directory / "router.log",
        router_env(directory, f"unix:{socket_path}", port, metrics_port),
    )
    try:
        await wait_healthy(reactor, f"unix:{socket_path}", inference)
        await wait_healthy(reactor, f"http://127.0.0.1:{port}", router)
        state = json.loads((directory / "keys" / "state.json").read_text())
        target = Target(reactor, port, metrics_port, b64u_decode(state["signing_key"], "pin", 32))
        await target.refresh_key()
        clients = [Legit(target, f"127.0.0.{2 + i}", args.interval) for i in range(args.clients)]
        done = [False]
        running = [defer.Deferred.fromCoroutine(c.run(lambda: done[0])) for c in clients]
        await _sleep(reactor, args.interval * 2)  # every device known (its first proof paid)
        report: dict[str, Any] = {"phases": {}}
        for name in ["baseline", *(args.only or ATTACKS)]:
            for client in clients:
                client.phase = name
            rss_before = _rss_kib(router.popen.pid)
            if name == "baseline":
                await _sleep(reactor, args.phase_seconds)
                attack: dict[str, int] = {}
            else:
                # Its own process, so that the attack's CPU does not delay the legitimate
                # clients' event loop (both still share the machine with the daemons).
                output, errors, code = await utils.getProcessOutputAndValue(
                    sys.executable,
                    [
                        *(__file__, "--attacker", name, str(port), state["signing_key"]),
                        str(args.phase_seconds),
                    ],
                    env={**os.environ, SOCKET_ENV: str(directory / SOCKET)},
                )
                if code != 0:
                    raise SystemExit(f"attack {name} failed:\n{errors.decode()[-3000:]}")
                attack = json.loads(output.decode().strip().splitlines()[-1])
            results = [r for c in clients for r in c.results if r[0] == name]
            ttfts = [r[2] for r in results if r[1] and r[2] is not None]
            failures = Counter(r[3] for r in results if not r[1])
            entry = {
                "legit_requests": len(results),
                "legit_success": sum(r[1] for r in results) / max(1, len(results)),
                "legit_ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
                "legit_ttft_p95_ms": round(percentile(ttfts, 95) * 1000, 1),
                "legit_failures": dict(failures),
                "attack": attack,
                "router_counters_after": await target.counters(),
                "router_rss_mib": round(_rss_kib(router.popen.pid) / 1024, 1),
                "router_rss_growth_mib": round((_rss_kib(router.popen.pid) - rss_before) / 1024, 1),
            }
            report["phases"][name] = entry
            print(json.dumps({name: entry}), flush=True)
            await _sleep(reactor, 3.0)  # let the attack's leftovers drain between phases
        done[0] = True
        await defer.gatherResults(running)
        worst = min(p["legit_success"] for p in report["phases"].values())
        report["target_met"] = worst >= 0.99
        report["cpu_count"] = os.cpu_count()
        report["load_average_at_end"] = os.getloadavg()
        print(json.dumps(report, indent=2))
    finally:
        router.stop()
        inference.stop()


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
