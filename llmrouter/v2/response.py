"""A protocol v2 response: the node's sealed stream and the router's sealed ``event: router``.

The node seals its stream exactly as v1.1 does (``init``, ``chunk``..., ``final``), with the
response secret of the request's content key and no ``enc`` in the salt (:func:`node_sealer`).
The router, which cannot open that stream, relays it byte for byte; what it has to say itself
after it opened the outer layer (a refusal, or the node's stream breaking) goes in one terminal
``event: router`` sealed under the router secret (:func:`seal_router_event`). The client's
:class:`ResponseOpener` accepts both; a stream is complete only with a verified node ``final``
or a verified router event.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llmrouter import hpke
from llmrouter.protocol import (
    DEFAULT_PAD,
    FINAL_AAD,
    RESPONSE_NONCE_BYTES,
    ErrorChunk,
    ProtocolError,
    RequestState,
    ResponseKeys,
    ResponseSealer,
    StreamError,
    StreamItem,
    b64u_decode,
    b64u_encode,
    compact_json,
)
from llmrouter.protocol import Done as Done  # a v2 stream ends as v1.1's does (bench reads it here)
from llmrouter.protocol import ResponseOpener as NodeStreamOpener
from llmrouter.protocol import pad as _pad
from llmrouter.sse import format_event
from llmrouter.v2.request import ClientState, Random

__all__ = [
    "REFUSAL_STATUS",
    "ROUTER_EVENT",
    "ROUTER_EVENT_PAD",
    "ResponseOpener",
    "RouterRefusal",
    "node_sealer",
    "open_router_event",
    "refusal_status",
    "seal_node_refusal",
    "seal_router_event",
]

ROUTER_EVENT = "router"
# Router events are padded to a larger block than chunks, so that its refusals (code, message,
# challenge) all have one size: a TLS-terminating hop cannot tell one from another.
ROUTER_EVENT_PAD = 256
MAX_CODE = 64
MAX_MESSAGE = 1024
_CODE = re.compile(r"[a-z0-9_]{1,64}")
_ROUTER_EVENT_FIELDS = frozenset({"response_nonce", "sealed"})
_EXTRA = ("retry_after", "challenge", "difficulty")
_MAX_JSON_INT = (1 << 53) - 1

# The HTTP status a v2 refusal stands for (it travels sealed, in a 200 stream): what a client
# reports, and what llmrouter-client proxy answers its own clients with.
REFUSAL_STATUS = {
    **ProtocolError.STATUS,
    "stale": 401,
    "key_unknown": 400,
    "decrypt_failed": 400,
    "device_proof_failed": 400,
    "bad_payload": 400,
    "unsupported_field": 400,
    "upstream_refused": 400,
    "model_unknown": 404,
    "timeout": 504,
}


def refusal_status(code: str) -> int:
    return REFUSAL_STATUS.get(code, 400)


@dataclass(frozen=True)
class RouterRefusal(ErrorChunk):
    """The router's terminal error (a refusal, or the node's stream breaking), with what the
    client needs to act on it (``status``, ``retry_after`` seconds, as in a v1.1 router's sealed
    error; a proof-of-work ``challenge``)."""

    challenge: str | None = None
    difficulty: int | None = None


def node_sealer(secret: bytes, pad: int = DEFAULT_PAD) -> ResponseSealer:
    """The node's stream sealer: v1 section 3's, keyed by the response secret (no ``enc``)."""
    return ResponseSealer(secret, b"", pad)


def seal_node_refusal(secret: bytes, error: ProtocolError, *, pad: int = DEFAULT_PAD) -> bytes:
    """A whole node stream whose only event after ``init`` is a ``final`` error, with the
    status and ``retry_after`` a plain refusal would have had (as a v1.1 router seals one)."""
    sealer = node_sealer(secret, pad)
    return sealer.init_event() + sealer.error(
        error.code, error.message, error.status, **error.extra
    )


def seal_router_event(
    router_secret: bytes,
    outer_enc: bytes,
    error: ProtocolError,
    *,
    pad: int = ROUTER_EVENT_PAD,
    rng: Random = secrets,
) -> bytes:
    """The router's ``event: router``: ``error`` (its code, message, HTTP status, and
    ``retry_after``, ``challenge``, ``difficulty`` when it has them) sealed as one final chunk
    (counter 0, aad ``final``) under v1 section 3.1's schedule with ``salt = outer enc ||
    response_nonce``."""
    message: dict[str, Any] = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "status": error.status,
    }
    message.update((name, error.extra[name]) for name in _EXTRA if name in error.extra)
    response_nonce = rng.token_bytes(RESPONSE_NONCE_BYTES)
    keys = ResponseKeys(router_secret, outer_enc, response_nonce)
    sealed = keys.seal(FINAL_AAD, _pad(compact_json(message), pad))
    data = {"response_nonce": b64u_encode(response_nonce), "sealed": b64u_encode(sealed)}
    return format_event(ROUTER_EVENT, json.dumps(data))


def _optional_int(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_JSON_INT:
        raise StreamError("malformed router event")
    return value


def open_router_event(router_secret: bytes, outer_enc: bytes, payload: str) -> RouterRefusal:
    """Verify and read the data of an ``event: router`` (:class:`StreamError` if it is not
    genuine or not well formed)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise StreamError("malformed router event") from None
    if not isinstance(doc, dict) or set(doc) != _ROUTER_EVENT_FIELDS:
        raise StreamError("malformed router event")
    try:
        nonce = b64u_decode(doc["response_nonce"], "response_nonce", RESPONSE_NONCE_BYTES)
        sealed = b64u_decode(doc["sealed"], "sealed")
    except ProtocolError:
        raise StreamError("malformed router event") from None
    try:
        plaintext = ResponseKeys(router_secret, outer_enc, nonce).open(FINAL_AAD, sealed)
    except hpke.OpenError:
        raise StreamError("the router event failed authentication") from None
    try:
        message = json.loads(plaintext.rstrip(b" "))
    except (ValueError, RecursionError):
        raise StreamError("malformed router event") from None
    if not isinstance(message, dict) or message.get("type") != "error":
        raise StreamError("malformed router event")
    if not set(message) <= {"type", "code", "message", "status", *_EXTRA}:
        raise StreamError("malformed router event")
    code, text, challenge = message.get("code"), message.get("message"), message.get("challenge")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise StreamError("malformed router event")
    if not isinstance(text, str) or len(text) > MAX_MESSAGE:
        raise StreamError("malformed router event")
    if challenge is not None and (not isinstance(challenge, str) or len(challenge) > 256):
        raise StreamError("malformed router event")
    status = _optional_int(message, "status")
    if status is not None and not 100 <= status <= 599:
        raise StreamError("malformed router event")
    return RouterRefusal(
        code,
        text,
        status=status,
        retry_after=_optional_int(message, "retry_after"),
        challenge=challenge,
        difficulty=_optional_int(message, "difficulty"),
    )


class ResponseOpener(NodeStreamOpener):
    """Client side of a v2 stream: feed raw SSE bytes, get verified items back, in order.

    The node's stream is v1.1's (``init``, ``chunk``, ``final``), opened with the response
    secret by v1's opener, which this extends with the router's event: an ``event: router`` is
    opened with the router secret, and it ends the stream. ``close()`` returns the terminal item
    (:class:`~llmrouter.protocol.Done`, a node's :class:`~llmrouter.protocol.ErrorChunk` or a
    :class:`RouterRefusal`) or raises :class:`~llmrouter.protocol.StreamError` for a truncated
    stream, as v1's opener does.
    """

    def __init__(self, state: ClientState, max_line: int = 1 << 20) -> None:
        super().__init__(RequestState(b"", state.response_secret), max_line)
        self._client = state

    def event(self, name: str, payload: str) -> Iterable[StreamItem]:
        if name != ROUTER_EVENT:
            return super().event(name, payload)
        if self.finished:
            raise StreamError("data after the final chunk")
        refusal = open_router_event(self._client.router_secret, self._client.outer_enc, payload)
        self.finished, self.final = True, refusal
        return (refusal,)
