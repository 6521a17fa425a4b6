"""Locked memory and process hardening, checked against what the kernel reports."""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from llmrouter import secmem


def _run(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (hardening is irreversible) and parse its JSON output."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _status(field: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(field)


class HardenProcessTests(unittest.TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("prctl and /proc are Linux")

    def test_core_dumps_off_and_not_dumpable(self) -> None:
        result = _run(
            """
            import json, resource
            from llmrouter import secmem
            before = (secmem.core_dumps_disabled(), secmem.is_dumpable())
            secmem.harden_process()
            secmem.harden_process()  # idempotent
            print(json.dumps({
                "before_dumpable": before[1],
                "rlimit_core": list(resource.getrlimit(resource.RLIMIT_CORE)),
                "dumpable": secmem.is_dumpable(),
                "disabled": secmem.core_dumps_disabled(),
            }))
            """
        )
        self.assertTrue(result["before_dumpable"])
        self.assertEqual(result["rlimit_core"], [0, 0])
        self.assertFalse(result["dumpable"])
        self.assertTrue(result["disabled"])

    def test_not_dumpable_is_seen_by_prctl_directly(self) -> None:
        # Independent of secmem's own reader: ask the kernel through a separate libc handle.
        result = _run(
            """
            import ctypes, json
            from llmrouter import secmem
            libc = ctypes.CDLL(None)
            before = libc.prctl(3, 0, 0, 0, 0)
            secmem.harden_process()
            print(json.dumps({"before": before, "after": libc.prctl(3, 0, 0, 0, 0)}))
            """
        )
        self.assertEqual(result, {"before": 1, "after": 0})


class LockedBufferTests(unittest.TestCase):
    def test_bytes_round_trip_and_redacted_repr(self) -> None:
        secret = bytes(range(32))
        buf = secmem.LockedBuffer(secret)
        self.addCleanup(buf.wipe)
        self.assertEqual(buf.bytes(), secret)
        self.assertEqual(len(buf), 32)
        for text in (repr(buf), str(buf)):
            self.assertNotIn(secret.hex(), text)
            self.assertNotIn(repr(secret)[2:-1], text)
            self.assertIn("redacted", text)

    def test_cannot_be_pickled(self) -> None:
        import copy
        import pickle

        buf = secmem.LockedBuffer(b"k" * 32)
        self.addCleanup(buf.wipe)
        self.assertRaises(TypeError, pickle.dumps, buf)
        self.assertRaises(TypeError, copy.copy, buf)

    def test_wipe_zeroes_the_storage(self) -> None:
        buf = secmem.LockedBuffer(b"\xaa" * 48)
        storage = buf._buf  # keep the old storage alive to inspect it after the wipe
        address = ctypes.addressof(buf._view)  # type: ignore[arg-type]
        buf.wipe()
        self.assertEqual(bytes(storage), bytes(48))
        self.assertEqual(ctypes.string_at(address, 48), bytes(48))
        self.assertTrue(buf.wiped)
        self.assertFalse(buf.locked)
        self.assertRaises(ValueError, buf.bytes)
        buf.wipe()  # idempotent

    def test_mlock_shows_in_vmlck_and_is_released(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("VmLck is in Linux's /proc")

        def locked_kb() -> int:
            return int(_status("VmLck").split()[0])

        # Buffers of earlier tests freed by the collector mid-test would move VmLck under us.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        start = locked_kb()
        big = secmem.LockedBuffer(b"\x01" * (5 * 4096))
        self.addCleanup(big.wipe)
        if not big.locked:
            raise unittest.SkipTest("the OS refused mlock here (RLIMIT_MEMLOCK)")
        self.assertGreaterEqual(locked_kb() - start, 20)
        big.wipe()
        self.assertEqual(locked_kb(), start)

    def test_pages_shared_by_buffers_stay_locked_until_the_last_goes(self) -> None:
        # mlock is not reference counted; wiping one small buffer must not unlock its neighbour.
        buffers = [secmem.LockedBuffer(bytes([i]) * 32) for i in range(8)]
        for b in buffers:
            self.addCleanup(b.wipe)
        if not all(b.locked for b in buffers):
            raise unittest.SkipTest("the OS refused mlock here")
        pages = {ctypes.addressof(b._view) // secmem._PAGE for b in buffers}  # type: ignore[arg-type]
        for page in pages:
            self.assertIn(page, secmem._page_users)
        buffers[0].wipe()
        survivors = {
            ctypes.addressof(b._view) // secmem._PAGE  # type: ignore[arg-type]
            for b in buffers[1:]
        }
        for page in survivors:
            self.assertIn(page, secmem._page_users)
        for b in buffers[1:]:
            b.wipe()
        for page in pages:
            self.assertNotIn(page, secmem._page_users)

    def test_empty_buffer(self) -> None:
        buf = secmem.LockedBuffer(b"")
        self.assertEqual(buf.bytes(), b"")
        self.assertFalse(buf.locked)
        buf.wipe()
        self.assertTrue(buf.wiped)


class ForkTests(unittest.TestCase):
    def test_locks_are_taken_again_in_a_forked_child(self) -> None:
        # mlock() is not inherited by fork(); twistd forks when it daemonizes.
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("VmLck is in Linux's /proc")
        result = _run(
            """
            import json, os
            from llmrouter import secmem

            def locked_kb():
                for line in open("/proc/self/status"):
                    if line.startswith("VmLck:"):
                        return int(line.split()[1])

            buf = secmem.LockedBuffer(b"s" * 8192)
            parent = locked_kb()
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write, str(locked_kb()).encode())
                os._exit(0)
            os.close(write)
            child = int(os.read(read, 100))
            os.waitpid(pid, 0)
            print(json.dumps({"locked": buf.locked, "parent": parent, "child": child}))
            """
        )
        if not result["locked"]:
            raise unittest.SkipTest("the OS refused mlock here")
        self.assertGreaterEqual(result["parent"], 8)
        self.assertEqual(result["child"], result["parent"])
