"""Protocol v2 with our engine in process: the gate feeds the sealed stream from the scheduler.

Real daemons on real UNIX sockets: ``twistd inference --keys-dir`` on the tiny model (its gate
calls the engine in process), and beside it a ``--front`` node of dialect ``llmrouter`` in front
of that same daemon's API, which is the HTTP path the gate took before (``ChatCall`` over the
engine's event stream). Each has its own in-process router; the same requests through both must
open to the same items: text, logprobs, JSON output, tool calls, reasoning, usage, and the same
sealed refusals. Then what only the in-process call does: cancel, pause and resume the
generation itself, and the engine's overload.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from inference.gate.engine import EngineReply
from inference.gate.metrics import GateMetrics
from inference.guardrails import APIError
from inference.metrics import Metrics
from llmrouter.chat import ChatRequest, ResponseFormat, Tool
from llmrouter.protocol import Delta, Done, ErrorChunk, ToolCallDelta
from tests.router_support import metric_value, prompt
from tests.test_inference_openai import SCHEMA
from tests.test_v2_e2e import Stack, v2_stack
from tests.v2_support import TINY, Operator, start_front_node, start_node


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


# greedy, the tiny model counts on up to max_tokens
LONG = prompt("Count to a thousand.", max_tokens=1000, temperature=0.0, model=TINY)


def comparable(items: list[Any]) -> list[Any]:
    """The opened items, with the engine's random tool-call ids blanked (each call gets its
    own)."""
    out = []
    for item in items:
        if isinstance(item, ToolCallDelta) and item.id is not None:
            item = dataclasses.replace(item, id="-")
        out.append(item)
    return out


@defer.inlineCallbacks
def two_paths(testcase: TestCase, extra_args: tuple[str, ...] = ()) -> Any:
    """(in-process stack, HTTP-path stack) over the one engine of ``node-a``."""
    operator = Operator()
    node = yield start_node(testcase, operator, extra_args=extra_args)
    front = yield start_front_node(
        testcase, operator, node.url, name="node-f", models=(TINY,), dialect="openai"
    )
    inproc = yield v2_stack(testcase, [node], operator)
    http = yield v2_stack(testcase, [front], operator)
    return inproc, http


def engine_metric(stack: Stack, name: str, labels: str = "") -> Any:
    """One sample of the node's ``/metrics`` (the engine's and the gate's)."""
    return (
        stack.nodes[0]
        .daemon.request(b"GET", "/metrics")
        .addCallback(lambda answer: metric_value(answer[2].decode(), name, labels))
    )


class SameAnswerTests(TestCase):
    """What the HTTP hop gave the gate, the in-process call gives it."""

    timeout = 300

    @defer.inlineCallbacks
    def test_same_items_as_the_http_path(self) -> Any:
        inproc, http = yield two_paths(self)
        tool = Tool("lookup", "Look a city up.", {"type": "object", "properties": {"city": {}}})
        requests = [
            prompt("Hello there", max_tokens=12, temperature=0.0, model=TINY),
            ChatRequest.from_prompt(
                "Hi", model=TINY, logprobs=True, top_logprobs=3, max_tokens=10, temperature=0.0
            ),
            ChatRequest.from_prompt(
                "Who?",
                model=TINY,
                response_format=ResponseFormat("json_schema", SCHEMA, "person"),
                temperature=0.0,
                max_tokens=300,
                logprobs=True,
            ),
            ChatRequest.from_prompt(
                "Weather in Paris?",
                model=TINY,
                tools=(tool,),
                tool_choice="lookup",
                temperature=0.0,
                max_tokens=60,
            ),
            ChatRequest.from_prompt(
                "Think, then answer: 2+2?",
                model=TINY,
                include_reasoning=True,
                temperature=0.0,
                max_tokens=16,
            ),
        ]
        for request in requests:
            a = yield inproc.client().chat(request)
            b = yield http.client().chat(request)
            self.assertEqual((a.status, b.status), (200, 200))
            self.assertIsInstance(a.final, Done)
            self.assertEqual(comparable(a.items), comparable(b.items))
        # the JSON answer is valid, the forced call was made, logprobs came
        json_answer = yield inproc.client().chat(requests[2])
        self.assertTrue(json.loads(json_answer.text))
        self.assertTrue(json_answer.logprobs)
        called = yield inproc.client().chat(requests[3])
        self.assertEqual([name for _, name, _ in called.tool_calls.values()], ["lookup"])
        # it was the in-process call: the gate's upstream metric names the engine
        duration = yield engine_metric(
            inproc, "inference_gate_upstream_duration_seconds_count", 'backend="engine"'
        )
        self.assertEqual(duration, len(requests) + 2)

    @defer.inlineCallbacks
    def test_engine_refusals_are_sealed_as_before(self) -> Any:
        inproc, http = yield two_paths(self)
        bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
        unsupported = ChatRequest.from_prompt(
            "N?", model=TINY, response_format=ResponseFormat("json_schema", bounded, "n")
        )
        too_long = prompt("word " * 6000, max_tokens=8, model=TINY)
        for request, code in (
            (unsupported, "unsupported_schema"),
            (too_long, "context_length_exceeded"),
        ):
            a = yield inproc.client().chat(request)
            b = yield http.client().chat(request)
            self.assertIsNone(a.refusal)  # the node's sealed final, not the router's
            assert isinstance(a.final, ErrorChunk)
            self.assertEqual(a.final, b.final)
            self.assertEqual(
                (a.final.code, a.final.status, a.final.upstream_status, a.final.upstream_code),
                ("upstream_refused", 400, 400, code),
            )
        answer = yield inproc.client().chat(prompt("Hi", max_tokens=2, model=TINY))
        self.assertIsInstance(answer.final, Done)  # the engine goes on serving


class ControlTests(TestCase):
    """The stream controls the generation itself: cancel, pause, resume; the engine's slots."""

    timeout = 300

    @defer.inlineCallbacks
    def stack(self, *extra: str) -> Any:
        operator = Operator()
        node = yield start_node(self, operator, extra_args=extra)
        return (yield v2_stack(self, [node], operator))

    @defer.inlineCallbacks
    def held(self, stack: Stack) -> Any:
        """A long generation whose client stops reading (after its first item): its node's
        buffers fill (chunks padded to 8 KiB) and the generation is held, keeping its slot."""
        client = stack.client()  # a device each: the router's per-device limits stay out
        body, state = yield client.seal(LONG)
        _, reader = yield client.post(body, state)
        yield reader.first
        reader.transport.pauseProducing()  # type: ignore[attr-defined]
        return reader

    @defer.inlineCallbacks
    def test_client_leaving_cancels_the_generation(self) -> Any:
        stack = yield self.stack("--parallel", "1", "--queue", "1", "--pad-bytes", "8192")
        reader = yield self.held(stack)
        reader.transport.loseConnection()  # type: ignore[attr-defined]
        for _ in range(200):
            active = yield engine_metric(stack, "inference_active_generations")
            if active == 0:
                break
            yield sleep(0.05)
        self.assertEqual(active, 0)  # the slot is free: the generation was cancelled
        generated = yield engine_metric(stack, "inference_tokens_generated_total")
        self.assertLess(generated, 1000)
        cancelled = yield engine_metric(stack, "inference_requests_total", 'outcome="cancelled"')
        self.assertEqual(cancelled, 1)
        answer = yield stack.client().chat(prompt("Hi", max_tokens=2, model=TINY))
        self.assertIsInstance(answer.final, Done)  # the one slot serves again

    @defer.inlineCallbacks
    def test_a_paused_reader_pauses_the_generation(self) -> Any:
        """A client that stops reading: the node's buffers fill, the stream pauses the
        generation (its token count stops while far from max_tokens); reading again resumes
        it, and the answer is the one an attentive client gets."""
        stack = yield self.stack("--pad-bytes", "8192")  # megabytes: the buffers between fill
        client = stack.client()
        request = ChatRequest.from_prompt(
            "Count to a thousand.",
            model=TINY,
            max_tokens=1000,
            temperature=0.0,
            logprobs=True,
            top_logprobs=20,
        )
        whole = yield client.chat(request)
        assert isinstance(whole.final, Done)
        before = yield engine_metric(stack, "inference_tokens_generated_total")
        body, state = yield client.seal(request)
        _, reader = yield client.post(body, state)
        yield reader.first
        reader.transport.pauseProducing()  # type: ignore[attr-defined]
        last, steady = -1.0, 0
        for _ in range(100):  # until the count holds still over three looks
            yield sleep(0.2)
            count = yield engine_metric(stack, "inference_tokens_generated_total")
            steady = steady + 1 if count == last else 0
            last = count
            if steady == 3:
                break
        self.assertEqual(steady, 3)
        self.assertLess(last - before, whole.final.completion_tokens)  # held, not finished
        active = yield engine_metric(stack, "inference_active_generations")
        self.assertEqual(active, 1)  # paused, still holding its slot
        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        yield reader.ended
        final = reader.opener.close()
        self.assertEqual(final, whole.final)
        texts = [i.text for i in reader.items if isinstance(i, Delta)]
        self.assertEqual("".join(texts), whole.text)

    @defer.inlineCallbacks
    def test_a_busy_engine_is_overloaded(self) -> Any:
        """One slot and one place in the queue: while both are taken, the next request is
        refused overloaded; once they are free, served again."""
        stack = yield self.stack("--parallel", "1", "--queue", "1", "--pad-bytes", "8192")
        readers = [(yield self.held(stack))]
        queued = stack.client()
        body, state = yield queued.seal(LONG)
        second = queued.post(body, state)  # answers once it has the slot: not waited for
        for _ in range(200):  # until the second waits in the queue
            waiting = yield engine_metric(stack, "inference_queue_depth")
            if waiting == 1:
                break
            yield sleep(0.05)
        self.assertEqual(waiting, 1)
        client = stack.client()
        refused = yield client.chat(prompt("Hi", max_tokens=2, model=TINY))
        self.assertEqual(refused.code, "overloaded")
        self.assertIsNotNone(refused.refusal)  # the node refused it plainly, before opening
        readers[0].transport.loseConnection()  # type: ignore[attr-defined]
        _, reader = yield second  # the queued one got the slot
        yield reader.first
        reader.transport.loseConnection()  # type: ignore[attr-defined]
        for _ in range(200):
            answer = yield client.chat(prompt("Hi", max_tokens=2, model=TINY))
            if isinstance(answer.final, Done):
                break
            yield sleep(0.05)
        self.assertIsInstance(answer.final, Done)


class _Sink:
    """Records what reaches the stream (the seam under test is the reply's mapping)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def failed(self, *args: Any) -> None:
        self.calls.append(("failed", *args))

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


class RefusalMappingTests(TestCase):
    """An engine refusal the e2e tests cannot time (an overload between the gate's check and
    the scheduler's, the model still loading) is sealed as the HTTP hop's answer was: a 4xx is
    ``upstream_refused`` with its status, code and param; a 503 or 500 ``upstream_failed``."""

    def refuse(self, error: APIError) -> list[tuple[Any, ...]]:
        sink = _Sink()
        gate_metrics = GateMetrics(CollectorRegistry())
        reply = EngineReply(
            sink,  # type: ignore[arg-type]
            Metrics(),
            Clock(),
            0.0,
            upstream=gate_metrics,
            reasoning=False,
            tool_calls=False,
            logprobs=False,
        )
        reply.refuse(error)
        return sink.calls

    def test_refusals(self) -> None:
        message = "the inference backend refused the request"
        for error, expected in (
            (
                APIError(503, "overloaded", "busy", retry_after=1),
                ("failed", "upstream_failed", message, 502, None),
            ),
            (
                APIError(503, "loading", "loading", retry_after=5),
                ("failed", "upstream_failed", message, 502, None),
            ),
            (
                APIError(500, "internal", "Internal error."),
                ("failed", "upstream_failed", message, 502, None),
            ),
            (
                APIError(400, "unsupported_field", "x is not supported", param="x"),
                (
                    "failed",
                    "upstream_refused",
                    message,
                    400,
                    {
                        "upstream_status": 400,
                        "upstream_code": "unsupported_field",
                        "upstream_param": "x",
                    },
                ),
            ),
        ):
            self.assertEqual(self.refuse(error), [expected])
