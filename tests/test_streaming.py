"""The lifetime of a streaming response, shared by the sealed stream (v1.1 and the node's v2) and
the router's v2 relay: headers once, the reader's flow control driving the upstream, the
write-stall and deadline limits, and one ending whichever way it comes.

On a fake clock, with Twisted's request double (tests/test_router_stream.py and
tests/test_v2_e2e.py run both owners between real daemons); every test ends with no timer left.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from llmrouter.router.metrics import RouterMetrics
from llmrouter.streaming import StreamingResponse


class _Request(DummyRequest):
    """The request double, keeping its producer (the double's own loops over resumeProducing)."""

    producer: Any = None
    unregistered = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True


class _Upstream:
    """What the response asked of the call that feeds it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def cancel(self) -> None:
        self.calls.append("cancel")


class StreamingResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.request = _Request([b"api", b"chat"])
        self.request.channel = SimpleNamespace(transport=StringTransport())
        self.metrics = RouterMetrics()
        self.upstream = _Upstream()
        self.closes = 0
        self.timeouts = 0
        self.response = StreamingResponse(
            self.request,  # type: ignore[arg-type]
            self.clock,
            self.metrics,
            90.0,
            deadline=160.0,
            write_stall=30.0,
            on_timeout=self.timed_out,
            on_close=self.closed,
        )
        self.response.attach(self.upstream)
        self.assertIs(self.response.upstream, self.upstream)

    def timed_out(self) -> None:
        self.timeouts += 1
        self.response.cancel_upstream()
        self.response.close()

    def closed(self) -> None:
        self.closes += 1

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def dropped(self, reason: str) -> float:
        return self.sample("llmrouter_streams_dropped_total", {"reason": reason})

    def assertEndedOnce(self) -> None:
        self.assertTrue(self.response.closed)
        self.assertEqual(self.closes, 1)
        self.assertIsNone(self.successResultOf(self.response.done))
        self.assertEqual(self.sample("llmrouter_active_streams"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_open_once_then_finish(self) -> None:
        self.assertEqual(self.sample("llmrouter_active_streams"), 1)
        self.response.open(first_output=True)
        self.response.open()
        self.assertEqual(self.request.responseCode, 200)
        headers = self.request.responseHeaders
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertIs(self.request.producer, self.response)
        self.assertEqual(self.sample("llmrouter_http_responses_total", {"status": "200"}), 1)
        self.assertEqual(self.sample("llmrouter_time_to_first_token_seconds_count"), 1)
        self.assertEqual(self.sample("llmrouter_time_to_first_token_seconds_sum"), 10)
        self.response.write(b"data: x\n\n")
        self.response.close()
        self.response.close()
        self.assertEndedOnce()
        self.assertEqual(self.request.written, [b"data: x\n\n"])
        self.assertEqual(self.request.finished, 1)
        self.assertTrue(self.request.unregistered)
        self.assertFalse(self.response.left)
        self.assertEqual(self.upstream.calls, [])
        self.assertEqual(self.sample("llmrouter_request_duration_seconds_sum"), 10)

    def test_nothing_goes_out_after_the_end(self) -> None:
        self.response.close()
        self.response.open()
        self.response.write(b"late")
        self.assertEqual(self.request.written, [])
        self.assertIsNone(self.request.producer)
        self.assertEqual(self.sample("llmrouter_http_responses_total", {"status": "200"}), 0)
        self.assertEndedOnce()

    def test_pause_resume_and_stop_drive_the_upstream(self) -> None:
        self.response.open()
        self.request.producer.pauseProducing()
        self.assertTrue(self.response.paused)
        self.request.producer.resumeProducing()
        self.assertFalse(self.response.paused)
        self.request.producer.stopProducing()
        self.assertEqual(self.upstream.calls, ["pause", "resume", "cancel"])
        self.assertTrue(self.response.left)
        self.assertEqual(self.request.finished, 0)  # the reader left: nothing to finish
        self.assertEndedOnce()

    def test_a_reader_that_stays_paused_is_dropped(self) -> None:
        self.response.open()
        self.request.producer.pauseProducing()
        self.clock.advance(29.5)
        self.assertFalse(self.response.closed)
        self.clock.advance(0.5)
        self.assertEqual(self.dropped("write_stall"), 1)
        self.assertTrue(self.request.channel.transport.disconnecting)
        self.assertTrue(self.response.left)
        self.assertEqual(self.upstream.calls, ["pause", "cancel"])
        self.assertEqual(self.request.finished, 0)
        self.assertEndedOnce()

    def test_a_resumed_reader_is_not_dropped(self) -> None:
        self.response.open()
        self.request.producer.pauseProducing()
        self.clock.advance(29)
        self.request.producer.resumeProducing()
        self.clock.advance(30)
        self.assertEqual(self.dropped("write_stall"), 0)
        self.assertFalse(self.response.closed)
        self.response.close()
        self.assertEndedOnce()

    def test_the_deadline_while_the_reader_reads_is_the_owners(self) -> None:
        self.response.open()
        self.clock.advance(59.5)
        self.assertEqual(self.timeouts, 0)
        self.clock.advance(0.5)
        self.assertEqual(self.timeouts, 1)
        self.assertEqual(self.dropped("deadline"), 0)
        self.assertEqual(self.request.finished, 1)
        self.assertFalse(self.response.left)
        self.assertEndedOnce()

    def test_the_deadline_while_the_reader_is_paused_drops_it(self) -> None:
        self.response.open()
        self.clock.advance(50)
        self.request.producer.pauseProducing()
        self.clock.advance(10)
        self.assertEqual(self.timeouts, 0)
        self.assertEqual(self.dropped("deadline"), 1)
        self.assertTrue(self.request.channel.transport.disconnecting)
        self.assertEqual(self.upstream.calls, ["pause", "cancel"])
        self.assertEndedOnce()

    def test_a_deadline_already_past_ends_at_once(self) -> None:
        late = StreamingResponse(
            _Request([b"api", b"chat"]),  # type: ignore[arg-type]
            self.clock,
            self.metrics,
            0.0,
            deadline=50.0,
            write_stall=30.0,
            on_timeout=lambda: late.close(),
            on_close=self.closed,
        )
        self.clock.advance(0)
        self.assertTrue(late.closed)
        self.response.close()
        self.assertEqual(self.closes, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_connection_lost_is_the_reader_leaving(self) -> None:
        self.response.open()
        self.request.processingFailed(Failure(ConnectionLost()))
        self.assertTrue(self.response.left)
        self.assertEqual(self.upstream.calls, ["cancel"])
        self.assertEndedOnce()

    def test_cancelling_done_is_the_reader_leaving(self) -> None:
        self.response.done.cancel()  # Klein's, when the client goes
        self.assertTrue(self.response.left)
        self.assertEqual(self.upstream.calls, ["cancel"])
        self.assertEndedOnce()
