"""A key directory (the router's; for protocol v2 also each inference node's): HPKE keys with
rotation and revocation, and long-lived secrets.

Layout of the directory (0700, every file 0600, written atomically):

* ``signing.key``: Ed25519 seed that signs the key document; long-lived, the app pins it.
* ``pow.key``: long-lived HMAC key of PoW challenges. (A ``log-hash.key`` left by an older
  version, the security log's hash key, is destroyed on open: the log now keys each day in
  memory.)
* ``state-hash.key``: long-lived secret from which routers sharing state in Redis derive the
  day's key of the hashes Redis sees instead of identifiers (``llmrouter.router.redisstore``).
  A node's directory (``node=True``: ``twistd inference --keys-dir``) has neither of these two.
* ``hpke-KID.key``: one X25519 secret key per live HPKE key (``KID`` = RFC 9458 key_id in hex).
* ``state.json``: which keys exist and their status (current, next, retired, revoked), validity
  times and public keys, the rotation settings and counters. It holds no secret.
* ``.lock``: ``flock`` target. Every read-modify-write (the router's rotation timer, the operator
  CLI ``llmrouter-keys``) holds it exclusively and starts from the state on disk, so concurrent
  writers never lose each other's changes; readers take it shared.

Lifecycle: exactly one ``current`` and one ``next`` key are published. Rotation (on a timer on the
injected clock, or on demand) retires the current key, promotes the next and creates a new next.
A retired key is still accepted for the overlap window and then destroyed: its file overwritten
and removed, its locked memory wiped. Revocation destroys a key at once; its record stays for one
overlap window so its id is not reused while clients may still send it.

A running router notices changes made by another process by polling ``state.json`` every 2 s
(:meth:`KeyStore.start`) and on SIGHUP (:meth:`KeyStore.reload`). That includes a new signing
key: :meth:`KeyStore.replace_signing_key` (``llmrouter-keys backup-switch``) is the one way to
change it, a deliberate operator step when the old one is lost or compromised.

Several routers, one key set (issue 10): one router (or ``llmrouter-keys`` on a timer) is the
leader and rotates; the others open the directory as followers (``follower=True``,
``KEYS_ROLE=follower``): they never create or rotate keys, refuse a missing directory, read
without a lock (the directory may be a read-only copy) and apply the state file when it changes.
The one change a follower makes is expiry: a retired key past its overlap window is wiped from
its memory and, where the directory is writable, destroyed on disk under the lock, so with every
router a follower (rotation by ``llmrouter-keys rotate`` on a timer) a retired private key does
not wait for the next rotation (a day) to go. A state file that names a key file not there yet (a
copy in progress) fails that reload and the next poll retries; the keys in memory stay meanwhile.

Nothing here puts key bytes into a message, a ``repr`` or a log line.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import nacl.signing
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmrouter import hpke
from llmrouter.protocol import (
    PublishedKey,
    b64u_encode,
    build_jwks,
    build_key_document,
    build_ohttp_key_configs,
    key_document_issued_at,
    kid_for_key_id,
)
from llmrouter.secmem import LockedBuffer

__all__ = [
    "POLL_SECONDS",
    "KeyInfo",
    "KeyStore",
    "KeyStoreBusyError",
    "KeyStoreError",
    "UnknownKeyError",
    "allocate_key_id",
    "fingerprint",
]

POLL_SECONDS = 2.0
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
SIGNING_FILE = "signing.key"
OLD_LOG_HASH_FILE = "log-hash.key"
POW_FILE = "pow.key"
STATE_HASH_FILE = "state-hash.key"
STATE_VERSION = 1
SECRET_BYTES = 32
STATUSES = ("current", "next", "retired", "revoked")

_HPKE_FILE = re.compile(r"hpke-([0-9a-f]{2})\.key")
_TMP_FILE = re.compile(r"\..+\.tmp-[0-9a-f]+")
_log = Logger(namespace="llmrouter.keystore")


class Events(Protocol):
    """Where key lifecycle events go (the router's security log); nothing here depends on it."""

    def event(self, name: str, **fields: str | int) -> None: ...


class _SigningKey(nacl.signing.SigningKey):
    """PyNaCl's ``str()`` of a signing key is its seed; this one never prints it."""

    def __str__(self) -> str:
        return "SigningKey(<redacted>)"

    __repr__ = __str__


class KeyStoreError(Exception):
    """A problem with the key directory. Messages name paths and key ids, never key bytes."""


class KeyStoreBusyError(KeyStoreError):
    """Another process holds the key directory's lock."""


class UnknownKeyError(KeyStoreError):
    """No key with that id in the key directory."""


@dataclass(frozen=True)
class KeyInfo:
    """Public facts about one HPKE key (``pk`` is the public key)."""

    kid: str
    key_id: int
    pk: bytes
    status: str
    not_before: int
    not_after: int

    def published(self) -> PublishedKey:
        return PublishedKey(self.kid, self.pk, self.status, self.not_before, self.not_after)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.pk)

    @property
    def has_secret(self) -> bool:
        return self.status != "revoked"

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "key_id": self.key_id,
            "pk": b64u_encode(self.pk),
            "status": self.status,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "revoked": self.status == "revoked",
        }


def fingerprint(public_key: bytes) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key, for operators to compare."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def allocate_key_id(last: int, in_use: set[int]) -> int:
    """The id after ``last`` (mod 256) that no recorded key uses."""
    for step in range(1, 257):
        candidate = (last + step) % 256
        if candidate not in in_use:
            return candidate
    raise KeyStoreError("all 256 key ids are in use")


@dataclass(frozen=True)
class _State:
    keys: tuple[KeyInfo, ...]
    last_key_id: int
    rotations: int
    rotation_seconds: int
    overlap_seconds: int
    signing_pk: bytes

    def with_status(self, status: str) -> KeyInfo:
        return next(k for k in self.keys if k.status == status)

    def find(self, kid: str) -> KeyInfo | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def with_secrets(self) -> dict[str, KeyInfo]:
        return {k.kid: k for k in self.keys if k.has_secret}

    def published(self) -> tuple[PublishedKey, ...]:
        return (self.with_status("current").published(), self.with_status("next").published())

    def dumps(self) -> bytes:
        doc = {
            "v": STATE_VERSION,
            "signing_key": b64u_encode(self.signing_pk),
            "rotation_seconds": self.rotation_seconds,
            "overlap_seconds": self.overlap_seconds,
            "last_key_id": self.last_key_id,
            "rotations": self.rotations,
            "keys": [k.to_json() for k in sorted(self.keys, key=_key_order)],
        }
        return (json.dumps(doc, indent=1) + "\n").encode("ascii")

    @classmethod
    def loads(cls, raw: bytes, path: Path) -> _State:
        try:
            doc = json.loads(raw)
            if doc["v"] != STATE_VERSION:
                raise ValueError
            keys = tuple(_key_from_json(k) for k in doc["keys"])
            state = cls(
                keys,
                _int(doc["last_key_id"], 0, 255),
                _int(doc["rotations"], 0),
                _int(doc["rotation_seconds"], 1),
                _int(doc["overlap_seconds"], 0),
                _b64u(doc["signing_key"]),
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise KeyStoreError(f"state file {path} is corrupt") from None
        statuses = [k.status for k in keys]
        kids = [k.kid for k in keys]
        if statuses.count("current") != 1 or statuses.count("next") != 1:
            raise KeyStoreError(f"state file {path} must have exactly one current and one next key")
        if len(set(kids)) != len(kids) or len(state.signing_pk) != 32:
            raise KeyStoreError(f"state file {path} is corrupt")
        return state


def _key_order(k: KeyInfo) -> tuple[int, int]:
    return (k.not_before, STATUSES.index(k.status))


def _int(value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError
    if high is not None and value > high:
        raise ValueError
    return value


def _b64u(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_from_json(doc: Any) -> KeyInfo:
    key_id = _int(doc["key_id"], 0, 255)
    info = KeyInfo(
        doc["kid"],
        key_id,
        _b64u(doc["pk"]),
        doc["status"],
        _int(doc["not_before"], 0),
        _int(doc["not_after"], 0),
    )
    if info.kid != kid_for_key_id(key_id) or info.status not in STATUSES or len(info.pk) != 32:
        raise ValueError
    return info


# Files: opened without following symlinks, checked for owner and mode, written atomically.


def _check_private(path: Path, st: os.stat_result, kind: str = "file") -> None:
    if st.st_uid != os.geteuid():
        raise KeyStoreError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
            "run as the router's user (e.g. sudo -u llmrouter llmrouter-keys ...)"
        )
    if st.st_mode & 0o077:
        mode = oct(stat.S_IMODE(st.st_mode))
        want = "700" if kind == "directory" else "600"
        raise KeyStoreError(
            f"{path} has mode {mode}: key {kind}s must not be accessible to group or others; "
            f"run chmod {want} {path} (and treat its keys as exposed if others could read them)"
        )


def _read_private(path: Path, length: int | None = None) -> bytes:
    """Read a 0600 file of ours; FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise KeyStoreError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(f"{path} is not a regular file")
        _check_private(path, st)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if length is not None and len(data) != length:
        raise KeyStoreError(f"{path} has the wrong length for a key file")
    return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(directory: Path, name: str, data: bytes) -> None:
    """Temp file (0600 whatever the umask), fsync, rename over ``name``, fsync the directory."""
    tmp = directory / f".{name}.tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def _destroy_file(path: Path) -> None:
    """Overwrite with zeros, then unlink. Best effort on journaling/SSD storage, still worth it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        path.unlink(missing_ok=True)
        return
    try:
        size = os.fstat(fd).st_size
        if size:
            os.write(fd, bytes(size))
            os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)


def _hpke_file(kid: str) -> str:
    return f"hpke-{kid}.key"


@contextmanager
def _locked(directory: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    """``flock`` the directory's lock file; ``timeout`` 0 means do not wait at all."""
    fd = os.open(
        directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        os.fchmod(fd, 0o600)
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, operation)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KeyStoreBusyError(
                        f"the key directory {directory} is locked by another process"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


class KeyStore:
    """The router's keys. Create with :meth:`open`; ``start()`` runs rotation and polling.

    ``events`` (the router's security log) may be set after opening, since the log's hash key
    comes from this store.
    """

    lock_timeout = 5.0

    def __init__(
        self,
        directory: Path,
        clock: IReactorTime,
        rotation_seconds: float | None,
        overlap_seconds: float | None,
        events: Events | None,
        follower: bool = False,
        node: bool = False,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.follower = follower
        self._expiry_refused = False
        self.node = node
        self._clock = clock
        self._rotation_setting = rotation_seconds
        self._overlap_setting = overlap_seconds
        self.events = events
        self.rotations = 0
        self.signing_key: nacl.signing.SigningKey
        self.pow_key: bytes
        self.state_key: bytes
        self._state: _State
        self._state_raw = b""
        self._secrets: dict[str, LockedBuffer] = {}
        self._cache: dict[str, bytes] = {}
        self._document_hour = -1
        self._timer: IDelayedCall | None = None
        self._poller: LoopingCall | None = None
        self._closed = False
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"KeyStore({str(self.directory)!r}, <secrets redacted>)"

    # Opening.

    @classmethod
    def open(
        cls,
        directory: Path,
        clock: IReactorTime,
        rotation_seconds: float | None = 86400,
        overlap_seconds: float | None = 3600,
        events: Events | None = None,
        create: bool = True,
        follower: bool = False,
        node: bool = False,
    ) -> KeyStore:
        """Open (and on first start create) the key directory.

        ``rotation_seconds``/``overlap_seconds`` of None use what the state file records (the
        operator CLI does this, so it never overrides the router's configuration). With
        ``create`` False a missing directory is an error. A ``follower`` only reads (see the
        module docstring): it needs an existing directory and ignores the rotation settings.
        A ``node`` directory holds no router secrets (``pow_key`` and ``state_key`` are empty).
        """
        if rotation_seconds is not None and rotation_seconds < 1:
            raise ValueError("rotation_seconds must be at least 1")
        if overlap_seconds is not None and overlap_seconds < 0:
            raise ValueError("overlap_seconds must not be negative")
        store = cls(directory, clock, rotation_seconds, overlap_seconds, events, follower, node)
        try:
            if follower:
                store._follow()
            else:
                store._open(create)
        except OSError as e:
            store.close()
            raise KeyStoreError(f"cannot use the key directory {store.directory}: {e}") from None
        except BaseException:
            store.close()
            raise
        return store

    def _open(self, create: bool) -> None:
        d = self.directory
        if not d.exists():
            if not create:
                raise KeyStoreError(f"key directory {d} does not exist")
            missing = [d, *(p for p in d.parents if not p.exists())]
            for path in reversed(missing):  # 0700 whatever the umask (it could be 0777)
                path.mkdir(mode=0o700)
                os.chmod(path, 0o700)
        st = os.stat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise KeyStoreError(f"{d} is not a directory")
        _check_private(d, st, "directory")
        with _locked(d, exclusive=True, timeout=self.lock_timeout):
            raw = self._read_state_raw()
            if raw is None:
                if not create:
                    raise KeyStoreError(f"key directory {d} has no {STATE_FILE}")
                state = self._initialize()
            else:
                state = _State.loads(raw, d / STATE_FILE)
                state = self._record_settings(state)
            self._load_long_lived(state)
            self._remove_strays(state)
            raw = state.dumps()
            if raw != self._read_state_raw():
                _write_private(d, STATE_FILE, raw)
            self._apply(state, raw, initial=True)
        if not self.memory_locked:
            _log.warn("could not mlock() key memory (RLIMIT_MEMLOCK?); keys may reach swap")

    def _follow(self) -> None:
        d = self.directory
        if not d.is_dir():
            raise KeyStoreError(
                f"key directory {d} does not exist: a follower (KEYS_ROLE=follower) never creates"
                " keys; copy the leader's directory here first"
            )
        _check_private(d, os.stat(d), "directory")
        raw = self._read_state_raw()
        if raw is None:
            raise KeyStoreError(f"key directory {d} has no {STATE_FILE} (copy the leader's)")
        state = _State.loads(raw, d / STATE_FILE)
        self._load_long_lived(state)
        self._apply(state, raw, initial=True)

    def _read_state_raw(self) -> bytes | None:
        try:
            return _read_private(self.directory / STATE_FILE)
        except FileNotFoundError:
            return None

    def _initialize(self) -> _State:
        now = int(self._clock.seconds())
        rotation = int(self._rotation_setting or 86400)
        overlap = int(self._overlap_setting if self._overlap_setting is not None else 3600)
        signing = self._long_lived_secret(SIGNING_FILE)
        signing_pk = bytes(nacl.signing.SigningKey(signing).verify_key)
        # hpke-*.key without a state file are left over from an interrupted first start.
        self._remove_strays(None)
        current = KeyInfo(
            "00", 0, self._create_hpke_key("00"), "current", now, now + rotation + overlap
        )
        upcoming = KeyInfo(
            "01",
            1,
            self._create_hpke_key("01"),
            "next",
            now + rotation,
            now + 2 * rotation + overlap,
        )
        state = _State((current, upcoming), 1, 0, rotation, overlap, signing_pk)
        _write_private(self.directory, STATE_FILE, state.dumps())
        _log.info("created key directory {directory}", directory=str(self.directory))
        return state

    def _record_settings(self, state: _State) -> _State:
        rotation, overlap = state.rotation_seconds, state.overlap_seconds
        if self._rotation_setting is not None:
            rotation = int(self._rotation_setting)
        if self._overlap_setting is not None:
            overlap = int(self._overlap_setting)
        return replace(state, rotation_seconds=rotation, overlap_seconds=overlap)

    def _long_lived_secret(self, name: str) -> bytes:
        try:
            return _read_private(self.directory / name, SECRET_BYTES)
        except FileNotFoundError:
            if self.follower:
                raise KeyStoreError(
                    f"{self.directory / name} is missing: a follower only reads the leader's keys"
                ) from None
            if name == SIGNING_FILE and (self.directory / STATE_FILE).exists():
                raise KeyStoreError(
                    f"{self.directory / SIGNING_FILE} is missing: clients pin the signing key, "
                    "so it is never replaced silently"
                ) from None
            secret = secrets.token_bytes(SECRET_BYTES)  # also a valid Ed25519 seed
            _write_private(self.directory, name, secret)
            return secret

    def _signing_key_for(self, state: _State) -> _SigningKey:
        signing = _SigningKey(self._long_lived_secret(SIGNING_FILE))
        if not hmac.compare_digest(bytes(signing.verify_key), state.signing_pk):
            raise KeyStoreError(
                f"{self.directory / SIGNING_FILE} does not match the signing key in {STATE_FILE}"
            )
        return signing

    def _load_long_lived(self, state: _State) -> None:
        self.signing_key = self._signing_key_for(state)
        if not self.follower and (self.directory / OLD_LOG_HASH_FILE).exists():
            _destroy_file(self.directory / OLD_LOG_HASH_FILE)
        if self.node:
            self.pow_key = self.state_key = b""
            return
        self.pow_key = self._long_lived_secret(POW_FILE)
        self.state_key = self._long_lived_secret(STATE_HASH_FILE)

    def _create_hpke_key(self, kid: str) -> bytes:
        pair = hpke.generate_key_pair()
        _write_private(self.directory, _hpke_file(kid), pair.sk)
        return pair.pk

    def _remove_strays(self, state: _State | None) -> None:
        """Destroy key files no state refers to, and temp files of interrupted writes."""
        live = set() if state is None else set(state.with_secrets())
        for path in self.directory.iterdir():
            match = _HPKE_FILE.fullmatch(path.name)
            if (match and match.group(1) not in live) or _TMP_FILE.fullmatch(path.name):
                _destroy_file(path)

    # Applying a state to memory (after our own change or another process's).

    def _load_secret(self, info: KeyInfo) -> LockedBuffer:
        path = self.directory / _hpke_file(info.kid)
        try:
            sk = _read_private(path, hpke.N_SK)
        except FileNotFoundError:
            raise KeyStoreError(f"{path} is missing") from None
        if not hmac.compare_digest(hpke.public_key(sk), info.pk):
            raise KeyStoreError(f"{path} does not match the public key recorded for {info.kid}")
        return LockedBuffer(sk)

    def _apply(self, state: _State, raw: bytes, initial: bool = False) -> None:
        wanted = state.with_secrets()
        old = None if initial else self._state
        signing = None
        if old is not None and old.signing_pk != state.signing_pk:
            signing = self._signing_key_for(state)  # replaced by another process
        old_keys = {} if old is None else {k.kid: k for k in old.keys}
        loaded: dict[str, LockedBuffer] = {}
        try:
            for kid, info in wanted.items():
                previous = old_keys.get(kid)
                kept = self._secrets.get(kid)
                if kept is not None and previous is not None and previous.pk == info.pk:
                    loaded[kid] = kept
                else:
                    loaded[kid] = self._load_secret(info)
        except BaseException:
            for kid, buf in loaded.items():
                if self._secrets.get(kid) is not buf:
                    buf.wipe()
            raise
        for kid, buf in self._secrets.items():
            if loaded.get(kid) is not buf:
                buf.wipe()
        self._secrets = loaded
        published_changed = old is None or old.published() != state.published()
        if signing is not None:
            self.signing_key = signing
            published_changed = True  # the key document's signature changes
        self._state, self._state_raw = state, raw
        if published_changed:
            self._cache.clear()
        if old is not None:
            self._report(old, state)
        self._schedule()

    def _report(self, old: _State, new: _State) -> None:
        if old.signing_pk != new.signing_pk:
            _log.warn("the signing key was replaced: apps must pin the new one")
            self._event("signing_key_replaced")
        before, after = old.with_status("current"), new.with_status("current")
        if (before.kid, before.pk) != (after.kid, after.pk):
            self.rotations += 1
            _log.info("HPKE key {kid} is now current", kid=after.kid)
            self._event("key_rotated", kid=after.kid, previous=before.kid)
        old_keys = {k.kid: k for k in old.keys}
        new_keys = {k.kid: k for k in new.keys}
        for kid, info in new_keys.items():
            was = old_keys.get(kid)
            if info.status == "revoked" and (was is None or was.status != "revoked"):
                _log.warn("HPKE key {kid} revoked", kid=kid)
                self._event("key_revoked", kid=kid)
        for kid, info in old_keys.items():
            if kid not in new_keys and info.status == "retired":
                self._event("key_expired", kid=kid)

    def _event(self, name: str, **fields: str | int) -> None:
        if self.events is not None:
            self.events.event(name, **fields)

    # Changing the state on disk: always under the exclusive lock, from the state on disk.

    def _transaction(
        self,
        change: Callable[[_State, int], _State | None],
        timeout: float,
        expiry: bool = False,
    ) -> bool:
        if self._closed:
            raise KeyStoreError("the key store is closed")
        if self.follower and not expiry:
            raise KeyStoreError("a follower (KEYS_ROLE=follower) never changes the keys")
        try:
            return self._locked_transaction(change, timeout)
        except OSError as e:
            raise KeyStoreError(f"cannot update the key directory {self.directory}: {e}") from None

    def _locked_transaction(
        self, change: Callable[[_State, int], _State | None], timeout: float
    ) -> bool:
        with _locked(self.directory, exclusive=True, timeout=timeout):
            raw = self._read_state_raw()
            if raw is None:
                raise KeyStoreError(f"{self.directory / STATE_FILE} has disappeared")
            state = _State.loads(raw, self.directory / STATE_FILE)
            new = change(state, int(self._clock.seconds()))
            if new is None:
                if raw != self._state_raw:
                    self._apply(state, raw)
                return False
            new_raw = new.dumps()
            _write_private(self.directory, STATE_FILE, new_raw)
            for kid in set(state.with_secrets()) - set(new.with_secrets()):
                _destroy_file(self.directory / _hpke_file(kid))
            self._apply(new, new_raw)
            return True

    def _new_next(self, state: _State, keys: list[KeyInfo], now: int) -> tuple[KeyInfo, int]:
        in_use = {k.key_id for k in keys}
        key_id = allocate_key_id(state.last_key_id, in_use)
        kid = kid_for_key_id(key_id)
        rotation, overlap = state.rotation_seconds, state.overlap_seconds
        current = next(k for k in keys if k.status == "current")
        starts = max(now, current.not_before + rotation)
        info = KeyInfo(
            kid, key_id, self._create_hpke_key(kid), "next", starts, starts + rotation + overlap
        )
        return info, key_id

    def _rotated(self, state: _State, now: int, old_status: str = "retired") -> _State:
        """Promote next to current; the old current becomes ``old_status``; make a new next."""
        rotation, overlap = state.rotation_seconds, state.overlap_seconds
        keys = []
        for k in state.keys:
            if k.status == "current":
                k = replace(k, status=old_status, not_after=now + overlap)
            elif k.status == "next":
                k = replace(k, status="current", not_before=now, not_after=now + rotation + overlap)
            keys.append(k)
        upcoming, key_id = self._new_next(state, keys, now)
        rotated = replace(
            state, keys=(*keys, upcoming), last_key_id=key_id, rotations=state.rotations + 1
        )
        return _expired(rotated, now) or rotated

    def _revoked(self, state: _State, now: int, kid: str) -> _State | None:
        info = state.find(kid)
        if info is None:
            raise UnknownKeyError(f"no key {kid} in {self.directory}")
        if info.status == "revoked":
            return None
        if info.status == "current":
            return self._rotated(state, now, old_status="revoked")
        keys = [
            replace(k, status="revoked", not_after=now + state.overlap_seconds)
            if k.kid == kid
            else k
            for k in state.keys
        ]
        if info.status == "next":
            upcoming, key_id = self._new_next(state, keys, now)
            return replace(state, keys=(*keys, upcoming), last_key_id=key_id)
        return replace(state, keys=tuple(keys))

    def _scheduled(self, state: _State, now: int) -> _State | None:
        """Rotation and expiry if due, judged on the state from disk (another process may
        have done them already)."""
        if now >= _rotation_due(state):
            return self._rotated(state, now)
        return _expired(state, now)

    # Public API.

    def rotate(self) -> None:
        """Rotate now (the operator's ``llmrouter-keys rotate``)."""
        self._transaction(self._rotated, self.lock_timeout)

    def replace_signing_key(self, seed: bytes) -> bytes:
        """Make ``seed`` (a 32-byte Ed25519 seed: the offline backup key) the signing key.

        The HPKE keys stay; the old ``signing.key`` is overwritten. Apps that pin only the old
        key stop trusting this router, which is why only an operator does this. Returns the
        new public key (the pin).
        """
        if len(seed) != SECRET_BYTES:
            raise KeyStoreError(f"a signing key is {SECRET_BYTES} bytes")
        new_pk = bytes(nacl.signing.SigningKey(seed).verify_key)

        def change(state: _State, now: int) -> _State | None:
            if state.signing_pk == new_pk:
                return None
            _write_private(self.directory, SIGNING_FILE, seed)
            return replace(state, signing_pk=new_pk)

        self._transaction(change, self.lock_timeout)
        return new_pk

    def revoke(self, kid: str) -> None:
        """Destroy key ``kid`` at once; if it was current, the next key takes over."""
        self._transaction(lambda state, now: self._revoked(state, now, kid), self.lock_timeout)

    def reload(self) -> bool:
        """Re-read the directory if ``state.json`` changed; True if something changed.

        Never raises for problems on disk: those are logged (and kept in ``last_error``) and the
        keys in memory stay as they were, so a bad edit cannot take the router down.
        """
        if self._closed:
            return False
        try:
            raw = self._read_state_raw()
            if raw is None:
                if self.last_error is None:  # say it once, not every 2 s
                    self._failed("reload", KeyStoreError(f"{STATE_FILE} has disappeared"))
                return False
            if raw == self._state_raw:
                return False
            if self.follower:  # no lock: the directory may be a read-only copy
                self._apply(_State.loads(raw, self.directory / STATE_FILE), raw)
            else:
                with _locked(self.directory, exclusive=False, timeout=0):
                    raw = self._read_state_raw()
                    if raw is None or raw == self._state_raw:
                        return False
                    self._apply(_State.loads(raw, self.directory / STATE_FILE), raw)
        except KeyStoreBusyError:
            return False  # a writer is at work; the next poll picks its result up
        except (KeyStoreError, OSError) as e:
            self._failed("reload", e)
            return False
        self.last_error = None
        return True

    def _failed(self, what: str, error: Exception) -> None:
        message = str(error)
        self.last_error = message
        _log.error("key directory {what} failed: {message}", what=what, message=message)

    def private_key_for(self, kid: str) -> bytes | None:
        """The secret key for ``kid`` if requests sealed to it are accepted now, else None.

        Accepted: the current key, the next key (a client with a clock ahead of ours may already
        use it), and a retired key inside its overlap window.
        """
        if self._closed:
            return None
        info = next((k for k in self._state.keys if k.kid == kid), None)
        if info is None or info.status == "revoked":
            return None
        if info.status == "retired" and self._clock.seconds() >= info.not_after:
            return None
        buf = self._secrets.get(kid)
        return None if buf is None or buf.wiped else buf.bytes()

    def published(self) -> list[PublishedKey]:
        """The current and the next key, as the key document lists them."""
        return list(self._state.published())

    def keys(self) -> list[KeyInfo]:
        """Every key on record (current, next, retired, revoked), oldest first."""
        return sorted(self._state.keys, key=_key_order)

    def info(self, kid: str) -> KeyInfo | None:
        return self._state.find(kid)

    @property
    def current(self) -> KeyInfo:
        return self._state.with_status("current")

    @property
    def next(self) -> KeyInfo:
        return self._state.with_status("next")

    @property
    def rotation_seconds(self) -> int:
        return self._state.rotation_seconds

    @property
    def overlap_seconds(self) -> int:
        return self._state.overlap_seconds

    @property
    def memory_locked(self) -> bool:
        """Whether every secret HPKE key in memory is mlock()ed."""
        return all(buf.locked for buf in self._secrets.values())

    def _cached(self, name: str, build: Callable[[], bytes]) -> bytes:
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = build()
        return value

    def key_document(self) -> bytes:
        """The signed key document, signed again when the keys change and every hour on the
        hour (``issued_at`` is the hour boundary: the same keys give the same bytes anywhere)."""
        issued_at = key_document_issued_at(self._clock.seconds())
        if self._document_hour != issued_at:
            self._cache.pop("document", None)
            self._document_hour = issued_at
        return self._cached(
            "document", lambda: build_key_document(self.published(), self.signing_key, issued_at)
        )

    def jwks(self) -> bytes:
        return self._cached("jwks", lambda: build_jwks(self.published()))

    def ohttp_configs(self) -> bytes:
        return self._cached("ohttp", lambda: build_ohttp_key_configs(self.published()))

    def current_key_age(self) -> float:
        return max(0.0, self._clock.seconds() - self.current.not_before)

    # Timers.

    def start(self) -> None:
        """Poll the directory every 2 s and rotate/expire keys on time, on the given clock."""
        if self._closed:
            raise KeyStoreError("the key store is closed")
        if self._poller is not None:
            return
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self._clock
        self._poller.start(POLL_SECONDS, now=False)
        self._maintain()
        self._schedule()

    def stop(self) -> None:
        """Stop the timers (keys stay usable; :meth:`close` also wipes them)."""
        if self._poller is not None:
            if self._poller.running:
                self._poller.stop()
            self._poller = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Stop and wipe every secret held in locked memory."""
        self.stop()
        for buf in self._secrets.values():
            buf.wipe()
        self._secrets = {}
        self._closed = True

    def _due(self) -> float:
        state = self._state
        times = [_rotation_due(state)]
        times += [k.not_after for k in state.keys if k.status in ("retired", "revoked")]
        return float(min(times))

    def _schedule(self) -> None:
        if self._poller is None or self.follower:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = self._due() - self._clock.seconds()
        # Overdue only if the last attempt could not run (lock busy): retry with the poll.
        self._timer = self._clock.callLater(delay if delay > 0 else POLL_SECONDS, self._on_timer)

    def _poll(self) -> None:
        # A LoopingCall whose function raises stops for good; rotation must not stop with it.
        try:
            self.reload()
            self._maintain()
        except Exception:
            _log.failure("key directory poll failed")

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self._maintain()
        except Exception:
            _log.failure("key rotation failed")
        self._schedule()

    def _maintain(self) -> None:
        if self._closed or self._clock.seconds() < self._due():
            return
        if self.follower:
            self._follower_expiry()
            return
        try:
            self._transaction(self._scheduled, timeout=0)
        except KeyStoreBusyError:
            pass  # retried by the next poll
        except (KeyStoreError, OSError) as e:
            self._failed("maintenance", e)

    def _follower_expiry(self) -> None:
        """Expiry, the one change a follower makes: wipe expired keys from memory now, and
        destroy them on disk if the directory lets it (a read-only copy is left to the leader)."""
        now = self._clock.seconds()
        expired = [
            k.kid
            for k in self._state.keys
            if k.status in ("retired", "revoked") and now >= k.not_after
        ]
        if not expired:
            return  # only rotation is due, and that is the leader's
        for kid in expired:
            buf = self._secrets.get(kid)
            if buf is not None:
                buf.wipe()
        if self._expiry_refused:
            return
        try:
            self._transaction(_expired, timeout=0, expiry=True)
        except KeyStoreBusyError:
            pass  # the leader or another follower is at it; the next poll looks again
        except (KeyStoreError, OSError) as e:
            self._expiry_refused = True  # a read-only copy: say it once
            self._failed("expiry (the leader destroys the files)", e)


def _rotation_due(state: _State) -> int:
    return state.with_status("current").not_before + state.rotation_seconds


def _expired(state: _State, now: int) -> _State | None:
    """Drop retired keys past their overlap and revoked records past theirs; None if none."""
    keep = tuple(
        k for k in state.keys if not (k.status in ("retired", "revoked") and now >= k.not_after)
    )
    if len(keep) == len(state.keys):
        return None
    return replace(state, keys=keep)
