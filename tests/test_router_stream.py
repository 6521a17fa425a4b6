"""The client-facing stream: cadence slots (timing hides token boundaries), keepalives, padding.

In-process router whose timers run on a fake clock, on a real socket, in front of the fault
backend (which can stall mid-stream); the client side decrypts every event it gets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone

from llmrouter.chat import Tool
from llmrouter.protocol import (
    MAX_LOGPROB_ENTRIES,
    Delta,
    Done,
    ErrorChunk,
    Reasoning,
    ResponseOpener,
    ToolCallDelta,
)
from llmrouter.sse import SSEParser
from tests.router_support import Script, prompt, sealed, start_fault_backend, start_router


def settle() -> defer.Deferred[None]:
    return deferLater(reactor, 0.05, lambda: None)


class _Raw(Protocol):
    """Keeps every raw SSE event (and comments) and the decrypted items."""

    def __init__(self, state: Any) -> None:
        self.opener = ResponseOpener(state)
        self.parser = SSEParser()
        self.raw = b""
        self.events: list[tuple[str, str]] = []
        self.items: list[Any] = []
        self.ended: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.events += self.parser.feed(data)
        self.items += self.opener.feed(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self.ended.callback(None)


@defer.inlineCallbacks
def stream(running: Any, tokens: int = 64, request: Any = None) -> Any:
    from io import BytesIO

    from twisted.web.client import FileBodyProducer
    from twisted.web.http_headers import Headers

    from llmrouter.httpclient import agent_for
    from tests.router_support import prompt

    body, _, state = yield sealed(running, request or prompt("hi", max_tokens=tokens))
    agent, base = agent_for(reactor, running.url)
    response = yield agent.request(
        b"POST",
        (base + "/api/chat").encode(),
        Headers({b"Content-Type": [b"application/json"]}),
        FileBodyProducer(BytesIO(body)),
    )
    assert response.code == 200, response.code
    raw = _Raw(state)
    response.deliverBody(raw)
    return raw


class CadenceTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_one_padded_chunk_per_slot(self) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=5, stall_after=3))
        running = yield start_router(self, [url], stream_cadence_ms=50)
        clock = running.router.clock
        raw = yield stream(running)
        yield settle()
        self.assertEqual([e[0] for e in raw.events], ["init"])  # tokens wait for their slot
        clock.advance(0.05)
        yield settle()
        self.assertEqual([e[0] for e in raw.events], ["init", "chunk"])
        self.assertEqual(raw.items, [Delta("tok0 tok1 tok2 ")])  # coalesced
        for _ in range(3):  # nothing arrives: still exactly one (empty) chunk per slot
            clock.advance(0.05)
            yield settle()
        self.assertEqual(raw.items[1:], [Delta(""), Delta(""), Delta("")])
        sizes = {len(data) for name, data in raw.events if name == "chunk"}
        self.assertEqual(len(sizes), 1)  # every chunk the same size on the wire
        raw.transport.loseConnection()  # type: ignore[attr-defined]
        yield raw.ended

    @defer.inlineCallbacks
    def test_final_comes_in_its_own_slot(self) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=2))
        running = yield start_router(self, [url], stream_cadence_ms=50)
        clock = running.router.clock
        raw = yield stream(running)
        yield settle()
        clock.advance(0.05)
        yield settle()
        self.assertEqual(raw.items, [Delta("tok0 tok1 ")])
        clock.advance(0.05)
        yield raw.ended
        self.assertIsInstance(raw.items[-1], Done)
        self.assertEqual([e[0] for e in raw.events], ["init", "chunk", "final"])
        self.assertEqual(running.router.app.streams, set())

    @defer.inlineCallbacks
    def test_one_kind_per_slot(self) -> Any:
        """Reasoning, answer and a tool call's fragments each merge into runs; a slot sends one."""

        def delta(**fields: Any) -> dict[str, Any]:
            return {"choices": [{"delta": fields}]}

        call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}
        events = [
            delta(reasoning_content="thinking "),
            delta(reasoning_content="hard"),
            delta(content="A"),
            delta(content="B"),
            delta(tool_calls=[call]),
            delta(tool_calls=[{"index": 0, "function": {"arguments": '{"x":'}}]),
            delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
        ]
        _, url = yield start_fault_backend(self, Script(events=events, finish_reason="tool_calls"))
        running = yield start_router(self, [url], stream_cadence_ms=50)
        clock = running.router.clock
        tools = (Tool("f"),)
        request = prompt("hi", include_reasoning=True, tools=tools)
        raw = yield stream(running, request=request)
        for _ in range(4):
            yield settle()
            clock.advance(0.05)
        yield raw.ended
        self.assertEqual(
            raw.items,
            [
                Reasoning("thinking hard"),
                Delta("AB"),
                ToolCallDelta(0, "c1", "f", '{"x":1}'),
                Done("tool_calls", 3, 7),
            ],
        )
        self.assertEqual([e[0] for e in raw.events], ["init", "chunk", "chunk", "chunk", "final"])

    @defer.inlineCallbacks
    def test_logprobs_split_at_the_chunk_limit(self) -> Any:
        """Text merges into one chunk per slot, but no chunk carries more logprobs than a client
        takes: 300 tokens with logprobs in one slot go out as two chunks."""
        entry = {"token": "t", "logprob": -0.5, "top_logprobs": []}
        events = [
            {"choices": [{"delta": {"content": "t"}, "logprobs": {"content": [entry]}}]}
        ] * 300
        fake, url = yield start_fault_backend(self, Script(events=events))
        running = yield start_router(self, [url], stream_cadence_ms=50)
        raw = yield stream(running, request=prompt("hi", logprobs=True))
        while not fake.log.completed:  # all of it waits for the first slot
            yield settle()
        yield settle()
        while not raw.ended.called:
            yield settle()
            running.router.clock.advance(0.05)
        deltas = [item for item in raw.items if isinstance(item, Delta)]
        self.assertEqual([len(d.logprobs) for d in deltas], [MAX_LOGPROB_ENTRIES, 44])
        self.assertEqual("".join(d.text for d in deltas), "t" * 300)


class KeepaliveTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_keepalive_when_idle_and_padding(self) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=5, stall_after=2))
        running = yield start_router(
            self, [url], keepalive_seconds=15, pad_bytes=128, idle_timeout_seconds=100
        )
        clock = running.router.clock
        raw = yield stream(running)
        while len(raw.items) < 2:
            yield settle()
        self.assertNotIn(b": keepalive", raw.raw)
        clock.advance(15)
        yield settle()
        self.assertEqual(raw.raw.count(b": keepalive\n\n"), 1)
        clock.advance(15)
        yield settle()
        self.assertEqual(raw.raw.count(b": keepalive\n\n"), 2)
        # every sealed chunk is padded to a multiple of 128 bytes (+16 tag)
        from llmrouter.protocol import b64u_decode

        for name, data in raw.events:
            if name == "chunk":
                self.assertEqual((len(b64u_decode(data, "chunk")) - 16) % 128, 0)
        raw.transport.loseConnection()  # type: ignore[attr-defined]
        yield raw.ended

    @defer.inlineCallbacks
    def test_router_shutdown_sends_sealed_error(self) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=5, stall_after=1))
        running = yield start_router(self, [url])
        raw = yield stream(running)
        while not raw.items:
            yield settle()
        running.router.stop()
        yield raw.ended
        self.assertEqual(
            raw.items[-1], ErrorChunk("overloaded", "the router is shutting down, retry", 503)
        )


class SlowReaderTests(TestCase):
    """A client that stops reading pinned its stream slot forever in cadence mode: the final
    chunk waited for a slot that never came and the request deadline had ended with the upstream
    call (issue 8). Both modes now drop a stalled client and hold every stream to a deadline."""

    timeout = 60

    @defer.inlineCallbacks
    def stalled(self, cadence_ms: int, **changes: Any) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=3000, text="x" * 2000))
        running = yield start_router(
            self,
            [url],
            unix=True,  # small socket buffers: the window closes after a few hundred KiB
            stream_cadence_ms=cadence_ms,
            idle_timeout_seconds=1000,
            **{"request_ttl_seconds": 1000, "write_stall_seconds": 30, **changes},
        )
        clock = running.router.clock
        raw = yield stream(running)
        raw.transport.pauseProducing()  # type: ignore[attr-defined]  # zero window from now on
        (open_stream,) = running.router.app.streams
        for _ in range(400):
            if open_stream.response.paused:
                break
            clock.advance(0.05)
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(open_stream.response.paused, "the client's window never closed")
        return running, raw

    @defer.inlineCallbacks
    def check_dropped(self, running: Any, raw: Any, after: float, reason: str) -> Any:
        clock = running.router.clock
        clock.advance(after - 1)
        yield settle()
        self.assertEqual(running.router.admission.slots.open, 1)
        clock.advance(1)
        self.assertEqual(running.router.admission.slots.open, 0)
        self.assertEqual(running.router.app.streams, set())
        raw.transport.resumeProducing()  # type: ignore[attr-defined]
        yield raw.ended  # the connection was closed under the client, without a final chunk
        self.assertFalse(raw.opener.finished)
        metrics = running.router.metrics.render().decode()
        self.assertIn(f'llmrouter_streams_dropped_total{{reason="{reason}"}} 1.0', metrics)

    @defer.inlineCallbacks
    def test_write_stall_frees_the_slot_in_cadence_mode(self) -> Any:
        running, raw = yield self.stalled(50)
        yield self.check_dropped(running, raw, 30, "write_stall")

    @defer.inlineCallbacks
    def test_write_stall_frees_the_slot_without_cadence(self) -> Any:
        running, raw = yield self.stalled(0)
        yield self.check_dropped(running, raw, 30, "write_stall")

    @defer.inlineCallbacks
    def test_whole_stream_deadline(self) -> Any:
        running, raw = yield self.stalled(50, request_ttl_seconds=20, write_stall_seconds=1000)
        elapsed = running.router.clock.seconds() - 1_700_000_000
        yield self.check_dropped(running, raw, 20 - elapsed, "deadline")


class _HeldCommits:
    """The router's own store, with each commit's answer held until ``answer()`` (a shared store
    that is slow to answer)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.held: list[tuple[defer.Deferred[Any], Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def commit(self, query: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((d, self._store.commit(query)))
        return d

    def answer(self) -> None:
        for d, committed in self.held:
            d.callback(committed)


class DepartureTests(TestCase):
    @defer.inlineCallbacks
    def test_a_client_that_leaves_during_admission_frees_its_slot(self) -> Any:
        """A client that leaves while a shared store answers opens no stream, calls no backend
        and holds no slot (the cancelled admission gives it back)."""
        from io import BytesIO

        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        from llmrouter.httpclient import agent_for

        backend, url = yield start_fault_backend(self, Script(tokens=3))
        running = yield start_router(self, [url])
        store = _HeldCommits(running.router.admission.store)
        running.router.admission.store = store
        body, _, _ = yield sealed(running, prompt("hi"))
        agent, base = agent_for(reactor, running.url)
        response = agent.request(
            b"POST",
            (base + "/api/chat").encode(),
            Headers({b"Content-Type": [b"application/json"]}),
            FileBodyProducer(BytesIO(body)),
        )
        response.addErrback(lambda failure: None)
        for _ in range(100):
            if store.held:
                break
            yield settle()
        self.assertEqual(len(store.held), 1)
        response.cancel()  # the client goes while the store has not answered
        yield settle()
        store.answer()
        yield settle()
        self.assertEqual(running.router.admission.slots.open, 0)
        self.assertEqual(running.router.app.streams, set())
        self.assertEqual(backend.log.requests, 0)


class StallTimerTests(TestCase):
    """The write-stall limit on a clock: it counts from the current pause only."""

    def stream(self) -> tuple[Any, Any, Any, Any]:
        from types import SimpleNamespace

        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.test.requesthelper import DummyRequest

        from llmrouter.protocol import ResponseSealer
        from llmrouter.router.metrics import RouterMetrics
        from llmrouter.terminate.stream import EncryptedStream

        class Request(DummyRequest):
            def registerProducer(self, producer: Any, streaming: bool) -> None:
                self.producer = producer  # DummyRequest's loops over resumeProducing

        clock, request, metrics = Clock(), Request([b"api", b"chat"]), RouterMetrics()
        request.channel = SimpleNamespace(transport=StringTransport())
        stream = EncryptedStream(
            request,
            ResponseSealer(b"s" * 32, b"e" * 32),
            clock,
            metrics,
            0.0,
            1000.0,
            deadline=1000.0,
            write_stall=30.0,
        )
        stream.token("first")  # opens the response: its producer is registered
        return stream, clock, metrics, request

    def dropped(self, metrics: Any) -> float:
        value = metrics.registry.get_sample_value(
            "llmrouter_streams_dropped_total", {"reason": "write_stall"}
        )
        return value or 0.0

    def test_a_reader_that_keeps_resuming_is_never_dropped(self) -> None:
        stream, clock, metrics, request = self.stream()
        for _ in range(100):  # 100 s of short pauses, each far below the 30 s limit
            request.producer.pauseProducing()
            clock.advance(1)
            request.producer.resumeProducing()
        clock.advance(60)
        self.assertEqual(self.dropped(metrics), 0)
        self.assertFalse(stream.response.left)
        self.assertFalse(request.channel.transport.disconnecting)
        request.producer.stopProducing()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_limit_counts_from_the_current_pause(self) -> None:
        stream, clock, metrics, request = self.stream()
        request.producer.pauseProducing()  # the timer is armed for t=30
        clock.advance(10)
        request.producer.resumeProducing()
        clock.advance(15)
        request.producer.pauseProducing()  # paused again at t=25: dropped at t=55, not t=30
        clock.advance(29.5)
        self.assertEqual(self.dropped(metrics), 0)
        clock.advance(0.5)
        self.assertEqual(self.dropped(metrics), 1)
        self.assertTrue(stream.response.left)
        self.assertTrue(request.channel.transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])
