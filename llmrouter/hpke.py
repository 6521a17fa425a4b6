"""HPKE (RFC 9180) for one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.

X25519 and the AEAD come from libsodium (through ``nacl.bindings``); HKDF is RFC 5869 on the
standard library's HMAC-SHA256. Nothing below those primitives is implemented here.

Every mode of RFC 9180 is supported (base, psk, auth, auth_psk); the wire protocol uses base and
auth. Errors are typed and their messages never contain key material or plaintext.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass, field

import nacl.bindings as sodium
import nacl.exceptions

__all__ = [
    "AEAD_ID",
    "KDF_ID",
    "KEM_ID",
    "N_ENC",
    "N_K",
    "N_N",
    "N_PK",
    "N_SK",
    "N_T",
    "DHError",
    "ExportLengthError",
    "HPKEError",
    "InvalidKeyError",
    "InvalidPSKError",
    "KeyPair",
    "MessageLimitReachedError",
    "Mode",
    "OpenError",
    "RecipientContext",
    "SenderContext",
    "aead_open",
    "aead_seal",
    "derive_key_pair",
    "generate_key_pair",
    "hkdf_expand",
    "hkdf_extract",
    "open_auth",
    "open_base",
    "public_key",
    "seal_auth",
    "seal_base",
    "setup_auth_r",
    "setup_auth_s",
    "setup_base_r",
    "setup_base_s",
    "setup_r",
    "setup_s",
]

KEM_ID = 0x0020
KDF_ID = 0x0001
AEAD_ID = 0x0003

N_SECRET = 32  # KEM shared secret
N_ENC = 32
N_PK = 32
N_SK = 32
N_K = 32  # AEAD key
N_N = 12  # AEAD nonce
N_T = 16  # AEAD tag
N_H = 32  # KDF output

_VERSION = b"HPKE-v1"
_KEM_SUITE_ID = b"KEM" + KEM_ID.to_bytes(2, "big")
_HPKE_SUITE_ID = (
    b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
)
_ZERO_DH = bytes(32)
_MAX_SEQ = (1 << (8 * N_N)) - 1

Buffer = bytes | bytearray | memoryview


class Mode(enum.IntEnum):
    BASE = 0x00
    PSK = 0x01
    AUTH = 0x02
    AUTH_PSK = 0x03


class HPKEError(Exception):
    """Base of every HPKE failure. Messages are fixed strings: nothing secret is ever echoed."""


class InvalidKeyError(HPKEError):
    """A serialized key has the wrong length."""


class DHError(HPKEError):
    """The X25519 output was all zeros (the peer's key is a small-order point)."""


class OpenError(HPKEError):
    """Authentication of a ciphertext failed."""


class MessageLimitReachedError(HPKEError):
    """The context's sequence number is exhausted; no further message may be sealed or opened."""


class ExportLengthError(HPKEError):
    """An export longer than 255 * Nh was requested."""


class InvalidPSKError(HPKEError):
    """PSK inputs inconsistent with the mode (RFC 9180 section 5.1, VerifyPSKInputs)."""


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An X25519 key pair. ``repr`` is redacted so a key never lands in a log or traceback."""

    sk: bytes
    pk: bytes

    def __repr__(self) -> str:
        return "KeyPair(<redacted>)"


# RFC 5869 HKDF on HMAC-SHA256 (the standard library's HMAC; no primitive of our own).


def hkdf_extract(salt: Buffer, ikm: Buffer) -> bytes:
    # An empty salt is HashLen zero bytes (RFC 5869); HMAC's zero key padding gives exactly that.
    return hmac.new(bytes(salt), bytes(ikm), hashlib.sha256).digest()


def hkdf_expand(prk: Buffer, info: Buffer, length: int) -> bytes:
    if length > 255 * N_H:
        raise ExportLengthError("requested length exceeds 255 * Nh")
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(
            bytes(prk), block + bytes(info) + bytes([counter]), hashlib.sha256
        ).digest()
        okm += block
        counter += 1
    return okm[:length]


def _labeled_extract(suite_id: bytes, salt: Buffer, label: bytes, ikm: Buffer) -> bytes:
    return hkdf_extract(salt, _VERSION + suite_id + label + bytes(ikm))


def _labeled_expand(suite_id: bytes, prk: Buffer, label: bytes, info: Buffer, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + _VERSION + suite_id + label + bytes(info)
    return hkdf_expand(prk, labeled_info, length)


# AEAD (libsodium's IETF ChaCha20-Poly1305).


def aead_seal(key: Buffer, nonce: Buffer, aad: Buffer, pt: Buffer) -> bytes:
    return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(pt), bytes(aad), bytes(nonce), bytes(key)
    )


def aead_open(key: Buffer, nonce: Buffer, aad: Buffer, ct: Buffer) -> bytes:
    if len(bytes(ct)) < N_T:  # PyNaCl raises a bare ValueError from cffi for these
        raise OpenError("decryption failed")
    try:
        return sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
            bytes(ct), bytes(aad), bytes(nonce), bytes(key)
        )
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise OpenError("decryption failed") from None


# DHKEM(X25519, HKDF-SHA256), RFC 9180 section 4.1 and 7.1.


def _check_key(key: Buffer, length: int) -> bytes:
    data = bytes(key)
    if len(data) != length:
        raise InvalidKeyError("key has the wrong length")
    return data


def public_key(sk: Buffer) -> bytes:
    return sodium.crypto_scalarmult_base(_check_key(sk, N_SK))


def generate_key_pair() -> KeyPair:
    pk, sk = sodium.crypto_box_keypair()
    return KeyPair(sk=sk, pk=pk)


def derive_key_pair(ikm: Buffer) -> KeyPair:
    if len(ikm) < N_SK:
        raise InvalidKeyError("ikm must be at least Nsk bytes")
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", N_SK)
    return KeyPair(sk=sk, pk=public_key(sk))


def _dh(sk: Buffer, pk: Buffer) -> bytes:
    try:
        out = sodium.crypto_scalarmult(_check_key(sk, N_SK), _check_key(pk, N_PK))
    except nacl.exceptions.RuntimeError:
        # libsodium refuses an all-zero result itself; keep our own check as well.
        raise DHError("DH output is zero") from None
    if hmac.compare_digest(out, _ZERO_DH):
        raise DHError("DH output is zero")
    return out


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, N_SECRET)


def _encap(pk_r: bytes, sk_s: bytes | None, eph: KeyPair) -> tuple[bytes, bytes]:
    dh = _dh(eph.sk, pk_r)
    kem_context = eph.pk + pk_r
    if sk_s is not None:
        dh += _dh(sk_s, pk_r)
        kem_context += public_key(sk_s)
    return _extract_and_expand(dh, kem_context), eph.pk


def _decap(enc: bytes, sk_r: bytes, pk_s: bytes | None) -> bytes:
    dh = _dh(sk_r, enc)
    kem_context = enc + public_key(sk_r)
    if pk_s is not None:
        dh += _dh(sk_r, pk_s)
        kem_context += pk_s
    return _extract_and_expand(dh, kem_context)


# Key schedule and contexts, RFC 9180 section 5.


@dataclass(repr=False)
class _Context:
    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    seq: int = field(default=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seq={self.seq})"

    def _nonce(self) -> bytes:
        seq = self.seq.to_bytes(N_N, "big")
        return bytes(a ^ b for a, b in zip(self.base_nonce, seq, strict=True))

    def _check_limit(self) -> None:
        # RFC 9180 IncrementSeq raises once seq reaches 2^96 - 1; checking before the AEAD call
        # refuses the same message without computing a ciphertext that would be thrown away.
        if self.seq >= _MAX_SEQ:
            raise MessageLimitReachedError("sequence number overflow")

    def export(self, exporter_context: Buffer, length: int) -> bytes:
        if length > 255 * N_H:
            raise ExportLengthError("requested length exceeds 255 * Nh")
        return _labeled_expand(
            _HPKE_SUITE_ID, self.exporter_secret, b"sec", exporter_context, length
        )


class SenderContext(_Context):
    def seal(self, aad: Buffer, pt: Buffer) -> bytes:
        self._check_limit()
        ct = aead_seal(self.key, self._nonce(), aad, pt)
        self.seq += 1
        return ct


class RecipientContext(_Context):
    def open(self, aad: Buffer, ct: Buffer) -> bytes:
        self._check_limit()
        pt = aead_open(self.key, self._nonce(), aad, ct)
        self.seq += 1
        return pt


def _verify_psk_inputs(mode: Mode, psk: bytes, psk_id: bytes) -> None:
    if bool(psk) != bool(psk_id):
        raise InvalidPSKError("psk and psk_id must be given together")
    if bool(psk) != (mode in (Mode.PSK, Mode.AUTH_PSK)):
        raise InvalidPSKError("psk inputs do not match the mode")


def _key_schedule(
    mode: Mode, shared_secret: bytes, info: Buffer, psk: bytes, psk_id: bytes
) -> tuple[bytes, bytes, bytes]:
    _verify_psk_inputs(mode, psk, psk_id)
    psk_id_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", psk_id)
    info_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"info_hash", info)
    ksc = bytes([mode]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE_ID, shared_secret, b"secret", psk)
    key = _labeled_expand(_HPKE_SUITE_ID, secret, b"key", ksc, N_K)
    base_nonce = _labeled_expand(_HPKE_SUITE_ID, secret, b"base_nonce", ksc, N_N)
    exporter_secret = _labeled_expand(_HPKE_SUITE_ID, secret, b"exp", ksc, N_H)
    return key, base_nonce, exporter_secret


def _mode_for(sender_auth: bool, psk: bytes) -> Mode:
    if sender_auth:
        return Mode.AUTH_PSK if psk else Mode.AUTH
    return Mode.PSK if psk else Mode.BASE


def setup_s(
    pk_r: Buffer,
    info: Buffer = b"",
    *,
    sk_s: Buffer | None = None,
    psk: Buffer = b"",
    psk_id: Buffer = b"",
    ephemeral: KeyPair | None = None,
) -> tuple[bytes, SenderContext]:
    """Sender setup for any mode: auth when ``sk_s`` is given, psk when ``psk`` is.

    ``ephemeral`` exists only to reproduce published test vectors; leave it unset.
    """
    pk_r_b = _check_key(pk_r, N_PK)
    sk_s_b = None if sk_s is None else _check_key(sk_s, N_SK)
    mode = _mode_for(sk_s_b is not None, bytes(psk))
    shared_secret, enc = _encap(pk_r_b, sk_s_b, ephemeral or generate_key_pair())
    key, nonce, exp = _key_schedule(mode, shared_secret, info, bytes(psk), bytes(psk_id))
    return enc, SenderContext(key, nonce, exp)


def setup_r(
    enc: Buffer,
    sk_r: Buffer,
    info: Buffer = b"",
    *,
    pk_s: Buffer | None = None,
    psk: Buffer = b"",
    psk_id: Buffer = b"",
) -> RecipientContext:
    """Recipient setup for any mode: auth when ``pk_s`` is given, psk when ``psk`` is."""
    enc_b = _check_key(enc, N_ENC)
    sk_r_b = _check_key(sk_r, N_SK)
    pk_s_b = None if pk_s is None else _check_key(pk_s, N_PK)
    mode = _mode_for(pk_s_b is not None, bytes(psk))
    shared_secret = _decap(enc_b, sk_r_b, pk_s_b)
    key, nonce, exp = _key_schedule(mode, shared_secret, info, bytes(psk), bytes(psk_id))
    return RecipientContext(key, nonce, exp)


def setup_base_s(
    pk_r: Buffer, info: Buffer = b"", *, ephemeral: KeyPair | None = None
) -> tuple[bytes, SenderContext]:
    return setup_s(pk_r, info, ephemeral=ephemeral)


def setup_base_r(enc: Buffer, sk_r: Buffer, info: Buffer = b"") -> RecipientContext:
    return setup_r(enc, sk_r, info)


def setup_auth_s(
    pk_r: Buffer, info: Buffer, sk_s: Buffer, *, ephemeral: KeyPair | None = None
) -> tuple[bytes, SenderContext]:
    return setup_s(pk_r, info, sk_s=sk_s, ephemeral=ephemeral)


def setup_auth_r(enc: Buffer, sk_r: Buffer, info: Buffer, pk_s: Buffer) -> RecipientContext:
    return setup_r(enc, sk_r, info, pk_s=pk_s)


# Single-shot APIs, RFC 9180 section 6.1.


def seal_base(pk_r: Buffer, info: Buffer, aad: Buffer, pt: Buffer) -> tuple[bytes, bytes]:
    enc, ctx = setup_base_s(pk_r, info)
    return enc, ctx.seal(aad, pt)


def open_base(enc: Buffer, sk_r: Buffer, info: Buffer, aad: Buffer, ct: Buffer) -> bytes:
    return setup_base_r(enc, sk_r, info).open(aad, ct)


def seal_auth(
    pk_r: Buffer, info: Buffer, aad: Buffer, pt: Buffer, sk_s: Buffer
) -> tuple[bytes, bytes]:
    enc, ctx = setup_auth_s(pk_r, info, sk_s)
    return enc, ctx.seal(aad, pt)


def open_auth(
    enc: Buffer, sk_r: Buffer, info: Buffer, aad: Buffer, ct: Buffer, pk_s: Buffer
) -> bytes:
    return setup_auth_r(enc, sk_r, info, pk_s).open(aad, ct)
