"""The worked examples in docs/protocol.md are recomputed here, so the document cannot drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.chat import Tool

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
WEATHER = Tool(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def text_example() -> tuple[p.ChatRequest, Any]:
    """Section 7.1: "Hello!" answered "Hi", " there"."""

    def stream(sealer: p.ResponseSealer) -> bytes:
        return sealer.delta("Hi") + sealer.delta(" there") + sealer.done("stop", 9, 2)

    return p.ChatRequest.from_prompt("Hello!", max_tokens=16), stream


def tool_example() -> tuple[p.ChatRequest, Any]:
    """Section 7.2: a forced tool call, streamed in fragments."""
    request = p.ChatRequest.from_prompt(
        "Weather in Oslo?", model="gpt-oss-20b", tools=(WEATHER,), tool_choice="required"
    )

    def stream(sealer: p.ResponseSealer) -> bytes:
        raw = sealer.tool_call(0, "call_1", "get_weather", "")
        raw += sealer.tool_call(0, None, None, '{"city":')
        raw += sealer.tool_call(0, None, None, '"Oslo"}')
        return raw + sealer.done("tool_calls", 71, 12)

    return request, stream


def worked_example(example: Any = text_example, first: int = 0) -> dict[str, Any]:
    """Every value of an example, from fixed inputs (RFC 9180 DeriveKeyPair on fixed ikm);
    ``first`` shifts the ephemeral key, rid and response nonce so each example has its own."""
    router = hpke.derive_key_pair(bytes(range(32)))
    ephemeral = hpke.derive_key_pair(bytes(range(32 + first, 64 + first)))
    key = p.PublishedKey("01", router.pk, "current", 1767225600, 1767312000)
    request, respond = example()
    env, state = p.seal_request(
        key, request, 1767225660, ephemeral=ephemeral, rid=bytes(range(first, 16 + first))
    )
    nonce = bytes(range(64 + first, 96 + first))
    sealer = p.ResponseSealer(state.secret, env.enc, response_nonce=nonce)
    stream = sealer.init_event() + respond(sealer)
    return {
        "router_sk": router.sk.hex(),
        "router_pk": p.b64u_encode(router.pk),
        "ephemeral_sk": ephemeral.sk.hex(),
        "aad": env.aad().decode(),
        "plaintext": json.dumps(request.to_plaintext(), separators=(",", ":")),
        "envelope": json.dumps(env.to_json(), indent=2),
        "secret": state.secret.hex(),
        "stream": stream.decode(),
    }


class WorkedExampleTests(SynchronousTestCase):
    def test_document_matches_code(self) -> None:
        text = DOC.read_text()
        for example, first in ((text_example, 0), (tool_example, 128)):
            for name, value in worked_example(example, first).items():
                for line in value.splitlines():
                    self.assertIn(line.strip(), text, f"docs/protocol.md is out of date ({name})")

    def test_example_opens(self) -> None:
        ex = worked_example()
        router_sk = bytes.fromhex(ex["router_sk"])
        env = p.parse_envelope(ex["envelope"].encode())
        request, secret = p.open_request(env, router_sk)
        self.assertEqual(request.messages[0].content, "Hello!")
        opener = p.ResponseOpener(p.RequestState(env.enc, secret))
        items = opener.feed(ex["stream"].encode())
        self.assertEqual([i.text for i in items if isinstance(i, p.Delta)], ["Hi", " there"])
        self.assertEqual(opener.close(), p.Done("stop", 9, 2))

    def test_tool_example_opens(self) -> None:
        ex = worked_example(tool_example, 128)
        env = p.parse_envelope(ex["envelope"].encode())
        request, secret = p.open_request(env, bytes.fromhex(ex["router_sk"]))
        self.assertEqual((request.model, request.tools), ("gpt-oss-20b", (WEATHER,)))
        opener = p.ResponseOpener(p.RequestState(env.enc, secret))
        items = opener.feed(ex["stream"].encode())
        self.assertEqual(
            items[:3],
            [
                p.ToolCallDelta(0, "call_1", "get_weather", ""),
                p.ToolCallDelta(0, None, None, '{"city":'),
                p.ToolCallDelta(0, None, None, '"Oslo"}'),
            ],
        )
        self.assertEqual(opener.close(), p.Done("tool_calls", 71, 12))
