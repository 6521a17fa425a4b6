"""Throwaway hosts for tests/test_deployment_walk.py, and the commands of docs/deployment.md.

A :class:`Host` is a process holding new mount, network and UTS namespaces whose root is an
overlay of this machine's ``/`` with a private tmpfs on top: commands (``nsenter`` into it)
see the machine's Debian, its packages and this checkout, and everything they write (users in
``/etc/passwd``, ``/opt/llmrouter``, ``/etc/llmrouter``, units in ``/etc/systemd/system``) lands
in the tmpfs and vanishes with the host. Its network namespace has loopback and, once
WireGuard "starts", a ``wg0`` (a veth into a bridge shared by the hosts of one walk, with the
address the host's ``wg0.conf`` names), so the firewall rules, listeners and ``verify-network``
are each host's own.

The page's commands run in a :class:`Session`: one bash per host, kept from command to command as
an operator's login shell is, so that what a command leaves behind (the umask, the working
directory, variables) is there for the next one, and starting again at every section of the
page, as a new SSH session would (home directory, umask 022, no variables).

systemd cannot run as PID 1 here, so :class:`Services` stands in for it where the page says
``systemctl``: it reads the installed unit files and their drop-ins (systemd's precedence for
``Environment=``/``EnvironmentFile=``, ``User=``, state and runtime directories) and starts
``ExecStart=`` with the sandbox launcher of tests/test_systemd_sandbox.py for our units, or as
the unit's user (with its ambient capabilities) for Debian's (Caddy, Prometheus, Redis).
``systemctl`` itself is replaced inside a host by a script that hands its call to the walk and
waits for the result, as the real one waits for its job (the renewal unit's ``ExecStartPost=``
calls it too), so ``systemctl restart X && curl X`` means what it means on a real host.
"""

from __future__ import annotations

import grp
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmrouter.ops.unitfile import find_unit, service_setting, unit_environment

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "tests" / "test_systemd_sandbox.py"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system")
CALLS = "/run/walk-systemctl"
SESSION = "/run/walk-session"

# Runs as ``python -c HOLDER BASE NAME``: namespaces, the overlay root, then waits for EOF.
HOLDER = r"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
def mount(src, target, fstype, flags, data=None):
    enc = lambda v: v.encode() if v else None
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), target)
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
base, name, repo, shim = sys.argv[1:5]
check(libc.unshare(0x00020000 | 0x40000000 | 0x04000000), "unshare")  # mount, net, uts
mount(None, "/", None, MS_REC | MS_PRIVATE)
mount("tmpfs", base, "tmpfs", 0, "size=16g,mode=0700")
for d in ("upper", "work", "root"):
    os.mkdir(f"{base}/{d}")
root = f"{base}/root"
mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={base}/upper,workdir={base}/work")
mount("proc", f"{root}/proc", "proc", 0)
mount("/dev", f"{root}/dev", None, MS_BIND | MS_REC)
mount("sysfs", f"{root}/sys", "sysfs", 0)
for d in ("tmp", "run"):
    mount("tmpfs", f"{root}/{d}", "tmpfs", 0, "mode=1777" if d == "tmp" else "mode=0755")
if repo.startswith(("/tmp/", "/run/")):  # a checkout the fresh /tmp or /run hid: throwaway too
    for d in ("repo-upper", "repo-work"):
        os.mkdir(f"{base}/{d}")
    os.makedirs(f"{root}{repo}")
    options = f"lowerdir={repo},upperdir={base}/repo-upper,workdir={base}/repo-work"
    mount("overlay", f"{root}{repo}", "overlay", 0, options)
# the page's `git clone ... llmrouter` in root's home: this checkout (its throwaway copy)
os.makedirs(f"{root}/root/llmrouter", exist_ok=True)
mount(f"{root}{repo}", f"{root}/root/llmrouter", None, MS_BIND | MS_REC)
with open(f"{base}/systemctl", "w") as f:
    f.write(shim)
os.chmod(f"{base}/systemctl", 0o755)
mount(f"{base}/systemctl", f"{root}/usr/bin/systemctl", None, MS_BIND)
libc.sethostname(name.encode(), len(name))
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
# pivot_root, not chroot: a chrooted process may not create user namespaces (PrivateUsers=)
os.chdir(root)
pivot_root = {"x86_64": 155, "aarch64": 41}[os.uname().machine]
check(libc.syscall(pivot_root, b".", b"."), "pivot_root")
check(libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
os.chdir(repo)
print("ready", flush=True)
sys.stdin.read()
"""
SHIM = f"""#!/bin/sh
# systemd is not PID 1 here: hand the call to the walk, wait for its result, as systemctl does
mkdir -p {CALLS}
id=$$.$(date +%s%N)
printf '%s\\n' "$*" > {CALLS}/$id.tmp && mv {CALLS}/$id.tmp {CALLS}/$id.call
while [ ! -e {CALLS}/$id.done ]; do sleep 0.05; done
cat {CALLS}/$id.out
code=$(cat {CALLS}/$id.done)
rm -f {CALLS}/$id.done {CALLS}/$id.out
exit "$code"
"""


class WalkError(AssertionError):
    """A documented step failed; the message has the command, its output and where it is."""


@dataclass(frozen=True)
class Block:
    """A fenced block of docs/deployment.md: commands (``sh``) or lines to set in a file."""

    host: str
    kind: str  # "sh" or "edit"
    lines: tuple[str, ...]
    line_number: int
    path: str = ""
    section: str = ""  # the section (##) it is in: a new login session starts with each

    def commands(self) -> Iterator[str]:
        """Logical lines: continuations joined, comments and blank lines skipped."""
        pending = ""
        for raw in self.lines:
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                yield line


def blocks(markdown: str) -> list[Block]:
    """The blocks the walk performs: fences ``sh HOST`` and ``ini HOST`` (an edit, whose first
    line ``# /path`` names the file); untagged fences are illustrations."""
    found: list[Block] = []
    lines = markdown.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i].lstrip("#").strip()
        match = re.fullmatch(r"```(sh|ini) (\w+)", lines[i].strip())
        if match is None:
            i += 1
            continue
        start = i + 1
        end = lines.index("```", start)
        body = tuple(lines[start:end])
        if match.group(1) == "sh":
            found.append(Block(match.group(2), "sh", body, start, section=section))
        else:
            path = body[0].removeprefix("#").strip()
            found.append(Block(match.group(2), "edit", body[1:], start, path, section))
        i = end + 1
    return found


def set_lines(text: str, assignments: list[str]) -> str:
    """What an operator does in an editor: replace the active ``KEY=...`` line, else its
    commented-out example ``#KEY=...``, or add it at the end. (A comment that merely mentions
    ``KEY=`` in prose, e.g. ``#   KEY=a, b``, is not the setting.)"""
    out = text.splitlines()
    for assignment in assignments:
        key = re.escape(assignment.split("=", 1)[0])
        for pattern in (re.compile(rf"^{key}="), re.compile(rf"^#{key}=")):
            index = next((i for i, line in enumerate(out) if pattern.match(line)), None)
            if index is not None:
                out[index] = assignment
                break
        else:
            out.append(assignment)
    return "\n".join(out) + "\n"


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    unit: dict[str, list[str]]
    env: dict[str, str]


class Host:
    """One throwaway machine; commands run as root in its root, namespaces and checkout."""

    def __init__(self, name: str, scratch: Path, logs: Path) -> None:
        self.name = name
        self.logs = logs
        self.variables: dict[str, str] = {}
        self.link: Link | None = None
        base = scratch / name
        base.mkdir()
        self._holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(base), name, str(REPO), SHIM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"ready\n":
            assert self._holder.stderr is not None
            raise WalkError(f"{name}: no throwaway root: {self._holder.stderr.read().decode()}")
        self.pid = self._holder.pid
        self.services = Services(self)
        self.session: Session | None = None
        self._serving: set[str] = set()

    def path(self, inside: str) -> Path:
        """A path of this host, seen from the test (through its root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def enter(self, network: bool = True) -> list[str]:
        argv = ["nsenter", "-t", str(self.pid), "-m", "-u", "-r", "-w"]
        return [*argv, "-n"] if network else argv

    def environment(self) -> dict[str, str]:
        """A root login's environment (plus this machine's pip configuration)."""
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root"}
        env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
        return env

    def shell(
        self, command: str, network: bool = True, timeout: float = 900, serve: bool = False
    ) -> str:
        """``command`` in a bash of its own (``-euo pipefail``, no session state: the test's
        own looks at the host); its output, or :class:`WalkError` with the output when it
        fails. ``serve``: carry out its systemctl calls meanwhile."""
        with tempfile.TemporaryFile() as out:
            process = subprocess.Popen(
                [*self.enter(network), "bash", "-euo", "pipefail", "-c", command],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.environment(),
            )
            if serve:
                code = self.wait(process, timeout)
            else:
                try:
                    code = process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    raise
            out.seek(0)
            output = out.read().decode(errors="replace")
        if code != 0:
            raise WalkError(f"[{self.name}] exit {code}: {command}\n{output[-6000:]}")
        return output

    def serve(self) -> None:
        """Carry out the systemctl calls waiting in this host (the shim waits for each)."""
        folder = self.path(CALLS)
        if not folder.is_dir():
            return
        for call in sorted(folder.glob("*.call")):
            name = call.name.removesuffix(".call")
            if name in self._serving:
                continue
            self._serving.add(name)
            try:
                argv = shlex.split(call.read_text())
                call.unlink()
                code, output = 0, ""
                try:
                    output = self.services.systemctl(argv) or ""
                except WalkError as error:
                    code, output = 1, f"{error}\n"
                (folder / f"{name}.out").write_text(output)
                (folder / f"{name}.done").write_text(f"{code}\n")
            finally:
                self._serving.discard(name)

    def wait(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        """``process``'s exit status, carrying out its systemctl calls meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                self.serve()
                return code
            if time.monotonic() > deadline:
                process.kill()
                raise subprocess.TimeoutExpired(process.args, timeout)
            self.serve()
            time.sleep(0.05)

    def new_session(self) -> None:
        """A new login shell, as after a new SSH connection: the old one's state is gone."""
        if self.session is not None:
            self.session.close()
        self.session = Session(self)

    def run(self, command: str, timeout: float = 900) -> str:
        """``command`` in this host's current session (one is opened if there is none)."""
        if self.session is None:
            self.new_session()
        assert self.session is not None
        return self.session.run(command, timeout)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.services.stop_all()
        if self._holder.stdin is not None:
            self._holder.stdin.close()
        self._holder.wait(30)


class Session:
    """An operator's shell on a host: one bash, as root, in the host's namespaces, that keeps
    its working directory, umask and variables from one command to the next. It starts where
    an SSH login does (``/root``, umask 022). ``set -u`` and an ERR trap make a command that
    uses an unset variable, or any part of which fails, fail the walk (an operator sees the
    error; the walk must too).

    Commands that download (``pip``, ``make``, ``bin/install-release``) need the machine's
    network, which the host's namespace does not have: they run in a bash of their own, in the
    host's mounts but the machine's network, given this session's directory, umask and
    variables."""

    SETUP = (
        "set -uE -o pipefail\n"
        "trap 'walk_failed=$?' ERR\n"
        "umask 0022\n"
        "cd /root\n"
        "walk_names=$(compgen -v | tr '\\n' ' ')\n"
    )

    def __init__(self, host: Host) -> None:
        self.host = host
        self.process = subprocess.Popen(
            [*host.enter(), "bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=host.environment(),
        )
        host.path(SESSION).mkdir(parents=True, exist_ok=True)
        self._send(self.SETUP)
        self.run("true")

    def _send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def run(self, command: str, timeout: float = 900) -> str:
        """The command's output; WalkError (with it) when any part of it failed."""
        folder = self.host.path(SESSION)
        (folder / "command").write_text(command + "\n")
        self._send(
            f"walk_failed=0; . {SESSION}/command > {SESSION}/output 2>&1 < /dev/null; "
            'walk_status=$?; [ "$walk_failed" = 0 ] || walk_status=$walk_failed; '
            'printf "\\n__walk_done__ %s\\n" "$walk_status"\n'
        )
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        os.set_blocking(fd, False)
        buffered = b""
        deadline = time.monotonic() + timeout
        while True:
            self.host.serve()
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    output = (folder / "output").read_text(errors="replace")
                    raise WalkError(
                        f"[{self.host.name}] the shell exited: {command}\n{output[-6000:]}"
                    )
                buffered += chunk
                match = re.search(rb"__walk_done__ (\d+)\n", buffered)
                if match is not None:
                    break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
        output = (folder / "output").read_text(errors="replace")
        code = int(match.group(1))
        if code != 0:
            raise WalkError(f"[{self.host.name}] exit {code}: {command}\n{output[-6000:]}")
        return output

    def state(self) -> str:
        """Bash lines that recreate this session's directory, umask and variables."""
        return self.run(
            'printf "cd %q\\numask %s\\n" "$PWD" "$(umask)"; '
            'for name in $(compgen -v); do case " $walk_names walk_names walk_failed '
            'walk_status " in *" $name "*) ;; *) declare -p "$name" ;; esac; done'
        )

    def run_networked(self, command: str, timeout: float = 1800) -> str:
        """``command`` in the machine's network, with this session's state."""
        return self.host.shell(self.state() + command, network=False, timeout=timeout, serve=True)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Services:
    """systemd's part, for the units the page starts (see the module docstring)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.running: dict[str, Service] = {}
        self.before_start: dict[str, Callable[[], None]] = {}

    # Unit files.

    def unit_file(self, name: str) -> tuple[str, list[Path], str]:
        """(unit file inside the host, drop-ins, instance) for ``name``, found as systemd would."""
        instance = ""
        template = name
        match = re.fullmatch(r"(.+@)(.+)(\.\w+)", name)
        if match is not None:
            template, instance = match.group(1) + match.group(3), match.group(2)
        for directory in UNIT_DIRS:
            if self.host.path(f"{directory}/{template}").exists():
                inside = f"{directory}/{template}"
                break
        else:
            raise WalkError(f"[{self.host.name}] no unit {name} installed")
        dropins: list[Path] = []
        for directory in UNIT_DIRS:
            for stem in sorted({name, template}):
                folder = self.host.path(f"{directory}/{stem}.d")
                if folder.is_dir():
                    dropins += sorted(folder.glob("*.conf"))
        return inside, dropins, instance

    def unit(self, name: str) -> dict[str, list[str]]:
        self.unit_file(name)  # WalkError when it is not installed
        return find_unit(name, self.host.path("/"))

    # systemctl.

    def systemctl(self, argv: list[str]) -> str:
        """One systemctl call; its output. WalkError where systemctl would fail."""
        args = [a for a in argv if not a.startswith("-")]
        now = "--now" in argv
        verb, names = args[0], [_full(n) for n in args[1:]]
        if verb in ("daemon-reload", "mask"):
            return ""  # nothing to load; nothing swaps here
        if verb == "is-active":
            states = ["active" if n in self.running else "inactive" for n in names]
            if "inactive" in states:
                raise WalkError("\n".join(states))
            return "\n".join(states) + "\n"
        for name in names:
            if verb in ("enable", "disable"):
                self.unit_file(name)  # must be installed; boot-time enabling has no meaning here
                if now:
                    (self.start if verb == "enable" else self.stop)(name)
            elif verb == "start":
                self.start(name)
            elif verb == "stop":
                self.stop(name)
            elif verb == "restart":
                self.stop(name)
                self.start(name)
            elif verb == "try-restart":
                for running in [n for n in self.running if _matches(name, n)]:
                    self.stop(running)
                    self.start(running)
            elif verb in ("try-reload-or-restart", "reload-or-restart"):
                matched = [n for n in self.running if _matches(name, n)]
                if verb == "reload-or-restart" and not matched:
                    matched = [name]
                for unit in matched:
                    if unit in self.running and "Service.ExecReload" in self.running[unit].unit:
                        self.reload(unit)
                    else:
                        self.stop(unit)
                        self.start(unit)
            elif verb == "reload":
                self.reload(name)
            else:
                raise WalkError(f"[{self.host.name}] systemctl {verb}: not modelled by the walk")
        return ""

    def start(self, name: str) -> None:
        if name in self.running:
            return
        hook = self.before_start.get(name)
        if hook is not None:
            hook()
        if name.endswith(".socket"):
            # the launcher creates the socket (as systemd would) when the service starts
            self.start(
                self.unit(name).get("Socket.Service", [name.replace(".socket", ".service")])[0]
            )
            return
        if name.endswith(".timer"):
            self.unit_file(name)
            return
        if name == "nftables.service":
            self.host.shell("nft -f /etc/nftables.conf")
            return
        if name.startswith("wg-quick@"):
            self.wireguard(name)
            return
        self.run_service(name)

    def stop(self, name: str) -> None:
        if name.endswith(".socket"):
            path = self.unit(name).get("Socket.ListenStream", [""])[0]
            if path and self.host.path(path).exists():
                self.host.path(path).unlink()  # RemoveOnStop=yes
            return
        service = self.running.pop(name, None)
        if service is None:
            return
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(30)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(10)
        for directory in service.unit.get("Service.RuntimeDirectory", []):
            shutil.rmtree(self.host.path(f"/run/{directory}"), ignore_errors=True)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def reload(self, name: str) -> None:
        if name == "nftables.service":
            self.host.shell("nft -f /etc/nftables.conf")
            return
        service = self.running.get(name)
        if service is None:
            raise WalkError(f"[{self.host.name}] reload of {name}, which is not running")
        command = service_setting(service.unit, "ExecReload").replace(
            "$MAINPID", str(service.process.pid)
        )
        self.exec(service.unit, _words(command, service.env), service.env, wait=True)

    def pid(self, name: str) -> int:
        return self.running[name].process.pid

    def log(self, name: str) -> str:
        path = self.host.logs / f"{self.host.name}-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # Starting a service.

    def environment(self, unit: dict[str, list[str]]) -> dict[str, str]:
        """What systemd gives a service: PATH, the user's HOME/USER/LOGNAME/SHELL, then the
        unit's Environment= and EnvironmentFile= (read from this host's root)."""
        env = {"PATH": PATH, "LANG": "C.UTF-8"}
        user = service_setting(unit, "User") or "root"
        entry = self.passwd(user)
        env.update(HOME=entry[5], USER=user, LOGNAME=user, SHELL=entry[6])
        env.update(unit_environment(unit, self.host.path))
        return env

    def passwd(self, user: str) -> list[str]:
        for line in self.host.path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return fields
        raise WalkError(f"[{self.host.name}] no user {user}")

    def ids(self, unit: dict[str, list[str]]) -> tuple[int, int]:
        user = service_setting(unit, "User") or "root"
        fields = self.passwd(user)
        group = service_setting(unit, "Group")
        if group:
            for line in self.host.path("/etc/group").read_text().splitlines():
                if line.split(":")[0] == group:
                    return int(fields[2]), int(line.split(":")[2])
        return int(fields[2]), int(fields[3])

    def directories(self, unit: dict[str, list[str]]) -> list[str]:
        """StateDirectory=, CacheDirectory=, RuntimeDirectory=: created, owned by the user."""
        uid, gid = self.ids(unit)
        made = []
        for kind, top in (("State", "/var/lib"), ("Cache", "/var/cache"), ("Runtime", "/run")):
            mode = int(service_setting(unit, f"{kind}DirectoryMode", "0755"), 8)
            for name in " ".join(unit.get(f"Service.{kind}Directory", [])).split():
                inside = f"{top}/{name}"
                path = self.host.path(inside)
                path.mkdir(parents=True, exist_ok=True)
                os.chown(path, uid, gid)
                os.chmod(path, mode)
                made.append(inside)
        return made

    def run_service(self, name: str) -> None:
        unit = self.unit(name)
        env = self.environment(unit)
        writable = self.directories(unit)
        unit_path = self.unit_file(name)[0]
        ours = (REPO / "etc" / "systemd" / Path(unit_path).name).exists()
        argv = _words(service_setting(unit, "ExecStart"), env)
        sock = self.socket_of(name)
        if ours:
            launcher = [sys.executable, str(LAUNCHER), unit_path]
            if sock is not None:
                launcher += ["--listen-unix", sock]
            for path in writable:
                launcher += ["--rw", path]
            argv = [*launcher, "--", *argv]
        else:
            argv = self.as_user(unit, argv)
        cwd = service_setting(unit, "WorkingDirectory") or "/"
        oneshot = service_setting(unit, "Type") == "oneshot"
        process = self.exec(unit, argv, env, cwd=cwd, log=name, wait=oneshot)
        if oneshot:
            for post in unit.get("Service.ExecStartPost", []):
                self.exec(unit, _words(post, env), env, wait=True, log=name)
            for directory in unit.get("Service.RuntimeDirectory", []):
                shutil.rmtree(self.host.path(f"/run/{directory}"), ignore_errors=True)
            return
        self.running[name] = Service(
            name, process, self.host.logs / f"{self.host.name}-{name}.log", unit, env
        )
        try:
            self.wait_ready(name, env, sock)
        except WalkError:
            self.stop(name)
            raise

    def socket_of(self, name: str) -> str | None:
        """The path of the UNIX socket a socket unit makes for ``name`` (inference.socket,
        llmrouter@N.socket), with its directory made as systemd makes it (DirectoryMode=)."""
        socket_unit = name.removesuffix(".service") + ".socket"
        try:
            unit = self.unit(socket_unit)
        except WalkError:
            return None
        path = unit["Socket.ListenStream"][0]
        mode = int(unit.get("Socket.DirectoryMode", ["0755"])[-1], 8)
        parent = self.host.path(str(Path(path).parent))
        if not parent.exists():
            parent.mkdir(parents=True)
            os.chmod(parent, mode)
        # systemd keeps its socket across a restart of the service; the launcher makes a new
        # one at the same path instead, so the last one's file goes first
        self.host.path(path).unlink(missing_ok=True)
        return path

    def as_user(self, unit: dict[str, list[str]], argv: list[str]) -> list[str]:
        user = service_setting(unit, "User")
        if not user or user == "root":
            return argv
        caps = []
        for cap in " ".join(unit.get("Service.AmbientCapabilities", [])).split():
            name = cap.lower().removeprefix("cap_")
            caps += [f"--inh-caps=+{name}", f"--ambient-caps=+{name}"]
        uid, gid = self.ids(unit)
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", *caps, "--", *argv]

    def exec(
        self,
        unit: dict[str, list[str]],
        argv: list[str],
        env: dict[str, str],
        cwd: str = "/",
        log: str = "",
        wait: bool = False,
    ) -> subprocess.Popen[bytes]:
        """``argv`` in this host; systemd's prefixes: ``+`` (as root, no sandbox: the walk
        sandboxes only what it starts through the launcher) and ``-`` (failure ignored)."""
        ignore = argv[0].startswith("-") or argv[0].startswith("+-")
        argv = [argv[0].lstrip("+-"), *argv[1:]]
        self.host.logs.mkdir(parents=True, exist_ok=True)
        path = self.host.logs / f"{self.host.name}-{log or 'exec'}.log"
        with path.open("ab") as output:
            process = subprocess.Popen(
                [*self.host.enter(), "env", f"--chdir={cwd}", *argv],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait:
            code = self.host.wait(process, 300)  # an ExecStartPost= may call systemctl
            if code != 0 and not ignore:
                raise WalkError(
                    f"[{self.host.name}] {' '.join(argv)} exited {code}:\n"
                    + path.read_text(errors="replace")[-4000:]
                )
        return process

    def wait_ready(
        self, name: str, env: dict[str, str], sock: str | None = None, limit: float = 120
    ) -> None:
        """Until the service answers where it listens (systemd's Type=simple returns at once;
        the walk waits so that the next documented check is not a race)."""
        probe = _probe(name, env, sock)
        deadline = time.monotonic() + limit
        service = self.running[name]
        while True:
            if service.process.poll() is not None:
                raise WalkError(f"[{self.host.name}] {name} exited:\n{self.log(name)[-4000:]}")
            if probe is None:
                return
            try:
                self.host.shell(probe, timeout=10)
                return
            except (WalkError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise WalkError(
                        f"[{self.host.name}] {name} not ready:\n{self.log(name)[-4000:]}"
                    ) from None
                time.sleep(0.3)

    def wireguard(self, name: str) -> None:
        """wg-quick@wg0 needs the WireGuard kernel module, which this kernel lacks: check the
        file the page wrote (0600, no placeholder left, accepted by ``wg-quick strip``) and
        give the host a ``wg0`` with its address on the walk's shared link instead."""
        conf = self.host.path("/etc/wireguard/wg0.conf")
        if conf.stat().st_mode & 0o077:
            raise WalkError(f"[{self.host.name}] /etc/wireguard/wg0.conf is not 0600")
        if re.search(r"^[^#]*<", conf.read_text(), re.M):
            raise WalkError(f"[{self.host.name}] placeholders left in /etc/wireguard/wg0.conf")
        self.host.shell("wg-quick strip wg0 > /dev/null")
        address = re.search(r"^Address = (\S+)", conf.read_text(), re.M)
        assert address is not None and self.host.link is not None
        self.host.link.attach(self.host)
        self.host.shell(f"ip addr add {address.group(1)} dev wg0 && ip link set wg0 up")


def _full(name: str) -> str:
    return name if re.search(r"\.(service|socket|timer|target)$", name) else f"{name}.service"


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), name) is not None


def _words(command: str, env: dict[str, str]) -> list[str]:
    """systemd's command line: ``$VAR`` splits into words, ``${VAR}`` stays one."""
    words: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def _probe(name: str, env: dict[str, str], sock: str | None = None) -> str | None:
    """A command that succeeds once the service serves (None: ready when started)."""
    if sock is not None:  # socket-activated: its health over that socket
        path = "/health/live" if name.startswith("llmrouter") else "/health"
        return f"curl -fsS -o /dev/null --unix-socket {sock} http://localhost{path}"
    if name == "redis-server.service":
        return "test -S /run/redis/redis-server.sock"
    if name == "llmrouter.service":
        listen = re.search(r"tcp:(\d+):interface=([\d.]+)", env.get("LISTEN", ""))
        assert listen is not None, env.get("LISTEN")
        return f"curl -fsS -o /dev/null http://{listen.group(2)}:{listen.group(1)}/health/live"
    if name.startswith("inference@"):
        listen = re.search(r"ssl:(\d+):interface=([\d.]+)", env.get("INFERENCE_LISTEN", ""))
        assert listen is not None
        return f"exec 3<>/dev/tcp/{listen.group(2)}/{listen.group(1)}"
    if name == "caddy.service":
        return "test -S /run/caddy/admin.sock && exec 3<>/dev/tcp/127.0.0.1/443"
    if name == "prometheus.service":
        return "curl -fsS -o /dev/null http://127.0.0.1:9090/-/ready"
    if name == "prometheus-alertmanager.service":
        return "curl -fsS -o /dev/null http://127.0.0.1:9093/-/ready"
    return None


@dataclass
class Link:
    """The hosts' shared link (what WireGuard carries in production): a bridge in a namespace
    of its own; each host gets a veth named wg0 into it."""

    holder: subprocess.Popen[bytes] = field(init=False)
    attached: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "sh",
                "-c",
                "ip link add br0 type bridge && ip link set br0 up && echo ready && exec cat",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != b"ready\n":
            raise WalkError("no bridge for the walk's hosts")

    def attach(self, host: Host) -> None:
        """Give ``host`` a wg0 on the link. The others forget the addresses they had learnt (a
        host that takes over a lost one's address, as the restore does, is reached at once)."""
        for other in self.attached:
            other.shell("ip neigh flush dev wg0")
        self.attached.append(host)
        peer = f"to-{host.name}"
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "wg0",
                "netns",
                str(host.pid),
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                str(self.holder.pid),
            ],
            check=True,
        )
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.holder.pid),
                "-n",
                "ip",
                "link",
                "set",
                peer,
                "master",
                "br0",
                "up",
            ],
            check=True,
        )

    def detach(self, host: Host) -> None:
        """``host`` leaves the link (a lost host)."""
        host.shell("ip link del wg0")
        self.attached.remove(host)

    def close(self) -> None:
        if self.holder.stdin is not None:
            self.holder.stdin.close()
        self.holder.wait(10)


def apt_packages(command: str) -> list[str]:
    """The packages an ``apt-get install`` line names."""
    return [word for word in command.split()[2:] if not word.startswith("-")]


def installed(package: str) -> bool:
    """Whether dpkg has ``package`` installed on this machine (the roots' lower layer)."""
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return status.stdout == "install ok installed"


def group_id(host: Host, name: str) -> int:
    for line in host.path("/etc/group").read_text().splitlines():
        if line.split(":")[0] == name:
            return int(line.split(":")[2])
    return grp.getgrnam(name).gr_gid


class Walk:
    """The hosts of one walk, and the page's blocks performed on them in order.

    Commands run as written, in each host's :class:`Session` (a new one at every section of the
    page), with these exceptions, which need what a test machine cannot give: ``apt-get`` (the
    packages must already be installed here: etc/dev/ci-deps), ``git`` (``git clone`` finds
    this checkout in ``/root/llmrouter``; ``git checkout vNEW`` sets the version of that copy to
    NEW, for the upgrade), ``scp`` (copies between the hosts' roots, by the public names in
    ``addresses``), ``sysctl --system`` (the file must be installed; the kernel is the
    machine's) and ``swapoff``. Commands that download (``pip``, ``make``,
    ``bin/install-release``, ``llmrouter-llama-build``) use the machine's network; all others
    run in the host's own.
    """

    def __init__(
        self, scratch: Path, logs: Path, names: list[str], addresses: dict[str, str]
    ) -> None:
        self.link = Link()
        self.hosts: dict[str, Host] = {}
        self.addresses = addresses
        self.transcript: list[str] = []
        self.before: list[tuple[str, Callable[[Host, str], None]]] = []
        self.after: list[tuple[str, Callable[[Host, str, str], None]]] = []
        self.section = ""
        try:
            for name in names:
                self.hosts[name] = Host(name, scratch, logs)
                self.hosts[name].link = self.link
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        self.link.close()

    def perform(self, block: Block) -> None:
        if block.section != self.section:  # another day, another SSH login on every host
            self.section = block.section
            for each in self.hosts.values():
                if each.session is not None:
                    each.session.close()
                    each.session = None
        host = self.hosts[block.host]
        if block.kind == "edit":
            path = host.path(block.path)
            text = path.read_text() if path.exists() else ""
            path.write_text(set_lines(text, [line for line in block.lines if "=" in line]))
            self.transcript.append(f"[{host.name}] (edit) {block.path}")
            return
        for command in block.commands():
            for pattern, before in self.before:
                if re.search(pattern, command):
                    before(host, command)
            try:
                output = self.run(host, command)
            except (WalkError, subprocess.TimeoutExpired) as error:
                raise WalkError(
                    f"docs/deployment.md, block at line {block.line_number} ({block.section}):\n"
                    f"{error}\nwalk so far:\n" + "\n".join(self.transcript[-15:])
                ) from None
            self.transcript.append(f"[{host.name}] {command}")
            for pattern, after in self.after:
                if re.search(pattern, command):
                    after(host, command, output)

    def run(self, host: Host, command: str) -> str:
        word = command.split()[0]
        if word == "apt-get":
            self.packages(host, command)
        elif word == "git":
            self.checkout(host, command)
        elif word == "scp":
            self.copy(host, command)
        elif command == "sysctl --system":
            if not host.path("/etc/sysctl.d/90-llmrouter.conf").is_file():
                raise WalkError(f"[{host.name}] sysctl --system: the settings are not installed")
        elif word != "swapoff":
            if host.session is None:
                host.new_session()
            assert host.session is not None
            if re.search(r"\bpip\b|^make\b|install-release|llmrouter-llama-build", command):
                output = host.session.run_networked(command)
            else:
                output = host.session.run(command)
            assignment = re.match(r"([A-Z_][A-Z0-9_]*)=", command)
            if assignment is not None:
                name = assignment.group(1)
                host.variables[name] = host.session.run(f'printf %s "${name}"')
                return host.variables[name]
            return output
        return ""

    def packages(self, host: Host, command: str) -> None:
        missing = [name for name in apt_packages(command) if not installed(name)]
        if missing:
            raise WalkError(f"[{host.name}] not installed here (etc/dev/ci-deps): {missing}")

    def checkout(self, host: Host, command: str) -> None:
        match = re.search(r"checkout v(\S+)", command)
        if match is None:
            if not host.path("/root/llmrouter/setup.cfg").exists():
                raise WalkError(f"[{host.name}] {command}: no checkout in /root/llmrouter")
            return  # git clone: the walk runs in this checkout, laid out at /root/llmrouter
        version = host.run(f'printf %s "{match.group(1)}"')
        tree = host.path(host.run("pwd").strip())
        setup = tree / "setup.cfg"
        setup.write_text(re.sub(r"(?m)^version = .*$", f"version = {version}", setup.read_text()))
        init = tree / "llmrouter" / "__init__.py"
        init.write_text(
            re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text())
        )

    def copy(self, host: Host, command: str) -> None:
        words = shlex.split(host.run(f"printf '%s\\n' {command.split(' ', 1)[1]}"))
        cwd = host.run("pwd").strip()
        *sources, target = words
        user_host, _, directory = target.partition(":")
        other = self.hosts[self.addresses[user_host.split("@")[-1]]]
        for source in sources:
            original = host.path(str(Path(cwd) / source))  # relative: to the session's cwd
            copied = other.path(directory) / Path(source).name
            shutil.copyfile(original, copied)
            os.chmod(copied, original.stat().st_mode & 0o777)
