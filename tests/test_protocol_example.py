"""The worked example in docs/protocol.md is recomputed here, so the document cannot drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmrouter import hpke
from llmrouter import protocol as p

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def worked_example() -> dict[str, Any]:
    """Every value of the example, from fixed inputs (RFC 9180 DeriveKeyPair on fixed ikm)."""
    router = hpke.derive_key_pair(bytes(range(32)))
    ephemeral = hpke.derive_key_pair(bytes(range(32, 64)))
    key = p.PublishedKey("01", router.pk, "current", 1767225600, 1767312000)
    request = p.ChatRequest.from_prompt("Hello!", max_tokens=16)
    env, state = p.seal_request(key, request, 1767225660, ephemeral=ephemeral, rid=bytes(range(16)))
    sealer = p.ResponseSealer(state.secret, env.enc, response_nonce=bytes(range(64, 96)))
    stream = sealer.init_event() + sealer.delta("Hi") + sealer.delta(" there")
    stream += sealer.done("stop", 9, 2)
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
        for name, value in worked_example().items():
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
