"""KeyStore: the key directory on disk, rotation and overlap on a fake clock, revocation, reload."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import stat
from pathlib import Path

import nacl.signing
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmrouter import hpke, protocol
from llmrouter.keystore import (
    KeyStore,
    KeyStoreBusyError,
    KeyStoreError,
    UnknownKeyError,
    allocate_key_id,
    fingerprint,
)
from llmrouter.router.seclog import SecurityLog

T0 = 1_700_000_000
DAY = 86400
HOUR = 3600


class KeyStoreTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.dir = Path(self.mktemp()) / "keys"
        self.events: list[dict[str, object]] = []
        self.stores: list[KeyStore] = []

    def open(self, **kwargs: object) -> KeyStore:
        store = KeyStore.open(self.dir, self.clock, **kwargs)  # type: ignore[arg-type]
        store.events = SecurityLog(emit=lambda line: self.events.append(json.loads(line)))
        self.stores.append(store)
        self.addCleanup(store.close)
        return store

    def names(self) -> set[str]:
        return {p.name for p in self.dir.iterdir()}

    def event_names(self) -> list[object]:
        return [e["event"] for e in self.events]


class CreationTests(KeyStoreTestCase):
    def check_permissions(self) -> None:
        self.assertEqual(stat.S_IMODE(self.dir.stat().st_mode), 0o700)
        for path in self.dir.iterdir():
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path.name)

    def test_first_start_creates_everything_private(self) -> None:
        store = self.open()
        self.assertEqual(
            self.names(),
            {
                ".lock",
                "state.json",
                "signing.key",
                "pow.key",
                "state-hash.key",
                "hpke-00.key",
                "hpke-01.key",
            },
        )
        self.check_permissions()
        self.assertEqual([k.kid for k in store.published()], ["00", "01"])
        self.assertEqual([k.status for k in store.published()], ["current", "next"])
        current, upcoming = store.published()
        self.assertEqual((current.not_before, current.not_after), (T0, T0 + DAY + HOUR))
        self.assertEqual((upcoming.not_before, upcoming.not_after), (T0 + DAY, T0 + 2 * DAY + HOUR))
        self.assertEqual(len(store.pow_key), 32)
        sk = store.private_key_for("00")
        assert sk is not None
        self.assertEqual(hpke.public_key(sk), current.pk)
        self.assertEqual((self.dir / "hpke-00.key").read_bytes(), sk)

    def test_a_node_directory_holds_no_router_secrets(self) -> None:
        """An inference node's key directory (protocol v2) rotates HPKE keys as a router's does,
        with no proof-of-work or shared-state key: a node needs neither."""
        store = self.open(node=True)
        self.assertEqual(
            self.names(), {".lock", "state.json", "signing.key", "hpke-00.key", "hpke-01.key"}
        )
        self.assertEqual((store.pow_key, store.state_key), (b"", b""))
        self.clock.advance(DAY)
        store.start()
        self.addCleanup(store.stop)
        self.assertEqual(store.current.kid, "01")
        self.assertNotIn("pow.key", self.names())

    def test_an_old_log_hash_key_is_destroyed(self) -> None:
        """Security-log hashes used a long-lived key kept here; whoever holds it can reverse
        the IPv4 hashes of old logs, so it is destroyed (the log now keys a day in memory)."""
        self.open().close()
        (self.dir / "log-hash.key").write_bytes(bytes(32))
        os.chmod(self.dir / "log-hash.key", 0o600)
        self.open()
        self.assertNotIn("log-hash.key", self.names())

    def test_permissions_do_not_depend_on_the_umask(self) -> None:
        for umask in (0o000, 0o777):
            self.dir = Path(self.mktemp()) / "nested" / "keys"
            previous = os.umask(umask)
            try:
                store = self.open()
                store.rotate()
            finally:
                os.umask(previous)
            self.check_permissions()
            self.assertEqual(stat.S_IMODE(self.dir.parent.stat().st_mode), 0o700)

    def test_reopen_gives_the_same_keys(self) -> None:
        first = self.open()
        first_state = (
            bytes(first.signing_key.verify_key),
            first.pow_key,
            first.published(),
            first.private_key_for("00"),
            first.private_key_for("01"),
        )
        first.close()
        self.clock.advance(100)
        again = self.open()
        self.assertEqual(
            (
                bytes(again.signing_key.verify_key),
                again.pow_key,
                again.published(),
                again.private_key_for("00"),
                again.private_key_for("01"),
            ),
            first_state,
        )

    def test_refuses_group_or_world_accessible_files(self) -> None:
        self.open().close()
        for name in ("signing.key", "hpke-01.key", "pow.key", "state.json"):
            for mode in (0o640, 0o604, 0o620):
                os.chmod(self.dir / name, mode)
                with self.assertRaises(KeyStoreError) as caught:
                    KeyStore.open(self.dir, self.clock)
                self.assertIn(name, str(caught.exception))
                self.assertIn("chmod 600", str(caught.exception))
                os.chmod(self.dir / name, 0o600)
        os.chmod(self.dir, 0o750)
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("chmod 700", str(caught.exception))
        os.chmod(self.dir, 0o700)
        self.open()  # fine again

    def test_refuses_symlinked_key_file(self) -> None:
        self.open().close()
        real = self.dir.parent / "elsewhere.key"
        os.rename(self.dir / "signing.key", real)
        os.symlink(real, self.dir / "signing.key")
        self.assertRaises(KeyStoreError, KeyStore.open, self.dir, self.clock)

    def test_refuses_files_of_another_user(self) -> None:
        self.open().close()
        try:
            os.chown(self.dir / "pow.key", 65534, 65534)
        except PermissionError:
            raise unittest.SkipTest("needs CAP_CHOWN") from None
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("owned by uid 65534", str(caught.exception))

    def test_mismatched_or_damaged_key_files_are_refused(self) -> None:
        store = self.open()
        secret = store.private_key_for("00")
        assert secret is not None
        store.close()
        (self.dir / "hpke-00.key").write_bytes(hpke.generate_key_pair().sk)
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("does not match", str(caught.exception))
        (self.dir / "hpke-00.key").write_bytes(secret[:31])
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("wrong length", str(caught.exception))
        self.assertNotIn(secret.hex(), str(caught.exception))
        (self.dir / "hpke-00.key").write_bytes(secret)
        (self.dir / "state.json").write_text("{not json")
        self.assertRaises(KeyStoreError, KeyStore.open, self.dir, self.clock)

    def test_signing_key_is_never_replaced_silently(self) -> None:
        self.open().close()
        (self.dir / "signing.key").unlink()
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("signing key", str(caught.exception))
        (self.dir / "signing.key").write_bytes(os.urandom(32))
        os.chmod(self.dir / "signing.key", 0o600)
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock)
        self.assertIn("does not match", str(caught.exception))

    def test_stray_files_of_interrupted_writes_are_destroyed(self) -> None:
        self.open().close()
        (self.dir / "hpke-7f.key").write_bytes(os.urandom(32))
        (self.dir / ".state.json.tmp-0123abcd").write_bytes(b"{}")
        self.open()
        self.assertNotIn("hpke-7f.key", self.names())
        self.assertNotIn(".state.json.tmp-0123abcd", self.names())

    def test_missing_directory_without_create(self) -> None:
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(self.dir, self.clock, create=False)
        self.assertIn("does not exist", str(caught.exception))
        self.assertFalse(self.dir.exists())

    def test_os_errors_become_clear_key_store_errors(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"")
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(blocker / "keys", self.clock)
        self.assertIn("cannot use the key directory", str(caught.exception))
        with self.assertRaises(KeyStoreError) as caught:
            KeyStore.open(blocker, self.clock)
        self.assertIn("not a directory", str(caught.exception))

    def test_secrets_never_in_repr_or_str(self) -> None:
        store = self.open()
        secrets = [store.private_key_for("00"), store.private_key_for("01")]
        secrets += [store.pow_key, bytes(store.signing_key)]
        texts = [repr(store), str(store), repr(store.keys()), repr(store.published())]
        texts += [str(store.signing_key), repr(store.signing_key), f"{store.signing_key}"]
        texts += [repr(b) for b in store._secrets.values()]
        for secret in secrets:
            assert secret is not None
            for text in texts:
                self.assertNotIn(secret.hex(), text)
                self.assertNotIn(protocol.b64u_encode(secret), text)
                self.assertNotIn(repr(secret), text)

    def test_memory_is_locked(self) -> None:
        store = self.open()
        self.assertEqual(len(store._secrets), 2)
        if not store.memory_locked and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < 65536:
            raise unittest.SkipTest("RLIMIT_MEMLOCK too small here to mlock anything")
        self.assertTrue(store.memory_locked)
        buffers = list(store._secrets.values())
        store.close()
        self.assertTrue(all(b.wiped and not b.locked for b in buffers))


class KeyDocumentTests(KeyStoreTestCase):
    def test_document_is_signed_and_has_one_current_and_one_next(self) -> None:
        store = self.open()
        doc = json.loads(store.key_document())
        payload = protocol.b64u_decode(doc["payload"], "payload")
        signature = protocol.b64u_decode(doc["signature"], "signature")
        signing_pk = protocol.b64u_decode(doc["signing_key"], "signing_key")
        self.assertEqual(signing_pk, bytes(store.signing_key.verify_key))
        nacl.signing.VerifyKey(signing_pk).verify(payload, signature)  # raises if bad
        body = json.loads(payload)
        self.assertEqual([k["status"] for k in body["keys"]], ["current", "next"])
        self.assertEqual(body["issued_at"], T0 // HOUR * HOUR)
        verified = protocol.verify_key_document(store.key_document(), signing_pk, now=T0)
        self.assertEqual(verified.current().kid, "00")
        self.assertEqual(list(verified.keys), store.published())
        # Tampering breaks it.
        bad = dict(doc, payload=protocol.b64u_encode(payload.replace(b'"00"', b'"05"')))
        self.assertRaises(
            protocol.KeyDocumentError,
            protocol.verify_key_document,
            json.dumps(bad).encode(),
            now=T0,
        )

    def test_jwks_and_ohttp_configs(self) -> None:
        store = self.open()
        jwks = json.loads(store.jwks())["keys"]
        self.assertEqual([j["kid"] for j in jwks], ["00", "01"])
        self.assertEqual(protocol.b64u_decode(jwks[0]["x"], "x"), store.current.pk)
        configs = store.ohttp_configs()
        self.assertEqual(len(configs), 2 * (2 + 41))
        self.assertEqual(configs[2], 0)  # key_id of the first key
        self.assertEqual(configs[2 + 41 + 2], 1)

    def test_cached_until_the_keys_change(self) -> None:
        store = self.open()
        doc, jwks, ohttp = store.key_document(), store.jwks(), store.ohttp_configs()
        self.clock.advance(60)
        self.assertIs(store.key_document(), doc)
        self.assertIs(store.jwks(), jwks)
        self.assertIs(store.ohttp_configs(), ohttp)
        store.rotate()
        self.assertNotEqual(store.key_document(), doc)
        self.assertNotEqual(store.jwks(), jwks)
        self.assertNotEqual(store.ohttp_configs(), ohttp)
        body = protocol.verify_key_document(store.key_document(), now=T0 + 60)
        self.assertEqual(body.issued_at, T0 // HOUR * HOUR)
        self.assertEqual(
            [(k.kid, k.status) for k in body.keys], [("01", "current"), ("02", "next")]
        )
        # Expiry of the retired key does not change what is published.
        store.start()
        self.clock.advance(HOUR)
        self.assertIsNone(store.private_key_for("00"))
        again = protocol.verify_key_document(store.key_document(), now=self.clock.seconds())
        self.assertEqual(again.keys, body.keys)

    def test_signed_again_every_hour_and_the_same_bytes_from_the_same_keys(self) -> None:
        """Clients refuse documents older than a day, so the router re-signs every hour on the
        hour; with the same keys two routers serve byte-identical documents (issue 8)."""
        store = self.open()
        hour = T0 // HOUR * HOUR
        doc = store.key_document()
        self.assertEqual(json.loads(self.payload(doc))["issued_at"], hour)
        self.clock.advance(hour + HOUR - 1 - T0)
        self.assertIs(store.key_document(), doc)
        self.assertEqual(self.open().key_document(), doc)  # another router, same directory
        self.clock.advance(1)
        later = store.key_document()
        self.assertEqual(json.loads(self.payload(later))["issued_at"], hour + HOUR)
        self.assertEqual(self.open().key_document(), later)

    @staticmethod
    def payload(document: bytes) -> bytes:
        return protocol.b64u_decode(json.loads(document)["payload"], "payload")


class RotationTests(KeyStoreTestCase):
    def test_timer_rotation_and_overlap_window(self) -> None:
        store = self.open()
        store.start()
        old_sk = store.private_key_for("00")
        old_buffer = store._secrets["00"]
        self.clock.advance(DAY - 1)
        self.assertEqual(store.current.kid, "00")
        self.assertEqual(store.rotations, 0)
        self.assertEqual(store.current_key_age(), DAY - 1)
        self.clock.advance(1)
        self.assertEqual(store.rotations, 1)
        self.assertEqual(
            [(k.kid, k.status) for k in store.published()], [("01", "current"), ("02", "next")]
        )
        self.assertEqual(store.current_key_age(), 0)
        self.assertIn("hpke-02.key", self.names())
        # Inside the overlap window the old key is still accepted...
        self.assertEqual(store.private_key_for("00"), old_sk)
        self.clock.advance(HOUR - 1)
        self.assertEqual(store.private_key_for("00"), old_sk)
        self.assertIn("hpke-00.key", self.names())
        # ...and then it is key_unknown, its file gone and its memory wiped.
        self.clock.advance(1)
        self.assertIsNone(store.private_key_for("00"))
        self.assertNotIn("hpke-00.key", self.names())
        self.assertTrue(old_buffer.wiped)
        self.assertIsNone(store.info("00"))
        self.assertEqual(self.event_names(), ["key_rotated", "key_expired"])
        self.assertEqual(self.events[0]["kid"], "01")
        self.assertEqual(self.events[0]["previous"], "00")
        # The next rotation comes a rotation period after the last one.
        self.clock.advance(DAY - HOUR)
        self.assertEqual(store.current.kid, "02")
        self.assertEqual(store.rotations, 2)

    def test_the_next_key_is_accepted_and_unknown_kids_are_not(self) -> None:
        store = self.open()
        self.assertIsNotNone(store.private_key_for("01"))
        for kid in ("02", "ff", "zz", ""):
            self.assertIsNone(store.private_key_for(kid))

    def test_schedule_survives_a_restart(self) -> None:
        first = self.open()
        first.close()
        self.clock.advance(DAY - 10)
        store = self.open()
        store.start()
        self.assertEqual(store.current.kid, "00")
        self.clock.advance(10)
        self.assertEqual(store.current.kid, "01")

    def test_overdue_rotation_happens_at_start_and_expired_keys_go(self) -> None:
        first = self.open()
        first.rotate()
        first.close()
        self.clock.advance(3 * DAY)
        store = self.open()
        # Before start: retired key past its overlap is not accepted even though still on disk.
        self.assertIsNone(store.private_key_for("00"))
        store.start()
        self.assertEqual(store.current.kid, "02")
        self.assertEqual({k.kid for k in store.keys()}, {"01", "02", "03"})
        self.assertNotIn("hpke-00.key", self.names())

    def test_restart_inside_the_overlap_keeps_the_old_key(self) -> None:
        first = self.open()
        first.start()
        self.clock.advance(DAY)
        old = first.private_key_for("00")
        first.close()
        self.clock.advance(HOUR / 2)
        store = self.open()
        store.start()
        self.assertEqual(store.private_key_for("00"), old)
        self.clock.advance(HOUR / 2)
        self.assertIsNone(store.private_key_for("00"))
        self.assertNotIn("hpke-00.key", self.names())

    def test_configured_periods(self) -> None:
        store = self.open(rotation_seconds=600, overlap_seconds=30)
        store.start()
        self.clock.advance(600)
        self.assertEqual(store.current.kid, "01")
        self.clock.advance(29)
        self.assertIsNotNone(store.private_key_for("00"))
        self.clock.advance(1)
        self.assertIsNone(store.private_key_for("00"))
        state = json.loads((self.dir / "state.json").read_text())
        self.assertEqual((state["rotation_seconds"], state["overlap_seconds"]), (600, 30))

    def test_zero_overlap_destroys_at_rotation(self) -> None:
        store = self.open(overlap_seconds=0)
        store.rotate()
        self.assertIsNone(store.private_key_for("00"))
        self.assertNotIn("hpke-00.key", self.names())

    def test_kid_wraps_around(self) -> None:
        store = self.open(overlap_seconds=0)
        store.rotate()
        store.rotate()  # 02 current, 03 next; 00 and 01 destroyed
        state = json.loads((self.dir / "state.json").read_text())
        state["last_key_id"] = 252  # as if 250 more rotations had happened
        (self.dir / "state.json").write_text(json.dumps(state))
        self.assertTrue(store.reload())
        seen = []
        for _ in range(6):
            store.rotate()
            seen.append(store.next.kid)
        self.assertEqual(seen, ["fd", "fe", "ff", "00", "01", "02"])
        self.assertEqual((store.current.kid, store.next.kid), ("01", "02"))
        self.assertEqual(store.rotations, 8)
        hpke_files = sorted(n for n in self.names() if n.startswith("hpke-"))
        self.assertEqual(hpke_files, ["hpke-01.key", "hpke-02.key"])
        self.assertEqual(
            protocol.verify_key_document(store.key_document(), now=self.clock.seconds())
            .current()
            .kid,
            "01",
        )

    def test_allocation_skips_ids_in_use(self) -> None:
        self.assertEqual(allocate_key_id(0, set()), 1)
        self.assertEqual(allocate_key_id(255, set()), 0)
        self.assertEqual(allocate_key_id(254, {255, 0, 1}), 2)
        self.assertEqual(allocate_key_id(3, {4, 5}), 6)
        self.assertRaises(KeyStoreError, allocate_key_id, 0, set(range(256)))

    def test_wrapped_allocation_skips_a_retired_key_still_in_overlap(self) -> None:
        store = self.open(overlap_seconds=HOUR)
        store.rotate()  # 00 retired (in overlap), 01 current, 02 next
        state = json.loads((self.dir / "state.json").read_text())
        state["last_key_id"] = 255  # as if the ids had gone round
        (self.dir / "state.json").write_text(json.dumps(state))
        store.reload()
        store.rotate()  # 01 retired, 02 current; new next: not 00 (in use), not 01, not 02
        self.assertEqual(store.next.kid, "03")
        self.assertEqual(store.info("00").status, "retired")  # type: ignore[union-attr]


class RevocationTests(KeyStoreTestCase):
    def test_revoking_the_current_key_is_immediate(self) -> None:
        store = self.open()
        store.start()
        buffer = store._secrets["00"]
        doc = store.key_document()
        store.revoke("00")
        self.assertIsNone(store.private_key_for("00"))
        self.assertTrue(buffer.wiped)
        self.assertNotIn("hpke-00.key", self.names())
        self.assertEqual(
            [(k.kid, k.status) for k in store.published()], [("01", "current"), ("02", "next")]
        )
        self.assertEqual(store.info("00").status, "revoked")  # type: ignore[union-attr]
        self.assertNotEqual(store.key_document(), doc)
        self.assertEqual(self.event_names(), ["key_rotated", "key_revoked"])
        # The record holds the id for an overlap window, then goes.
        self.clock.advance(HOUR)
        self.assertIsNone(store.info("00"))

    def test_revoking_the_next_key_makes_a_new_next(self) -> None:
        store = self.open()
        store.revoke("01")
        self.assertIsNone(store.private_key_for("01"))
        self.assertEqual(
            [(k.kid, k.status) for k in store.published()], [("00", "current"), ("02", "next")]
        )
        self.assertEqual(store.next.not_before, T0 + DAY)
        self.assertEqual(store.rotations, 0)

    def test_revoking_a_retired_key_ends_its_overlap(self) -> None:
        store = self.open()
        store.rotate()
        self.assertIsNotNone(store.private_key_for("00"))
        store.revoke("00")
        self.assertIsNone(store.private_key_for("00"))
        self.assertNotIn("hpke-00.key", self.names())

    def test_unknown_and_repeated_revocations(self) -> None:
        store = self.open()
        self.assertRaises(UnknownKeyError, store.revoke, "42")
        store.revoke("00")
        store.revoke("00")  # no-op
        self.assertEqual(store.current.kid, "01")
        self.assertEqual(self.event_names(), ["key_rotated", "key_revoked"])


class ReloadTests(KeyStoreTestCase):
    def test_another_process_rotation_is_picked_up(self) -> None:
        router = self.open()
        operator = self.open()
        self.assertFalse(router.reload())
        operator.rotate()
        self.assertEqual(router.current.kid, "00")
        self.assertTrue(router.reload())
        self.assertFalse(router.reload())
        self.assertEqual(router.current.kid, "01")
        self.assertEqual(router.private_key_for("02"), operator.private_key_for("02"))
        self.assertEqual(router.rotations, 1)
        self.assertEqual(
            protocol.verify_key_document(router.key_document(), now=self.clock.seconds())
            .current()
            .kid,
            "01",
        )

    def test_polling_picks_up_a_revocation_within_two_seconds(self) -> None:
        router = self.open()
        router.start()
        buffer = router._secrets["00"]
        operator = self.open()
        operator.revoke("00")
        self.assertIsNotNone(router.private_key_for("00"))
        self.clock.advance(2)
        self.assertIsNone(router.private_key_for("00"))
        self.assertTrue(buffer.wiped)
        self.assertEqual(router.current.kid, "01")

    def test_a_writer_starts_from_the_state_on_disk(self) -> None:
        router = self.open()
        operator = self.open()
        operator.rotate()
        router.rotate()  # must not undo the operator's rotation
        self.assertEqual(router.current.kid, "02")
        self.assertEqual({k.kid for k in router.keys()}, {"00", "01", "02", "03"})
        self.assertTrue(operator.reload())
        self.assertEqual(operator.keys(), router.keys())

    def test_timer_does_not_rotate_twice_when_another_process_did(self) -> None:
        router = self.open()
        router.start()
        other = self.open()
        self.clock.advance(DAY - 1)
        other.rotate()  # e.g. a second router or the operator, just before the timer
        self.clock.advance(1)
        self.assertEqual(router.current.kid, "01")
        self.assertEqual(router.rotations, 1)

    def test_locked_directory(self) -> None:
        router = self.open()
        operator = self.open()
        operator.rotate()
        fd = os.open(self.dir / ".lock", os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.assertFalse(router.reload())  # busy: tried again on the next poll
        router.lock_timeout = 0.05
        self.assertRaises(KeyStoreBusyError, router.rotate)
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertTrue(router.reload())

    def test_busy_directory_delays_timer_rotation_to_the_next_poll(self) -> None:
        router = self.open()
        router.start()
        fd = os.open(self.dir / ".lock", os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.clock.advance(DAY)
        self.assertEqual(router.current.kid, "00")
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.clock.advance(2)
        self.assertEqual(router.current.kid, "01")

    def test_a_bad_state_file_keeps_the_keys_in_memory(self) -> None:
        router = self.open()
        sk = router.private_key_for("00")
        (self.dir / "state.json").write_text('{"v": 1}')
        self.assertFalse(router.reload())
        assert router.last_error is not None
        self.assertIn("corrupt", router.last_error)
        self.assertEqual(router.private_key_for("00"), sk)

    def test_vanished_directory(self) -> None:
        store = self.open()
        sk = store.private_key_for("00")
        store.start()
        shutil.rmtree(self.dir)
        with self.assertRaises(KeyStoreError) as caught:
            store.rotate()
        self.assertIn("cannot update the key directory", str(caught.exception))
        self.assertFalse(store.reload())
        self.assertIn("disappeared", store.last_error or "")
        self.clock.advance(DAY)  # timers keep running and keep the keys they have
        self.assertEqual(store.private_key_for("00"), sk)

    def test_closed_store_serves_no_keys(self) -> None:
        store = self.open()
        buffers = list(store._secrets.values())
        store.close()
        self.assertIsNone(store.private_key_for("00"))
        self.assertTrue(all(b.wiped for b in buffers))
        self.assertRaises(KeyStoreError, store.rotate)


class FingerprintTests(unittest.TestCase):
    def test_ssh_style(self) -> None:
        self.assertEqual(
            fingerprint(bytes(32)), "SHA256:Zmh6rfhivXdsj8GLjp+OIAiXFIVu4jOzkCpZHQ1fKSU"
        )


class FollowerTests(KeyStoreTestCase):
    """KEYS_ROLE=follower (issue 10): another router's directory, read and never written."""

    def snapshot(self) -> dict[str, tuple[bytes, float]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime) for p in self.dir.iterdir()}

    def test_refuses_a_missing_directory_or_state(self) -> None:
        error = self.assertRaises(KeyStoreError, self.open, follower=True)
        self.assertIn("never creates keys", str(error))
        self.assertFalse(self.dir.exists())
        self.dir.mkdir(mode=0o700, parents=True)
        self.assertRaises(KeyStoreError, self.open, follower=True)
        self.assertEqual(self.names(), set())

    def test_follows_the_leader_and_never_writes(self) -> None:
        leader = self.open(rotation_seconds=DAY, overlap_seconds=HOUR)
        leader.start()
        (self.dir / ".lock").unlink()  # a copy need not have one: the follower takes no lock
        follower = self.open(follower=True, rotation_seconds=60, overlap_seconds=0)
        follower.start()
        self.assertEqual(follower.key_document(), leader.key_document())
        self.assertEqual(follower.state_key, leader.state_key)
        self.assertEqual(follower.pow_key, leader.pow_key)
        before = self.snapshot()
        self.assertRaises(KeyStoreError, follower.rotate)
        self.assertRaises(KeyStoreError, follower.revoke, follower.current.kid)
        leader.stop()  # only the follower's timers run from here on
        self.clock.advance(2 * DAY)  # rotation long overdue: a follower does not rotate
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(follower.rotations, 0)
        leader._maintain()  # the leader's rotation reaches the follower at its next poll
        self.clock.advance(2)
        self.assertEqual(follower.rotations, 1)
        self.assertEqual(follower.published(), leader.published())
        self.assertEqual(follower.key_document(), leader.key_document())

    def test_followers_expire_retired_keys(self) -> None:
        """Every router a follower and a daily ``llmrouter-keys rotate``: a retired private key
        stayed on disk (and in memory) until the next rotation, a day instead of the overlap
        window (issue 19). A follower expires it, on disk where it may write."""
        leader = self.open(rotation_seconds=DAY, overlap_seconds=HOUR)
        follower = self.open(follower=True)
        follower.start()
        retired = follower.current.kid
        leader.rotate()  # the operator's timer; no router is the leader
        leader.stop()
        self.clock.advance(2)
        self.assertIsNotNone(follower.private_key_for(retired))  # inside its overlap
        self.assertIn(f"hpke-{retired}.key", self.names())
        self.clock.advance(HOUR)
        self.assertIsNone(follower.private_key_for(retired))
        self.assertNotIn(f"hpke-{retired}.key", self.names())
        self.assertNotIn(retired, [k.kid for k in follower._state.keys])  # type: ignore[attr-defined]
        self.assertEqual(follower.rotations, 1)  # and it rotated nothing itself
        self.assertIsNone(follower.last_error)

    def test_a_follower_that_cannot_write_wipes_expired_keys_from_memory(self) -> None:
        leader = self.open(rotation_seconds=DAY, overlap_seconds=HOUR)
        follower = self.open(follower=True)
        follower.start()
        retired = follower.current.kid
        leader.rotate()
        leader.stop()
        self.clock.advance(2)
        buffer = follower._secrets[retired]  # type: ignore[attr-defined]
        (self.dir / ".lock").unlink()
        (self.dir / ".lock").mkdir()  # no lock to be had (as in a read-only copy, even as root)
        self.clock.advance(HOUR)
        self.assertTrue(buffer.wiped)
        self.assertIsNone(follower.private_key_for(retired))
        self.assertIn(f"hpke-{retired}.key", self.names())  # the leader's to destroy
        self.assertIn("cannot update the key directory", follower.last_error or "")

    def test_a_copy_in_progress_keeps_the_old_keys(self) -> None:
        """state.json names a key file that has not arrived yet (rsync in progress): that
        reload fails, the keys in memory stay, and the next poll applies the whole copy."""
        leader = self.open()
        follower = self.open(follower=True)
        follower.start()
        kid = follower.current.kid
        leader.rotate()
        new_next = leader.next.kid
        hidden = self.dir / f"hpke-{new_next}.key"
        moved = hidden.with_name("elsewhere")
        hidden.rename(moved)
        self.clock.advance(2)
        self.assertEqual(follower.current.kid, kid)
        self.assertIsNotNone(follower.last_error)
        moved.rename(hidden)
        self.clock.advance(2)
        self.assertEqual(follower.published(), leader.published())
        self.assertIsNone(follower.last_error)
