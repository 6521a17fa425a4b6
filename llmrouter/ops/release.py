"""``llmrouter-release``: the checks around installing, upgrading and rolling back a release.

    llmrouter-release check [--venv /opt/llmrouter/venv]
        every llmrouter and inference daemon running on this host runs the release the venv
        link points at (after an upgrade or a rollback: an instance that was not restarted, or
        a disabled unit started by mistake, shows here); exit 1 otherwise, or when none runs
    llmrouter-release check-settings UNIT [--venv DIR]
        the router's settings check (``twistd llmrouter --check``, production preflight
        included) as the unit would run it: as its user, with its environment (Environment=,
        every EnvironmentFile= in order, drop-ins, ``%i``) and the release in DIR (default: the
        one the unit names), so that a file the service cannot read or a setting an instance's
        own file overrides shows before anything restarts

Daemons are found in ``/proc``: ``twistd ... llmrouter|inference`` processes with this host's
root (not a container's); a process's release is the virtualenv of its interpreter (the path
pip wrote into ``twistd``'s first line when that release was installed), and its unit the
systemd service in its cgroup.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmrouter.ops.unitfile import find_unit, service_setting, unit_environment

__all__ = ["Daemon", "main", "running_daemons"]

PROG = "llmrouter-release"
VENV = Path("/opt/llmrouter/venv")
PLUGINS = ("llmrouter", "inference")


@dataclass(frozen=True)
class Daemon:
    pid: int
    plugin: str  # "llmrouter" or "inference"
    unit: str  # the systemd service, or "pid N" outside one
    release: Path  # the virtualenv its interpreter belongs to

    def describe(self) -> str:
        return f"{self.unit} ({self.plugin}, pid {self.pid}): {self.release}"


def running_daemons(proc: Path = Path("/proc")) -> list[Daemon]:
    """Every ``twistd`` llmrouter or inference daemon whose root is this process's root."""
    mine = os.stat("/")
    found: list[Daemon] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            argv = [a.decode(errors="replace") for a in raw.split(b"\0")]
            root = os.stat(entry / "root")
            cgroup = (entry / "cgroup").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if (root.st_dev, root.st_ino) != (mine.st_dev, mine.st_ino):
            continue
        words = [a for a in argv if a]
        if len(words) < 2 or not any(Path(w).name == "twistd" for w in words[:3]):
            continue
        plugin = next((w for w in words if w in PLUGINS), None)
        if plugin is None:
            continue
        interpreter = Path(words[0])
        release = Path(os.path.realpath(interpreter.parent)).parent
        unit = next(
            (
                part
                for line in cgroup.splitlines()
                for part in reversed(line.split("/"))
                if part.endswith(".service")
            ),
            f"pid {entry.name}",
        )
        found.append(Daemon(int(entry.name), plugin, unit, release))
    return sorted(found, key=lambda d: (d.unit, d.pid))


def check(venv: Path, proc: Path = Path("/proc")) -> int:
    target = Path(os.path.realpath(venv))
    daemons = running_daemons(proc)
    if not daemons:
        print(f"{PROG}: no llmrouter or inference daemon is running here", file=sys.stderr)
        return 1
    stale = [d for d in daemons if d.release != target]
    for daemon in daemons:
        mark = "ok   " if daemon.release == target else "STALE"
        print(f"{mark} {daemon.describe()}")
    if stale:
        print(f"{PROG}: {len(stale)} of {len(daemons)} daemons do not run {target} ({venv}):"
              " restart them", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{PROG}: all {len(daemons)} daemons run {target}")
    return 0


def check_settings(unit_name: str, venv: Path | None) -> int:
    """``twistd llmrouter --check`` as ``unit_name``'s user, with its environment."""
    try:
        unit = find_unit(unit_name)
    except FileNotFoundError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    command = service_setting(unit, "ExecStart").split()
    if "llmrouter" not in command:
        print(f"{PROG}: {unit_name} does not run the router", file=sys.stderr)
        return 2
    twistd = Path(command[0])
    if venv is not None:
        twistd = venv / "bin" / "twistd"
    user = service_setting(unit, "User") or "root"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(unit_environment(unit))
    argv = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    argv += [str(twistd), "llmrouter", "--check"]
    directory = service_setting(unit, "WorkingDirectory") or "/"
    result = subprocess.run(argv, cwd=directory if Path(directory).is_dir() else "/", check=False)
    return result.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    running = commands.add_parser("check", help="every daemon here runs the linked release")
    running.add_argument("--venv", type=Path, default=VENV)
    settings = commands.add_parser("check-settings", help="--check as the unit runs the router")
    settings.add_argument("unit")
    settings.add_argument("--venv", type=Path, default=None, help="the release to check with")
    options = parser.parse_args(argv)
    if options.command == "check":
        return check(options.venv)
    return check_settings(options.unit, options.venv)


if __name__ == "__main__":
    sys.exit(main())
