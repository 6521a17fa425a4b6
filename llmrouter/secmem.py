"""Locked memory for secret key bytes, and process hardening against core dumps.

Why: a secret that reaches swap or a core dump outlives the key's retirement. ``mlock`` keeps the
pages of a :class:`LockedBuffer` out of swap (where the OS allows it; ``locked`` records whether it
worked), ``wipe()`` zeroes them when a key is retired, and :func:`harden_process` stops the kernel
from writing core dumps and other processes of the same user from attaching (``PR_SET_DUMPABLE``).

Limits of doing this from Python: :meth:`LockedBuffer.bytes` returns an ordinary ``bytes`` copy
(the crypto APIs take ``bytes``), and such copies live in normal, unlocked memory until the
garbage collector reuses it. Callers should keep those copies short-lived.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
import sys
from typing import Any

__all__ = ["LockedBuffer", "core_dumps_disabled", "harden_process", "is_dumpable"]

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_PAGE = mmap.PAGESIZE
_libc: Any = None
# mlock is not reference counted: munlock on one buffer would unlock a page another buffer still
# needs. So pages are locked on their first user and unlocked when their last user goes away.
_page_users: dict[int, int] = {}


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc.mlock.restype = ctypes.c_int
        _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc.munlock.restype = ctypes.c_int
        if sys.platform.startswith("linux"):
            _libc.prctl.argtypes = (
                ctypes.c_int,
                ctypes.c_ulong,
                ctypes.c_ulong,
                ctypes.c_ulong,
                ctypes.c_ulong,
            )
            _libc.prctl.restype = ctypes.c_int
    return _libc


def _pages(address: int, size: int) -> range:
    first = address // _PAGE
    return range(first, (address + size - 1) // _PAGE + 1)


def _lock_pages(address: int, size: int) -> bool:
    libc = _load_libc()
    done: list[int] = []
    for page in _pages(address, size):
        if page not in _page_users:
            if libc.mlock(page * _PAGE, _PAGE) != 0:
                for locked in done:
                    _unlock_page(locked)
                return False
            _page_users[page] = 0
        _page_users[page] += 1
        done.append(page)
    return True


def _unlock_page(page: int) -> None:
    _page_users[page] -= 1
    if _page_users[page] == 0:
        del _page_users[page]
        _load_libc().munlock(page * _PAGE, _PAGE)


def _unlock_pages(address: int, size: int) -> None:
    for page in _pages(address, size):
        _unlock_page(page)


def _relock_after_fork() -> None:
    """Memory locks are not inherited across fork() (twistd daemonizing): take them again."""
    if _page_users:
        libc = _load_libc()
        for page in _page_users:
            libc.mlock(page * _PAGE, _PAGE)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_relock_after_fork)


def harden_process() -> None:
    """No core dumps (RLIMIT_CORE 0) and not dumpable/ptrace-able by the same user (Linux).

    Idempotent. Raises ``OSError`` if the kernel refuses either setting, so a daemon that asked for
    hardening does not silently run without it.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = _load_libc()
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, "prctl(PR_SET_DUMPABLE, 0) failed")


def core_dumps_disabled() -> bool:
    """Whether both the soft and hard RLIMIT_CORE are 0."""
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def is_dumpable() -> bool:
    """``prctl(PR_GET_DUMPABLE)`` on Linux; elsewhere assume the worst (True)."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(_load_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


class LockedBuffer:
    """A fixed-size bytearray whose pages are ``mlock()``ed where the OS allows it.

    The ctypes view taken over the bytearray's storage also pins it: a bytearray with an exported
    buffer cannot be resized, so its storage is never reallocated (and never left behind, unwiped).
    """

    __slots__ = ("__weakref__", "_buf", "_view", "_wiped", "locked")

    def __init__(self, data: bytes) -> None:
        self._buf = bytearray(data)
        self._view: ctypes.Array[ctypes.c_char] | None = None
        self.locked = False
        self._wiped = False
        if self._buf:
            self._view = (ctypes.c_char * len(self._buf)).from_buffer(self._buf)
            try:
                self.locked = _lock_pages(ctypes.addressof(self._view), len(self._buf))
            except (OSError, AttributeError):
                self.locked = False

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"LockedBuffer(<{len(self._buf)} bytes redacted>, locked={self.locked})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("LockedBuffer holds a secret and cannot be pickled or copied")

    @property
    def wiped(self) -> bool:
        return self._wiped

    def bytes(self) -> bytes:
        """A copy of the secret (see the module docstring for why that is unavoidable)."""
        if self.wiped:
            raise ValueError("the buffer has been wiped")
        return bytes(self._buf)

    def wipe(self) -> None:
        """Zero the bytes in place, unlock the pages and drop the storage. Idempotent."""
        view, self._view = self._view, None
        if view is not None:
            size = len(self._buf)
            ctypes.memset(ctypes.addressof(view), 0, size)
            if self.locked:
                _unlock_pages(ctypes.addressof(view), size)
            self.locked = False
            del view
        self._buf = bytearray()
        self._wiped = True

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # noqa: S110 - interpreter shutdown: nothing useful left to do
            pass
