"""llmrouter-keys against a real key directory, next to a running KeyStore."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import nacl.signing
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from llmrouter import protocol
from llmrouter.keystore import KeyStore
from llmrouter.ops import keyctl
from llmrouter.router.seclog import SecurityLog
from llmrouter.v2 import certs as v2certs


def _secret_spellings(directory: Path) -> list[str]:
    """Every secret in the directory, in the encodings a careless printer might use."""
    out = []
    for path in directory.iterdir():
        if path.suffix == ".key":
            secret = path.read_bytes()
            out += [
                secret.hex(),
                secret.hex().upper(),
                protocol.b64u_encode(secret),
                base64.b64encode(secret).decode(),
                repr(secret)[2:-1],
            ]
    return out


class KeyctlTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()) / "keys"
        self.clock = Clock()
        self.clock.advance(time.time())

    def run_main(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = keyctl.main(["--keys-dir", str(self.dir), *args], harden=False)
        return code, out.getvalue(), err.getvalue()

    def init(self) -> tuple[int, str, str]:
        """``init`` as the directory's owner would run it: as root (these tests run as root
        in CI) only into a directory root made, since root refuses to create one."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.run_main("init")

    def running_store(self) -> KeyStore:
        store = KeyStore.open(self.dir, self.clock)
        store.start()
        self.addCleanup(store.close)
        return store

    def test_init_then_list(self) -> None:
        code, out, err = self.init()
        self.assertEqual((code, err), (0, ""))
        store = KeyStore.open(self.dir, self.clock)
        self.addCleanup(store.close)
        self.assertIn(protocol.b64u_encode(bytes(store.signing_key.verify_key)), out)
        code, out, err = self.run_main("list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("KID  STATUS", lines[3])
        self.assertTrue(lines[4].startswith("00   current"))
        self.assertTrue(lines[5].startswith("01   next"))
        self.assertIn(store.current.fingerprint, lines[4])
        self.assertIn(store.next.fingerprint, lines[5])

    def test_list_never_prints_secret_bytes(self) -> None:
        store = self.running_store()
        spellings = _secret_spellings(self.dir)  # including 00's, destroyed below
        store.rotate()
        store.revoke("00")
        spellings += _secret_spellings(self.dir)
        code, out, err = self.run_main("list")
        self.assertEqual(code, 0)
        self.assertIn("revoked", out)
        for spelling in spellings:
            self.assertNotIn(spelling, out + err)

    def test_rotate_is_picked_up_by_a_running_store(self) -> None:
        store = self.running_store()
        self.clock.advance(600)
        code, out, err = self.run_main("rotate")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("01 is current (was 00), 02 is next", out)
        self.assertEqual(store.current.kid, "00")
        self.clock.advance(2)  # the store's poll
        self.assertEqual(store.current.kid, "01")
        self.assertIsNotNone(store.private_key_for("02"))
        self.assertIsNotNone(store.private_key_for("00"))  # overlap window
        self.assertEqual(store.rotations, 1)

    def test_revoke_is_picked_up_by_reload(self) -> None:
        store = KeyStore.open(self.dir, self.clock)
        self.addCleanup(store.close)
        code, out, err = self.run_main("revoke", "00")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("revoked 00", out)
        self.assertIsNotNone(store.private_key_for("00"))
        self.assertTrue(store.reload())
        self.assertIsNone(store.private_key_for("00"))
        self.assertEqual(store.current.kid, "01")

    def test_cli_keeps_the_routers_settings(self) -> None:
        KeyStore.open(self.dir, self.clock, rotation_seconds=7200, overlap_seconds=120).close()
        code, out, _ = self.run_main("rotate")
        self.assertEqual(code, 0)
        self.assertIn("stays accepted for 120 s", out)
        code, out, _ = self.run_main("list")
        self.assertIn("rotation every 7200 s, overlap 120 s", out)

    def test_errors(self) -> None:
        code, _, err = self.run_main("list")
        self.assertEqual(code, 1)
        self.assertIn("does not exist", err)
        self.assertFalse(self.dir.exists())
        self.init()
        code, _, err = self.run_main("revoke", "42")
        self.assertEqual(code, 1)
        self.assertIn("no key 42", err)
        code, _, err = self.run_main("revoke", "0A")
        self.assertEqual(code, 2)
        self.assertIn("two lowercase hex digits", err)
        code, _, err = self.run_main("frobnicate")
        self.assertEqual(code, 2)
        code, _, err = self.run_main()
        self.assertEqual(code, 2)
        os.chmod(self.dir / "signing.key", 0o644)
        code, _, err = self.run_main("list")
        self.assertEqual(code, 1)
        self.assertIn("chmod 600", err)
        self.assertNotIn("Traceback", err)

    def test_unusable_directory(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"")
        self.dir = blocker / "keys"
        self.patch(os, "geteuid", lambda: 1000)  # not root: init may create directories
        code, _, err = self.run_main("init")
        self.assertEqual(code, 1)
        self.assertIn("cannot use the key directory", err)
        self.assertNotIn("Traceback", err)

    def test_waits_for_the_lock_then_gives_up_cleanly(self) -> None:
        import fcntl

        self.init()
        fd = os.open(self.dir / ".lock", os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.patch(KeyStore, "lock_timeout", 0.05)
        code, _, err = self.run_main("rotate")
        self.assertEqual(code, 1)
        self.assertIn("locked by another process", err)

    def test_root_does_not_create_a_key_directory(self) -> None:
        """As root, ``init`` would leave root-owned keys that the router (llmrouter) refuses."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        code, _, err = self.run_main("init")
        self.assertEqual(code, 1)
        self.assertIn("refusing to create", err)
        self.assertIn(f"runuser -u llmrouter -- llmrouter-keys --keys-dir {self.dir} init", err)
        self.assertFalse(self.dir.exists())
        self.assertEqual(self.init()[0], 0)  # a directory root made on purpose is root's

    def test_pin_prints_only_the_signing_key(self) -> None:
        store = self.running_store()
        code, out, err = self.run_main("pin")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, protocol.b64u_encode(bytes(store.signing_key.verify_key)) + "\n")

    def test_backup_signing_key_create_pin_and_switch(self) -> None:
        events: list[str] = []
        store = self.running_store()
        store.events = SecurityLog(emit=lambda line: events.append(json.loads(line)["event"]))
        old_pin = bytes(store.signing_key.verify_key)
        current = (store.current.kid, store.current.fingerprint)
        backup = Path(self.mktemp())
        code, out, err = self.run_main("backup-create", str(backup))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(backup.stat().st_mode & 0o777, 0o600)
        new_pin = nacl.signing.SigningKey(backup.read_bytes()).verify_key.encode()
        self.assertIn(f"backup pin (apps pin it next to the current one): {b64(new_pin)}", out)
        self.assertNotIn(backup.read_bytes().hex(), out)
        self.assertNotIn(protocol.b64u_encode(backup.read_bytes()), out)
        # never overwritten
        code, _, err = self.run_main("backup-create", str(backup))
        self.assertEqual(code, 1)
        self.assertIn("refusing to overwrite", err)
        code, out, _ = self.run_main("backup-pin", str(backup))
        self.assertEqual((code, out), (0, b64(new_pin) + "\n"))

        # the switch, from standard input (root hands a root-only file to the router's user)
        self.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(backup.read_bytes())))
        code, out, err = self.run_main("backup-switch", "-")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"the pin is now {b64(new_pin)} (was {b64(old_pin)})", out)
        self.clock.advance(2)  # the running store's poll picks the new key up
        self.assertEqual(bytes(store.signing_key.verify_key), new_pin)
        document = protocol.verify_key_document(
            store.key_document(), pin=new_pin, now=self.clock.seconds()
        )
        self.assertEqual(document.keys[0].kid, current[0])  # HPKE keys stay as they were
        self.assertEqual((store.current.kid, store.current.fingerprint), current)
        self.assertRaises(
            protocol.KeyDocumentError,
            protocol.verify_key_document,
            store.key_document(),
            pin=old_pin,
            now=self.clock.seconds(),
        )
        self.assertIn("signing_key_replaced", events)
        reopened = KeyStore.open(self.dir, self.clock)
        self.addCleanup(reopened.close)
        self.assertEqual(bytes(reopened.signing_key.verify_key), new_pin)

    def test_backup_file_errors(self) -> None:
        self.running_store()
        short = Path(self.mktemp())
        short.write_bytes(b"x" * 31)
        for command in ("backup-pin", "backup-switch"):
            code, _, err = self.run_main(command, str(short))
            self.assertEqual(code, 1)
            self.assertIn("is not a signing key file", err)
            code, _, err = self.run_main(command, str(short) + ".missing")
            self.assertEqual(code, 1)
            self.assertIn("cannot read", err)
            self.assertNotIn("Traceback", err)


def b64(data: bytes) -> str:
    return protocol.b64u_encode(data)


class KeyctlProcessTests(unittest.TestCase):
    """The module run as a program, next to a store started on the real reactor."""

    async def wait_for(self, condition: object, limit: float = 30.0) -> None:
        deadline = reactor.seconds() + limit  # type: ignore[attr-defined]
        while not condition():  # type: ignore[operator]
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.fail("the running store did not pick the change up")
            await task.deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]

    def test_subprocess_rotate_and_revoke(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._subprocess_rotate_and_revoke())

    async def _subprocess_rotate_and_revoke(self) -> None:
        directory = Path(self.mktemp()) / "keys"
        store = KeyStore.open(directory, reactor)  # type: ignore[arg-type]
        store.start()
        self.addCleanup(store.close)

        async def cli(*args: str) -> tuple[bytes, bytes, int]:
            result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
                sys.executable,
                ["-m", "llmrouter.ops.keyctl", "--keys-dir", str(directory), *args],
                env=os.environ,
            )
            return result

        out, err, code = await cli("rotate")
        self.assertEqual((code, err), (0, b""), err.decode(errors="replace"))
        self.assertIn(b"01 is current", out)
        await self.wait_for(lambda: store.current.kid == "01")
        self.assertIsNotNone(store.private_key_for("00"))

        out, err, code = await cli("revoke", "00")
        self.assertEqual((code, err), (0, b""), err.decode(errors="replace"))
        await self.wait_for(lambda: store.private_key_for("00") is None)
        self.assertNotIn("hpke-00.key", {p.name for p in directory.iterdir()})

        out, err, code = await cli("list")
        self.assertEqual(code, 0)
        self.assertIn(b"00   revoked", out)
        for spelling in _secret_spellings(directory):
            self.assertNotIn(spelling.encode(), out + err)

    def test_concurrent_rotations_are_all_applied(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._concurrent_rotations())

    async def _concurrent_rotations(self) -> None:
        # Four operators at once: the lock serialises them and each starts from the state on
        # disk, so no rotation is lost and no key id is handed out twice.
        directory = Path(self.mktemp()) / "keys"
        KeyStore.open(directory, reactor).close()  # type: ignore[arg-type]
        argv = ["-m", "llmrouter.ops.keyctl", "--keys-dir", str(directory), "rotate"]
        results = await gatherResults(
            [getProcessOutputAndValue(sys.executable, argv, env=os.environ) for _ in range(4)]
        )
        for _, err, code in results:
            self.assertEqual((code, err), (0, b""), err.decode(errors="replace"))
        store = KeyStore.open(directory, reactor, rotation_seconds=None, overlap_seconds=None)  # type: ignore[arg-type]
        self.addCleanup(store.close)
        self.assertEqual((store.current.kid, store.next.kid), ("04", "05"))
        state = json.loads((directory / "state.json").read_text())
        self.assertEqual(state["rotations"], 4)
        self.assertEqual(
            sorted(k["kid"] for k in state["keys"]), ["00", "01", "02", "03", "04", "05"]
        )
        currents = sorted(out.split(b" is current")[0].split(b" ")[-1] for out, _, _ in results)
        self.assertEqual(currents, [b"01", b"02", b"03", b"04"])


class OperatorKeyTests(unittest.TestCase):
    """Protocol v2's operator key: created offline, pinned by apps, certifying signing keys."""

    def run_main(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = keyctl.main(list(args), harden=False)
        return code, out.getvalue(), err.getvalue()

    def operator(self) -> tuple[Path, bytes]:
        path = Path(self.mktemp())
        code, _out, err = self.run_main("operator-init", str(path))
        self.assertEqual((code, err), (0, ""))
        pin = nacl.signing.SigningKey(path.read_bytes()).verify_key.encode()
        return path, pin

    def test_init_and_pin(self) -> None:
        path = Path(self.mktemp())
        code, out, err = self.run_main("operator-init", str(path))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        seed = path.read_bytes()
        pin = b64(nacl.signing.SigningKey(seed).verify_key.encode())
        self.assertIn(f"operator pin (v2 apps pin it): {pin}", out)
        self.assertIn("never on a router host", out)
        for spelling in (seed.hex(), b64(seed), base64.b64encode(seed).decode()):
            self.assertNotIn(spelling, out)
        self.assertEqual(self.run_main("operator-pin", str(path))[:2], (0, pin + "\n"))
        # never overwritten, never through a symbolic link
        code, _, err = self.run_main("operator-init", str(path))
        self.assertEqual(code, 1)
        self.assertIn("refusing to overwrite", err)
        self.assertEqual(path.read_bytes(), seed)
        target = Path(self.mktemp())
        link = Path(self.mktemp())
        link.symlink_to(target)
        code, _, err = self.run_main("operator-init", str(link))
        self.assertEqual(code, 1)
        self.assertFalse(target.exists())

    def test_certify_a_router_and_a_node(self) -> None:
        path, pin = self.operator()
        router = nacl.signing.SigningKey.generate()
        code, out, err = self.run_main(
            "operator-certify", str(path), "--type", "router", "--name", "router-1",
            "--key", b64(bytes(router.verify_key)),
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn("certified router router-1 until", err)
        self.assertIn("router.cert", err)
        now = time.time()
        cert = v2certs.verify_certificate(json.loads(out), pin, now=now, type="router")
        self.assertEqual(
            (cert.name, cert.key, cert.models), ("router-1", bytes(router.verify_key), ())
        )
        self.assertEqual(cert.not_after - cert.not_before, 30 * 86400)
        self.assertLessEqual(abs(cert.not_before - now), 5)

        node = nacl.signing.SigningKey.generate()
        code, out, err = self.run_main(
            "operator-certify", str(path), "--type", "node", "--name", "gpu-1.eu",
            "--key", b64(bytes(node.verify_key)), "--model", "qwen3:8b", "--model", "m/2",
            "--days", "366",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        cert = v2certs.verify_certificate(json.loads(out), pin, now=now, type="node")
        self.assertEqual((cert.name, cert.models), ("gpu-1.eu", ("qwen3:8b", "m/2")))
        self.assertEqual(cert.not_after - cert.not_before, 366 * 86400)
        self.assertNotIn(path.read_bytes().hex(), out + err)
        self.assertNotIn(b64(path.read_bytes()), out + err)

    def test_certify_a_key_whose_pin_begins_with_a_dash(self) -> None:
        """One pin in 64 begins with "-"; ``--key -KEY`` as the docs write it must still work
        (argparse took it for an option, and make run's fresh keys failed one start in 64)."""
        path, pin = self.operator()
        router = nacl.signing.SigningKey.generate()
        while not b64(bytes(router.verify_key)).startswith("-"):
            router = nacl.signing.SigningKey.generate()
        code, out, err = self.run_main(
            "operator-certify", str(path), "--type", "router", "--name", "router-1",
            "--key", b64(bytes(router.verify_key)),
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        cert = v2certs.verify_certificate(json.loads(out), pin, now=time.time(), type="router")
        self.assertEqual(cert.key, bytes(router.verify_key))

    def test_certify_refusals(self) -> None:
        path, _ = self.operator()
        key = b64(bytes(nacl.signing.SigningKey.generate().verify_key))
        cases = [
            (("--type", "node", "--name", "n", "--key", key), "1 to 64 models"),
            (("--type", "router", "--name", "r", "--key", key, "--model", "m"), "no models"),
            (("--type", "node", "--name", "Big", "--key", key, "--model", "m"), "name"),
            (("--type", "node", "--name", "n", "--key", key, "--model", "a b"), "model names"),
            (
                ("--type", "node", "--name", "n", "--key", key, "--model", "m", "--model", "m"),
                "distinct",
            ),
            (("--type", "router", "--name", "r", "--key", key, "--days", "367"), "1 to 366"),
            (("--type", "router", "--name", "r", "--key", key, "--days", "0"), "1 to 366"),
            (("--type", "router", "--name", "r", "--key", "short"), "--key must be"),
        ]
        for args, text in cases:
            code, out, err = self.run_main("operator-certify", str(path), *args)
            self.assertEqual((code, out), (1, ""), args)
            self.assertIn(text, err, args)
            self.assertNotIn("Traceback", err)
        code, _, err = self.run_main(
            "operator-certify", str(path) + ".missing", "--type", "router", "--name", "r",
            "--key", key,
        )  # fmt: skip
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)
        code, _, err = self.run_main("operator-certify", str(path), "--type", "operator",
                                     "--name", "r", "--key", key)  # fmt: skip
        self.assertEqual(code, 2)

    def test_certify_a_key_directorys_pin(self) -> Deferred[None]:
        """The walk an operator does: the node's pin, certified offline, written to a file as
        the shell redirects it (stdout is the certificate alone)."""
        return Deferred.fromCoroutine(self._certify_a_key_directorys_pin())

    async def _certify_a_key_directorys_pin(self) -> None:
        path, pin = self.operator()
        directory = Path(self.mktemp()) / "keys"
        KeyStore.open(directory, reactor).close()  # type: ignore[arg-type]

        async def cli(*args: str) -> tuple[bytes, bytes, int]:
            result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
                sys.executable, ["-m", "llmrouter.ops.keyctl", *args], env=os.environ
            )
            return result

        node_pin, err, code = await cli("--keys-dir", str(directory), "pin")
        self.assertEqual(code, 0, err)
        out, err, code = await cli(
            "operator-certify", str(path), "--type", "node", "--name", "node-a",
            "--key", node_pin.decode().strip(), "--model", "tiny",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        cert = v2certs.verify_certificate(json.loads(out), pin, now=time.time(), type="node")
        store = KeyStore.open(directory, reactor, rotation_seconds=None, overlap_seconds=None)  # type: ignore[arg-type]
        self.addCleanup(store.close)
        self.assertEqual(cert.key, bytes(store.signing_key.verify_key))
