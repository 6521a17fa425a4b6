"""Coverage-guided fuzzing (atheris) of every parser that reads what a peer sent.

    python -m tests.fuzz.targets TARGET [libFuzzer options] [CORPUS_DIR ...]

Targets: ``envelope`` (the router's request envelope), ``plaintext`` (a decrypted request),
``sse`` (the event-stream parser and the client's response opener), ``keydoc`` (the client's
key-document verifier, with and without a valid signature over the fuzzed payload),
``guardrails`` (the inference daemon's request validation and the grammars it makes of JSON
schemas and forced tool calls), ``proxy`` (the local OpenAI proxy's request mapping, from an
OpenAI body to a protocol v1.1 request), and for protocol v2: ``v2keydoc`` (the v2 key document,
its certificates and node key sets, each also validly signed around the fuzzed payload),
``v2request`` (the router's outer header and outer plaintext, the node's forwarded request and
inner plaintext, each also validly sealed around the input) and ``v2stream`` (the client's v2
opener, and the input as a validly sealed router event). Each may refuse its input only with
the error type it documents; any other exception (a crash, a ``TypeError`` that would be a 500)
ends the run with a non-zero status and the input saved. ``make fuzz`` runs each for a few
seconds from the seed corpus in ``tests/fuzz/corpus/``; docs/security-testing.md has the longer
command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import atheris

# Coverage is collected in our own code and llama-cpp-python's JSON-schema-to-grammar converter
# (which the guardrails call on what a client sent): only those are instrumented. Everything
# else they import, Twisted and the rest of llama_cpp above all, took some 20 s per target to
# instrument and is not what is fuzzed.
with atheris.instrument_imports(include=["llmrouter", "inference", "llama_cpp.llama_grammar"]):
    import nacl.signing

    from inference import grammars, guardrails
    from llmrouter import hpke, protocol
    from llmrouter.client import proxy as openai_proxy
    from llmrouter.sse import SSEError, SSEParser
    from llmrouter.v2 import certs as v2certs
    from llmrouter.v2 import request as v2request_module
    from llmrouter.v2 import response as v2response

NOW = 1_767_225_600
_SIGNING = nacl.signing.SigningKey(bytes(range(32)))
_STATE = protocol.RequestState(bytes(32), bytes(range(32)))

# Protocol v2: an operator, a certified router and node, all with fixed keys.
_OPERATOR = nacl.signing.SigningKey(bytes(range(1, 33)))
_ROUTER_SIGNING = nacl.signing.SigningKey(bytes(range(2, 34)))
_NODE_SIGNING = nacl.signing.SigningKey(bytes(range(3, 35)))
_OUTER = hpke.derive_key_pair(bytes(range(4, 36)))
_NODE_KEY = hpke.derive_key_pair(bytes(range(5, 37)))
_DEVICE = hpke.derive_key_pair(bytes(range(6, 38)))


def _v2_certificate(
    type: str, name: str, key: nacl.signing.SigningKey, models: tuple[str, ...] = ()
) -> dict[str, str]:
    return v2certs.issue_certificate(
        bytes(_OPERATOR),
        type=type,
        name=name,
        key=bytes(key.verify_key),
        models=models,
        not_before=NOW - 3600,
        not_after=NOW + 30 * 86400,
    )


_ROUTER_CERT = _v2_certificate("router", "router-1", _ROUTER_SIGNING)
_NODE_CERT = _v2_certificate("node", "node-a", _NODE_SIGNING, ("m1",))
_V2_KEYS = [
    protocol.PublishedKey("01", _OUTER.pk, "current", NOW - 60, NOW + 86400),
    protocol.PublishedKey("02", _DEVICE.pk, "next", NOW + 86400, NOW + 2 * 86400),
]
_NODE_KEYS = [
    protocol.PublishedKey("0a", _NODE_KEY.pk, "current", NOW - 60, NOW + 86400),
    protocol.PublishedKey("0b", _DEVICE.pk, "next", NOW + 86400, NOW + 2 * 86400),
]
_V2_STATE = v2request_module.ClientState(
    bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
)


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


def v2keydoc(data: bytes) -> None:
    """The input as a key document; as the router-signed payload of one; as the node-signed
    payload of a certified node's key set in a genuine document."""
    entry = {
        "certificate": _NODE_CERT,
        "keys": _v2_signed(data, _NODE_SIGNING, v2certs.NODE_KEYS_CONTEXT),
        "attestations": [],
    }
    for body in (
        data,
        json.dumps(
            {
                **_v2_signed(data, _ROUTER_SIGNING, v2certs.KEY_DOCUMENT_CONTEXT),
                "certificate": _ROUTER_CERT,
            }
        ).encode(),
        v2certs.build_key_document_v2(_ROUTER_SIGNING, _ROUTER_CERT, _V2_KEYS, [entry], "m1", NOW),
    ):
        try:
            v2certs.verify_key_document_v2(body, bytes(_OPERATOR.verify_key), now=NOW)
        except protocol.KeyDocumentError:
            pass


def _v2_signed(payload: bytes, key: nacl.signing.SigningKey, context: bytes) -> dict[str, str]:
    signature = key.sign(v2certs.signed_message(context, payload)).signature
    return {
        "payload": protocol.b64u_encode(payload),
        "signature": protocol.b64u_encode(signature),
        "signing_key": protocol.b64u_encode(bytes(key.verify_key)),
    }


def v2request(data: bytes) -> None:
    """The router's view (the input as a body, and sealed as an outer plaintext), then the
    node's (the input as a forwarded request, and as the inner plaintext of a genuine wrap)."""
    hdr = v2request_module.outer_header("01")
    enc, ctx = hpke.setup_s(
        _OUTER.pk, v2request_module.OUTER_INFO + b"\x00" + hdr, ephemeral=_DEVICE
    )
    for body in (data, hdr + enc + ctx.seal(b"", data)):
        try:
            v2request_module.parse_outer_header(body)
            v2request_module.open_outer(body, _OUTER.sk)
        except protocol.ProtocolError:
            pass
    try:
        v2request_module.open_node_request(v2request_module.parse_node_request(data), _NODE_KEY.sk)
    except protocol.ProtocolError:
        pass
    bound = v2request_module.binding(NOW, "m1", _DEVICE.pk)
    key, nonce, _ = v2request_module.content_keys(bytes(32))
    wrap_enc, wrap_ctx = hpke.setup_s(
        _NODE_KEY.pk, v2request_module.WRAP_INFO, sk_s=_DEVICE.sk, ephemeral=_OUTER
    )
    inner = v2request_module.NodeRequest(
        NOW,
        "m1",
        _DEVICE.pk,
        "0a",
        wrap_enc,
        wrap_ctx.seal(bound, bytes(32)),
        hpke.aead_seal(key, nonce, bound, data),
        "node-a",
    )
    try:
        v2request_module.open_node_request(inner, _NODE_KEY.sk)
    except protocol.ProtocolError:
        pass


def v2stream(data: bytes) -> None:
    """The client's v2 opener on the input (split where it says), and on the input sealed as
    the plaintext of a genuine router event."""
    split = data[0] if data else 0
    opener = v2response.ResponseOpener(_V2_STATE, max_line=4096)
    try:
        opener.feed(data[1 : 1 + split])
        opener.feed(data[1 + split :])
        opener.close()
    except protocol.StreamError:
        pass
    keys = protocol.ResponseKeys(_V2_STATE.router_secret, _V2_STATE.outer_enc, bytes(32))
    event = json.dumps(
        {
            "response_nonce": protocol.b64u_encode(bytes(32)),
            "sealed": protocol.b64u_encode(keys.seal(b"final", data)),
        }
    )
    try:
        v2response.open_router_event(_V2_STATE.router_secret, _V2_STATE.outer_enc, event)
    except protocol.StreamError:
        pass


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
    "v2keydoc": v2keydoc,
    "v2request": v2request,
    "v2stream": v2stream,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.targets {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
