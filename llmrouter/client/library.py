"""The Python client library for wire protocol v1.

:class:`Client` talks to one router: it fetches and verifies the signed key document, seals each
request with HPKE, and delivers verified tokens to a callback as they arrive (Deferred/coroutine
API). ``llmrouter.client.cli`` is the command line built on it.

Trust in the router's keys comes from a pin of its Ed25519 signing key, or from an explicit
trust-on-first-use file that keeps the first signing key seen and refuses any other later; a
client with neither cannot be made (docs/protocol.md, section 1). Files the client writes (device
key, trust-on-first-use file, the state of a sealed request) are created 0600 and never followed
through a symbolic link.
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

__all__ = [
    "DEFAULT_URL",
    "ChatError",
    "Client",
    "load_device_key",
    "read_private",
    "write_private",
]

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
        tofu: Path | None = None,
        device_key: hpke.KeyPair | None = None,
        pad: int = DEFAULT_PAD,
        tls: ClientTLS | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if pin is None and tofu is None:
            raise ValueError(
                "trusting a router needs pin= (its signing key) or tofu= (a trust-on-first-use"
                " file that keeps the first signing key seen)"
            )
        self._agent, self._base = agent_for(reactor, url, tls)
        self._clock: IReactorTime = clock or reactor
        self._pin = pin
        self._tofu = tofu
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
        self._keys = keys
        return keys

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


def _trusted_key(path: Path) -> bytes | None:
    """The signing key a trust-on-first-use file holds, None if there is no file yet."""
    try:
        text = read_private(path)
    except FileNotFoundError:
        return None
    except ChatError as e:
        raise ChatError("tofu", e.message) from None
    except OSError as e:
        raise ChatError("tofu", f"cannot read {path}: {e.strerror}") from None
    try:
        return b64u_decode(text.strip(), "trusted key", 32)
    except ProtocolError:
        raise ChatError("tofu", f"{path} does not hold a signing key") from None


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
    try:
        text = read_private(path)
    except FileNotFoundError:
        pair = hpke.generate_key_pair()
        try:
            write_private(path, b64u_encode(pair.sk) + "\n", exclusive=True)
        except OSError as e:
            raise ChatError("device_key", f"cannot create {path}: {e.strerror}") from None
        return pair
    except ChatError as e:
        raise ChatError("device_key", e.message) from None
    except OSError as e:
        raise ChatError("device_key", f"cannot read {path}: {e.strerror}") from None
    try:
        sk = b64u_decode(text.strip(), "device key", hpke.N_SK)
    except ProtocolError:
        raise ChatError("device_key", "device key file is not a device key") from None
    return hpke.KeyPair(sk=sk, pk=hpke.public_key(sk))
