"""``llmrouter-client``: chat (one prompt, or an interactive conversation), the curl-friendly
``seal``/``open`` pair, ``keys``, ``models`` and ``proxy``.

Protocol 2 (the blind router) unless ``--protocol 1`` (or ``LLMROUTER_PROTOCOL=1``) asks for
v1.1; the pin is the operator's key in protocol 2 and the router's signing key in protocol 1.

A thin layer over :class:`llmrouter.client.library.Client` (and, for ``proxy``,
:mod:`llmrouter.client.proxy`). The answer goes to stdout; reasoning (``--show-reasoning``)
goes to stderr, dimmed on a terminal, so a piped answer stays clean.
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

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError, ConnectError
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from llmrouter.chat import RequestError, parse_request
from llmrouter.client import proxy as proxy_module
from llmrouter.client.library import (
    DEFAULT_URL,
    PROTOCOLS,
    ChatError,
    Client,
    Conversation,
    Reply,
    error_from_chunk,
    load_device_key,
    write_private,
)
from llmrouter.pinarg import pins_attached
from llmrouter.protocol import (
    ChatRequest,
    Delta,
    ErrorChunk,
    KeyDocument,
    Message,
    ProtocolError,
    Reasoning,
    RequestState,
    ResponseOpener,
    StreamError,
    b64u_decode,
    b64u_encode,
)
from llmrouter.v2 import response as v2response
from llmrouter.v2.certs import KeyDocumentV2
from llmrouter.v2.request import ClientState

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
        "--protocol",
        type=int,
        choices=PROTOCOLS,
        default=_env_protocol(),
        help="2 (default): sealed to the inference nodes, the router cannot read the chat; 1:"
        " protocol v1.1, which the router decrypts (env LLMROUTER_PROTOCOL)",
    )
    common.add_argument(
        "--pin",
        metavar="KEY",
        default=os.environ.get("LLMROUTER_PIN") or None,
        help="the Ed25519 key to trust, base64url (env LLMROUTER_PIN): in protocol 2 the"
        " operator's key (`llmrouter-keys operator-pin FILE`), in protocol 1 the router's"
        " signing key (`llmrouter-keys pin`)",
    )
    common.add_argument(
        "--tofu",
        metavar="FILE",
        type=Path,
        help="protocol 1 only: trust on first use, keep the first signing key seen in FILE"
        " (created 0600) and refuse any other later",
    )
    common.add_argument(
        "--device-key",
        metavar="FILE",
        type=Path,
        help="use auth mode with the X25519 device key in FILE (created 0600 on first use)",
    )
    request = argparse.ArgumentParser(add_help=False)
    request.add_argument("--system", help="a system message sent before the prompt")
    request.add_argument("--model", help="the model to use (llmrouter-client models lists them)")
    request.add_argument("--max-tokens", type=int)
    request.add_argument("--temperature", type=float)
    request.add_argument("--top-p", type=float)
    request.add_argument("--seed", type=int)
    request.add_argument(
        "--json-schema",
        metavar="FILE",
        type=Path,
        help="answer with JSON valid against the JSON Schema in FILE",
    )
    request.add_argument(
        "--show-reasoning",
        action="store_true",
        help="ask for the model's reasoning and print it to stderr (dimmed on a terminal)",
    )

    parser = argparse.ArgumentParser(prog="llmrouter-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser(
        "chat",
        parents=[common, request],
        help="send a prompt and print the answer as it streams; without a prompt, an"
        " interactive conversation (history kept here only, an empty line or EOF ends it)",
    )
    chat.add_argument("prompt", nargs="?", help="the user message")
    seal = sub.add_parser(
        "seal",
        parents=[common, request],
        help="write a sealed request to stdout, for curl (protocol 2: binary, redirect it to a"
        " file; protocol 1: a JSON envelope)",
    )
    seal.add_argument("prompt", help="the user message")
    seal.add_argument("--state", type=Path, required=True, help="file to keep the response secret")
    open_ = sub.add_parser("open", parents=[common], help="decrypt a saved or piped response")
    open_.add_argument("--state", type=Path, required=True, help="the file written by seal")
    open_.add_argument("input", nargs="?", default="-", help="the SSE response (default stdin)")
    sub.add_parser("keys", parents=[common], help="fetch, verify and print the key document")
    sub.add_parser("models", parents=[common], help="list the models the router serves")
    proxy = sub.add_parser(
        "proxy",
        parents=[common],
        help="serve an OpenAI-compatible API on loopback, sealing every request to the router",
    )
    proxy.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        help="HOST:PORT (default 127.0.0.1:8000; port 0: any), or unix:/path.sock (created 0600)",
    )
    proxy.add_argument(
        "--token-file",
        metavar="FILE",
        type=Path,
        default=_config_dir() / "proxy-token",
        help="the bearer token clients must send as their API key, created (random, 0600) on"
        " first start and printed with the start message (default %(default)s)",
    )
    proxy.add_argument(
        "--no-token",
        action="store_true",
        help="ask no token: only with a unix: --listen (no web page can reach a UNIX socket;"
        " its 0600 mode keeps other users out)",
    )
    proxy.add_argument(
        "--allow-remote", action="store_true", help="allow a --listen address that is not loopback"
    )
    proxy.add_argument(
        "--model-name",
        default=proxy_module.DEFAULT_MODEL,
        help="the model id that stands for the router's default model (default"
        f" {proxy_module.DEFAULT_MODEL}); /v1/models lists it and the router's models",
    )
    return parser


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "llmrouter"


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the options ask for, checked as the router would check them."""
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "model": args.model,
        "seed": args.seed,
    }
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_bytes())
        except (OSError, ValueError):
            raise ChatError("bad_schema", "--json-schema: cannot read a JSON file") from None
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in args.json_schema.stem)
        json_schema = {"name": name[:64] or "response", "schema": schema}
        params["response_format"] = {"type": "json_schema", "json_schema": json_schema}
    if args.show_reasoning:
        params["include_reasoning"] = True
    params = {name: value for name, value in params.items() if value is not None}
    try:  # the same checks the router runs, before anything is sealed
        parsed = parse_request({"messages": [{"role": "user", "content": ""}], **params})
    except RequestError as e:
        raise ChatError("bad_request", str(e)) from None
    return {name: getattr(parsed, name) for name in params}


def _request(args: argparse.Namespace, prompt: str) -> ChatRequest:
    messages = [Message("system", args.system)] if args.system else []
    messages.append(Message("user", prompt))
    return ChatRequest(tuple(messages), **_params(args))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _env_protocol() -> int:
    text = os.environ.get("LLMROUTER_PROTOCOL") or "2"
    return int(text) if text in ("1", "2") else 0  # 0: refused in main()


def _pin(text: str) -> bytes:
    try:
        return b64u_decode(text, "pin", 32)
    except ProtocolError:
        raise ChatError("bad_pin", "--pin must be an Ed25519 public key in base64url") from None


def _listen(args: argparse.Namespace) -> tuple[str, int] | str:
    """``(host, port)``, or the path of a UNIX socket."""
    listen: str = args.listen
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if not path:
            raise ChatError("bad_listen", "--listen unix: needs a path")
        return path
    if args.no_token:
        raise ChatError(
            "bad_listen",
            "--no-token only with a unix: --listen: any web page the user visits can send"
            " requests to a TCP port on this machine",
        )
    try:
        return proxy_module.parse_listen(listen, args.allow_remote)
    except ValueError as e:
        raise ChatError("bad_listen", str(e)) from None


def _token(args: argparse.Namespace) -> bytes | None:
    if args.no_token:
        return None
    try:
        args.token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return proxy_module.load_token(args.token_file)
    except OSError as e:
        raise ChatError("bad_token", f"cannot use {args.token_file}: {e.strerror}") from None


async def _proxy(
    reactor: Any, client: Client, listen: tuple[str, int] | str, args: argparse.Namespace
) -> int:
    """Check everything before listening: a bad address, pin or key document never serves a
    request (the key document is verified, and with --tofu its key kept, first)."""
    token = _token(args)
    await client.fetch_keys()
    resource = proxy_module.ProxyResource(client, args.model_name)
    site = proxy_module.ProxySite(resource)
    if isinstance(listen, str):
        await UNIXServerEndpoint(reactor, listen, mode=0o600).listen(site)
        resource.access = proxy_module.Access.for_unix(token)
        where = f"unix:{listen}"
    else:
        host, port = listen
        endpoint_type = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        listening = await endpoint_type(reactor, port, interface=host).listen(site)
        address = listening.getHost()
        resource.access = proxy_module.Access.for_tcp(address.host, address.port, token or b"")
        shown = f"[{address.host}]" if ":" in address.host else address.host
        where = f"http://{shown}:{address.port}/v1"
    _write(f"llmrouter-client proxy: {where} -> {args.url}\n")
    if token is not None:
        _write(f"API key (Authorization: Bearer): {token.decode()} (in {args.token_file})\n")
    await Deferred()  # until SIGINT or SIGTERM stops the reactor
    return 0


class _Printer:
    """The answer to stdout; reasoning (if shown) to stderr, dimmed on a terminal, and a line
    break between the two when the answer starts."""

    def __init__(self, show_reasoning: bool) -> None:
        self.on_reasoning = self._reasoning if show_reasoning else None
        self._dim = sys.stderr.isatty()
        self._thinking = False
        self.printed = False

    def _reasoning(self, text: str) -> None:
        self._thinking = True
        sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if self._dim else text)
        sys.stderr.flush()

    def answer(self, text: str) -> None:
        if self._thinking:
            self._thinking = False
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.printed = True
        _write(text)


def _finish(reply: Reply) -> None:
    done = reply.done
    sys.stderr.write(
        f"[finish_reason={done.finish_reason} prompt_tokens={done.prompt_tokens} "
        f"completion_tokens={done.completion_tokens}]\n"
    )


async def _converse(client: Client, args: argparse.Namespace) -> int:
    """Interactive mode: one line per turn; the history lives in this process only. A turn that
    fails is reported and left out of the history; the conversation goes on."""
    conversation = Conversation(client, system=args.system, **_params(args))
    interactive = sys.stdin.isatty()
    if interactive:
        sys.stderr.write("llmrouter-client: chatting; an empty line or Ctrl-D ends it\n")
    status = 0
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = await threads.deferToThread(sys.stdin.readline)
        if not line.strip():
            return status
        printer = _Printer(args.show_reasoning)
        try:
            reply = await conversation.say(
                line.rstrip("\n"), printer.answer, on_reasoning=printer.on_reasoning
            )
        except ChatError as e:
            if printer.printed:
                _write("\n")  # the part of the answer that came before the failure
            status = _fail(e)
            continue
        _write("\n")
        _finish(reply)


def _key_summary(doc: KeyDocument | KeyDocumentV2) -> dict[str, Any]:
    """What ``keys`` prints: the verified document, public keys only."""
    if isinstance(doc, KeyDocument):
        keys = [k.to_json() for k in doc.keys]
        return {"signing_key": b64u_encode(doc.signing_key), "issued_at": doc.issued_at,
                "keys": keys}  # fmt: skip
    nodes = [
        {
            "name": node.name,
            "models": list(node.models),
            "keys": [k.to_json() for k in node.keys],
            "attestations": [a["format"] for a in node.attestations],
        }
        for node in doc.nodes
    ]
    return {
        "protocol": 2,
        "router": doc.router.name,
        "signing_key": b64u_encode(doc.signing_key),
        "issued_at": doc.issued_at,
        "default_model": doc.default_model,
        "keys": [k.to_json() for k in doc.router_keys],
        "nodes": nodes,
    }


async def _seal(client: Client, args: argparse.Namespace) -> int:
    if client.protocol == 2 and sys.stdout.isatty():
        raise ChatError(
            "binary_output", "a protocol 2 request is binary: redirect it to a file (> req.bin)"
        )
    envelope, state = await client.seal(_request(args, args.prompt))
    try:
        write_private(args.state, json.dumps(state.to_json()))
    except OSError as e:
        raise ChatError("bad_state", f"cannot write the state file: {e.strerror}") from None
    if isinstance(envelope, bytes):
        sys.stdout.buffer.write(envelope)
        sys.stdout.buffer.flush()
    else:
        _write(json.dumps(envelope) + "\n")
    return 0


async def _run(reactor: Any, args: argparse.Namespace) -> int:
    listen = _listen(args) if args.command == "proxy" else None  # before any file is made
    pin = _pin(args.pin) if args.pin else None
    device_key = load_device_key(args.device_key) if args.device_key else None
    client = Client(
        reactor, args.url, pin=pin, tofu=args.tofu, device_key=device_key, protocol=args.protocol
    )
    if listen is not None:
        return await _proxy(reactor, client, listen, args)
    if args.command == "keys":
        _write(json.dumps(_key_summary(await client.fetch_keys())) + "\n")
        return 0
    if args.command == "models":
        for name in await client.models():
            _write(name + "\n")
        return 0
    if args.command == "seal":
        return await _seal(client, args)
    if args.prompt is None:
        return await _converse(client, args)
    printer = _Printer(args.show_reasoning)
    request = _request(args, args.prompt)
    reply = await client.complete(request, printer.answer, on_reasoning=printer.on_reasoning)
    _write("\n")
    _finish(reply)
    return 0


def _open(args: argparse.Namespace) -> int:
    """Decrypt a response stream without a reactor: it is a pure function of bytes."""
    opener = _opener(args.state)
    stream = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    source = cast(io.BufferedReader, stream)
    with source:
        # read1 returns what is available, so a piped `curl -N` stream prints as it arrives.
        first = True
        while chunk := source.read1(65536):
            if first and chunk.lstrip().startswith(b"{"):
                _plain_refusal(chunk + source.read(65536))  # the router refused it in plain
            first = False
            try:
                items = opener.feed(chunk)
            except StreamError as e:
                raise ChatError("bad_stream", str(e)) from None
            for item in items:
                if isinstance(item, Delta):
                    _write(item.text)
                elif isinstance(item, Reasoning):
                    sys.stderr.write(item.text)
    try:
        final = opener.close()
    except StreamError as e:
        raise ChatError("truncated", str(e)) from None
    _write("\n")
    if isinstance(final, ErrorChunk):
        raise error_from_chunk(final)
    return 0


def _opener(path: Path) -> ResponseOpener | v2response.ResponseOpener:
    """The opener for the state file ``seal`` wrote (its ``v`` says the protocol)."""
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("v") == "2":
            return v2response.ResponseOpener(ClientState.from_json(doc))
        return ResponseOpener(RequestState.from_json(doc))
    except (OSError, ValueError, ProtocolError):
        raise ChatError("bad_state", "cannot read the state file written by seal") from None


def _plain_refusal(body: bytes) -> None:
    """A JSON error instead of a stream: the router refused the request before opening it."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise ChatError("bad_stream", "the answer is neither a stream nor an error") from None
    raise ChatError(code, message)


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
    except CannotListenError:
        return _fail(ChatError("cannot_listen", "cannot listen on the --listen address"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(pins_attached(sys.argv[1:] if argv is None else argv, ["--pin"]))
    if args.protocol not in PROTOCOLS:
        parser.error("LLMROUTER_PROTOCOL must be 1 or 2")
    if args.command != "open" and args.protocol == 2 and args.tofu is not None:
        parser.error("--tofu is protocol 1 only (--protocol 1): protocol 2 needs --pin")
    if args.command != "open" and args.protocol == 2 and not args.pin:
        parser.error(
            "protocol 2 trusts the operator's key: --pin KEY (or LLMROUTER_PIN;"
            " `llmrouter-keys operator-pin FILE` prints it). With --protocol 1 the router's own"
            " signing key (--pin SIGNING_KEY) or --tofu FILE is trusted instead"
        )
    if args.command != "open" and not args.pin and args.tofu is None:
        parser.error(
            "the router's signing key must be trusted explicitly: --pin SIGNING_KEY (or"
            " LLMROUTER_PIN; `llmrouter-keys pin` prints it), or --tofu FILE to trust the first"
            " key seen and refuse any other later"
        )
    if args.command != "open" and args.pin and args.tofu is not None:
        parser.error("--pin (or LLMROUTER_PIN) and --tofu exclude each other: give one")
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
