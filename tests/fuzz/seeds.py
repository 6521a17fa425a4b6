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
    )
    sealer = p.ResponseSealer(_STATE.secret, _STATE.enc, response_nonce=bytes(32))
    stream = sealer.init_event() + sealer.delta("Hi") + p.KEEPALIVE + sealer.done("stop", 3, 1)
    _write("sse", b"\x10" + stream, b"\x00event: x\r\ndata: 1\rdata: 2\n\n: c\n\n")
    document = p.build_key_document([key, upcoming], nacl.signing.SigningKey(bytes(32)), NOW)
    payload = p.b64u_decode(json.loads(document)["payload"], "payload")
    _write("keydoc", document, payload)
    _write(
        "guardrails",
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,'
        b'"temperature":0.2,"top_p":0.5,"stop":["x"],"stream":true,"seed":1}',
        b'{"prompt":"once upon","max_tokens":4,"stream":false}',
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}',
    )


if __name__ == "__main__":
    main()
