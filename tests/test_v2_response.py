"""Protocol v2 responses: the node's sealed stream, the router's sealed event, the client's
opener (truncation, tampering, order)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmrouter import protocol as p
from llmrouter.v2 import request as rq
from llmrouter.v2 import response as rs
from tests.v2_world import World


class Fixture(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        doc = self.world.verified()
        body, self.state = rq.seal_request(
            doc, p.ChatRequest.from_prompt("hi"), model="m1", device_sk=None
        )
        self.outer = rq.open_outer(body, self.world.outer.sk)
        wrap = self.outer.wraps[0]
        req = rq.parse_node_request(rq.node_request_body(self.outer, wrap))
        _, self.secret = rq.open_node_request(req, self.world.node(wrap.node).secret_key(wrap.kid))

    def node_stream(self, *texts: str, final: bool = True) -> bytes:
        sealer = rs.node_sealer(self.secret)
        out = sealer.init_event() + b"".join(sealer.delta(t) + p.KEEPALIVE for t in texts)
        return out + (sealer.done("stop", 3, len(texts)) if final else b"")

    def router_event(self, error: p.ProtocolError, secret: bytes | None = None) -> bytes:
        return rs.seal_router_event(secret or self.outer.router_secret, self.outer.enc, error)

    def opener(self) -> rs.ResponseOpener:
        return rs.ResponseOpener(self.state)


class NodeStreamTests(Fixture):
    def test_a_whole_stream(self) -> None:
        opener = self.opener()
        items = opener.feed(self.node_stream("Hi", " there"))
        self.assertEqual([i.text for i in items if isinstance(i, p.Delta)], ["Hi", " there"])
        self.assertEqual(opener.close(), p.Done("stop", 3, 2))
        self.assertTrue(opener.finished)

    def test_byte_by_byte(self) -> None:
        opener = self.opener()
        stream = self.node_stream("a", "b", "c")
        items = [item for i in range(len(stream)) for item in opener.feed(stream[i : i + 1])]
        self.assertEqual(len(items), 4)
        self.assertEqual(opener.close(), p.Done("stop", 3, 3))

    def test_truncated(self) -> None:
        for stream in (self.node_stream("a", final=False), b"", self.node_stream("a")[:-5]):
            opener = self.opener()
            opener.feed(stream)
            with self.assertRaises(p.StreamError) as caught:
                opener.close()
            self.assertIn("truncated", str(caught.exception))

    def test_the_node_stream_is_not_v1s(self) -> None:
        """The secret alone keys it (no enc in the salt): v1's opener with the outer enc, or the
        router's secret, cannot open it."""
        stream = self.node_stream("a")
        for state in (
            p.RequestState(self.state.outer_enc, self.state.response_secret),
            p.RequestState(b"", self.state.router_secret),
        ):
            with self.assertRaises(p.StreamError):
                p.ResponseOpener(state).feed(stream)
        wrong = rq.ClientState(self.state.outer_enc, self.state.router_secret, bytes(32))
        with self.assertRaises(p.StreamError):
            rs.ResponseOpener(wrong).feed(stream)

    def test_reordered_dropped_or_replayed_chunks(self) -> None:
        stream = self.node_stream("a", "b")
        events = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
        init, a, keep1, b, keep2, final = events
        for broken in ([init, b, a, final], [init, a, final], [init, a, a, b, final]):
            opener = self.opener()
            with self.assertRaises(p.StreamError):
                opener.feed(b"".join(broken))
        del keep1, keep2

    def test_node_refusal_stream(self) -> None:
        refusal = rs.seal_node_refusal(
            self.secret, p.ProtocolError("unsupported_field", "tools is not supported")
        )
        opener = self.opener()
        opener.feed(refusal)
        # with the status a plain refusal would have had, as a v1.1 router seals one
        self.assertEqual(
            opener.close(), p.ErrorChunk("unsupported_field", "tools is not supported", 400)
        )
        self.assertNotIsInstance(opener.close(), rs.RouterRefusal)


class RouterEventTests(Fixture):
    def test_refusal_alone(self) -> None:
        error = p.ProtocolError("pow_required", "solve it", challenge="C" * 51, difficulty=16)
        event = self.router_event(error)
        self.assertTrue(event.startswith(b"event: router\ndata: {"))
        opener = self.opener()
        (item,) = opener.feed(event)
        expected = rs.RouterRefusal(
            "pow_required", "solve it", 401, challenge="C" * 51, difficulty=16
        )
        self.assertEqual((item, opener.close()), (expected, expected))
        retry = self.router_event(p.ProtocolError("device_rate_limited", "slow", retry_after=7))
        opener = self.opener()
        opener.feed(retry)
        self.assertEqual(
            opener.close(), rs.RouterRefusal("device_rate_limited", "slow", 429, retry_after=7)
        )

    def test_after_node_chunks(self) -> None:
        """The node's stream broke: the router's event ends it, and it is an error."""
        opener = self.opener()
        stream = self.node_stream("a", "b", final=False)
        stream += self.router_event(p.ProtocolError("upstream_failed", "the node went away"))
        items = opener.feed(stream)
        self.assertEqual(len(items), 3)
        self.assertEqual(
            opener.close(), rs.RouterRefusal("upstream_failed", "the node went away", 502)
        )

    def test_it_is_terminal(self) -> None:
        for after in (
            self.node_stream("a"),
            self.router_event(p.ProtocolError("timeout", "late")),
            b"event: chunk\ndata: AAAA\n\n",
        ):
            opener = self.opener()
            with self.assertRaises(p.StreamError):
                opener.feed(self.router_event(p.ProtocolError("timeout", "late")) + after)
        # ... and nothing comes after the node's final either
        opener = self.opener()
        with self.assertRaises(p.StreamError):
            opener.feed(self.node_stream("a") + self.router_event(p.ProtocolError("x", "y")))

    def test_forged_or_tampered(self) -> None:
        """Only the router (and the client) hold its secret; a node's secret or a replay of
        another request's event does not verify."""
        error = p.ProtocolError("overloaded", "busy")
        other_body, _ = rq.seal_request(
            self.world.verified(), p.ChatRequest.from_prompt("x"), model="m1", device_sk=None
        )
        other = rq.open_outer(other_body, self.world.outer.sk)
        for event in (
            self.router_event(error, secret=self.secret),
            rs.seal_router_event(other.router_secret, other.enc, error),
            self.router_event(error).replace(b'"sealed": "', b'"sealed": "A'),
        ):
            with self.assertRaises(p.StreamError):
                self.opener().feed(event)

    def test_malformed(self) -> None:
        keys = p.ResponseKeys(self.outer.router_secret, self.outer.enc, bytes(32))

        def sealed(message: object, aad: bytes = b"final") -> bytes:
            data = {
                "response_nonce": p.b64u_encode(bytes(32)),
                "sealed": p.b64u_encode(keys.seal(aad, json.dumps(message).encode())),
            }
            keys.counter = 0
            return b"event: router\ndata: " + json.dumps(data).encode() + b"\n\n"

        good = {"type": "error", "code": "overloaded", "message": "busy"}
        cases = [
            b"event: router\ndata: nope\n\n",
            b"event: router\ndata: {}\n\n",
            b'event: router\ndata: {"response_nonce": "AA", "sealed": "AAAA"}\n\n',
            sealed(good, aad=b""),
            sealed({**good, "type": "done"}),
            sealed({**good, "code": "Has Spaces"}),
            sealed({**good, "code": 3}),
            sealed({**good, "message": "x" * 1025}),
            sealed({**good, "retry_after": -1}),
            sealed({**good, "retry_after": True}),
            sealed({**good, "difficulty": "8"}),
            sealed({**good, "challenge": 8}),
            sealed({**good, "extra": 1}),
            sealed([good]),
        ]
        for event in cases:
            with self.assertRaises(p.StreamError, msg=event):
                self.opener().feed(event)
        self.opener().feed(sealed(good))

    def test_padded_to_hide_the_code(self) -> None:
        short = self.router_event(p.ProtocolError("stale", "x"))
        long = self.router_event(
            p.ProtocolError(
                "pow_required",
                "solve the proof of work and retry",
                challenge="C" * 51,
                difficulty=16,
                retry_after=120,
            )
        )
        self.assertEqual(len(short), len(long))

    def test_status_of_refusals(self) -> None:
        for code, status in (
            ("model_unknown", 404),
            ("timeout", 504),
            ("rate_limited", 429),
            ("overloaded", 503),
            ("device_proof_failed", 400),
            ("odd", 400),
        ):
            self.assertEqual(rs.refusal_status(code), status)


class FuzzedStreamTests(Fixture):
    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400), st.integers(0, 400))
    def test_any_bytes_end_in_a_stream_error_or_items(self, data: bytes, split: int) -> None:
        opener = rs.ResponseOpener(self.state, max_line=256)
        try:
            opener.feed(data[:split])
            opener.feed(data[split:])
            opener.close()
        except p.StreamError:
            pass
