"""The Python client library: wire protocol v2 (the blind router) by default, v1.1 on request.

:class:`Client` talks to one router: it fetches and verifies the signed key document, seals each
request with HPKE, and delivers verified output to callbacks as it arrives (Deferred/coroutine
API): answer text, reasoning apart from it, tool calls assembled from their fragments.
:class:`Conversation` keeps a multi-turn history (tool results included) on the client only; each
turn sends all of it. ``llmrouter.client.cli`` is the command line built on it.

Protocol 2 (the default) seals each request to inference nodes the router cannot read for, and
trusts only a pin of the operator's key (docs/protocol.md, part II). Protocol 1 (``protocol=1``:
v1.1, which the router decrypts) trusts a pin of the router's own signing key, or an explicit
trust-on-first-use file that keeps the first signing key seen and refuses any other later. A
client without a pin (or, in protocol 1, a trust-on-first-use file) cannot be made. Files the
client writes (device key, trust-on-first-use file, the state of a sealed request) are created
0600 and never followed through a symbolic link.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmrouter import hpke, pow
from llmrouter.chat import Message, ToolCall
from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.protocol import (
    DEFAULT_PAD,
    ChatRequest,
    Delta,
    Done,
    ErrorChunk,
    KeyDocument,
    KeyDocumentError,
    Logprob,
    ProtocolError,
    Reasoning,
    RequestState,
    ResponseOpener,
    StreamError,
    StreamItem,
    ToolCallDelta,
    b64u_decode,
    b64u_encode,
    check_key_document_times,
    seal_request,
    verify_key_document,
)
from llmrouter.v2 import request as v2request
from llmrouter.v2 import response as v2response
from llmrouter.v2.certs import CertificateError, KeyDocumentV2, verify_key_document_v2

__all__ = [
    "DEFAULT_URL",
    "PROTOCOLS",
    "ChatError",
    "Client",
    "Conversation",
    "Reply",
    "error_from_chunk",
    "load_device_key",
    "read_private",
    "write_private",
]

DEFAULT_URL = "http://127.0.0.1:8080"
PROTOCOLS = (1, 2)
# As the TypeScript SDK: the key document is fetched again after an hour (the router re-signs
# hourly), and a proof of work harder than 24 bits (about 16 million hashes) is refused.
KEY_REFRESH_SECONDS = 3600
MAX_POW_DIFFICULTY = 24


class ChatError(Exception):
    """The router refused the request, the stream ended in an error, or it was truncated.

    A refusal is the same error whether it came as plain JSON (before the router decrypted the
    request) or as the stream's sealed final chunk (after): ``status`` the HTTP status,
    ``retry_after`` seconds when the router said (rate limits), ``upstream`` what a backend's own
    refusal said (``upstream_status``, ``upstream_code``, ``upstream_param``) for
    ``upstream_refused``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        retry_after: int | None = None,
        upstream: Mapping[str, Any] | None = None,
        challenge: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, when the router said (rate limits)
        self.upstream = dict(upstream or {})
        self.challenge = challenge  # a sealed pow_required's challenge (protocol 2)


@dataclass(frozen=True, repr=False)
class Reply:
    """One whole answer: text, reasoning (apart), tool calls (assembled), logprobs, usage."""

    text: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]
    logprobs: tuple[Logprob, ...]
    done: Done

    def __repr__(self) -> str:
        return f"Reply(<{len(self.text)} chars>, {len(self.tool_calls)} tool calls, {self.done})"

    @property
    def finish_reason(self) -> str:
        return self.done.finish_reason

    def message(self) -> Message:
        """The assistant message to put into the history (reasoning is not sent back)."""
        if self.tool_calls:
            return Message("assistant", self.text or None, self.tool_calls)
        return Message("assistant", self.text)


@dataclass
class _Collector:
    """Assembles stream items into a Reply, passing text and reasoning on as they arrive."""

    on_delta: Callable[[str], None]
    on_reasoning: Callable[[str], None] | None
    on_item: Callable[[StreamItem], None] | None = None
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, arguments...]

    def __call__(self, item: StreamItem) -> None:
        if self.on_item is not None:
            self.on_item(item)
        if isinstance(item, Delta):
            self.text.append(item.text)
            self.logprobs.extend(item.logprobs or ())
            if item.text:
                self.on_delta(item.text)
        elif isinstance(item, Reasoning):
            self.reasoning.append(item.text)
            if self.on_reasoning is not None:
                self.on_reasoning(item.text)
        elif isinstance(item, ToolCallDelta):
            call = self.calls.setdefault(item.index, ["", ""])
            call[0] = item.id or call[0]
            call[1] = item.name or call[1]
            call.append(item.arguments)

    def reply(self, done: Done) -> Reply:
        calls = tuple(  # a call without an id gets one, so it can go back in the history
            ToolCall(call[0] or f"call_{index}", call[1], "".join(call[2:]))
            for index, call in sorted(self.calls.items())
        )
        text, reasoning = "".join(self.text), "".join(self.reasoning)
        return Reply(text, reasoning, calls, tuple(self.logprobs), done)


class _Opener(typing.Protocol):
    def feed(self, data: bytes) -> list[StreamItem]: ...

    def close(self) -> Done | ErrorChunk: ...


class _StreamReader(Protocol):
    """Feeds the response body to a response opener, verified item by verified item."""

    def __init__(self, opener: _Opener, on_item: Callable[[StreamItem], None]) -> None:
        self._opener = opener
        self._on_item = on_item
        # Cancelling (the caller gave up, e.g. its own client left) closes the connection, which
        # makes the router cancel the generation.
        self.finished: Deferred[Done | ErrorChunk] = Deferred(self._cancel)
        self._failed = False

    def _cancel(self, _: Deferred[Done | ErrorChunk]) -> None:
        self._failed = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            items = self._opener.feed(data)
        except StreamError as e:
            self._failed = True
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.finished.errback(ChatError("bad_stream", str(e)))
            return
        for item in items:
            self._on_item(item)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._failed:
            return
        try:
            self.finished.callback(self._opener.close())
        except StreamError as e:
            self.finished.errback(ChatError("truncated", str(e)))


def error_from_chunk(final: ErrorChunk, default_status: int | None = None) -> ChatError:
    """A sealed final error (a v1.1 router's, a v2 node's, or a v2 ``event: router``) as the
    error a plain refusal would have been: the same status, ``retry_after``, the backend's
    reason and, from a v2 router, a proof-of-work challenge."""
    challenge = final.challenge if isinstance(final, v2response.RouterRefusal) else None
    return ChatError(
        final.code,
        final.message,
        final.status if final.status is not None else default_status,
        final.retry_after,
        _upstream(final.detail()),
        challenge,
    )


def _upstream(error: Mapping[str, Any]) -> dict[str, Any]:
    names = ("upstream_status", "upstream_code", "upstream_param")
    return {name: error[name] for name in names if isinstance(error.get(name), int | str)}


_PIN_HELP = (
    "pin= is an Ed25519 public key: 32 bytes, or the base64url text `llmrouter-keys"
    " operator-pin` (protocol 2: the operator's key) or `llmrouter-keys pin` (protocol 1: the"
    " router's signing key) prints"
)


def _pin(pin: bytes | str | None) -> bytes | None:
    """The key to trust (32 bytes, or the base64url text the tools print); anything else is
    refused now, not at the first request."""
    if isinstance(pin, str):
        try:
            return b64u_decode(pin.strip(), "pin", 32)
        except ProtocolError:
            raise ValueError(_PIN_HELP) from None
    if pin is not None and (not isinstance(pin, bytes) or len(pin) != 32):
        raise ValueError(_PIN_HELP)
    return pin


def _json_error(status: int, body: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"]), error
    except (ValueError, KeyError, TypeError):
        return "http_error", f"HTTP {status}", {}


Envelope = dict[str, Any] | bytes  # protocol 1's JSON envelope, protocol 2's binary body
State = RequestState | v2request.ClientState


class Client:
    """One router. Fetches and verifies the key document, seals, streams.

    ``protocol`` 2 (the default): ``pin`` is the operator's key (``llmrouter-keys
    operator-pin``); requests are sealed to ``k`` inference nodes picked at random among those
    the verified key document lists for the model. ``protocol`` 1: ``pin`` is the router's
    signing key, or ``tofu`` a trust-on-first-use file.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        pin: bytes | str | None = None,
        tofu: Path | None = None,
        device_key: hpke.KeyPair | None = None,
        pad: int = DEFAULT_PAD,
        tls: ClientTLS | None = None,
        clock: IReactorTime | None = None,
        max_pow_difficulty: int = MAX_POW_DIFFICULTY,
        key_refresh_seconds: float = KEY_REFRESH_SECONDS,
        protocol: int = 2,
        k: int = v2request.DEFAULT_K,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError("protocol is 1 or 2")
        if protocol == 2 and (pin is None or tofu is not None):
            raise ValueError(
                "protocol 2 trusts the operator's key only: pass pin= (`llmrouter-keys"
                " operator-pin` prints it); trust on first use (tofu=) is protocol=1 only"
            )
        if pin is None and tofu is None:
            raise ValueError(
                "trusting a router needs pin= (its signing key) or tofu= (a trust-on-first-use"
                " file that keeps the first signing key seen)"
            )
        pin = _pin(pin)
        if not 1 <= k <= v2request.MAX_WRAPS:
            raise ValueError(f"k is 1 to {v2request.MAX_WRAPS}")
        self._agent, self._base = agent_for(reactor, url, tls)
        self._clock: IReactorTime = clock or reactor
        self.protocol = protocol
        self._pin = pin
        self._tofu = tofu
        self._device_key = device_key
        self._pad = pad
        self._max_pow = max_pow_difficulty
        self._refresh = key_refresh_seconds
        self._k = k
        self._keys: KeyDocument | KeyDocumentV2 | None = None
        self._fetched_at = 0.0

    async def _get(self, path: str) -> tuple[IResponse, bytes]:
        response = await self._agent.request(b"GET", (self._base + path).encode("ascii"))
        return response, await readBody(response)

    async def fetch_keys(self) -> KeyDocument | KeyDocumentV2:
        """Fetch and verify the key document (``/api/v2/keys`` or, protocol 1, ``/api/pubkey``)."""
        keys = await (self._fetch_v2() if self.protocol == 2 else self._fetch_v1())
        self._fetched_at = self._clock.seconds()
        return self._hold(keys)

    async def _fetch_v1(self) -> KeyDocument:
        response, body = await self._get("/api/pubkey")
        if response.code != 200:
            code, message, _ = _json_error(response.code, body)
            raise ChatError(code, message, response.code)
        pin = self._pin
        if pin is None and self._tofu is not None:
            pin = _trusted_key(self._tofu)
        try:
            keys = verify_key_document(body, pin, now=self._clock.seconds())
        except KeyDocumentError as e:
            if self._pin is None and pin is not None:
                raise ChatError("bad_key_document", f"{e} (trusted on first use)") from None
            raise ChatError("bad_key_document", str(e)) from None
        if pin is None and self._tofu is not None:
            _trust(self._tofu, keys.signing_key)
        return keys

    def _hold(self, keys: KeyDocument | KeyDocumentV2) -> KeyDocument | KeyDocumentV2:
        """Keep ``keys`` unless the document held is newer and still valid: an older one is
        what a replayed document looks like (or a router behind the hour), never an update."""
        held = self._valid(self._keys, self._clock.seconds())
        if held is not None and keys.issued_at < held.issued_at:
            return held
        self._keys = keys
        return keys

    @staticmethod
    def _valid(
        keys: KeyDocument | KeyDocumentV2 | None, now: float
    ) -> KeyDocument | KeyDocumentV2 | None:
        """``keys`` if its time rules still hold at ``now`` (protocol 2: with the nodes whose
        certificate and key set are still valid), else None."""
        try:
            if isinstance(keys, KeyDocumentV2):
                return keys.still_valid(now)
            if keys is not None:
                check_key_document_times(keys, now)
        except KeyDocumentError:
            return None
        return keys

    async def current_keys(self) -> KeyDocument | KeyDocumentV2:
        """The verified key document to seal to, checked again before each seal: the one in
        memory while it is less than an hour old and still valid (24 hours since signing, the
        current key's ``not_after``; protocol 2 also the certificates and the node key sets),
        else a fresh one. If the router cannot be reached, a document still valid is used."""
        now = self._clock.seconds()
        keys = self._valid(self._keys, now)
        if keys is not None and now - self._fetched_at < self._refresh:
            return keys
        try:
            return await self.fetch_keys()
        except (ConnectError, ResponseFailed, ResponseNeverReceived):
            if keys is None:
                raise
            return keys

    async def _fetch_v2(self) -> KeyDocumentV2:
        assert self._pin is not None
        response, body = await self._get("/api/v2/keys")
        if response.code == 404:
            raise ChatError(
                "v2_unavailable",
                "the router does not speak protocol 2 (no /api/v2/keys); protocol 1 needs the"
                " router's own signing key as the pin",
                404,
            )
        if response.code != 200:
            code, message, _ = _json_error(response.code, body)
            raise ChatError(code, message, response.code)
        try:
            return verify_key_document_v2(body, self._pin, now=self._clock.seconds())
        except CertificateError as e:
            if await self._is_router_pin():
                raise ChatError(
                    "bad_key_document",
                    "the pin is this router's own signing key (protocol 1), not the operator's"
                    " key: pin the operator key for protocol 2, or choose protocol 1 (in which"
                    " the router can read the conversation)",
                ) from None
            raise ChatError("bad_key_document", str(e)) from None
        except KeyDocumentError as e:
            raise ChatError("bad_key_document", str(e)) from None

    async def _is_router_pin(self) -> bool:
        """Whether the pin is the router's v1 signing key (for a helpful message only)."""
        try:
            response, body = await self._get("/api/pubkey")
            if response.code != 200:
                return False
            verify_key_document(body, self._pin, now=self._clock.seconds())
        except (KeyDocumentError, ConnectError, ResponseFailed, ResponseNeverReceived):
            return False
        return True

    async def seal(self, request: ChatRequest) -> tuple[Envelope, State]:
        """The sealed request and what opens its answer: protocol 1's envelope (a JSON object)
        and RequestState, or protocol 2's binary body and ClientState."""
        keys = await self.current_keys()
        now = int(self._clock.seconds())
        if isinstance(keys, KeyDocumentV2):
            model = request.model or keys.default_model
            if model is None:
                raise ChatError(
                    "model_required",
                    "the router names no default model: choose one (llmrouter-client models)",
                )
            device_sk = None if self._device_key is None else self._device_key.sk
            try:
                return v2request.seal_request(
                    keys, request, model=model, device_sk=device_sk, k=self._k, ts=now,
                    pad=self._pad,
                )  # fmt: skip
            except ProtocolError as e:
                raise ChatError(e.code, e.message, e.status) from None
        env, state = seal_request(keys.current(), request, now, self._device_key, self._pad)
        return env.to_json(), state

    async def models(self) -> list[str]:
        """The model names requests may use: protocol 2, those some verified node of the key
        document serves; protocol 1, the router's ``GET /api/models`` (not signed)."""
        if self.protocol == 2:
            keys = await self.fetch_keys()
            assert isinstance(keys, KeyDocumentV2)
            return list(keys.models())
        response, body = await self._get("/api/models")
        if response.code != 200:
            code, message, _ = _json_error(response.code, body)
            raise ChatError(code, message, response.code)
        try:
            return [str(entry["id"]) for entry in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise ChatError("bad_models", "the model list is malformed") from None

    async def chat(
        self,
        request: ChatRequest,
        on_delta: Callable[[str], None] = lambda text: None,
        *,
        on_reasoning: Callable[[str], None] | None = None,
    ) -> Done:
        """Send one request, text to ``on_delta`` as it arrives; returns the final chunk."""
        reply = await self.complete(request, on_delta, on_reasoning=on_reasoning)
        return reply.done

    async def complete(
        self,
        request: ChatRequest,
        on_delta: Callable[[str], None] = lambda text: None,
        *,
        on_reasoning: Callable[[str], None] | None = None,
        on_item: Callable[[StreamItem], None] | None = None,
    ) -> Reply:
        """Send one request and return the whole reply (tool calls assembled).

        Reasoning reaches ``on_reasoning`` only for a request with ``include_reasoning``;
        ``on_item`` sees every verified item as it arrives (tool-call fragments, logprobs), for
        a caller that relays the stream. The request is sealed again and resent once on
        ``key_unknown`` (after fetching the key document again), once on ``stale`` (a router
        that just restarted refuses earlier timestamps), and, protocol 2, once on a sealed
        ``pow_required`` (solved for the new request).
        """
        retried: set[str] = set()
        challenge: str | None = None
        while True:
            envelope, state = await self.seal(request)
            pow_header = None
            if challenge is not None and isinstance(state, v2request.ClientState):
                pow_header = await self._solve(challenge, state.outer_enc)
            collector = _Collector(on_delta, on_reasoning, on_item)
            try:
                done = await self.post(envelope, state, on_item=collector, pow_header=pow_header)
            except ChatError as e:
                again = e.code in ("key_unknown", "stale") or (
                    e.code == "pow_required" and e.challenge is not None
                )
                if not again or e.code in retried:
                    raise
                retried.add(e.code)
                challenge = e.challenge
                if e.code == "key_unknown":
                    await self.fetch_keys()
                continue
            return collector.reply(done)

    async def post(
        self,
        envelope: Envelope,
        state: State,
        on_delta: Callable[[str], None] = lambda text: None,
        *,
        on_item: Callable[[StreamItem], None] | None = None,
        pow_header: str | None = None,
    ) -> Done:
        """POST a sealed request and stream the response; solves a PoW challenge the router
        asks for before it opened anything, once (the same request goes again).

        Every verified item goes to ``on_item`` if given, else the text of deltas to ``on_delta``.
        """
        if on_item is None:
            on_item = _Collector(on_delta, None)
        for _ in (0, 1):
            response = await self._post(envelope, pow_header)
            if response.code == 200:
                return await self._stream(response, state, on_item)
            body = await readBody(response)
            code, message, error = _json_error(response.code, body)
            if code == "pow_required" and pow_header is None and "challenge" in error:
                enc = _enc_of(envelope)
                pow_header = await self._solve(str(error["challenge"]), enc)
                continue
            retry_after = error.get("retry_after")
            retry = retry_after if isinstance(retry_after, int) else None
            raise ChatError(code, message, response.code, retry, _upstream(error))
        raise ChatError("pow_invalid", "the proof of work was not accepted", 401)

    async def _solve(self, challenge: str, enc: bytes) -> str:
        """Solve a proof of work in a thread, if it is no harder than allowed; cancelling the
        request stops the thread (an on-path party could otherwise pin a CPU for hours)."""
        try:
            difficulty = pow.challenge_difficulty(challenge)
        except ProtocolError:
            raise ChatError("pow_invalid", "the challenge is malformed", 401) from None
        if difficulty > self._max_pow:
            raise ChatError(
                "pow_too_hard",
                f"the proof of work asked for ({difficulty} bits) is harder than this client"
                f" allows ({self._max_pow} bits)",
                401,
            )
        stop = threading.Event()
        work = threads.deferToThread(pow.solve, challenge, enc, difficulty, stop)
        solved: Deferred[str] = Deferred(lambda _: stop.set())

        def relay(result: str | Failure) -> None:
            if solved.called:  # cancelled: the thread stopped (pow.Stopped) or just finished
                return
            if isinstance(result, Failure):
                solved.errback(result)
            else:
                solved.callback(result)

        work.addBoth(relay)
        return await solved

    async def _post(self, envelope: Envelope, pow_header: str | None) -> IResponse:
        if isinstance(envelope, bytes):
            content_type, path, data = v2request.CONTENT_TYPE, "/api/v2/chat", envelope
        else:
            content_type, path = "application/json", "/api/chat"
            data = json.dumps(envelope).encode("ascii")
        headers = Headers(
            {b"Content-Type": [content_type.encode()], b"Accept": [b"text/event-stream"]}
        )
        if pow_header is not None:
            headers.addRawHeader(pow.HEADER, pow_header)
        url = (self._base + path).encode("ascii")
        body = FileBodyProducer(BytesIO(data))
        response: IResponse = await self._agent.request(b"POST", url, headers, body)
        return response

    async def _stream(
        self, response: IResponse, state: State, on_item: Callable[[StreamItem], None]
    ) -> Done:
        if isinstance(state, v2request.ClientState):
            reader = _StreamReader(v2response.ResponseOpener(state), on_item)
        else:
            reader = _StreamReader(ResponseOpener(state), on_item)
        response.deliverBody(reader)
        final = await reader.finished
        if isinstance(final, ErrorChunk):
            # protocol 2: a node (or its router) refuses inside a sealed stream what a v1 router
            # refused in plain; an older node's chunk without a status gets the code's
            v2 = isinstance(state, v2request.ClientState)
            raise error_from_chunk(final, v2response.refusal_status(final.code) if v2 else None)
        return final


def _enc_of(envelope: Envelope) -> bytes:
    """The ``enc`` a proof of work is bound to: the envelope's, or the outer one in a v2 body."""
    if isinstance(envelope, bytes):
        return v2request.parse_outer_header(envelope, len(envelope))[1]
    return b64u_decode(envelope["enc"], "enc")


class Conversation:
    """A multi-turn chat whose history stays on this side: each turn sends the whole history.

    ``params`` are :class:`ChatRequest` fields for every turn (``model``, ``tools``,
    ``response_format``, ``max_tokens``, ...). After a reply with tool calls, add each result with
    :meth:`tool_result` and call :meth:`resume` for the model's answer.
    """

    def __init__(self, client: Client, *, system: str | None = None, **params: Any) -> None:
        self.client = client
        self.params = params
        self.messages: list[Message] = [Message("system", system)] if system else []

    async def say(
        self,
        text: str,
        on_delta: Callable[[str], None] = lambda text: None,
        *,
        on_reasoning: Callable[[str], None] | None = None,
    ) -> Reply:
        self.messages.append(Message("user", text))
        return await self._turn(1, on_delta, on_reasoning, {})

    def tool_result(self, call_id: str, content: str) -> None:
        self.messages.append(Message("tool", content, (), call_id))

    async def resume(
        self,
        on_delta: Callable[[str], None] = lambda text: None,
        *,
        on_reasoning: Callable[[str], None] | None = None,
        **overrides: Any,
    ) -> Reply:
        """Ask for the next assistant message (after tool results); ``overrides`` for this turn."""
        return await self._turn(0, on_delta, on_reasoning, overrides)

    async def _turn(
        self,
        added: int,
        on_delta: Callable[[str], None],
        on_reasoning: Callable[[str], None] | None,
        overrides: dict[str, Any],
    ) -> Reply:
        request = ChatRequest(tuple(self.messages), **{**self.params, **overrides})
        try:
            reply = await self.client.complete(request, on_delta, on_reasoning=on_reasoning)
        except BaseException:
            del self.messages[len(self.messages) - added :]  # a failed turn leaves no trace
            raise
        self.messages.append(reply.message())
        return reply


# Private files: 0600, never through a symbolic link, never someone else's.


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to a 0600 file of ours; ``exclusive``: only if it does not exist yet.

    Raises OSError (FileExistsError with ``exclusive``; ELOOP for a symbolic link) or ChatError
    for a file that belongs to another user.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else 0
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ChatError("private_file", f"{path} is not a regular file of this user")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def read_private(path: Path) -> str:
    """Read a 0600 file of ours (FileNotFoundError passes through)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ChatError("private_file", f"{path} is not a regular file of this user")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ChatError("private_file", f"{path} must not be group/world accessible")
        with os.fdopen(os.dup(fd), "r", encoding="utf-8") as f:
            return f.read(65536)
    finally:
        os.close(fd)


def _read_key(path: Path, code: str, name: str, size: int) -> bytes | None:
    """The key (base64url, ``size`` bytes) a private file holds, None if there is no file yet;
    anything else is a ChatError with ``code``."""
    try:
        text = read_private(path)
    except FileNotFoundError:
        return None
    except ChatError as e:
        raise ChatError(code, e.message) from None
    except OSError as e:
        raise ChatError(code, f"cannot read {path}: {e.strerror}") from None
    try:
        return b64u_decode(text.strip(), name, size)
    except ProtocolError:
        raise ChatError(code, f"{path} does not hold a {name}") from None


def _trusted_key(path: Path) -> bytes | None:
    """The signing key a trust-on-first-use file holds, None if there is no file yet."""
    return _read_key(path, "tofu", "signing key", 32)


def _trust(path: Path, signing_key: bytes) -> None:
    try:
        write_private(path, b64u_encode(signing_key) + "\n", exclusive=True)
    except FileExistsError:  # another client got there first: it must have seen the same key
        if _trusted_key(path) != signing_key:
            raise ChatError("bad_key_document", "the router's signing key changed") from None
    except OSError as e:
        raise ChatError("tofu", f"cannot create {path}: {e.strerror}") from None


# Device keys (auth mode).


def load_device_key(path: Path) -> hpke.KeyPair:
    """Load the X25519 device key, creating it (0600, never overwritten) on first use."""
    sk = _read_key(path, "device_key", "device key", hpke.N_SK)
    if sk is not None:
        return hpke.KeyPair(sk=sk, pk=hpke.public_key(sk))
    pair = hpke.generate_key_pair()
    try:
        write_private(path, b64u_encode(pair.sk) + "\n", exclusive=True)
    except OSError as e:
        raise ChatError("device_key", f"cannot create {path}: {e.strerror}") from None
    return pair
