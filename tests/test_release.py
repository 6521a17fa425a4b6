"""The release: locked dependencies that cover what setup.cfg asks for, and ``make dist``'s
wheel and tarball (built from a copy of this checkout with a stale ``build/``, as a developer's
tree has one: a module deleted from the source must not ship)."""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from packaging.requirements import Requirement
from twisted.trial import unittest

from llmrouter.ops.llamabuild import LLAMA_CPP_VERSION

REPO = Path(__file__).resolve().parent.parent
LOCKS = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)(?:\s*;\s*([^\\]+?))?\s*\\?$", re.M)


def pins(lock: str) -> dict[str, str]:
    """name -> version of every package in a lock, each with its hashes."""
    text = (LOCKS / lock).read_text()
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = PIN.match(entry)
        if match is None:
            continue
        if "--hash=sha256:" not in entry:
            raise AssertionError(f"{lock}: {match.group(1)} has no hash")
        found[_normal(match.group(1))] = match.group(2)
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.cfg's install_requires ("") and extras, parsed."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")

    def parse(value: str) -> list[Requirement]:
        return [Requirement(line) for line in value.splitlines() if line.strip()]

    groups = {"": parse(config["options"]["install_requires"])}
    for extra, value in config["options.extras_require"].items():
        groups[extra] = parse(value)
    return groups


class LockTests(unittest.TestCase):
    def test_locks_cover_setup_cfg(self) -> None:
        """Each requirement of setup.cfg is locked at a version it accepts, in every lock that
        installs it (llama-cpp-python only as its sdist, in llama.lock)."""
        groups = setup_requirements()
        self.assertIn("twisted", {_normal(r.name) for r in groups[""]})
        self.assertIn("inference", groups)
        wanted = {
            "router.lock": groups[""],
            "node.lock": groups[""] + groups["inference"],
            # the model extra is our own wheel (llmrouter/ops/modelwheel.py), never from an index
            "dev.lock": [r for extra, reqs in groups.items() if extra != "model" for r in reqs],
        }
        for lock, requirements in wanted.items():
            locked = pins(lock)
            for requirement in requirements:
                name = _normal(requirement.name)
                if name == "llama-cpp-python":
                    self.assertNotIn(name, locked, lock)  # built from the sdist on each host
                    continue
                self.assertIn(name, locked, f"{lock} lacks {name}")
                self.assertTrue(
                    requirement.specifier.contains(locked[name], prereleases=True),
                    f"{lock}: {name}=={locked[name]} is not {requirement}",
                )

    def test_llama_cpp_python_sdist_is_the_pinned_version(self) -> None:
        self.assertEqual(pins("llama.lock"), {"llama-cpp-python": LLAMA_CPP_VERSION})
        inference = setup_requirements()["inference"]
        self.assertIn(f"llama-cpp-python=={LLAMA_CPP_VERSION}", [str(r) for r in inference])
        self.assertLessEqual(
            {"pip", "setuptools", "wheel", "scikit-build-core"}, set(pins("build.lock"))
        )


class DistTests(unittest.TestCase):
    timeout = 600

    def test_dist_from_a_tree_with_a_stale_build_directory(self) -> None:
        tree = Path(tempfile.mkdtemp(prefix="dist-"))
        self.addCleanup(shutil.rmtree, tree, True)
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, (n.decode() for n in listed)):
            source = REPO / name
            if source.is_file():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tree / name)
        stale = tree / "build" / "lib" / "llmrouter" / "deleted_module.py"
        stale.parent.mkdir(parents=True)
        stale.write_text("raise SystemExit('a module deleted from the source')\n")
        result = subprocess.run(
            ["make", "-s", "dist"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()),
                 "SOURCE_DATE_EPOCH": "1700000000"},
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        version = re.search(r"(?m)^version = (\S+)", (REPO / "setup.cfg").read_text())
        assert version is not None
        dist = tree / "dist"
        wheel = dist / f"llmrouter-{version.group(1)}-py3-none-any.whl"
        tarball = dist / f"llmrouter-{version.group(1)}.tar.gz"
        names = zipfile.ZipFile(wheel).namelist()
        self.assertIn("llmrouter/router/tap.py", names)
        self.assertNotIn("llmrouter/deleted_module.py", names)
        self.assertFalse((tree / "build").exists())
        # SHA256SUMS next to the tarball, and inside it for every file
        sums = dict(
            reversed(line.split("  ", 1)) for line in (dist / "SHA256SUMS").read_text().splitlines()
        )
        for path in (wheel, tarball):
            self.assertEqual(sums[path.name], hashlib.sha256(path.read_bytes()).hexdigest())
        top = f"llmrouter-{version.group(1)}"
        with tarfile.open(tarball) as archive:
            members = {m.name: m for m in archive.getmembers()}
            inner = archive.extractfile(f"{top}/SHA256SUMS")
            assert inner is not None
            listed_sums = dict(
                reversed(line.split("  ", 1)) for line in inner.read().decode().splitlines()
            )
            for name, digest in listed_sums.items():
                member = archive.extractfile(f"{top}/{name}")
                assert member is not None
                self.assertEqual(hashlib.sha256(member.read()).hexdigest(), digest, name)
        for needed in (
            wheel.name,
            "bin/install-release",
            "bin/verify-network",
            "requirements/node.lock",
            "requirements/llama.lock",
            "etc/systemd/llmrouter.service",
            "docs/deployment.md",
            "CHANGELOG.md",
        ):
            self.assertIn(f"{top}/{needed}", members)
            self.assertIn(needed, listed_sums)
        self.assertFalse([n for n in members if "/etc/dev/" in n or "__pycache__" in n])
        self.assertEqual({(m.uid, m.gid) for m in members.values()}, {(0, 0)})
        self.assertEqual({m.mtime for m in members.values()}, {1700000000})
        self.assertTrue(members[f"{top}/bin/install-release"].mode & 0o111)
        self.install_under_a_strict_umask(tarball, top)

    def install_under_a_strict_umask(self, tarball: Path, top: str) -> None:
        """A root shell with umask 077 (hardened hosts; or left over from `umask 077; wg
        genkey`) used to make a release the services could not read: install-release works
        under 022 whatever the shell's, so the unprivileged service user can run it."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (to run the release as another user)")
        release = Path(tempfile.mkdtemp(prefix="release-"))
        self.addCleanup(shutil.rmtree, release, True)
        os.chmod(release, 0o755)
        with tarfile.open(tarball) as archive:
            archive.extractall(release, filter="data")
        venv = release / "venv"
        # the system's python3.11, as on a server (this machine's own may live under /root)
        python = shutil.which("python3.11", path="/usr/bin") or "python3.11"
        result = subprocess.run(
            ["sh", "-c", f"umask 077 && {release / top / 'bin' / 'install-release'} router {venv}"],
            capture_output=True,
            text=True,
            check=False,
            # as a server's shell has it: not `trial -j`'s PYTHONPATH (this interpreter's
            # sys.path, whose lib-dynload the system python's ssl would load)
            env={**_without(os.environ, "PYTHONPATH", "PYTHONHOME"), "PYTHON": python},
        )
        self.assertEqual(result.returncode, 0, result.stdout[-2000:] + result.stderr[-2000:])
        module = next(venv.glob("lib/python3*/site-packages/llmrouter/__init__.py"))
        self.assertEqual(module.stat().st_mode & 0o044, 0o044)
        as_nobody = subprocess.run(
            ["runuser", "-u", "nobody", "--", str(venv / "bin" / "twistd"), "--help"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        self.assertEqual(as_nobody.returncode, 0, as_nobody.stderr[-2000:])
        self.assertIn("llmrouter", as_nobody.stdout)


class RunningReleaseTests(unittest.TestCase):
    """``llmrouter-release check`` on a /proc laid out as a host's (the deployment walk runs it
    on real daemons): each daemon's release is its interpreter's virtualenv."""

    def fake_proc(self, daemons: dict[int, tuple[str, str, str]]) -> Path:
        proc = Path(self.mktemp())
        for pid, (interpreter, plugin, unit) in daemons.items():
            entry = proc / str(pid)
            entry.mkdir(parents=True)
            argv = [
                interpreter,
                "/opt/llmrouter/venv/bin/twistd",
                "--nodaemon",
                "--pidfile=",
                plugin,
            ]
            (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
            (entry / "cgroup").write_text(f"0::/system.slice/system-x.slice/{unit}\n")
            (entry / "root").symlink_to("/")
        (proc / "self").mkdir()
        other = proc / "77"  # a process in another root (a container): not this host's
        other.mkdir()
        (other / "cmdline").write_bytes(b"/x/bin/python3.11\0/x/bin/twistd\0llmrouter\0")
        (other / "cgroup").write_text("0::/\n")
        (other / "root").symlink_to(proc)
        return proc

    def test_stale_instance_is_named(self) -> None:
        from llmrouter.ops import release

        venvs = Path(self.mktemp())
        for version in ("0.1.0", "0.1.1"):
            (venvs / "releases" / version / "bin").mkdir(parents=True)
        (venvs / "venv").symlink_to("releases/0.1.1")
        new = str(venvs / "releases" / "0.1.1" / "bin" / "python3.11")
        old = str(venvs / "releases" / "0.1.0" / "bin" / "python3.11")
        proc = self.fake_proc(
            {
                11: (new, "llmrouter", "llmrouter@1.service"),
                12: (old, "llmrouter", "llmrouter@2.service"),
                13: (new, "inference", "inference.service"),
            }
        )
        daemons = release.running_daemons(proc)
        self.assertEqual(
            [(d.unit, d.plugin, d.release.name) for d in daemons],
            [
                ("inference.service", "inference", "0.1.1"),
                ("llmrouter@1.service", "llmrouter", "0.1.1"),
                ("llmrouter@2.service", "llmrouter", "0.1.0"),
            ],
        )
        self.assertEqual(release.check(venvs / "venv", proc), 1)
        (venvs / "venv").unlink()
        (venvs / "venv").symlink_to("releases/0.1.0")
        self.assertEqual(release.check(venvs / "venv", proc), 1)
        proc12 = proc / "12" / "cmdline"
        proc12.write_bytes(proc12.read_bytes().replace(b"0.1.0", b"0.1.1"))
        (venvs / "venv").unlink()
        (venvs / "venv").symlink_to("releases/0.1.1")
        self.assertEqual(release.check(venvs / "venv", proc), 0)
        empty = Path(self.mktemp())
        empty.mkdir()
        self.assertEqual(release.check(venvs / "venv", empty), 1)  # none running


def _without(environ: Mapping[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in names}
