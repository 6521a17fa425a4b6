"""Python client for wire protocol v1, and the ``llmrouter-client`` command built on it.

The library is :class:`Client` (Deferred/coroutine API, tokens delivered to a callback as they are
verified). The command line is a thin layer: ``chat``, the curl-friendly ``seal``/``open`` pair and
``keys``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, cast

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
from llmrouter.httpclient import ClientTLS, agent_for
from llmrouter.protocol import (
    DEFAULT_PAD,
    ChatRequest,
    Delta,
    Done,
    ErrorChunk,
    KeyDocument,
    KeyDocumentError,
    Message,
    ProtocolError,
    RequestState,
    ResponseOpener,
    StreamError,
    b64u_decode,
    b64u_encode,
    seal_request,
    verify_key_document,
)

__all__ = ["ChatError", "Client", "load_device_key", "main"]

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
        """Send one request; on ``key_unknown`` refetch the key document and retry once."""
        for attempt in (0, 1):
            if attempt:
                await self.fetch_keys()
            envelope, state = await self.seal(request)
            try:
                return await self.post(envelope, state, on_delta)
            except ChatError as e:
                if e.code != "key_unknown" or attempt:
                    raise
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


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# The command line.


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("LLMROUTER_URL", DEFAULT_URL),
        help="router URL: http(s)://host:port or unix:/path.sock (env LLMROUTER_URL)",
    )
    common.add_argument(
        "--pin",
        metavar="SIGNING_KEY",
        help="refuse a key document not signed by this Ed25519 key (base64url)",
    )
    common.add_argument(
        "--device-key",
        metavar="FILE",
        type=Path,
        help="use auth mode with the X25519 device key in FILE (created 0600 on first use)",
    )
    request = argparse.ArgumentParser(add_help=False)
    request.add_argument("prompt", help="the user message")
    request.add_argument("--system", help="a system message sent before the prompt")
    request.add_argument("--max-tokens", type=int)
    request.add_argument("--temperature", type=float)
    request.add_argument("--top-p", type=float)

    parser = argparse.ArgumentParser(prog="llmrouter-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "chat", parents=[common, request], help="send a prompt, print tokens as they stream"
    )
    seal = sub.add_parser(
        "seal", parents=[common, request], help="print a sealed request envelope (for curl)"
    )
    seal.add_argument("--state", type=Path, required=True, help="file to keep the response secret")
    open_ = sub.add_parser("open", parents=[common], help="decrypt a saved or piped response")
    open_.add_argument("--state", type=Path, required=True, help="the file written by seal")
    open_.add_argument("input", nargs="?", default="-", help="the SSE response (default stdin)")
    sub.add_parser("keys", parents=[common], help="fetch, verify and print the key document")
    return parser


def _request(args: argparse.Namespace) -> ChatRequest:
    messages = [Message("system", args.system)] if args.system else []
    messages.append(Message("user", args.prompt))
    return ChatRequest(tuple(messages), args.max_tokens, args.temperature, args.top_p)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _run(reactor: Any, args: argparse.Namespace) -> int:
    pin = b64u_decode(args.pin, "pin", 32) if args.pin else None
    device_key = load_device_key(args.device_key) if args.device_key else None
    client = Client(reactor, args.url, pin=pin, device_key=device_key)
    if args.command == "keys":
        doc = await client.fetch_keys()
        keys = [k.to_json() for k in doc.keys]
        signing_key = b64u_encode(doc.signing_key)
        _write(json.dumps({"signing_key": signing_key, "issued_at": doc.issued_at, "keys": keys}))
        _write("\n")
        return 0
    if args.command == "seal":
        envelope, state = await client.seal(_request(args))
        _write_private(args.state, json.dumps(state.to_json()))
        _write(json.dumps(envelope) + "\n")
        return 0
    done = await client.chat(_request(args), _write)
    _write("\n")
    sys.stderr.write(
        f"[finish_reason={done.finish_reason} prompt_tokens={done.prompt_tokens} "
        f"completion_tokens={done.completion_tokens}]\n"
    )
    return 0


def _open(args: argparse.Namespace) -> int:
    """Decrypt a response stream without a reactor: it is a pure function of bytes."""
    try:
        state = RequestState.from_json(json.loads(args.state.read_text()))
    except (OSError, ValueError, ProtocolError):
        raise ChatError("bad_state", "cannot read the state file written by seal") from None
    opener = ResponseOpener(state)
    stream = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    source = cast(io.BufferedReader, stream)
    with source:
        # read1 returns what is available, so a piped `curl -N` stream prints as it arrives.
        while chunk := source.read1(65536):
            try:
                items = opener.feed(chunk)
            except StreamError as e:
                raise ChatError("bad_stream", str(e)) from None
            for item in items:
                if isinstance(item, Delta):
                    _write(item.text)
    try:
        final = opener.close()
    except StreamError as e:
        raise ChatError("truncated", str(e)) from None
    _write("\n")
    if isinstance(final, ErrorChunk):
        raise ChatError(final.code, final.message)
    return 0


def _fail(e: ChatError) -> int:
    sys.stderr.write(f"llmrouter-client: {e.code}: {e.message}\n")
    return 1


async def _guarded(reactor: Any, args: argparse.Namespace) -> int:
    try:
        return await _run(reactor, args)
    except ChatError as e:
        return _fail(e)
    except (ConnectError, ResponseFailed, ResponseNeverReceived) as e:
        return _fail(ChatError("unreachable", f"cannot talk to the router ({type(e).__name__})"))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "open":
        try:
            return _open(args)
        except ChatError as e:
            return _fail(e)
    from twisted.internet import task

    result = [1]

    async def go(reactor: Any) -> None:
        result[0] = await _guarded(reactor, args)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    except SystemExit:
        pass
    return result[0]


if __name__ == "__main__":
    sys.exit(main())
