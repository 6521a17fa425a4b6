"""A real ``redis-server`` for tests: on a UNIX socket in a temp dir, no persistence, stopped at
cleanup (Debian's ``redis-server``, installed by etc/dev/ci-deps)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.router_support import short_tempdir
from tests.tools import require_tool

CONFIG = Path(__file__).resolve().parent.parent / "etc" / "redis" / "llmrouter.conf"


class RedisServer:
    """``redis-server`` with the configuration docs/deployment.md documents
    (etc/redis/llmrouter.conf: no RDB, no AOF, no eviction), on a socket of its own."""

    def __init__(self, testcase: Any, *options: str, directory: Path | None = None) -> None:
        self.binary = require_tool(testcase, "redis-server")
        self.options = options  # more redis-server options (--requirepass, TLS)
        self.directory = directory or short_tempdir(testcase)
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        testcase.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                str(CONFIG),
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.directory),
                *self.options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.socket))
                    return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start: " + self.log())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str, options: tuple[str, ...] = ()) -> str:
        """``redis-cli`` against this server (blocking; for assertions only)."""
        result = subprocess.run(
            ["redis-cli", "-s", str(self.socket), *options, "--raw", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return result.stdout

    def dump(self) -> dict[str, tuple[str, int, str]]:
        """Every key: (type, TTL in ms, its whole value as text)."""
        found: dict[str, tuple[str, int, str]] = {}
        for key in self.cli("--scan").split():
            kind = self.cli("TYPE", key).strip()
            reader = {
                "string": ("GET",),
                "hash": ("HGETALL",),
                "zset": ("ZRANGE", "0", "-1", "WITHSCORES"),
                "set": ("SMEMBERS",),
                "list": ("LRANGE", "0", "-1"),
            }[kind]
            value = self.cli(reader[0], key, *reader[1:])
            found[key] = (kind, int(self.cli("PTTL", key)), value)
        return found


def start_redis(testcase: Any, *options: str) -> RedisServer:
    return RedisServer(testcase, *options).start()


__all__ = ["CONFIG", "RedisServer", "start_redis"]
