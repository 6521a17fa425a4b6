"""Run llama.cpp and the real daemons under the restrictions our systemd units declare.

systemd is not PID 1 on the build machines, so ``systemd-run`` cannot apply the units. Instead
this module is also a launcher (``python tests/test_systemd_sandbox.py UNIT [--rw DIR]... --
ARGV``) that reads the unit file and reproduces, with the kernel's own primitives, the
directives whose effect on a process can be reproduced without PID 1:

- mount namespace: ProtectSystem=strict (recursive read-only ``/``, ReadWritePaths and the
  state/cache/runtime directories passed as ``--rw``), ProtectHome=yes (empty tmpfs over
  /home, /root, /run/user), PrivateTmp=yes (fresh /tmp and /var/tmp), PrivateDevices=yes (a
  /dev with null, zero, full, random, urandom, tty only), ProtectProc=invisible and
  ProcSubset=pid (a private procfs instance with hidepid/subset options);
- PrivateNetwork=yes and PrivateIPC=yes: new network and IPC namespaces;
- User=, Group=: the unit's user where it exists (a throwaway root with the service users),
  else the overflow user nobody; CapabilityBoundingSet=: every other capability dropped from the
  bounding set (empty for the daemons, CAP_CHOWN only for the renewal);
- PrivateUsers=yes: a user namespace mapping only the service's own uid and gid (systemd also
  maps root, which a process cannot do for itself);
- UMask=, LimitCORE=0, NoNewPrivileges=yes;
- MemoryDenyWriteExecute=yes with prctl(PR_SET_MDWE), which is stricter than systemd's
  seccomp version (it also refuses mprotect adding PROT_EXEC later);
- a seccomp filter (libseccomp through ctypes) with the unit's SystemCallFilter= lines
  expanded by ``systemd-analyze syscall-filter``, SystemCallErrorNumber=, native architecture
  only, RestrictAddressFamilies=, and systemd's seccomp rules for RestrictNamespaces=
  (clone3 -> ENOSYS, namespace flags refused), RestrictRealtime=, LockPersonality= and
  RestrictSUIDSGID=.

The tests run real llama-cpp-python (tiny model and the embedded default model) and the
real ``twistd inference`` / ``twistd llmrouter`` daemons under that launcher and check both
that they work and that the restrictions were really in force.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmrouter.ops.unitfile import read_unit, service_setting

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "etc" / "systemd"

# --- unit files ------------------------------------------------------------------------------


# Unit files are read as systemd reads them by llmrouter.ops.unitfile (read_unit,
# service_setting, unit_environment, imported above), the operator tools' code.


def _expand_group(name: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for raw in out.splitlines()[1:]:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("@"):
            calls |= _expand_group(entry, seen)
        else:
            calls.add(entry)
    return calls


def syscall_allow_list(unit: dict[str, list[str]]) -> set[str]:
    """systemd's semantics: the first non-``~`` line sets an allow list, ``~`` lines remove."""
    allowed: set[str] = set()
    for line in unit.get("Service.SystemCallFilter", []):
        deny = line.startswith("~")
        for item in line.lstrip("~").split():
            calls = _expand_group(item) if item.startswith("@") else {item}
            if deny:
                allowed -= calls
            else:
                allowed |= calls
    return allowed


# --- ctypes plumbing -------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NS_FLAGS = 0x7E020080  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET} | CLONE_NEWTIME
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_SLAVE = 32, 4096, 8192, 16384, 1 << 19
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 (generic table)
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_MDWE, PR_GET_MDWE = 38, 24, 65, 66
PR_CAPBSET_READ = 23
PR_MDWE_REFUSE_EXEC_GAIN = 1
PR_SET_DUMPABLE = 4

AF_NAMES = {
    name: getattr(socket, name)
    for name in dir(socket)
    if name.startswith("AF_") and name != "AF_UNSPEC"
}


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        libc.mount(
            src.encode() if src else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _readonly_recursive(path: str) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        libc.syscall(
            SYS_MOUNT_SETATTR,
            AT_FDCWD,
            path.encode(),
            AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        ),
        f"mount_setattr {path}",
    )


# --- the launcher ----------------------------------------------------------------------------


def _outermost_under_tmp(paths: Iterable[str]) -> list[str]:
    """The paths below /tmp or /var/tmp, without those inside another one of them."""
    under = sorted({p for p in paths if p.startswith(("/tmp/", "/var/tmp/"))})
    return [p for p in under if not any(p.startswith(q + "/") for q in under)]


def _filesystem(unit: dict[str, list[str]], rw: Sequence[str], keep: Sequence[str]) -> None:
    """ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices in a new mount namespace.
    ``keep`` are read-only paths under /root re-exposed after ProtectHome (the test machine's
    interpreter lives in /root/.pyenv; production installs under /opt)."""
    _mount(None, "/", None, MS_REC | MS_SLAVE, None)
    # unit paths that do not exist on a test machine are stood in for by ``rw``
    configured = [p.lstrip("-") for p in unit.get("Service.ReadWritePaths", [])]
    writable = [*rw, *(p for p in configured if os.path.exists(p))]
    for path in writable:
        _mount(path, path, None, MS_BIND | MS_REC, None)
    keep_fds = [(p, os.open(p, os.O_PATH)) for p in keep]
    if service_setting(unit, "ProtectSystem") == "strict":
        _readonly_recursive("/")
        for path in writable:
            _mount(None, path, None, MS_BIND | MS_REMOUNT, None)
    if service_setting(unit, "ProtectHome") == "yes":
        for home in ("/home", "/root", "/run/user"):
            if os.path.isdir(home):
                _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for path, fd in keep_fds:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            _readonly_recursive(path)
        for path in ("/home", "/root", "/run/user"):
            if os.path.isdir(path):
                _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
    for _, fd in keep_fds:
        os.close(fd)
    if service_setting(unit, "PrivateTmp") == "yes":
        # A checkout under /tmp (`git clone . /tmp/x`) would vanish with it: bind it back, with the
        # mounts inside it (the writable state directories); nothing else of /tmp returns.
        anchors = [(p, os.open(p, os.O_PATH)) for p in _outermost_under_tmp([str(REPO), *rw])]
        for tmp in ("/tmp", "/var/tmp"):
            _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
        for path, fd in anchors:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            os.close(fd)
    proc_options = []
    protect_proc = service_setting(unit, "ProtectProc")
    if protect_proc in ("invisible", "noaccess", "ptraceable"):
        proc_options.append(f"hidepid={protect_proc}")
    if service_setting(unit, "ProcSubset") == "pid":
        proc_options.append("subset=pid")
    if proc_options:
        # a separate procfs instance with its own options (Linux 5.8+), as systemd mounts it
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(proc_options))
    if service_setting(unit, "PrivateDevices") == "yes":
        stage = tempfile.mkdtemp(dir="/tmp")
        _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
        for dev in ("null", "zero", "full", "random", "urandom", "tty"):
            Path(stage, dev).touch()
            _mount(f"/dev/{dev}", f"{stage}/{dev}", None, MS_BIND, None)
        os.mkdir(f"{stage}/shm", 0o1777)
        os.symlink("/proc/self/fd", f"{stage}/fd")
        for i, name in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{i}", f"{stage}/{name}")
        _mount(stage, "/dev", None, MS_MOVE, None)
        os.rmdir(stage)
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777")


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7


def SCMP_ACT_ERRNO(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _seccomp(unit: dict[str, list[str]]) -> None:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise OSError(errno.ENOENT, "libseccomp not found")
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    errno_name = service_setting(unit, "SystemCallErrorNumber", "EPERM")
    default = SCMP_ACT_ERRNO(getattr(errno, errno_name))
    # systemd's default without SystemCallErrorNumber= is to kill the process.
    if not unit.get("Service.SystemCallErrorNumber"):
        default = 0x80000000
    ctx = lib.seccomp_init(default)

    def rule(action: int, call: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = lib.seccomp_syscall_resolve_name(call.encode())
        if nr < 0:
            return
        array = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        _check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array), f"rule {call}")

    allowed = syscall_allow_list(unit)
    special = {"socket", "clone", "clone3", "unshare", "setns", "personality"}
    special |= {"sched_setscheduler", "sched_setattr", "chmod", "fchmod", "fchmodat"}
    for call in sorted(allowed - special):
        rule(SCMP_ACT_ALLOW, call)

    families = service_setting(unit, "RestrictAddressFamilies")
    if "socket" in allowed:
        if families:
            wanted = {AF_NAMES[f] for f in families.split()}
            for value in sorted(set(AF_NAMES.values())):
                action = SCMP_ACT_ALLOW if value in wanted else SCMP_ACT_ERRNO(errno.EAFNOSUPPORT)
                rule(action, "socket", (0, SCMP_CMP_EQ, value, 0))
        else:
            rule(SCMP_ACT_ALLOW, "socket")
    if service_setting(unit, "RestrictNamespaces") == "yes":
        # as systemd: clone3 cannot be filtered by flags, so it reports ENOSYS (libc falls back)
        rule(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
        rule(SCMP_ACT_ALLOW, "clone", (0, SCMP_CMP_MASKED_EQ, NS_FLAGS, 0))
    else:
        for call in ("clone", "clone3", "unshare", "setns"):
            if call in allowed:
                rule(SCMP_ACT_ALLOW, call)
    if "personality" in allowed:
        if service_setting(unit, "LockPersonality") == "yes":
            rule(SCMP_ACT_ALLOW, "personality", (0, SCMP_CMP_EQ, 0, 0))
            rule(SCMP_ACT_ALLOW, "personality", (0, SCMP_CMP_EQ, 0xFFFFFFFF, 0))
        else:
            rule(SCMP_ACT_ALLOW, "personality")
    if "sched_setscheduler" in allowed:
        if service_setting(unit, "RestrictRealtime") == "yes":
            for policy in (0, 3, 5):  # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE
                rule(SCMP_ACT_ALLOW, "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
        else:
            rule(SCMP_ACT_ALLOW, "sched_setscheduler")
    suid = service_setting(unit, "RestrictSUIDSGID") == "yes"
    for call, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
        if call in allowed:
            if suid:
                rule(SCMP_ACT_ALLOW, call, (arg, SCMP_CMP_MASKED_EQ, 0o6000, 0))
            else:
                rule(SCMP_ACT_ALLOW, call)
    _check(lib.seccomp_load(ctx), "seccomp_load")


def _ids(user: str, group: str) -> tuple[int, int]:
    """uid and gid of the unit's user and group where they exist (a throwaway root with the
    service users, tests/test_deployment_walk.py), else the overflow user ``nobody`` (65534)
    that stands in for them on a build machine."""
    import grp
    import pwd

    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = 65534
    try:
        gid = grp.getgrnam(group or user).gr_gid
    except KeyError:
        gid = 65534
    return uid, gid


def _supplementary_groups(unit: dict[str, list[str]]) -> list[int]:
    """SupplementaryGroups= (those that exist here: redis for llmrouter@.service's Redis)."""
    import grp

    names = " ".join(unit.get("Service.SupplementaryGroups", [])).split()
    found = []
    for name in names:
        try:
            found.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            pass
    return found


def _socket_activation(path: str, unit_path: Path, unit: dict[str, list[str]]) -> socket.socket:
    """What systemd does for the service's socket unit (inference.socket, llmrouter@.socket,
    next to the service's unit file): create the listening UNIX socket with its SocketMode and
    owners, and pass it as fd 3 (LISTEN_FDS=1)."""
    socket_path = unit_path.with_suffix(".socket")
    socket_unit = read_unit(socket_path)
    mode = int(socket_unit["Socket.SocketMode"][-1], 8)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    os.chmod(path, mode)
    if service_setting(unit, "User") not in ("", "root"):
        os.chown(
            path, *_ids(socket_unit["Socket.SocketUser"][-1], socket_unit["Socket.SocketGroup"][-1])
        )
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = socket_path.name
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    return sock


# The capabilities units keep (CapabilityBoundingSet=NAME ...), by number (linux/capability.h).
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_NET_BIND_SERVICE": 10}


def _drop_bounding_set(keep: Iterable[int] = ()) -> None:
    kept = set(keep)
    cap = 0
    while libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0:  # EINVAL past the last capability
        if cap not in kept:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
        cap += 1


def _bounding_set(unit: dict[str, list[str]]) -> list[int] | None:
    """The capabilities CapabilityBoundingSet= keeps; None when the unit does not restrict it."""
    if "Service.CapabilityBoundingSet" not in unit:
        return None
    return [CAPABILITIES[name] for name in service_setting(unit, "CapabilityBoundingSet").split()]


def _private_users() -> None:
    """PrivateUsers=yes: a user namespace in which only the service's own user and group exist.

    systemd also maps root; a process can map only its own ids, so here root-owned files show
    up as the overflow id. Access checks are the kernel's and the same either way.
    """
    uid, gid = os.getuid(), os.getgid()  # inside, until mapped, these read as the overflow id
    _check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    # setuid() left the process non-dumpable, which makes /proc/self root's; exec resets it
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")


def launch(
    unit_path: Path,
    rw: Sequence[str],
    keep: Sequence[str],
    argv: Sequence[str],
    listen_unix: str | None = None,
) -> None:
    """Apply ``unit_path``'s restrictions to this process, then exec ``argv`` (never returns)."""
    unit = read_unit(unit_path)
    activated = None if listen_unix is None else _socket_activation(listen_unix, unit_path, unit)
    flags = CLONE_NEWNS
    if service_setting(unit, "PrivateNetwork") == "yes":
        flags |= CLONE_NEWNET
    if service_setting(unit, "PrivateIPC") == "yes":
        flags |= CLONE_NEWIPC
    _check(libc.unshare(flags), "unshare")
    _filesystem(unit, rw, keep)
    bounding_set = _bounding_set(unit)
    if bounding_set is not None:
        _drop_bounding_set(bounding_set)
    if service_setting(unit, "User") not in ("", "root"):
        uid, gid = _ids(service_setting(unit, "User"), service_setting(unit, "Group"))
        os.setgroups(_supplementary_groups(unit))
        os.setgid(gid)
        os.setuid(uid)
    if service_setting(unit, "PrivateUsers") == "yes":
        _private_users()
        if bounding_set is not None:
            _drop_bounding_set(bounding_set)  # a new user namespace starts with a full set
    os.umask(int(service_setting(unit, "UMask", "0022"), 8))
    if service_setting(unit, "LimitCORE") == "0":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if service_setting(unit, "NoNewPrivileges") == "yes" or unit.get("Service.SystemCallFilter"):
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if service_setting(unit, "MemoryDenyWriteExecute") == "yes":
        _check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
    if unit.get("Service.SystemCallFilter"):
        _seccomp(unit)
    if activated is not None:
        # last: fd 3 may have been in use until now
        if activated.fileno() != 3:
            os.dup2(activated.fileno(), 3)
        os.set_inheritable(3, True)  # dup2 onto itself would keep FD_CLOEXEC
    os.execv(argv[0], list(argv))


def _main(args: list[str]) -> None:
    unit, rest = Path(args[0]), args[1:]
    rw: list[str] = []
    keep: list[str] = []
    listen: str | None = None
    while rest and rest[0] != "--":
        option, value, rest = rest[0], rest[1], rest[2:]
        if option == "--listen-unix":
            listen = value
        else:
            (rw if option == "--rw" else keep).append(value)
    launch(unit, rw, keep, rest[1:], listen)


# --- tests -----------------------------------------------------------------------------------

from twisted.internet import defer  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402
from twisted.trial import unittest  # noqa: E402

PROBE = r"""
import ctypes, errno, json, mmap, os, resource, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report = {
    "uid": os.getuid(),
    "seccomp": status["Seccomp"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "cap_bnd": status["CapBnd"].strip(),
    "mdwe": libc.prctl(66, 0, 0, 0, 0),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "umask": os.umask(0o077),
    "uid_map": open("/proc/self/uid_map").read().split(),
}
def attempt(name, fn):
    try:
        fn()
        report[name] = "allowed"
    except OSError as exc:
        report[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("write_usr", lambda: open("/usr/llmr-sandbox-probe", "w"))
attempt("read_root", lambda: os.listdir("/root/.ssh"))
attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("netlink_socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
def wx():
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.close()
attempt("mmap_wx", wx)
def unshare():
    if libc.unshare(0x04000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unshare", unshare)
attempt("chroot", lambda: os.chroot("/"))
attempt("sched_setaffinity", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
def set_mempolicy():  # MPOL_DEFAULT: what CUDA's and libnuma's NUMA placement calls
    if libc.syscall({"x86_64": 238, "aarch64": 237}[os.uname().machine], 0, None, 0) != 0:
        raise OSError(ctypes.get_errno(), "set_mempolicy")
attempt("set_mempolicy", set_mempolicy)
attempt("sethostname", lambda: socket.sethostname("x"))
def pyopenssl_callback():
    from OpenSSL import SSL
    try:
        SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *args: True)
    except MemoryError:
        raise OSError(errno.EACCES, "cffi callback needs W+X memory") from None
attempt("pyopenssl_callback", pyopenssl_callback)
report["devices"] = sorted(os.listdir("/dev"))
report["proc_pid1"] = os.path.exists("/proc/1")
report["proc_cpuinfo"] = os.path.exists("/proc/cpuinfo")
report["tmp"] = sorted(os.listdir("/tmp"))
"""

GENERATE = r"""
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=2, verbose=False, seed=1)
out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
report["completion_tokens"] = out["usage"]["completion_tokens"]
report["threads_ok"] = True
"""


def _ci() -> bool:
    return os.environ.get("CI") == "true"


def require_sandbox(testcase: unittest.TestCase) -> None:
    """The launcher needs root (namespaces, mounts) and libseccomp; fail in CI, skip elsewhere."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if ctypes.util.find_library("seccomp") is None:
        problems.append("libseccomp missing")
    if shutil.which("systemd-analyze") is None:
        problems.append("systemd-analyze missing")
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        problems.append("kernel without PR_SET_MDWE (< 6.3)")
    if problems:
        message = "cannot reproduce the sandbox here: " + ", ".join(problems)
        if _ci():
            testcase.fail(message)
        raise unittest.SkipTest(message)


def keep_paths() -> list[str]:
    """Read-only paths under /root that the interpreter needs (see _filesystem)."""
    paths = []
    for candidate in {Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}:
        if str(candidate).startswith("/root/"):
            parts = candidate.relative_to("/root").parts
            paths.append(str(Path("/root", parts[0])))
    return sorted(set(paths))


def tmp_reexposed() -> list[str]:
    """What a service sees in its private /tmp: only a checkout that lives under /tmp."""
    return [Path(p).parts[2] for p in _outermost_under_tmp([str(REPO)]) if p.startswith("/tmp/")]


def sandbox_argv(
    unit: str, rw: Iterable[Path], argv: Sequence[str], listen_unix: Path | None = None
) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), str(UNITS / unit)]
    if listen_unix is not None:
        command += ["--listen-unix", str(listen_unix)]
    for path in rw:
        command += ["--rw", str(path)]
    for path in keep_paths():
        command += ["--keep", path]
    return [*command, "--", *argv]


def service_dir(testcase: unittest.TestCase) -> Path:
    """A directory the unprivileged service user may write (not under /tmp: PrivateTmp hides it)."""
    base = Path(tempfile.mkdtemp(prefix="sbx-", dir=os.getcwd()))
    testcase.addCleanup(shutil.rmtree, base, True)
    os.chmod(base, 0o755)
    state = base / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    return base


def stage_model(testcase: unittest.TestCase, source: Path) -> Path:
    """Models built under /tmp or /root are hidden by PrivateTmp/ProtectHome (as they would be
    in production): put a copy (a hard link when possible) where the service user can read it."""
    staged = Path(tempfile.mkdtemp(prefix="model-", dir=os.getcwd()))
    testcase.addCleanup(shutil.rmtree, staged, True)
    os.chmod(staged, 0o755)
    model = staged / source.name
    try:
        os.link(source, model)
    except OSError:
        shutil.copy(source, model)
    os.chmod(model, 0o644)
    return model


class ProbeTests(unittest.TestCase):
    """Each unit's restrictions are really in force in the launcher (so passing tests mean
    something), and llama.cpp works under the inference units."""

    timeout = 300

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def probe(self, unit: str, model: Path | None = None) -> defer.Deferred[dict[str, object]]:
        import json

        base = service_dir(self)
        code = PROBE + (GENERATE if model else "") + "\nprint(json.dumps(report))\n"
        script = base / "probe.py"
        script.write_text(code)
        argv = sandbox_argv(unit, [base / "state"], [sys.executable, str(script)])
        if model is not None:
            argv.append(str(model))
        out, err, rc = yield getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
        self.assertEqual(rc, 0, err.decode(errors="replace")[-3000:])
        report: dict[str, object] = json.loads(out.decode().splitlines()[-1])
        return report

    def assert_common(self, report: dict[str, object], mdwe: bool = True) -> None:
        self.assertEqual(report["uid"], 65534)
        self.assertEqual(report["uid_map"], ["65534", "65534", "1"])  # PrivateUsers=yes
        self.assertEqual(report["seccomp"], "2")
        self.assertEqual(report["no_new_privs"], "1")
        self.assertEqual(report["cap_bnd"], "0000000000000000")
        if mdwe:
            self.assertEqual(report["mdwe"], 1)
            self.assertEqual(report["mmap_wx"], "EACCES")  # MemoryDenyWriteExecute
            # ... which is why the units that speak TLS through pyOpenSSL cannot have it
            self.assertEqual(report["pyopenssl_callback"], "EACCES")
        else:
            self.assertEqual(report["mdwe"], 0)
            self.assertEqual(report["pyopenssl_callback"], "allowed")
        self.assertEqual(report["core"], [0, 0])
        self.assertEqual(report["umask"], 0o077)
        self.assertEqual(report["write_usr"], "EROFS")
        self.assertEqual(report["read_root"], "ENOENT")  # ProtectHome: empty /root
        self.assertEqual(report["unshare"], "EPERM")  # RestrictNamespaces
        self.assertEqual(report["chroot"], "EPERM")  # ~@privileged
        self.assertEqual(report["sethostname"], "EPERM")
        self.assertEqual(report["netlink_socket"], "EAFNOSUPPORT")
        self.assertEqual(report["tmp"], tmp_reexposed())  # PrivateTmp
        self.assertFalse(report["proc_pid1"])  # ProtectProc=invisible: root's processes hidden
        self.assertFalse(report["proc_cpuinfo"])  # ProcSubset=pid
        self.assertLessEqual(
            set(report["devices"]),  # type: ignore[arg-type]
            {"null", "zero", "full", "random", "urandom", "tty", "shm", "fd"}
            | {"stdin", "stdout", "stderr"},
        )

    @defer.inlineCallbacks
    def test_llmrouter_unit_restrictions(self) -> defer.Deferred[None]:
        report = yield self.probe("llmrouter.service")
        self.assert_common(report, mdwe=False)
        self.assertEqual(report["inet_socket"], "allowed")

    @defer.inlineCallbacks
    def test_inference_unit_runs_llama_cpp_tiny_model(self) -> defer.Deferred[None]:
        from tests.tinymodel import tiny_model_path

        report = yield self.probe("inference.service", model=stage_model(self, tiny_model_path()))
        self.assert_common(report)
        self.assertEqual(report["inet_socket"], "EAFNOSUPPORT")  # AF_UNIX only
        self.assertEqual(report["completion_tokens"], 4)
        # ~@resources: what the CUDA runtime calls, hence allowed back by the GPU drop-in
        self.assertEqual(report["sched_setaffinity"], "EPERM")
        self.assertEqual(report["set_mempolicy"], "EPERM")

    @defer.inlineCallbacks
    def test_inference_unit_with_the_gpu_drop_in(self) -> defer.Deferred[None]:
        """inference.service with etc/systemd/inference-gpu.conf (merged as systemd merges a
        drop-in): llama.cpp still runs, the CUDA runtime's affinity and NUMA calls are allowed,
        the rest of the sandbox stays. No GPU here: the devices and CUDA itself are not run."""
        from tests.tinymodel import tiny_model_path

        merged = service_dir(self) / "inference.service"
        merged.write_text(
            (UNITS / "inference.service").read_text()
            + "\n"
            + (UNITS / "inference-gpu.conf").read_text()
        )
        report = yield self.probe(str(merged), model=stage_model(self, tiny_model_path()))
        self.assertEqual(report["completion_tokens"], 4)
        self.assertEqual(report["sched_setaffinity"], "allowed")
        self.assertEqual(report["set_mempolicy"], "allowed")
        self.assertEqual((report["no_new_privs"], report["seccomp"]), ("1", "2"))
        self.assertEqual(report["uid_map"], ["65534", "65534", "1"])  # PrivateUsers stays
        self.assertEqual(report["cap_bnd"], "0000000000000000")
        for call in ("chroot", "sethostname", "unshare"):
            self.assertEqual(report[call], "EPERM", call)
        self.assertEqual(report["inet_socket"], "EAFNOSUPPORT")
        self.assertEqual(report["mdwe"], 0)  # CUDA's JIT maps writable code
        self.assertTrue(report["proc_cpuinfo"])  # ProcSubset=all: /proc/driver/nvidia

    @defer.inlineCallbacks
    def test_inference_unit_runs_the_default_model(self) -> defer.Deferred[None]:
        """The real quantized default model (SmolLM2-135M-Instruct, Q4_1), read in place from
        the virtualenv as in production (docs/deployment.md, section 2.3)."""
        from inference.embedded import DEFAULT, MODELS

        report = yield self.probe("inference.service", model=MODELS[DEFAULT]())
        self.assert_common(report)  # including MemoryDenyWriteExecute
        self.assertEqual(report["inet_socket"], "EAFNOSUPPORT")
        self.assertEqual(report["completion_tokens"], 4)


if __name__ == "__main__":
    _main(sys.argv[1:])


class RenewUnitTests(unittest.TestCase):
    """llmrouter-pki-renew.service: root without capabilities, no network, writes only the PKI."""

    timeout = 120

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def test_renew_under_unit(self) -> defer.Deferred[None]:
        import datetime

        from llmrouter.ops import pki

        base = service_dir(self)
        directory = base / "pki"
        pki.create_ca(directory)
        pki.issue(directory, "client", "router", lifetime=datetime.timedelta(days=1))
        pki.issue(directory, "server", "node", ["node.wg"], lifetime=datetime.timedelta(days=1))
        # as the operator made them: the router's key readable by the router's group, the
        # node's key handed to another user (the service user stands in for both)
        os.chown(directory / "router.key", 0, 65534)
        os.chmod(directory / "router.key", 0o640)
        os.chown(directory / "node.key", 65534, 65534)
        before = (directory / "router.crt").read_bytes()
        tool = str(Path(sys.executable).parent / "llmrouter-pki")
        argv = sandbox_argv(
            "llmrouter-pki-renew.service",
            [directory],
            [tool, "--dir", str(directory), "renew", "--if-expiring-within", "2d"],
        )
        out, err, rc = yield getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
        self.assertEqual((rc, out.strip()), (0, b"renewed: node, router"), err.decode()[-2000:])
        self.assertNotEqual((directory / "router.crt").read_bytes(), before)
        pki.verify(directory, "router")
        # root without CAP_DAC_OVERRIDE, with CAP_CHOWN only: owners, groups and modes kept
        for name, expected in (
            ("router.key", (0, 65534, 0o640)),
            ("node.key", (65534, 65534, 0o600)),
        ):
            st = (directory / name).stat()
            self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), expected, name)

    @defer.inlineCallbacks
    def test_renewal_capabilities(self) -> defer.Deferred[None]:
        """Under the unit, CAP_CHOWN is the only capability root keeps."""
        argv = sandbox_argv(
            "llmrouter-pki-renew.service",
            [],
            ["/bin/sh", "-c", "grep -E '^Cap(Eff|Bnd):' /proc/self/status"],
        )
        out, err, rc = yield getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
        self.assertEqual(rc, 0, err.decode()[-2000:])
        caps = dict(line.split() for line in out.decode().replace(":", "").splitlines())
        self.assertEqual(caps, {"CapEff": "0000000000000001", "CapBnd": "0000000000000001"})


class SandboxedDaemon:
    """A tests.daemons.Daemon whose process is started through the launcher with ``unit``."""

    @staticmethod
    def create(  # type: ignore[no-untyped-def]
        unit: str,
        rw: Sequence[Path],
        plugin: str,
        args: Sequence[str],
        listen_unix: Path | None = None,
        **kw: object,
    ):
        from tests.daemons import TWISTD, Daemon, _Output

        class _Sandboxed(Daemon):
            def spawn(self) -> defer.Deferred[int]:
                environment = {
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("INFERENCE_", "LLMROUTER_")) and k != "LISTEN"
                }
                environment.update(self.env)
                environment["PYTHONUNBUFFERED"] = "1"
                inner = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", plugin, *self.args]
                argv = sandbox_argv(unit, rw, inner, listen_unix)
                self._protocol = _Output(self.log_path.open("ab"))
                self._transport = self.reactor.spawnProcess(
                    self._protocol, argv[0], argv, env=environment, path=str(self.directory)
                )

                def record(code: int) -> int:
                    self.exit_code = code
                    return code

                self._protocol.ended.addCallback(record)
                return self._chain(self._protocol.ended)

        return _Sandboxed(plugin, args, **kw)  # type: ignore[arg-type]


def sandboxed_router(testcase: unittest.TestCase, base: Path, upstream: list[str]) -> Any:
    """``twistd llmrouter`` under llmrouter.service, state in ``base/rstate``, listening on UNIX
    sockets there; ``upstream`` names its backend (and TLS files). Stopped at cleanup."""
    rstate = base / "rstate"
    rstate.mkdir()
    os.chown(rstate, 65534, 65534)
    public = rstate / "router.sock"
    router = SandboxedDaemon.create(
        "llmrouter.service",
        [rstate],
        "llmrouter",
        [
            *("--listen", f"unix:{public}:mode=666"),
            *("--metrics-listen", f"unix:{rstate}/metrics.sock:mode=666"),
            *("--keys-dir", str(rstate / "keys")),
            *upstream,
        ],
        health=f"unix:{public}",
        directory=rstate,
    )
    testcase.addCleanup(router.stop)
    return router


class RouterUnderUnitTests(unittest.TestCase):
    """The real ``twistd llmrouter`` under llmrouter.service's restrictions: starts, creates and
    mlocks its keys, serves the key document and metrics, reloads on SIGHUP (ExecReload)."""

    timeout = 180

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def test_router_serves_under_unit(self) -> defer.Deferred[None]:
        from twisted.internet import reactor, task

        base = service_dir(self)
        state = base / "state"
        public, metrics = state / "router.sock", state / "metrics.sock"
        args = [
            "--listen",
            f"unix:{public}:mode=666",
            "--metrics-listen",
            f"unix:{metrics}:mode=666",
            "--keys-dir",
            str(state / "keys"),
            "--inference",
            f"unix:{state}/no-inference.sock",
        ]
        daemon = SandboxedDaemon.create(
            "llmrouter.service",
            [state],
            "llmrouter",
            args,
            health=f"unix:{public}",
            health_path="/api/pubkey",
            directory=state,
        )
        self.addCleanup(daemon.stop)
        yield daemon.start()
        keys = sorted(p.name for p in (state / "keys").iterdir())
        self.assertTrue(keys)
        for path in (state / "keys").iterdir():
            self.assertEqual(path.stat().st_mode & 0o077, 0, path.name)
            self.assertEqual(path.stat().st_uid, 65534)
        # the HPKE secret keys sit in locked pages (in PrivateUsers' user namespace too)
        status_lines = Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
        locked = next(line for line in status_lines if line.startswith("VmLck:"))
        self.assertGreater(int(locked.split()[1]), 0, locked)
        status, _, body = yield daemon.request(b"GET", "/metrics", base=f"unix:{metrics}")
        self.assertEqual(status, 200)
        self.assertIn(b"llmrouter_active_streams", body)
        daemon.signal("HUP")
        yield task.deferLater(reactor, 0.5, lambda: None)
        status, _, _ = yield daemon.request(b"GET", "/api/pubkey")
        self.assertEqual(status, 200)
        self.assertTrue(daemon.running)
        code = yield daemon.stop()
        # twistd re-raises the SIGTERM it shut down on: a clean stop ends "killed by TERM"
        self.assertIn(code, (0, -15), daemon.log_text()[-3000:])
        self.assertIn("Server Shut Down", daemon.log_text())
        self.assertNotIn("Traceback", daemon.log_text())


class StackUnderUnitsTests(unittest.TestCase):
    """The real ``twistd inference`` under inference.service (socket-activated UNIX socket as
    inference.socket creates it, no network namespace access, AF_UNIX only) serving a streamed
    chat completion, and the real router under llmrouter.service reaching it through the
    socket (its readiness requires a successful health probe of the backend)."""

    timeout = 240

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def test_inference_and_router_under_units(self) -> Any:
        from tests.router_support import post_json
        from tests.tinymodel import tiny_model_path

        base = service_dir(self)
        state = base / "state"
        model = stage_model(self, tiny_model_path())
        # /run/llmrouter as tmpfiles-llmrouter.conf makes it: 0750, group of the router (here
        # the sandbox's service group); read-only for inference (ProtectSystem=strict), so
        # any chmod or unlink of the socket by the daemon would fail
        run = base / "run"
        run.mkdir(mode=0o750)
        os.chown(run, 0, 65534)
        inference_sock = run / "inference.sock"
        inference = SandboxedDaemon.create(
            "inference.service",
            [state],
            "inference",
            ["--listen", "systemd:domain=UNIX:index=0", "--model", str(model)],
            listen_unix=inference_sock,
            health=f"unix:{inference_sock}",
            directory=state,
        )
        self.addCleanup(inference.stop)
        yield inference.start()
        # the adopted socket keeps SocketMode=0660 (Twisted alone would chmod it to 0666)
        self.assertEqual(inference_sock.stat().st_mode & 0o777, 0o660)
        self.assertEqual(run.stat().st_mode & 0o777, 0o750)
        status, _, body = yield post_json(
            f"unix:{inference_sock}",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
        self.assertEqual(status, 200, body)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body[-200:])

        router = sandboxed_router(self, base, ["--inference", f"unix:{inference_sock}"])
        yield router.start()  # /health 200 = keys loaded and the backend probed healthy
        for daemon in (router, inference):
            code = yield daemon.stop()
            self.assertIn(code, (0, -15), daemon.log_text()[-3000:])
            self.assertNotIn("Traceback", daemon.log_text())
        # the socket is systemd's: it outlives the service, so a restart finds it in place
        self.assertTrue(inference_sock.is_socket())


class NodeUnderUnitTests(unittest.TestCase):
    """The real ``twistd inference`` under inference@.service's restrictions serving mutual
    TLS 1.3 with certificates from llmrouter-pki, and the real router under llmrouter.service
    reaching it as an https:// backend. (These two units cannot have MemoryDenyWriteExecute:
    pyOpenSSL's cffi callbacks need W+X memory; ProbeTests shows it.)"""

    timeout = 180

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def test_mtls_listener_under_unit(self) -> Any:
        from llmrouter.httpclient import ClientTLS
        from llmrouter.ops import pki
        from tests.tinymodel import tiny_model_path

        base = service_dir(self)
        state = base / "state"
        directory = base / "pki"
        pki.create_ca(directory)
        pki.issue(directory, "server", "inference-1", ["localhost"], ["127.0.0.1"])
        pki.issue(directory, "client", "router")
        os.chmod(directory, 0o755)
        os.chmod(directory / "inference-1.key", 0o644)  # readable by the sandbox's user
        model = stage_model(self, tiny_model_path())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        node = SandboxedDaemon.create(
            "inference@.service",
            [state],
            "inference",
            [
                "--listen",
                f"ssl:{port}:interface=127.0.0.1",
                "--model",
                str(model),
                "--tls-cert",
                str(directory / "inference-1.crt"),
                "--tls-key",
                str(directory / "inference-1.key"),
                "--tls-ca",
                str(directory / "ca.crt"),
            ],
            health=f"https://localhost:{port}",
            tls=ClientTLS(
                ca=directory / "ca.crt",
                cert=directory / "router.crt",
                key=directory / "router.key",
            ),
            directory=state,
        )
        self.addCleanup(node.stop)
        yield node.start()  # /health 200 over mutual TLS 1.3
        status, _, body = yield node.request(b"GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"inference_model_loaded 1.0", body)

        # the router under llmrouter.service using it as an https:// backend (mutual TLS)
        os.chmod(directory / "router.key", 0o644)
        router = sandboxed_router(
            self,
            base,
            [
                *("--inference", f"https://localhost:{port}"),
                *("--tls-ca", str(directory / "ca.crt")),
                *("--tls-client-cert", str(directory / "router.crt")),
                *("--tls-client-key", str(directory / "router.key")),
            ],
        )
        yield router.start()  # 200 only after a health probe over mutual TLS succeeded
        for daemon in (router, node):
            code = yield daemon.stop()
            self.assertIn(code, (0, -15), daemon.log_text()[-3000:])
            self.assertNotIn("Traceback", daemon.log_text())


class LlamaServerUnderUnitTests(unittest.TestCase):
    """etc/systemd/llama-server.service's recipe: the real llama-server, with the unit's own
    ExecStart= arguments (the binary, model and socket paths substituted), under the unit's
    sandbox (no network namespace, AF_UNIX only, MemoryDenyWriteExecute), serves a streamed chat
    on its socket in a setgid directory as tmpfiles-llmrouter.conf makes it: the socket gets
    the router's group, and GET /slots, which returns prompts, is off."""

    timeout = 240

    def setUp(self) -> None:
        require_sandbox(self)

    @defer.inlineCallbacks
    def test_llama_server_under_unit(self) -> Any:
        import shlex

        from tests.daemons import Daemon
        from tests.llama_server import binary
        from tests.router_support import http, post_json
        from tests.tinymodel import tiny_model_path

        server = binary()
        base = service_dir(self)
        run = base / "run"  # /run/llama-server: 2750 inference:llmrouter
        run.mkdir()
        router_gid = 65533
        os.chown(run, 65534, router_gid)
        os.chmod(run, 0o2750)
        sock = run / "llama.sock"
        model = stage_model(self, tiny_model_path())
        unit = read_unit(UNITS / "llama-server.service")
        argv = shlex.split(service_setting(unit, "ExecStart"))
        self.assertIn("--no-slots", argv)
        substitutions = {"/opt/llama-server/llama-server": str(server)}
        substitutions["/run/llama-server/llama.sock"] = str(sock)
        argv = [substitutions.get(a, a) for a in argv]
        argv += ["-m", str(model), "--threads", "1", "--ctx-size", "512", "--no-warmup"]
        command = sandbox_argv("llama-server.service", [base / "state", run], argv)
        if server.is_relative_to("/root"):  # ProtectHome hides the test machine's build cache
            top = Path("/root", server.relative_to("/root").parts[0])
            command[command.index("--") : command.index("--")] = ["--keep", str(top)]
        daemon = Daemon(
            "llama-server",
            [],
            command=command,
            health=f"unix:{sock}",
            env={"LLAMA_ARG_ENDPOINT_SLOTS": "0"},
            directory=base / "state",
        )
        self.addCleanup(daemon.stop)
        yield daemon.start()
        self.assertEqual((sock.stat().st_gid, sock.stat().st_mode & 0o777), (router_gid, 0o770))
        status, _, body = yield post_json(
            f"unix:{sock}",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
        self.assertEqual(status, 200, body)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body[-200:])
        status, _, _ = yield http(f"unix:{sock}", path="/slots")
        self.assertNotEqual(status, 200)
