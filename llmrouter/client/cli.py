"""``llmrouter-client``: chat, the curl-friendly ``seal``/``open`` pair and ``keys``.

A thin layer over :class:`llmrouter.client.library.Client`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from llmrouter.client.library import (
    DEFAULT_URL,
    ChatError,
    Client,
    load_device_key,
    write_private,
)
from llmrouter.protocol import (
    ChatRequest,
    Delta,
    ErrorChunk,
    Message,
    ProtocolError,
    RequestState,
    ResponseOpener,
    StreamError,
    b64u_decode,
    b64u_encode,
)

__all__ = ["main"]


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
        default=os.environ.get("LLMROUTER_PIN") or None,
        help="trust only key documents signed by this Ed25519 key, base64url (env LLMROUTER_PIN;"
        " `llmrouter-keys list` prints it)",
    )
    common.add_argument(
        "--tofu",
        metavar="FILE",
        type=Path,
        help="trust on first use: keep the first signing key seen in FILE (created 0600) and"
        " refuse any other later",
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
    try:
        pin = b64u_decode(args.pin, "pin", 32) if args.pin else None
    except ProtocolError:
        raise ChatError("bad_pin", "--pin is not a base64url Ed25519 public key") from None
    device_key = load_device_key(args.device_key) if args.device_key else None
    client = Client(reactor, args.url, pin=pin, tofu=args.tofu, device_key=device_key)
    if args.command == "keys":
        doc = await client.fetch_keys()
        keys = [k.to_json() for k in doc.keys]
        signing_key = b64u_encode(doc.signing_key)
        _write(json.dumps({"signing_key": signing_key, "issued_at": doc.issued_at, "keys": keys}))
        _write("\n")
        return 0
    if args.command == "seal":
        envelope, state = await client.seal(_request(args))
        try:
            write_private(args.state, json.dumps(state.to_json()))
        except OSError as e:
            raise ChatError("bad_state", f"cannot write the state file: {e.strerror}") from None
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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "open" and not args.pin and args.tofu is None:
        parser.error(
            "the router's signing key must be trusted explicitly: --pin SIGNING_KEY (or"
            " LLMROUTER_PIN; `llmrouter-keys list` prints it), or --tofu FILE to trust the first"
            " key seen and refuse any other later"
        )
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
