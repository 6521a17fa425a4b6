"""Coverage-guided fuzzing (atheris) of every parser that reads what a peer sent.

    python -m tests.fuzz.targets TARGET [libFuzzer options] [CORPUS_DIR ...]

Targets: ``envelope`` (the router's request envelope), ``plaintext`` (a decrypted request),
``sse`` (the event-stream parser and the client's response opener), ``keydoc`` (the client's
key-document verifier, with and without a valid signature over the fuzzed payload), and
``guardrails`` (the inference daemon's request validation and the grammars it makes of JSON
schemas and forced tool calls), and ``proxy`` (the local OpenAI proxy's request mapping, from an
OpenAI body to a protocol v1.1 request). Each may refuse its input only with
the error type it documents; any other exception (a crash, a ``TypeError`` that would be a 500)
ends the run with a non-zero status and the input saved. ``make fuzz`` runs each for a few
seconds from the seed corpus in ``tests/fuzz/corpus/``; docs/security-testing.md has the longer
command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    import nacl.signing

    from inference import grammars, guardrails
    from llmrouter import protocol
    from llmrouter.client import proxy as openai_proxy
    from llmrouter.sse import SSEError, SSEParser

NOW = 1_767_225_600
_SIGNING = nacl.signing.SigningKey(bytes(range(32)))
_STATE = protocol.RequestState(bytes(32), bytes(range(32)))


def envelope(data: bytes) -> None:
    try:
        protocol.parse_envelope(data)
    except protocol.ProtocolError:
        pass


def plaintext(data: bytes) -> None:
    try:
        protocol.parse_chat_request(data)
    except protocol.ProtocolError:
        pass


def sse(data: bytes) -> None:
    """The same bytes split at a position the input picks, through both parsers."""
    split = data[0] if data else 0
    parser = SSEParser(max_line=4096, max_event=8192)
    try:
        for piece in (data[1 : 1 + split], data[1 + split :]):
            for name, payload in parser.feed(piece):
                assert isinstance(name, str) and isinstance(payload, str)
    except SSEError:
        pass
    opener = protocol.ResponseOpener(_STATE, max_line=4096)
    try:
        opener.feed(data)
        opener.close()
    except protocol.StreamError:
        pass


def keydoc(data: bytes) -> None:
    """As sent (a signature almost never verifies), then signed so the payload is parsed."""
    for body in (data, _signed(data)):
        try:
            protocol.verify_key_document(body, now=NOW)
        except protocol.KeyDocumentError:
            pass


def _signed(payload: bytes) -> bytes:
    return protocol.json.dumps(
        {
            "payload": protocol.b64u_encode(payload),
            "signature": protocol.b64u_encode(_SIGNING.sign(payload).signature),
            "signing_key": protocol.b64u_encode(bytes(_SIGNING.verify_key)),
        }
    ).encode()


def guardrail(data: bytes) -> None:
    """Both request parsers, then the grammars a chat request's JSON schema and forced tool call
    become (the daemon answers ``unsupported_schema`` for a SchemaError)."""
    try:
        body = guardrails.parse_json(data)
    except guardrails.APIError as e:
        assert 400 <= e.status < 500, e.status
        return
    try:
        guardrails.parse_completion(body, max_tokens_cap=256)
    except guardrails.APIError as e:
        assert 400 <= e.status < 500, e.status
    try:
        chat = guardrails.parse_chat(body, max_tokens_cap=256)
    except guardrails.APIError as e:
        assert 400 <= e.status < 500, e.status
        return
    try:
        if chat.response_format == "json_schema":
            grammars.json_schema_grammar(chat.schema)
        if chat.tools.forced:
            for style in ("hermes", "llama3", "harmony", "generic"):
                grammars.tool_call_grammar(chat.tools.forced, style, chat.tools.parallel)
    except grammars.SchemaError:
        pass


def proxy(data: bytes) -> None:
    """What any local OpenAI client may send the proxy: refused only as an OpenAI 4xx error,
    and what it accepts is a request the router's own checks accept."""
    try:
        request, _ = openai_proxy.to_request(data, "llmrouter")
    except openai_proxy.OpenAIError as e:
        assert 400 <= e.status < 500, e.status
        assert isinstance(e.body()["error"]["message"], str)
        return
    protocol.parse_chat_request(protocol.json.dumps(request.to_plaintext()).encode())


TARGETS: dict[str, Callable[[bytes], None]] = {
    "envelope": envelope,
    "plaintext": plaintext,
    "sse": sse,
    "keydoc": keydoc,
    "guardrails": guardrail,
    "proxy": proxy,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.targets {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
