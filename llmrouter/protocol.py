"""Wire protocol v1.1: sealed chat requests, sealed SSE response streams, the signed key document.

Both sides live here: the client seals a request and opens a response stream; the router opens a
request and seals a response stream. ``docs/protocol.md`` is the prose version of this module; the
request plaintext itself (the OpenAI chat fields) is :mod:`llmrouter.chat`. Version 1.1 keeps the v1
envelope, key schedule and chunk framing; it adds request fields and chunk types, and a chunk type
is only ever sent to a client whose request asked for it, so a v1 client sees v1 bytes.

Error messages are fixed strings chosen here. Nothing a peer sent (field names, values, plaintext)
is ever echoed back or put into an exception, so errors can be logged and returned safely.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing

from llmrouter import hpke
from llmrouter.chat import MAX_STOP_SEQUENCES, ChatRequest, Message, RequestError, parse_request
from llmrouter.sse import SSEError, SSEParser, format_event

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_PAD",
    "KEEPALIVE",
    "KEY_DOCUMENT_MAX_AGE",
    "KEY_DOCUMENT_SKEW",
    "MAX_LOGPROB_ENTRIES",
    "MAX_STOP_SEQUENCES",
    "REQUEST_INFO",
    "RESPONSE_LABEL",
    "SKEW_SECONDS",
    "VERSION",
    "ChatRequest",
    "Delta",
    "Done",
    "Envelope",
    "ErrorChunk",
    "KeyDocument",
    "KeyDocumentError",
    "Logprob",
    "Message",
    "ProtocolError",
    "PublishedKey",
    "Reasoning",
    "RequestState",
    "ResponseKeys",
    "ResponseOpener",
    "ResponseSealer",
    "SealedRefusal",
    "StreamError",
    "ToolCallDelta",
    "b64u_decode",
    "b64u_encode",
    "build_jwks",
    "build_key_document",
    "build_ohttp_key_configs",
    "check_key_document_times",
    "check_key_set",
    "check_key_times",
    "check_timestamp",
    "compact_json",
    "key_document_issued_at",
    "key_id_for_kid",
    "kid_for_key_id",
    "logprob_entries",
    "open_request",
    "pad",
    "parse_chat_request",
    "parse_envelope",
    "parse_json",
    "parse_published_key",
    "seal_request",
    "verify_key_document",
]

VERSION = 1
REQUEST_INFO = b"llmrouter/v1 request"
RESPONSE_LABEL = b"llmrouter/v1 response"
AAD_PREFIX = "llmrouter/v1"
FINAL_AAD = b"final"
DEFAULT_PAD = 64
DEFAULT_MAX_BODY = 256 * 1024
SKEW_SECONDS = 60
KEY_DOCUMENT_MAX_AGE = 86400  # clients refuse older documents; routers re-sign every hour
KEY_DOCUMENT_SKEW = 300  # clock difference allowed for issued_at and the key validity
KEY_DOCUMENT_PERIOD = 3600  # issued_at is the hour the document was signed in
RID_BYTES = 16
RESPONSE_NONCE_BYTES = 32
SUITE = {"kem": hpke.KEM_ID, "kdf": hpke.KDF_ID, "aead": hpke.AEAD_ID}
KEEPALIVE = b": keepalive\n\n"

FINISH_REASONS = frozenset({"stop", "length", "cancelled", "tool_calls"})
MAX_TOOL_INDEX = 63
MAX_LOGPROB_ENTRIES = 256
MAX_TOP_LOGPROBS = 20
MIN_LOGPROB = -9999.0
_MAX_JSON_INT = (1 << 53) - 1
_B64U = re.compile(r"[A-Za-z0-9_-]*")
_KID = re.compile(r"[0-9a-f]{2}")
_ERROR_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\[\]-]{0,63}")  # a code or a parameter's name


class ProtocolError(Exception):
    """A rejection with an HTTP status and a stable, machine-readable code."""

    STATUS = {
        "body_too_large": 413,
        "unsupported_media_type": 415,
        "rate_limited": 429,
        "pow_required": 401,
        "pow_invalid": 401,
        "stale": 401,
        "replay": 409,
        "device_rate_limited": 429,
        "new_device_rate_limited": 429,
        "budget_exhausted": 429,
        "device_streams": 429,
        "overloaded": 503,
        "no_backend": 503,
        "upstream_failed": 502,
        "not_found": 404,
        "method_not_allowed": 405,
        "internal": 500,
    }

    def __init__(self, code: str, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else self.STATUS.get(code, 400)
        self.extra = extra

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, status={self.status})"

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode("ascii")


class SealedRefusal(ProtocolError):
    """A refusal of a request that was decrypted: it goes back sealed under the request's own
    response secret (docs/protocol.md, section 3.5), as a stream whose only chunk is the final
    error, so a hop that terminates TLS learns nothing of what the request contained (a refused
    field's name, the backend's reason). Only refusals before decryption are plain JSON."""

    def __init__(self, error: ProtocolError, secret: bytes, enc: bytes) -> None:
        super().__init__(error.code, error.message, error.status, **error.extra)
        self.secret = secret
        self.enc = enc

    def __repr__(self) -> str:
        return f"SealedRefusal({self.code!r}, status={self.status})"


# Base64url without padding (RFC 4648 section 5), canonical encodings only.


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str, field: str, length: int | None = None) -> bytes:
    """Decode ``text``; ``field`` is our name for the field (never the peer's), for the message."""
    if not isinstance(text, str):
        raise ProtocolError("bad_type", f"{field} must be a string")
    if len(text) % 4 == 1 or not _B64U.fullmatch(text):
        raise ProtocolError("bad_base64", f"{field} is not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_base64", f"{field} is not unpadded base64url") from None
    if b64u_encode(data) != text:
        raise ProtocolError("bad_base64", f"{field} is not canonical base64url")
    if length is not None and len(data) != length:
        raise ProtocolError("bad_length", f"{field} must be {length} bytes")
    return data


def pad(data: bytes, size: int) -> bytes:
    """Append ASCII spaces up to a multiple of ``size`` (JSON ignores trailing whitespace)."""
    if size <= 1:
        return data
    return data + b" " * (-len(data) % size)


def compact_json(obj: Any) -> bytes:
    """UTF-8 JSON without spaces (what is sealed or signed)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(_: str) -> Any:
    raise ValueError("non-finite number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def parse_json(data: bytes, code: str, what: str) -> Any:
    """Strict UTF-8 JSON: no duplicate keys, no NaN/Infinity; a failure is ``code``."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(code, f"{what} is not valid UTF-8 JSON") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Request envelope (section 3.2).

_ENVELOPE_FIELDS = frozenset({"v", "kid", "mode", "enc", "ts", "rid", "device_pubkey", "ct"})
_REQUIRED_FIELDS = ("v", "kid", "mode", "enc", "ts", "rid", "ct")


@dataclass(frozen=True, repr=False)
class Envelope:
    v: int
    kid: str
    mode: str
    enc: bytes
    ts: int
    rid: str
    device_pubkey: bytes | None
    device_pubkey_b64: str | None
    ct: bytes

    def __repr__(self) -> str:
        return f"Envelope(kid={self.kid!r}, mode={self.mode!r})"

    def aad(self) -> bytes:
        parts = (AAD_PREFIX, self.kid, self.mode, str(self.ts), self.rid, self.device_pubkey_b64)
        return "|".join(p or "" for p in parts).encode("ascii")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": self.v,
            "kid": self.kid,
            "mode": self.mode,
            "enc": b64u_encode(self.enc),
            "ts": self.ts,
            "rid": self.rid,
            "ct": b64u_encode(self.ct),
        }
        if self.device_pubkey_b64 is not None:
            doc["device_pubkey"] = self.device_pubkey_b64
        return doc


def parse_envelope(body: bytes, max_body: int = DEFAULT_MAX_BODY) -> Envelope:
    """Strict validation, cheapest checks first; every failure has its own code."""
    if len(body) > max_body:
        raise ProtocolError("body_too_large", "request body exceeds the size limit")
    doc = parse_json(body, "bad_json", "request body")
    if not isinstance(doc, dict):
        raise ProtocolError("bad_json", "request body must be a JSON object")
    if not _ENVELOPE_FIELDS.issuperset(doc):
        raise ProtocolError("unknown_field", "envelope has a field protocol v1 does not define")
    for name in _REQUIRED_FIELDS:
        if name not in doc:
            raise ProtocolError("missing_field", f"envelope field {name} is missing")
    if not _is_int(doc["v"]):
        raise ProtocolError("bad_type", "v must be an integer")
    if doc["v"] != VERSION:
        raise ProtocolError("bad_version", "unsupported protocol version")
    for name in ("kid", "mode", "enc", "rid", "ct"):
        if not isinstance(doc[name], str):
            raise ProtocolError("bad_type", f"{name} must be a string")
    if not _is_int(doc["ts"]) or not 0 <= doc["ts"] <= _MAX_JSON_INT:
        raise ProtocolError("bad_type", "ts must be a non-negative integer")
    kid, mode = doc["kid"], doc["mode"]
    if not _KID.fullmatch(kid):
        raise ProtocolError("key_unknown", "unknown key id")
    if mode not in ("base", "auth"):
        raise ProtocolError("bad_mode", "mode must be base or auth")
    device_b64 = doc.get("device_pubkey")
    if mode == "auth" and device_b64 is None:
        raise ProtocolError("missing_field", "envelope field device_pubkey is missing")
    if mode == "base" and device_b64 is not None:
        raise ProtocolError("bad_mode", "device_pubkey is only allowed with mode auth")
    enc = b64u_decode(doc["enc"], "enc", hpke.N_ENC)
    b64u_decode(doc["rid"], "rid", RID_BYTES)
    device = None if device_b64 is None else b64u_decode(device_b64, "device_pubkey", hpke.N_PK)
    ct = b64u_decode(doc["ct"], "ct")
    if len(ct) < hpke.N_T:
        raise ProtocolError("bad_length", "ct is shorter than the AEAD tag")
    return Envelope(VERSION, kid, mode, enc, doc["ts"], doc["rid"], device, device_b64, ct)


def check_timestamp(ts: int, now: float, skew: int = SKEW_SECONDS) -> None:
    if abs(ts - now) > skew:
        raise ProtocolError("stale", "request timestamp is outside the accepted window")


# The request plaintext (fields: llmrouter.chat).


def parse_chat_request(plaintext: bytes) -> ChatRequest:
    """Validate a decrypted request. Codes are all ``bad_payload``; messages never echo content."""
    doc = parse_json(plaintext.rstrip(b" "), "bad_payload", "request plaintext")
    try:
        return parse_request(doc)
    except RequestError as e:
        raise ProtocolError("bad_payload", str(e)) from None


# Sealing and opening requests.


@dataclass(frozen=True, repr=False)
class RequestState:
    """What the client keeps to open the response: the request's enc and the exported secret."""

    enc: bytes
    secret: bytes

    def __repr__(self) -> str:
        return "RequestState(<redacted>)"

    def to_json(self) -> dict[str, str]:
        return {"v": str(VERSION), "enc": b64u_encode(self.enc), "secret": b64u_encode(self.secret)}

    @classmethod
    def from_json(cls, doc: Any) -> RequestState:
        if not isinstance(doc, dict) or doc.get("v") != str(VERSION):
            raise ProtocolError("bad_state", "not a protocol v1 request state")
        return cls(
            b64u_decode(doc.get("enc", ""), "enc", hpke.N_ENC),
            b64u_decode(doc.get("secret", ""), "secret", 32),
        )


def seal_request(
    key: PublishedKey,
    request: ChatRequest,
    now: int,
    device_key: hpke.KeyPair | None = None,
    pad_to: int = DEFAULT_PAD,
    *,
    ephemeral: hpke.KeyPair | None = None,
    rid: bytes | None = None,
) -> tuple[Envelope, RequestState]:
    """Seal ``request`` to ``key``; auth mode when a device key is given.

    ``ephemeral`` and ``rid`` exist only to reproduce the worked example; leave them unset.
    """
    mode = "base" if device_key is None else "auth"
    device_b64 = None if device_key is None else b64u_encode(device_key.pk)
    rid_b64 = b64u_encode(os.urandom(RID_BYTES) if rid is None else rid)
    enc, ctx = hpke.setup_s(
        key.pk, REQUEST_INFO, sk_s=device_key.sk if device_key else None, ephemeral=ephemeral
    )
    env = Envelope(
        VERSION,
        key.kid,
        mode,
        enc,
        now,
        rid_b64,
        None if device_key is None else device_key.pk,
        device_b64,
        b"",
    )
    ct = ctx.seal(env.aad(), pad(compact_json(request.to_plaintext()), pad_to))
    state = RequestState(enc, ctx.export(RESPONSE_LABEL, 32))
    return dataclasses.replace(env, ct=ct), state


def open_request(env: Envelope, sk_r: bytes) -> tuple[ChatRequest, bytes]:
    """Decrypt and validate; any cryptographic failure is the one generic ``decrypt_failed``,
    an invalid plaintext a :class:`SealedRefusal` (``bad_payload``)."""
    try:
        ctx = hpke.setup_r(env.enc, sk_r, REQUEST_INFO, pk_s=env.device_pubkey)
        plaintext = ctx.open(env.aad(), env.ct)
    except hpke.HPKEError:
        raise ProtocolError("decrypt_failed", "the request could not be decrypted") from None
    secret = ctx.export(RESPONSE_LABEL, 32)
    try:
        return parse_chat_request(plaintext), secret
    except ProtocolError as e:
        raise SealedRefusal(e, secret, env.enc) from None


# The response stream (section 3.3).


class ResponseKeys:
    """RFC 9458 section 4.4 style key schedule, with our own export label (section 3.1); v2
    uses it too, with its own secrets and salts."""

    def __init__(self, secret: bytes, enc: bytes, response_nonce: bytes) -> None:
        prk = hpke.hkdf_extract(enc + response_nonce, secret)
        self._key = hpke.hkdf_expand(prk, b"key", hpke.N_K)
        self._nonce = hpke.hkdf_expand(prk, b"nonce", hpke.N_N)
        self.counter = 0

    def nonce(self) -> bytes:
        counter = self.counter.to_bytes(hpke.N_N, "big")
        return bytes(a ^ b for a, b in zip(self._nonce, counter, strict=True))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        sealed = hpke.aead_seal(self._key, self.nonce(), aad, plaintext)
        self.counter += 1
        return sealed

    def open(self, aad: bytes, sealed: bytes) -> bytes:
        plaintext = hpke.aead_open(self._key, self.nonce(), aad, sealed)
        self.counter += 1
        return plaintext


class ResponseSealer:
    """Router side: turns stream items into SSE bytes, each chunk sealed and padded."""

    def __init__(
        self,
        secret: bytes,
        enc: bytes,
        pad: int = DEFAULT_PAD,
        response_nonce: bytes | None = None,
    ) -> None:
        self.response_nonce = response_nonce or os.urandom(RESPONSE_NONCE_BYTES)
        self._keys = ResponseKeys(secret, enc, self.response_nonce)
        self._pad = pad
        self.finished = False

    def init_event(self) -> bytes:
        nonce = b64u_encode(self.response_nonce)
        return format_event("init", json.dumps({"response_nonce": nonce}))

    def _event(self, name: str, aad: bytes, message: dict[str, Any]) -> bytes:
        if self.finished:
            raise StreamError("the stream has already ended")
        sealed = self._keys.seal(aad, pad(compact_json(message), self._pad))
        return format_event(name, b64u_encode(sealed))

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        if logprobs is None:
            return self._event("chunk", b"", {"type": "delta", "text": text})
        return self._event("chunk", b"", {"type": "delta", "text": text, "logprobs": logprobs})

    def reasoning(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        """v1.1, only for a request with ``include_reasoning``: the model's thinking."""
        message: dict[str, Any] = {"type": "reasoning", "text": text}
        if logprobs is not None:
            message["logprobs"] = logprobs
        return self._event("chunk", b"", message)

    def tool_call(self, index: int, id: str | None, name: str | None, arguments: str) -> bytes:
        """v1.1, only for a request with ``tools``: one fragment of the call at ``index``."""
        message: dict[str, Any] = {"type": "tool_call", "index": index}
        if id is not None:
            message["id"] = id
        if name is not None:
            message["name"] = name
        message["arguments"] = arguments
        return self._event("chunk", b"", message)

    def done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        if finish_reason not in FINISH_REASONS:
            raise ValueError("unknown finish_reason")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        final = self._event(
            "final", FINAL_AAD, {"type": "done", "finish_reason": finish_reason, "usage": usage}
        )
        self.finished = True
        return final

    def error(self, code: str, message: str, status: int | None = None, **detail: Any) -> bytes:
        """The final error chunk: ``status`` is the HTTP status a plain refusal would have had,
        ``detail`` its other fields (``retry_after``, ``upstream_status``, ``upstream_code``,
        ``upstream_param``), so a client raises the same typed error either way."""
        message_doc: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if status is not None:
            message_doc["status"] = status
        message_doc.update(detail)
        final = self._event("final", FINAL_AAD, message_doc)
        self.finished = True
        return final


class StreamError(Exception):
    """The response stream is malformed, tampered with, or truncated."""


@dataclass(frozen=True, repr=False)
class Logprob:
    """A sampled token's log probability (and its most likely alternatives), as OpenAI gives it."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[Logprob, ...] = ()

    def __repr__(self) -> str:
        return f"Logprob({self.logprob:.3f})"


@dataclass(frozen=True)
class Delta:
    text: str = field(repr=False)
    logprobs: tuple[Logprob, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Reasoning:
    """v1.1: reasoning text, apart from the answer (only sent when the request asked for it)."""

    text: str = field(repr=False)
    logprobs: tuple[Logprob, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ToolCallDelta:
    """v1.1: a fragment of tool call ``index``; ``id`` and ``name`` come with its first one."""

    index: int
    id: str | None
    name: str | None
    arguments: str = field(repr=False)


@dataclass(frozen=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorChunk:
    """The router's final error: ``status`` (v1.1: the HTTP status a plain refusal would have
    had), ``retry_after`` seconds and what a backend's refusal said, when given."""

    code: str
    message: str
    status: int | None = None
    retry_after: int | None = None
    upstream_status: int | None = None
    upstream_code: str | None = None
    upstream_param: str | None = None

    def detail(self) -> dict[str, Any]:
        """The fields given besides code, message and status (as a plain refusal has them)."""
        fields = ("retry_after", "upstream_status", "upstream_code", "upstream_param")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


StreamItem = Delta | Reasoning | ToolCallDelta | Done | ErrorChunk


class ResponseOpener:
    """Client side: feed raw SSE bytes, get verified stream items back, in order.

    A stream is complete only once ``finished`` is true (a verified ``final`` chunk); a stream that
    ends before that must be treated as truncated (``close()`` raises).
    """

    def __init__(self, state: RequestState, max_line: int = 1 << 20) -> None:
        self._state = state
        self._parser = SSEParser(max_line)
        self._keys: ResponseKeys | None = None
        self.finished = False
        self.final: Done | ErrorChunk | None = None

    def feed(self, data: bytes) -> list[StreamItem]:
        try:
            events = self._parser.feed(data)
        except SSEError:
            raise StreamError("malformed event stream") from None
        return [item for name, payload in events for item in self.event(name, payload)]

    def close(self) -> Done | ErrorChunk:
        if not self.finished or self.final is None:
            raise StreamError("the stream ended without a verified final chunk (truncated)")
        return self.final

    def event(self, name: str, payload: str) -> Iterable[StreamItem]:
        """One parsed SSE event (v2's opener extends it with the router's event)."""
        if self.finished:
            raise StreamError("data after the final chunk")
        if name == "init":
            if self._keys is not None:
                raise StreamError("duplicate init event")
            nonce = self._decode(_loads_stream(payload).get("response_nonce"), RESPONSE_NONCE_BYTES)
            self._keys = ResponseKeys(self._state.secret, self._state.enc, nonce)
            return ()
        if name not in ("chunk", "final"):
            return ()  # unknown event types are ignored, as SSE consumers do
        if self._keys is None:
            raise StreamError("chunk before init")
        sealed = self._decode(payload, None)
        try:
            plaintext = self._keys.open(FINAL_AAD if name == "final" else b"", sealed)
        except hpke.OpenError:
            raise StreamError("a response chunk failed authentication") from None
        item = _parse_chunk(_loads_stream(plaintext.rstrip(b" ")), final=name == "final")
        if name == "final":
            assert isinstance(item, Done | ErrorChunk)
            self.finished, self.final = True, item
        return (item,)

    @staticmethod
    def _decode(text: Any, length: int | None) -> bytes:
        try:
            return b64u_decode(text, "chunk", length)
        except ProtocolError:
            raise StreamError("malformed chunk encoding") from None


def _loads_stream(data: str | bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise StreamError("malformed chunk JSON") from None
    if not isinstance(doc, dict):
        raise StreamError("malformed chunk JSON")
    return doc


def _parse_chunk(doc: dict[str, Any], final: bool) -> StreamItem:
    kind = doc.get("type")
    if not final:
        if kind in ("delta", "reasoning") and isinstance(doc.get("text"), str):
            logprobs = None
            if "logprobs" in doc:
                try:
                    logprobs = _logprobs(logprob_entries(doc["logprobs"]))
                except ValueError:
                    raise StreamError("unexpected chunk content") from None
            if kind == "delta":
                return Delta(doc["text"], logprobs)
            return Reasoning(doc["text"], logprobs)
        if kind == "tool_call":
            index, call_id, name = doc.get("index"), doc.get("id"), doc.get("name")
            if (
                isinstance(index, int)
                and not isinstance(index, bool)
                and 0 <= index <= MAX_TOOL_INDEX
                and isinstance(doc.get("arguments"), str)
                and isinstance(call_id, str | None)
                and isinstance(name, str | None)
            ):
                return ToolCallDelta(index, call_id, name, doc["arguments"])
    if kind == "done" and final and doc.get("finish_reason") in FINISH_REASONS:
        usage = doc.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                return Done(doc["finish_reason"], prompt, completion)
    if kind == "error" and final:
        code, message = doc.get("code"), doc.get("message")
        if isinstance(code, str) and isinstance(message, str):
            return ErrorChunk(
                code,
                message,
                _optional(doc, "status", _is_status),
                _optional(doc, "retry_after", _is_seconds),
                _optional(doc, "upstream_status", _is_status),
                _optional(doc, "upstream_code", _is_name),
                _optional(doc, "upstream_param", _is_name),
            )
    raise StreamError("unexpected chunk content")


def _is_status(value: Any) -> bool:
    return _is_int(value) and 100 <= value <= 599


def _is_seconds(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= _MAX_JSON_INT


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and _ERROR_NAME.fullmatch(value) is not None


def _optional(doc: dict[str, Any], name: str, valid: Callable[[Any], bool]) -> Any:
    """An optional field of the error chunk: absent, null, or valid (else the chunk is bad)."""
    value = doc.get(name)
    if value is not None and not valid(value):
        raise StreamError("unexpected chunk content")
    return value


def logprob_entries(raw: Any) -> list[dict[str, Any]]:
    """Validate OpenAI ``logprobs.content`` entries into the shape chunks carry (ValueError).

    Keeps ``token``, ``logprob``, ``bytes`` and ``top_logprobs`` (each ``token``, ``logprob``,
    ``bytes``), bounded in count, so what the router relays is exactly what it checked.
    """
    if not isinstance(raw, list) or len(raw) > MAX_LOGPROB_ENTRIES:
        raise ValueError("logprobs must be a bounded list")
    return [_logprob_entry(entry, top=True) for entry in raw]


def _logprob_entry(entry: Any, top: bool) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError("a logprob entry must be an object")
    token, logprob, raw_bytes = entry.get("token"), entry.get("logprob"), entry.get("bytes")
    if logprob is None or (_is_number(logprob) and not math.isfinite(logprob)):
        logprob = MIN_LOGPROB  # minus infinity (JSON has none; backends send null): as OpenAI does
    if not isinstance(token, str) or not _is_number(logprob):
        raise ValueError("a logprob entry needs a token and a number")
    out: dict[str, Any] = {"token": token, "logprob": logprob}
    if raw_bytes is not None:
        if not isinstance(raw_bytes, list) or not all(
            _is_int(b) and 0 <= b <= 255 for b in raw_bytes
        ):
            raise ValueError("logprob bytes must be a list of bytes")
        out["bytes"] = raw_bytes
    if top:
        alternatives = entry.get("top_logprobs") or []
        if not isinstance(alternatives, list) or len(alternatives) > MAX_TOP_LOGPROBS:
            raise ValueError("top_logprobs must be a bounded list")
        out["top_logprobs"] = [_logprob_entry(alt, top=False) for alt in alternatives]
    return out


def _logprobs(entries: list[dict[str, Any]]) -> tuple[Logprob, ...]:
    def one(entry: dict[str, Any]) -> Logprob:
        raw_bytes = entry.get("bytes")
        return Logprob(
            entry["token"],
            entry["logprob"],
            None if raw_bytes is None else tuple(raw_bytes),
            tuple(one(alt) for alt in entry.get("top_logprobs", ())),
        )

    return tuple(one(entry) for entry in entries)


# Key documents (section 3.1).


@dataclass(frozen=True, repr=False)
class PublishedKey:
    kid: str
    pk: bytes
    status: str
    not_before: int
    not_after: int

    def __repr__(self) -> str:
        return f"PublishedKey(kid={self.kid!r}, status={self.status!r})"

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "pk": b64u_encode(self.pk),
            "status": self.status,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


def kid_for_key_id(key_id: int) -> str:
    if not 0 <= key_id <= 255:
        raise ValueError("key_id is one byte")
    return f"{key_id:02x}"


def key_id_for_kid(kid: str) -> int:
    if not _KID.fullmatch(kid):
        raise ValueError("kid is two lowercase hex digits")
    return int(kid, 16)


def build_key_document(
    keys: Sequence[PublishedKey], signing_key: nacl.signing.SigningKey, issued_at: int
) -> bytes:
    payload = compact_json(
        {
            "v": VERSION,
            "suite": SUITE,
            "issued_at": issued_at,
            "keys": [k.to_json() for k in keys],
        }
    )
    signature = signing_key.sign(payload).signature
    doc = {
        "payload": b64u_encode(payload),
        "signature": b64u_encode(signature),
        "signing_key": b64u_encode(bytes(signing_key.verify_key)),
    }
    return json.dumps(doc).encode("ascii")


def build_jwks(keys: Sequence[PublishedKey]) -> bytes:
    """RFC 8037 OKP/X25519 JWKs."""
    jwks = [
        {"kty": "OKP", "crv": "X25519", "x": b64u_encode(k.pk), "kid": k.kid, "use": "enc"}
        for k in keys
    ]
    return json.dumps({"keys": jwks}).encode("ascii")


def build_ohttp_key_configs(keys: Sequence[PublishedKey]) -> bytes:
    """RFC 9458 section 3 key configurations, each with its 2-byte length prefix."""
    out = b""
    for k in keys:
        config = (
            bytes([key_id_for_kid(k.kid)])
            + hpke.KEM_ID.to_bytes(2, "big")
            + k.pk
            + (4).to_bytes(2, "big")
            + hpke.KDF_ID.to_bytes(2, "big")
            + hpke.AEAD_ID.to_bytes(2, "big")
        )
        out += len(config).to_bytes(2, "big") + config
    return out


class KeyDocumentError(Exception):
    """The key document is malformed, not signed by the pinned key, or inconsistent."""


@dataclass(frozen=True)
class KeyDocument:
    issued_at: int
    keys: tuple[PublishedKey, ...]
    signing_key: bytes

    def current(self) -> PublishedKey:
        """The only key a client seals to."""
        return next(k for k in self.keys if k.status == "current")


def key_document_issued_at(now: float) -> int:
    """The ``issued_at`` a router signs at ``now``: the hour boundary, so that routers with the
    same keys sign the same bytes (Ed25519 is deterministic) and re-sign once an hour."""
    return int(now) // KEY_DOCUMENT_PERIOD * KEY_DOCUMENT_PERIOD


def verify_key_document(body: bytes, pin: bytes | None = None, *, now: float) -> KeyDocument:
    """Check the signature over the exact payload bytes (and the pin), then the payload.

    Refused (docs/protocol.md, section 1): a document issued more than
    :data:`KEY_DOCUMENT_MAX_AGE` seconds before ``now`` or more than :data:`KEY_DOCUMENT_SKEW`
    after it (an old signed document may carry a key revoked since), a current key outside its
    validity window (give or take the skew), duplicate ``kid``s, anything but exactly one
    ``current`` and one ``next`` key.
    """
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError
        signing_key = b64u_decode(doc["signing_key"], "signing_key", 32)
        signature = b64u_decode(doc["signature"], "signature", 64)
        payload = b64u_decode(doc["payload"], "payload")
    except (ValueError, KeyError, TypeError, RecursionError, ProtocolError):
        raise KeyDocumentError("malformed key document") from None
    if pin is not None and not hmac.compare_digest(pin, signing_key):
        raise KeyDocumentError("key document is not signed by the pinned key")
    try:
        nacl.signing.VerifyKey(signing_key).verify(payload, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise KeyDocumentError("key document signature does not verify") from None
    try:
        p = json.loads(payload)
        if p["v"] != VERSION or p["suite"] != SUITE or not _is_int(p["issued_at"]):
            raise ValueError
        keys = tuple(parse_published_key(k) for k in p["keys"])
    except (ValueError, KeyError, TypeError, RecursionError, ProtocolError):
        raise KeyDocumentError("key document payload is not protocol v1") from None
    issued_at: int = p["issued_at"]
    check_key_set(issued_at, keys, now=now, what="key document")
    return KeyDocument(issued_at, keys, signing_key)


def check_key_set(
    issued_at: int, keys: Sequence[PublishedKey], *, now: float, what: str
) -> PublishedKey:
    """Checks 4 to 6 of section 1 (freshness, unique kids, one current and one next, the current
    key valid with skew), for any signed key set (``what`` names it in the message); returns the
    current key."""
    if len({k.kid for k in keys}) != len(keys):
        raise KeyDocumentError(f"{what} has duplicate key ids")
    statuses = sorted(k.status for k in keys)
    if statuses != ["current", "next"]:
        raise KeyDocumentError(f"{what} must have exactly one current and one next key")
    current = next(k for k in keys if k.status == "current")
    check_key_times(issued_at, current, now=now, what=what)
    return current


def check_key_document_times(document: KeyDocument, now: float) -> None:
    """The time rules alone, for a document verified earlier and about to be used again."""
    check_key_times(document.issued_at, document.current(), now=now, what="key document")


def check_key_times(issued_at: int, current: PublishedKey, *, now: float, what: str) -> None:
    """The time rules of a signed key set (freshness, the current key valid with skew)."""
    if issued_at < now - KEY_DOCUMENT_MAX_AGE:
        raise KeyDocumentError(f"{what} is older than 24 hours (stale or replayed)")
    if issued_at > now + KEY_DOCUMENT_SKEW:
        raise KeyDocumentError(f"{what} is issued in the future (check the clock)")
    if not current.not_before - KEY_DOCUMENT_SKEW <= now <= current.not_after + KEY_DOCUMENT_SKEW:
        raise KeyDocumentError(f"the current key of the {what} is outside its validity window")


def parse_published_key(doc: Any) -> PublishedKey:
    """One entry of a signed key set (ValueError or ProtocolError when malformed)."""
    if not isinstance(doc, dict) or doc.get("status") not in ("current", "next"):
        raise ValueError
    if not isinstance(doc["kid"], str) or not _KID.fullmatch(doc["kid"]):
        raise ValueError
    if not _is_int(doc["not_before"]):
        raise ValueError
    if not _is_int(doc["not_after"]):
        raise ValueError
    pk = b64u_decode(doc["pk"], "pk", hpke.N_PK)
    return PublishedKey(doc["kid"], pk, doc["status"], doc["not_before"], doc["not_after"])
