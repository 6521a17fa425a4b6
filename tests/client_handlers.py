"""Router sides of protocols 1 and 2 in their smallest form, for the client's tests.

:class:`Handler` is protocol.py's parse_envelope/open_request/ResponseSealer behind a
twisted.web resource; :class:`V2Handler` is llmrouter.v2's router functions (open the outer
layer, seal refusals) and node functions (open the wrap, seal the stream) in one resource. Both
answer with the words of the prompt reversed and can be told to misbehave (stale key, proof of
work, a stream cut short, ...) to drive a client's error paths.
"""

from __future__ import annotations

import time
from typing import Any

import nacl.signing
from twisted.web import resource, server
from twisted.web.http import Request

from llmrouter import hpke, pow
from llmrouter import protocol as p
from llmrouter.v2 import request as rq
from llmrouter.v2 import response as rs
from tests.v2_world import World


class Handler(resource.Resource):
    """Answers with the words of the prompt reversed, one padded chunk per word."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.signing = nacl.signing.SigningKey.generate()
        self.pair = hpke.generate_key_pair()
        self.kid = "07"
        self.rotations_pending = 0
        self.stale_pending = 0
        self.pow_key: bytes | None = None
        self.cut_after: int | None = None
        self.fail_with: str | None = None
        self.fail_detail: dict[str, Any] = {}  # the sealed error's status, retry_after, ...
        self.seen_modes: list[str] = []
        self.seen_devices: list[bytes | None] = []
        self.requests: list[p.ChatRequest] = []
        self.fail_requests: set[int] = set()  # by number, from 1
        self.issued_at: int | None = None  # None: signed this hour, as a router does
        self.upcoming = hpke.generate_key_pair()
        self.now = time.time
        self.not_after = 2**31  # of the current key
        self.documents_served = 0
        self.seen_kids: list[str] = []
        self.pow_difficulty = 8

    def document(self) -> bytes:
        self.documents_served += 1
        now = self.now()
        issued_at = p.key_document_issued_at(now) if self.issued_at is None else self.issued_at
        key = p.PublishedKey(self.kid, self.pair.pk, "current", 0, self.not_after)
        upcoming = p.PublishedKey("ff", self.upcoming.pk, "next", int(now), 2**31)
        return p.build_key_document([key, upcoming], self.signing, issued_at)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/api/models":
            return b'{"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}'
        return self.document()

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        try:
            env = p.parse_envelope(request.content.read())
            self.seen_kids.append(env.kid)
            if self.rotations_pending:
                self.rotations_pending -= 1
                self.rotate()
            if self.stale_pending:
                self.stale_pending -= 1
                raise p.ProtocolError("stale", "the request predates the router's start")
            if env.kid != self.kid:
                raise p.ProtocolError("key_unknown", "unknown key id")
            check_pow(request, env.enc, self.pow_key, self.pow_difficulty)
            chat, secret = p.open_request(env, self.pair.sk)
        except p.ProtocolError as e:
            request.setResponseCode(e.status)
            request.setHeader(b"content-type", b"application/json")
            return e.to_json()
        self.seen_modes.append(env.mode)
        self.seen_devices.append(env.device_pubkey)
        request.setHeader(b"content-type", b"text/event-stream")
        answer(self, request, p.ResponseSealer(secret, env.enc), chat)
        return server.NOT_DONE_YET

    def rotate(self) -> None:
        self.pair = hpke.generate_key_pair()
        self.kid = f"{int(self.kid, 16) + 1:02x}"


def check_pow(request: Request, enc: bytes, key: bytes | None, bits: int) -> None:
    """A proof of work of ``bits`` bound to ``enc`` (none asked for without ``key``)."""
    if key is None:
        return
    header = request.getHeader(pow.HEADER)
    if header is None or not pow.verify(key, header, enc, 1e10 - 60):
        challenge = pow.issue_challenge(key, bits, 1e10 - 60)
        raise p.ProtocolError(
            "pow_required", "solve the challenge", challenge=challenge, difficulty=bits
        )


def answer(
    handler: Any,
    request: Request,
    sealer: p.ResponseSealer,
    chat: p.ChatRequest,
    broken: bytes | None = None,
) -> None:
    """The words of the prompt reversed, one padded chunk per word (or a tool call, or the
    reasoning first), with the faults ``handler`` asks for; ``broken`` is what the router sends
    where a node's stream breaks (v2: its sealed event)."""
    handler.requests.append(chat)
    request.write(sealer.init_event())
    if chat.include_reasoning:
        request.write(sealer.reasoning("thinking it over"))
    last = chat.messages[-1]
    if chat.tools and last.role == "user":  # call the first tool, in two fragments
        request.write(sealer.tool_call(0, "call_7", chat.tools[0].name, '{"x":'))
        request.write(sealer.tool_call(0, None, None, " 1}"))
        request.write(sealer.done("tool_calls", 3, 2))
        request.finish()
        return
    assert isinstance(last.content, str)
    words = last.content.split()[::-1]
    for i, word in enumerate(words):
        if handler.cut_after is not None and i == handler.cut_after:
            request.write(broken or b"")  # v1: the stream ends without a final chunk
            request.finish()
            return
        request.write(sealer.delta(word + " "))
        request.write(p.KEEPALIVE)
    if handler.fail_with or len(handler.requests) in handler.fail_requests:
        code = handler.fail_with or "timeout"
        request.write(sealer.error(code, "upstream went away", **handler.fail_detail))
    else:
        request.write(sealer.done("stop", 3, len(words)))
    request.finish()


class V2Handler(resource.Resource):
    """Protocol 2's router and node in one resource, from llmrouter.v2's functions: the same
    answers and faults as :class:`Handler`, and v2's own (sealed refusals, node key rotation,
    the router's event where a node's stream breaks)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.world = World({"node-a": ("m1",), "node-b": ("m1", "m2"), "node-c": ("m2",)})
        self.pin = self.world.pin
        self.rotations_pending = 0  # the router's outer key: a plain key_unknown
        self.node_rotations_pending = 0  # every node's keys: a sealed key_unknown
        self.stale_pending = 0
        self.pow_key: bytes | None = None  # under stress: plain pow_required
        self.new_device_pow: bytes | None = None  # a new device: sealed pow_required
        self.known_devices: set[bytes] = set()
        self.cut_after: int | None = None
        self.router_breaks = False  # the router's event where the stream breaks
        self.fail_with: str | None = None
        self.fail_detail: dict[str, Any] = {}
        self.pow_difficulty = 8
        self.documents_served = 0
        self.seen_modes: list[str] = []
        self.seen_devices: list[bytes | None] = []
        self.seen_nodes: list[tuple[str, ...]] = []
        self.requests: list[p.ChatRequest] = []
        self.fail_requests: set[int] = set()
        self.issued_at: int | None = None
        self.posted: list[bytes] = []
        self.refuse_with: p.ProtocolError | None = None  # a sealed refusal after opening
        self.v2_available = True
        self.now = time.time  # the router's clock (the world's documents keep their own)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/api/models":
            return b'{"object": "list", "data": [{"id": "v1-only"}]}'
        if request.path == b"/api/pubkey":  # its v1 side, signed by the router's own key
            key = p.PublishedKey("01", self.world.outer.pk, "current", 0, 2**31)
            upcoming = p.PublishedKey("02", self.world.outer_next.pk, "next", 0, 2**31)
            issued = p.key_document_issued_at(time.time())
            return p.build_key_document([key, upcoming], self.world.router_signing, issued)
        if not self.v2_available:  # a router of before protocol 2
            request.setResponseCode(404)
            return b'{"error": {"code": "not_found", "message": "no such endpoint"}}'
        self.documents_served += 1
        return self.world.document(issued_at=self.issued_at)

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        self.posted.append(body)
        try:
            assert request.getHeader(b"content-type") == b"message/ohttp-req"
            if self.rotations_pending:
                self.rotations_pending -= 1
                self.rotate()
            kid, enc = rq.parse_outer_header(body)
            sk = self.world.router_secret_key(kid)
            if sk is None:
                raise p.ProtocolError("key_unknown", "unknown key id")
            check_pow(request, enc, self.pow_key, self.pow_difficulty)
            outer = rq.open_outer(body, sk)
        except p.ProtocolError as e:
            request.setResponseCode(e.status)
            request.setHeader(b"content-type", b"application/json")
            return e.to_json()
        request.setHeader(b"content-type", b"text/event-stream")
        try:
            self.admit(request, outer)
            for wrap in outer.wraps:  # the router's choice: the first node that has the key
                node = self.world.node(wrap.node)
                if wrap.kid in node.kids:
                    break
            else:
                raise p.ProtocolError("key_unknown", "no candidate node has that key")
        except p.ProtocolError as e:
            request.write(rs.seal_router_event(outer.router_secret, outer.enc, e))
            request.finish()
            return server.NOT_DONE_YET
        self.seen_modes.append("auth" if outer.device_proven else "base")
        self.seen_devices.append(outer.device_pk)
        self.seen_nodes.append(tuple(w.node for w in outer.wraps))
        # the node's side
        node_request = rq.parse_node_request(rq.node_request_body(outer, wrap))
        chat, secret = rq.open_node_request(node_request, node.secret_key(wrap.kid))
        broken = None
        if self.router_breaks:
            error = p.ProtocolError("upstream_failed", "the node went away")
            broken = rs.seal_router_event(outer.router_secret, outer.enc, error)
        answer(self, request, rs.node_sealer(secret), chat, broken)
        return server.NOT_DONE_YET

    def admit(self, request: Request, outer: rq.OuterRequest) -> None:
        """What the router checks once it has opened the outer layer (its refusals sealed)."""
        if self.stale_pending:
            self.stale_pending -= 1
            raise p.ProtocolError("stale", "the request predates the router's start")
        if abs(outer.ts - self.now()) > 60:
            raise p.ProtocolError("stale", "request timestamp is outside the accepted window")
        if self.refuse_with is not None:
            raise self.refuse_with
        device = outer.device_pk
        if self.new_device_pow is not None and device and device not in self.known_devices:
            check_pow(request, outer.enc, self.new_device_pow, self.pow_difficulty)
            self.known_devices.add(device)
        if self.node_rotations_pending:
            self.node_rotations_pending -= 1
            for node in self.world.nodes:
                node.current, node.upcoming = node.upcoming, hpke.generate_key_pair()
                node.kids = (node.kids[1], f"{int(node.kids[1], 16) + 1:02x}")

    def rotate(self) -> None:
        first = int(self.world.outer_kids[1], 16) + 1
        self.world.outer, self.world.outer_next = self.world.outer_next, hpke.generate_key_pair()
        self.world.outer_kids = (self.world.outer_kids[1], f"{first:02x}")
