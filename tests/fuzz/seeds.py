"""Writes the seed corpus in ``tests/fuzz/corpus/`` (run once; the files are committed).

python -m tests.fuzz.seeds
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nacl.signing

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.v2 import certs as v2certs
from llmrouter.v2 import request as v2request
from llmrouter.v2 import response as v2response
from tests.fuzz import targets as t
from tests.fuzz.targets import _STATE, NOW

CORPUS = Path(__file__).resolve().parent / "corpus"


def _write(target: str, *seeds: bytes) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main() -> None:
    key = p.PublishedKey("0a", hpke.derive_key_pair(bytes(32)).pk, "current", NOW - 60, NOW + 90000)
    upcoming = p.PublishedKey("0b", hpke.derive_key_pair(bytes([1] * 32)).pk, "next", NOW, NOW)
    request = p.ChatRequest.from_prompt("Hello!", max_tokens=16, temperature=0.5, stop=("\n",))
    device = hpke.derive_key_pair(bytes([2] * 32))
    base, _ = p.seal_request(key, request, NOW, rid=bytes(16), ephemeral=device)
    auth, _ = p.seal_request(key, request, NOW, device, rid=bytes(16), ephemeral=device)
    _write(
        "envelope",
        json.dumps(base.to_json()).encode(),
        json.dumps(auth.to_json()).encode(),
        b'{"v": 1, "kid": "0a", "mode": "psk"}',
    )
    _write(
        "plaintext",
        json.dumps(request.to_plaintext()).encode() + b"   ",
        b'{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],'
        b'"top_p":0.9,"stop":["a","b"]}',
        b'{"messages":[{"role":["user"],"content":"x"}]}',
        # protocol v1.1: tools and a tool round trip, structured output, logprobs, reasoning
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"w"}]},'
        b'{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",'
        b'"function":{"name":"f","arguments":"{}"}}]},'
        b'{"role":"tool","content":"r","tool_call_id":"c1"}],'
        b'"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object",'
        b'"properties":{"a":{"type":"string","maxLength":8}},"required":["a"]}}}],'
        b'"tool_choice":{"type":"function","function":{"name":"f"}},'
        b'"parallel_tool_calls":false,"logprobs":true,"top_logprobs":2,"seed":1,'
        b'"include_reasoning":true,"reasoning_effort":"low","max_completion_tokens":8}',
        b'{"messages":[{"role":"user","content":"u"}],"response_format":{"type":"json_schema",'
        b'"json_schema":{"name":"n","strict":true,"schema":{"type":"array","items":'
        b'{"$ref":"#/$defs/x"},"$defs":{"x":{"type":"string","pattern":"a{1,3}"}}}}},'
        b'"presence_penalty":0.5,"frequency_penalty":-0.5}',
    )
    sealer = p.ResponseSealer(_STATE.secret, _STATE.enc, response_nonce=bytes(32))
    stream = sealer.init_event() + sealer.delta("Hi") + p.KEEPALIVE + sealer.done("stop", 3, 1)
    logprobs = [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]
    sealer = p.ResponseSealer(_STATE.secret, _STATE.enc, response_nonce=bytes(32))
    v11 = (
        sealer.init_event()
        + sealer.reasoning("hmm", logprobs)
        + sealer.tool_call(0, "c1", "f", '{"a":')
        + sealer.tool_call(0, None, None, '"x"}')
        + sealer.delta("Hi", logprobs)
        + sealer.done("tool_calls", 3, 4)
    )
    _write(
        "sse",
        b"\x10" + stream,
        b"\x00event: x\r\ndata: 1\rdata: 2\n\n: c\n\n",
        bytes([len(v11) // 2 % 256]) + v11,
    )
    document = p.build_key_document([key, upcoming], nacl.signing.SigningKey(bytes(32)), NOW)
    payload = p.b64u_decode(json.loads(document)["payload"], "payload")
    _write("keydoc", document, payload)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = '{"city":"Oslo"}'
    city = {"type": "string", "enum": ["Oslo", "Paris"]}
    unit = {"type": "string", "pattern": "^[a-z]{1,9}$"}
    weather = {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": city, "unit": unit},
            "required": ["city"],
        },
    }
    person = {
        "name": "p",
        "strict": True,
        "schema": {
            "$defs": {"tag": {"enum": ["x", "y"]}},
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 10},
                "age": {"type": "integer"},
                "when": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
                "any": {"anyOf": [{"type": "null"}, {"type": "number"}]},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    }
    _write(
        "guardrails",
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,'
        b'"temperature":0.2,"top_p":0.5,"stop":["x"],"stream":true,"seed":1}',
        b'{"prompt":"once upon","max_tokens":4,"stream":false}',
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}',
        # issue 9: a tool round trip with a forced call, a JSON schema the converter turns into
        # a grammar, logprobs, penalties, n, reasoning and template options
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
                ],
                "tools": [{"type": "function", "function": weather}],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "stream": True,
            },
            separators=(",", ":"),
        ).encode(),
        json.dumps(
            {
                "messages": [{"role": "user", "content": "who?"}],
                "response_format": {"type": "json_schema", "json_schema": person},
                "logprobs": True,
                "top_logprobs": 2,
                "presence_penalty": 0.5,
                "frequency_penalty": -0.5,
                "n": 2,
                "seed": 3,
            },
            separators=(",", ":"),
        ).encode(),
        b'{"messages":[{"role":"developer","content":"x"},{"role":"user","content":"y"}],'
        b'"tools":[{"type":"function","function":{"name":"t","parameters":{"type":"object",'
        b'"properties":{"a":{"type":"array","prefixItems":[{"const":1},{"type":"boolean"}]}}}}}],'
        b'"tool_choice":{"type":"function","function":{"name":"t"}},"reasoning_effort":"low",'
        b'"reasoning_format":"deepseek","chat_template_kwargs":{"enable_thinking":false}}',
    )

    _v2()


class _Counter:
    """Fixed randomness, so the seeds are the same on every run."""

    def __init__(self) -> None:
        self.n = 0

    def token_bytes(self, n: int, /) -> bytes:
        self.n += 1
        return bytes([self.n]) * n

    def randbelow(self, n: int, /) -> int:
        return 0


def _v2() -> None:
    node_keys = v2certs.build_node_keys(t._NODE_SIGNING, t._NODE_KEYS, NOW)
    entry = {"certificate": t._NODE_CERT, "keys": node_keys, "attestations": [{"format": "x"}]}
    document = v2certs.build_key_document_v2(
        t._ROUTER_SIGNING, t._ROUTER_CERT, t._V2_KEYS, [entry], "m1", NOW
    )
    payload = p.b64u_decode(json.loads(document)["payload"], "payload")
    _write("v2keydoc", document, payload, p.b64u_decode(node_keys["payload"], "payload"))

    doc = v2certs.verify_key_document_v2(document, bytes(t._OPERATOR.verify_key), now=NOW)
    request = p.ChatRequest.from_prompt("Hello!", max_tokens=16)
    body, _ = v2request.seal_request(
        doc, request, model="m1", device_sk=t._DEVICE.sk, ts=NOW, rng=_Counter()
    )
    outer = v2request.open_outer(body, t._OUTER.sk)
    hdr = body[: v2request.HEADER_BYTES]
    ctx = hpke.setup_r(outer.enc, t._OUTER.sk, v2request.OUTER_INFO + b"\x00" + hdr)
    outer_plaintext = ctx.open(b"", body[v2request.HEADER_BYTES + hpke.N_ENC :])
    _write(
        "v2request",
        body,
        outer_plaintext,
        v2request.node_request_body(outer, outer.wraps[0]),
        json.dumps(request.to_plaintext()).encode(),
    )

    sealer = v2response.node_sealer(t._V2_STATE.response_secret)
    stream = sealer.init_event() + sealer.delta("Hi") + p.KEEPALIVE + sealer.done("stop", 3, 1)
    error = p.ProtocolError("pow_required", "solve it", challenge="C" * 51, difficulty=16)
    event = v2response.seal_router_event(
        t._V2_STATE.router_secret, t._V2_STATE.outer_enc, error, rng=_Counter()
    )
    _write(
        "v2stream",
        b"\x10" + stream,
        b"\x00" + event,
        bytes([len(stream) // 2]) + stream[:-20] + event,
        b'{"type":"error","code":"overloaded","message":"busy","retry_after":3}',
    )


def proxy_seeds() -> None:
    """OpenAI chat bodies as the clients send them (issue 19)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _write(
        "proxy",
        b'{"model":"llmrouter","messages":[{"role":"user","content":"hi"}],"max_tokens":8,'
        b'"stream":true,"stream_options":{"include_usage":true}}',
        json.dumps(
            {
                "model": "small",
                "messages": [
                    {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                ],
                "tools": [tool],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "o", "schema": {"type": "object"}, "strict": True},
                },
                "logprobs": True,
                "top_logprobs": 2,
                "n": 1,
                "stop": "\n",
                "max_completion_tokens": 5,
                "seed": None,
            }
        ).encode(),
        b'{"messages":[{"role":"user","content":"x","name":"bob"}],"n":2,"logit_bias":{}}',
    )


if __name__ == "__main__":
    main()
    proxy_seeds()
