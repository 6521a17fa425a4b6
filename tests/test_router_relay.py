"""The relay's reading of a node's stream: whole SSE events only, in linear work.

The relay never parses an event (it cannot open one); it only looks for the blank line that ends
each, so that its own ``event: router`` never lands inside a partial one. Here its body protocol
is fed the bytes a node sends, split every way, against a recorder standing in for the call that
owns it (tests/test_v2_e2e.py runs it between real daemons).
"""

from __future__ import annotations

import random
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed

from llmrouter.router.relay import _MAX_EVENT, _RelayBody

STREAM = (
    b"event: init\ndata: a\n\nevent: chunk\ndata: bb\n\n: keepalive\n\nevent: final\ndata: c\n\n"
)


class Recorder:
    """What a NodeCall hears from its body: the bytes relayed, each call apart, and the end."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.ended: list[bool] = []

    def attached(self, body: Any) -> None:
        pass

    def relayed(self, data: bytes) -> None:
        self.events.append(data)

    def body_ended(self, body: Any, clean: bool) -> None:
        self.ended.append(clean)


class Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def body() -> tuple[_RelayBody, Recorder, Transport]:
    recorder = Recorder()
    relay_body = _RelayBody(recorder)  # type: ignore[arg-type]
    transport = Transport()
    relay_body.makeConnection(transport)  # type: ignore[arg-type]
    return relay_body, recorder, transport


class RelayBodyTests(SynchronousTestCase):
    def test_whole_events_however_the_bytes_are_split(self) -> None:
        rng = random.Random(7)
        for _ in range(300):
            relay_body, recorder, _ = body()
            cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(0, 12)))
            for start, end in zip([0, *cuts], [*cuts, len(STREAM)], strict=True):
                relay_body.dataReceived(STREAM[start:end])
            self.assertEqual(b"".join(recorder.events), STREAM)
            for piece in recorder.events:  # each relay ends an event: never inside one
                self.assertTrue(piece.endswith(b"\n\n"), (cuts, recorder.events))
            relay_body.connectionLost(Failure(ResponseDone()))
            self.assertEqual(recorder.ended, [True])

    def test_one_byte_at_a_time(self) -> None:
        relay_body, recorder, _ = body()
        for i in range(len(STREAM)):
            relay_body.dataReceived(STREAM[i : i + 1])
        self.assertEqual(b"".join(recorder.events), STREAM)
        self.assertEqual(len(recorder.events), 4)  # one per event, none split

    def test_a_partial_event_at_the_end_is_a_broken_stream(self) -> None:
        relay_body, recorder, _ = body()
        relay_body.dataReceived(STREAM + b"event: chunk\ndata: x\n")
        self.assertEqual(b"".join(recorder.events), STREAM)  # the partial one is held back
        relay_body.connectionLost(Failure(ResponseDone()))
        self.assertEqual(recorder.ended, [False])
        relay_body, recorder, _ = body()
        relay_body.dataReceived(STREAM)
        relay_body.connectionLost(Failure(ResponseFailed([])))
        self.assertEqual(recorder.ended, [False])

    def test_a_long_event_in_small_pieces_is_linear_work(self) -> None:
        """A node that sends a 1 MiB event one byte at a time: each byte is examined once, not
        the whole event again (work counted in bytes, not seconds)."""
        relay_body, recorder, transport = body()
        event = b"data: " + b"x" * (_MAX_EVENT - 8) + b"\n\n"
        for i in range(len(event)):
            relay_body.dataReceived(event[i : i + 1])
            if relay_body.scanned > 2 * len(event):
                self.fail(f"{relay_body.scanned} bytes examined after {i + 1} bytes fed")
        self.assertEqual(recorder.events, [event])
        self.assertFalse(transport.stopped)

    def test_an_event_over_the_limit_stops_the_node(self) -> None:
        relay_body, recorder, transport = body()
        relay_body.dataReceived(b"data: " + b"x" * _MAX_EVENT)
        self.assertTrue(transport.stopped)
        self.assertEqual(recorder.events, [])
