"""Real daemons for tests: a ``twistd -n <plugin>`` subprocess per test.

``Daemon`` runs the plugin under the interpreter running the tests (so the working tree and the
venv are used), in a fresh short temp dir (UNIX socket paths must stay under 108 bytes), with
stdout and stderr captured to a log file, a readiness wait on ``GET /health`` and a clean stop
(SIGTERM, then SIGKILL if it does not exit in time). Everything is non-blocking on the reactor:
trial tests ``yield`` or return the Deferreds.

``start_inference`` is the inference daemon's shortcut on the tiny test model; the router's tests
start ``twistd llmrouter`` with ``Daemon`` directly, e.g.::

    d = Daemon("llmrouter", ["--listen", f"unix:{path}"], health=f"unix:{path}")
    testcase.addCleanup(d.stop)
    yield d.start()
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from llmrouter.httpclient import ClientTLS, agent_for
from tests.tinymodel import tiny_model_path

TWISTD = "from twisted.scripts.twistd import run; run()"


class DaemonFailed(Exception):
    """The daemon exited or never became healthy; the message carries the tail of its log."""


class _Output(ProcessProtocol):
    def __init__(self, log: BinaryIO) -> None:
        self._log = log
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self._log.close()
        code = 0
        value = reason.value
        if isinstance(value, ProcessTerminated):
            code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        elif not isinstance(value, ProcessDone):
            code = -1
        self.ended.callback(code)


class Daemon:
    """One twistd subprocess. ``health`` is ``unix:/path.sock``, ``http://h:p`` or ``https://h:p``."""

    def __init__(
        self,
        plugin: str,
        args: Sequence[str] = (),
        *,
        health: str | None = None,
        health_path: str = "/health",
        tls: ClientTLS | None = None,
        env: Mapping[str, str] | None = None,
        directory: Path | None = None,
        ready_timeout: float = 120.0,
        clock: Any = None,
        listen_fds: Sequence[int] = (),
        command: Sequence[str] = (),
    ) -> None:
        self.plugin = plugin
        self.command = list(command)  # another program than ``twistd -n plugin`` (llama-server)
        self.args = list(args)
        self.directory = directory or Path(tempfile.mkdtemp(prefix="llmr-"))
        self._owns_directory = directory is None
        self.log_path = self.directory / f"{plugin}.log"
        self.health = health
        self.health_path = health_path
        self.tls = tls
        self.ready_timeout = ready_timeout
        self.reactor: Any = clock or reactor
        self.env = dict(env or {})
        self.socket: Path | None = None  # set by start_inference
        self.listen_fds = list(listen_fds)
        self.exit_code: int | None = None
        self._protocol: _Output | None = None
        self._transport: Any = None

    # -- process ----------------------------------------------------------------------------
    def spawn(self) -> defer.Deferred[int]:
        """Start the process; the Deferred fires with its exit code when it ends."""
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("INFERENCE_", "LLMROUTER_")) and k not in ("LISTEN",)
        }
        environment.update(self.env)
        environment["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", self.plugin, *self.args]
        if self.command:
            argv = [*self.command, *self.args]
        executable = argv[0]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        if self.listen_fds:
            # systemd socket activation: the sockets as fds 3, 4, ... and LISTEN_PID set to the
            # daemon's own pid, which only a shell that then execs the daemon knows.
            for i, fd in enumerate(self.listen_fds):
                child_fds[3 + i] = fd
            environment["LISTEN_FDS"] = str(len(self.listen_fds))
            environment["LISTEN_FDNAMES"] = ":".join(["inference.socket"] * len(self.listen_fds))
            argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv]
            executable = "/bin/sh"
        self._protocol = _Output(self.log_path.open("ab"))
        self._transport = self.reactor.spawnProcess(
            self._protocol,
            executable,
            argv,
            env=environment,
            path=str(self.directory),
            childFDs=child_fds,
        )
        ended = self._protocol.ended

        def record(code: int) -> int:
            self.exit_code = code
            return code

        ended.addCallback(record)
        return self._chain(ended)

    @staticmethod
    def _chain(d: defer.Deferred[int]) -> defer.Deferred[int]:
        result: defer.Deferred[int] = defer.Deferred()

        def fire(code: int) -> int:
            result.callback(code)
            return code

        d.addCallback(fire)
        return result

    @property
    def running(self) -> bool:
        return self._protocol is not None and self.exit_code is None

    @property
    def pid(self) -> int | None:
        return None if self._transport is None else self._transport.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, name: str) -> None:
        if self.running:
            self._transport.signalProcess(name)

    # -- lifecycle --------------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self) -> Any:
        """Spawn, then wait until ``health`` answers 200; fails with DaemonFailed otherwise."""
        self.spawn()
        if self.health is None:
            return self
        deadline = self.reactor.seconds() + self.ready_timeout
        while True:
            if self.exit_code is not None:
                raise DaemonFailed(f"{self.plugin} exited with {self.exit_code}:\n{self._tail()}")
            try:
                probe = self.request(b"GET", self.health_path)
                probe.addTimeout(5, self.reactor)
                status, _, _ = yield probe
            except Exception:
                status = None
            if status == 200:
                return self
            if self.reactor.seconds() > deadline:
                yield self.stop()
                raise DaemonFailed(f"{self.plugin} not healthy in time:\n{self._tail()}")
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    def wait_exit(self, timeout: float = 60.0) -> defer.Deferred[int]:
        """The exit code once the process ends (without signalling it)."""
        if self.exit_code is not None:
            return defer.succeed(self.exit_code)
        assert self._protocol is not None
        d = self._chain(self._protocol.ended)
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: object, timeout: float) -> int:
        self.signal("KILL")
        raise DaemonFailed(f"{self.plugin} did not exit in {timeout}s:\n{self._tail()}")

    @defer.inlineCallbacks
    def stop(self, timeout: float = 20.0) -> Any:
        """SIGTERM and wait (SIGKILL after ``timeout``); remove the temp dir; idempotent."""
        if self.running:
            assert self._protocol is not None
            ended = self._chain(self._protocol.ended)
            self.signal("TERM")
            killer = self.reactor.callLater(timeout, self.signal, "KILL")
            yield ended
            if killer.active():
                killer.cancel()
        if self._owns_directory and os.environ.get("LLMR_KEEP_DAEMON_DIRS") is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return self.exit_code

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP -------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def request(
        self,
        method: bytes,
        path: str,
        body: bytes | None = None,
        headers: Mapping[bytes, Iterable[bytes]] | None = None,
        base: str | None = None,
    ) -> Any:
        """One request to ``base`` (default ``health``): fires with (status, Headers, body)."""
        target = base or self.health
        assert target is not None, "no address to talk to"
        agent, prefix = agent_for(self.reactor, target, tls=self.tls)
        producer = None
        all_headers = Headers({k: list(v) for k, v in (headers or {}).items()})
        if body is not None:
            producer = FileBodyProducer(BytesIO(body))
            if not all_headers.hasHeader(b"content-type"):
                all_headers.setRawHeaders(b"content-type", [b"application/json"])
        response = yield agent.request(method, (prefix + path).encode(), all_headers, producer)
        data = yield readBody(response)
        return response.code, response.headers, data


def activation_socket(testcase: Any, path: Path, mode: int = 0o660) -> socket.socket:
    """A listening UNIX socket as a systemd socket unit makes it (``SocketMode=``), for
    ``Daemon(listen_fds=[sock.fileno()])``; closed when the test ends."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    testcase.addCleanup(listener.close)
    listener.bind(str(path))
    os.chmod(path, mode)
    listener.listen(16)
    return listener


def start_router_daemon(
    testcase: Any,
    directory: Path,
    backends: list[str],
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Daemon:
    """``twistd llmrouter`` on ``directory/router.sock`` (metrics on ``metrics.sock``), keys in
    ``directory/keys``; stopped at cleanup."""
    sock = directory / "router.sock"
    args = ["--listen", f"unix:{sock}", "--metrics-listen", f"unix:{directory / 'metrics.sock'}"]
    args += ["--keys-dir", str(directory / "keys")]
    for backend in backends:
        args += ["--inference", backend]
    daemon = Daemon(
        "llmrouter",
        [*args, *extra],
        health=f"unix:{sock}",
        env={"HEALTH_INTERVAL_SECONDS": "0.5", **(env or {})},
        directory=directory,
    )
    testcase.addCleanup(daemon.stop)
    return daemon


def start_inference(
    testcase: Any,
    model: Path | None = None,
    listen: list[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120.0,
    wait: bool = True,
    fault: str | None = None,
) -> defer.Deferred[Daemon]:
    """Start ``twistd -n inference`` on ``model`` (default: the tiny test model).

    The daemon always listens on ``unix:<tmp>/inference.sock`` (its ``health`` address, also
    ``daemon.socket``) in addition to ``listen``. Stopped by the test's cleanup. With
    ``wait=False`` the Deferred fires as soon as the process is spawned (for tests of start-up
    failures or of /health while loading; use ``daemon.wait_exit()``). ``fault`` runs it with
    one fault injected (tests/faults.py).
    """
    directory = Path(tempfile.mkdtemp(prefix="llmr-"))
    socket = directory / "inference.sock"
    args = ["--listen", f"unix:{socket}:mode=600"]
    for endpoint in listen or ():
        args += ["--listen", endpoint]
    args += ["--model", str(model or tiny_model_path())]
    if "--threads" not in extra_args:
        args += ["--threads", "1"]  # OpenMP spin-waits badly on a shared 2-core machine
    args += list(extra_args)
    daemon = Daemon(
        "inference",
        args,
        health=f"unix:{socket}",
        env=env,
        directory=directory,
        ready_timeout=ready_timeout,
        command=(
            [sys.executable, "-m", "tests.faults", fault, "-n", "--pidfile=", "inference"]
            if fault
            else ()
        ),
    )
    daemon.socket = socket

    def cleanup() -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = daemon.stop()

        def remove(result: object) -> object:
            shutil.rmtree(directory, ignore_errors=True)
            return result

        d.addBoth(remove)
        return d

    testcase.addCleanup(cleanup)
    if not wait:
        daemon.spawn()
        return defer.succeed(daemon)
    started: defer.Deferred[Daemon] = daemon.start()
    return started


class StreamReader(Protocol):
    """Reads a streamed HTTP body (SSE) with real flow control.

    ``pause()`` stops reading from the socket (the server's writes then back up), ``resume()``
    reads again, ``disconnect()`` closes the connection. ``events`` are the ``data:`` payloads
    seen so far; ``wait_events(n)`` fires once there are at least n; ``done`` fires with all
    events when the body ends (or the connection is lost).
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()
        self.reason: Failure | None = None
        self._waiters: list[tuple[int, defer.Deferred[list[str]]]] = []
        self.transport: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    self.events.append(line[len(b"data: ") :].decode())
        for waiter in list(self._waiters):
            if len(self.events) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(self.events)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        for _, waiter in self._waiters:
            waiter.errback(Failure(DaemonFailed(f"stream ended after {len(self.events)} events")))
        self._waiters = []
        self.done.callback(self.events)

    def wait_events(self, n: int) -> defer.Deferred[list[str]]:
        if len(self.events) >= n:
            return defer.succeed(self.events)
        if self.done.called:
            return defer.fail(DaemonFailed(f"stream ended after {len(self.events)} events"))
        d: defer.Deferred[list[str]] = defer.Deferred()
        self._waiters.append((n, d))
        return d

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def disconnect(self) -> None:
        self.transport.stopProducing()


@defer.inlineCallbacks
def open_stream(
    daemon: Daemon,
    path: str,
    body: bytes,
    base: str | None = None,
    headers: Mapping[bytes, Iterable[bytes]] | None = None,
) -> Any:
    """POST and hand the body to a StreamReader: fires with (status, Headers, reader)."""
    target = base or daemon.health
    assert target is not None
    agent, prefix = agent_for(daemon.reactor, target, tls=daemon.tls)
    all_headers = Headers({k: list(v) for k, v in (headers or {}).items()})
    all_headers.setRawHeaders(b"content-type", [b"application/json"])
    producer = FileBodyProducer(BytesIO(body))
    response = yield agent.request(b"POST", (prefix + path).encode(), all_headers, producer)
    reader = StreamReader()
    response.deliverBody(reader)
    return response.code, response.headers, reader
