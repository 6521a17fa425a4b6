"""The Python client library for wire protocol v1.

:class:`Client` talks to one router: it fetches and verifies the signed key document, seals each
request with HPKE, and delivers verified tokens to a callback as they arrive (Deferred/coroutine
API). ``llmrouter.client.cli`` is the command line built on it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmrouter import hpke, pow
from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.protocol import (
    DEFAULT_PAD,
    ChatRequest,
    Delta,
    Done,
    ErrorChunk,
    KeyDocument,
    KeyDocumentError,
    ProtocolError,
    RequestState,
    ResponseOpener,
    StreamError,
    b64u_decode,
    b64u_encode,
    seal_request,
    verify_key_document,
)

__all__ = ["DEFAULT_URL", "ChatError", "Client", "load_device_key"]

DEFAULT_URL = "http://127.0.0.1:8080"


class ChatError(Exception):
    """The router refused the request, the stream ended in an error, or it was truncated."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class _StreamReader(Protocol):
    """Feeds the response body to a ResponseOpener, verified delta by verified delta."""

    def __init__(self, opener: ResponseOpener, on_delta: Callable[[str], None]) -> None:
        self._opener = opener
        self._on_delta = on_delta
        self.finished: Deferred[Done | ErrorChunk] = Deferred()
        self._failed = False

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
            if isinstance(item, Delta):
                self._on_delta(item.text)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._failed:
            return
        try:
            self.finished.callback(self._opener.close())
        except StreamError as e:
            self.finished.errback(ChatError("truncated", str(e)))


def _json_error(status: int, body: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"]), error
    except (ValueError, KeyError, TypeError):
        return "http_error", f"HTTP {status}", {}


class Client:
    """One router. Fetches and verifies (and optionally pins) the key document, seals, streams."""

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        pin: bytes | None = None,
        device_key: hpke.KeyPair | None = None,
        pad: int = DEFAULT_PAD,
        tls: ClientTLS | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._agent, self._base = agent_for(reactor, url, tls)
        self._clock: IReactorTime = clock or reactor
        self._pin = pin
        self._device_key = device_key
        self._pad = pad
        self._keys: KeyDocument | None = None

    async def _get(self, path: str) -> tuple[IResponse, bytes]:
        response = await self._agent.request(b"GET", (self._base + path).encode("ascii"))
        return response, await readBody(response)

    async def fetch_keys(self) -> KeyDocument:
        response, body = await self._get("/api/pubkey")
        if response.code != 200:
            code, message, _ = _json_error(response.code, body)
            raise ChatError(code, message, response.code)
        try:
            self._keys = verify_key_document(body, self._pin)
        except KeyDocumentError as e:
            raise ChatError("bad_key_document", str(e)) from None
        return self._keys

    async def seal(self, request: ChatRequest) -> tuple[dict[str, Any], RequestState]:
        keys = self._keys or await self.fetch_keys()
        now = int(self._clock.seconds())
        env, state = seal_request(keys.current(), request, now, self._device_key, self._pad)
        return env.to_json(), state

    async def chat(
        self, request: ChatRequest, on_delta: Callable[[str], None] = lambda text: None
    ) -> Done:
        """Send one request, sealed again once on ``key_unknown`` (after refetching the key
        document) or ``stale`` (a router that just restarted refuses earlier timestamps)."""
        refetch = False
        for attempt in (0, 1):
            if refetch:
                await self.fetch_keys()
            envelope, state = await self.seal(request)
            try:
                return await self.post(envelope, state, on_delta)
            except ChatError as e:
                if e.code not in ("key_unknown", "stale") or attempt:
                    raise
                refetch = e.code == "key_unknown"
        raise AssertionError("unreachable")

    async def post(
        self,
        envelope: dict[str, Any],
        state: RequestState,
        on_delta: Callable[[str], None] = lambda text: None,
    ) -> Done:
        """POST a sealed envelope and stream the response; solves a PoW challenge if asked once."""
        pow_header: str | None = None
        for _ in (0, 1):
            response = await self._post(envelope, pow_header)
            if response.code == 200:
                return await self._stream(response, state, on_delta)
            body = await readBody(response)
            code, message, error = _json_error(response.code, body)
            if code == "pow_required" and pow_header is None and "challenge" in error:
                enc = b64u_decode(envelope["enc"], "enc")
                pow_header = await threads.deferToThread(pow.solve, str(error["challenge"]), enc)
                continue
            raise ChatError(code, message, response.code)
        raise ChatError("pow_invalid", "the proof of work was not accepted", 401)

    async def _post(self, envelope: dict[str, Any], pow_header: str | None) -> IResponse:
        headers = Headers(
            {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}
        )
        if pow_header is not None:
            headers.addRawHeader(pow.HEADER, pow_header)
        body = FileBodyProducer(BytesIO(json.dumps(envelope).encode("ascii")))
        url = (self._base + "/api/chat").encode("ascii")
        response: IResponse = await self._agent.request(b"POST", url, headers, body)
        return response

    async def _stream(
        self, response: IResponse, state: RequestState, on_delta: Callable[[str], None]
    ) -> Done:
        reader = _StreamReader(ResponseOpener(state), on_delta)
        response.deliverBody(reader)
        final = await reader.finished
        if isinstance(final, ErrorChunk):
            raise ChatError(final.code, final.message)
        return final


# Device keys (auth mode).


def load_device_key(path: Path) -> hpke.KeyPair:
    """Load the X25519 device key, creating it (0600, never overwritten) on first use."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ChatError(
                "device_key", "device key file must not be group/world accessible"
            ) from None
        try:
            sk = b64u_decode(path.read_text().strip(), "device key", hpke.N_SK)
        except ProtocolError:
            raise ChatError("device_key", "device key file is not a device key") from None
        return hpke.KeyPair(sk=sk, pk=hpke.public_key(sk))
    pair = hpke.generate_key_pair()
    with os.fdopen(fd, "w") as f:
        f.write(b64u_encode(pair.sk) + "\n")
    return pair
