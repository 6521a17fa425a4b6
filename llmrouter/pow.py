"""Stateless proof-of-work challenges, asked for only when the router is under stress.

A challenge is ``version | expiry | difficulty | random | MAC`` signed with the router's PoW key,
so the router keeps no state per challenge. The work binds the request's ``enc``, and the router
remembers each solution it checked (:func:`solution_id`) for as long as its challenge lives: a
solution buys exactly one check, whether or not the request behind it then decrypts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading

from llmrouter.protocol import ProtocolError, b64u_decode, b64u_encode

__all__ = [
    "CHALLENGE_TTL",
    "HEADER",
    "MAX_DIFFICULTY",
    "MAX_HEADER",
    "Stopped",
    "challenge_difficulty",
    "issue_challenge",
    "solution_id",
    "solve",
    "verify",
]

HEADER = "X-LLMRouter-PoW"
MAX_DIFFICULTY = 32
CHALLENGE_TTL = 120
MAX_HEADER = 256  # a challenge (51 characters), a colon and at most 20 digits fit easily
_VERSION = 1
_LABEL = b"llmrouter/v1 pow|"
_BODY = struct.Struct(">BQB16s")  # version, expiry (unix seconds), difficulty, random
_MAC_BYTES = 16
_MAX_NONCE_DIGITS = 20


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, _LABEL + body, hashlib.sha256).digest()[:_MAC_BYTES]


def issue_challenge(key: bytes, difficulty: int, now: float, ttl: int = CHALLENGE_TTL) -> str:
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError("difficulty out of range")
    body = _BODY.pack(_VERSION, int(now) + ttl, difficulty, os.urandom(16))
    return b64u_encode(body + _mac(key, body))


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def _work(challenge: str, enc: bytes, nonce: str) -> int:
    digest = hashlib.sha256(
        _LABEL + challenge.encode("ascii") + b"|" + enc + b"|" + nonce.encode("ascii")
    ).digest()
    return _leading_zero_bits(digest)


def challenge_difficulty(challenge: str) -> int:
    """The difficulty a challenge asks for (ProtocolError if it is not one)."""
    return int(b64u_decode(challenge, "challenge", _BODY.size + _MAC_BYTES)[9])


class Stopped(Exception):
    """:func:`solve` was told to stop before it found a nonce."""


def solve(
    challenge: str,
    enc: bytes,
    difficulty: int | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Find a nonce; returns the header value ``<challenge>:<nonce>``. Raises :class:`Stopped`
    soon after ``stop`` is set (the work runs in a thread nobody could otherwise stop)."""
    needed = challenge_difficulty(challenge) if difficulty is None else difficulty
    if needed > MAX_DIFFICULTY:
        raise ValueError("difficulty out of range")
    nonce = 0
    while _work(challenge, enc, str(nonce)) < needed:
        nonce += 1
        if stop is not None and not nonce & 0xFFF and stop.is_set():
            raise Stopped()
    return f"{challenge}:{nonce}"


def verify(key: bytes, header_value: str, enc: bytes, now: float, difficulty: int = 0) -> bool:
    """A genuine, unexpired challenge of at least ``difficulty`` bits, solved for ``enc``."""
    challenge, sep, nonce = header_value.partition(":")
    if not sep or not nonce.isdigit() or not nonce.isascii() or len(nonce) > _MAX_NONCE_DIGITS:
        return False
    try:
        raw = b64u_decode(challenge, "challenge", _BODY.size + _MAC_BYTES)
    except ProtocolError:
        return False
    body, mac = raw[: _BODY.size], raw[_BODY.size :]
    if not hmac.compare_digest(mac, _mac(key, body)):
        return False
    version, expiry, bits, _ = _BODY.unpack(body)
    if version != _VERSION or int(expiry) < now or not difficulty <= int(bits) <= MAX_DIFFICULTY:
        return False
    return _work(challenge, enc, nonce) >= int(bits)


def solution_id(header_value: str, enc: bytes) -> bytes:
    """What the router remembers of a checked solution (16 bytes, whatever the header's size)."""
    return hashlib.sha256(_LABEL + header_value.encode("ascii") + b"|" + enc).digest()[:16]
