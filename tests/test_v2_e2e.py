"""Protocol v2 end to end: a client, the router relaying, the nodes' gates opening.

Real daemons on real UNIX sockets: ``twistd inference --keys-dir`` on the tiny model (a node
with its own keys and an operator certificate), or ``--front`` in front of the fault-injecting
backend (which stands in only for faults and for scripted output a random model cannot be asked
for), and the router in-process on the real reactor, certified by the same operator. The client
seals with the wire module and opens every event, as an app does. What v1.1's tests cover runs
here again in v2: tools, JSON output, reasoning, logprobs, model routing, rotation, revocation,
replay, limits, fault handling, several routers through Redis, cadence and padding.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from llmrouter import pow
from llmrouter.chat import ChatRequest, ResponseFormat, Tool
from llmrouter.keystore import KeyStore
from llmrouter.protocol import Delta, Done, ErrorChunk, Reasoning, ToolCallDelta
from llmrouter.sse import SSEParser
from llmrouter.v2.certs import KeyDocumentV2
from llmrouter.v2.request import node_request_body, open_outer
from tests.redis_server import start_redis
from tests.router_support import (
    Script,
    direct_logprobs,
    http,
    metric_value,
    prompt,
    start_fault_backend,
    start_router,
)
from tests.test_inference_openai import SCHEMA
from tests.tools import RawClient, files_open_under
from tests.v2_support import (
    TINY,
    Operator,
    V2Client,
    V2Node,
    start_front_node,
    start_node,
)


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@dataclasses.dataclass
class Stack:
    operator: Operator
    nodes: list[V2Node]
    running: Any

    def client(self, **kwargs: Any) -> V2Client:
        kwargs.setdefault("now", self.running.router.clock.seconds)
        return V2Client(self.running.url, self.operator.pin, **kwargs)

    @defer.inlineCallbacks
    def probe(self) -> Any:
        """What the router's next health probe would do, now."""
        for backend in self.running.router.pool.backends:
            yield self.running.router.pool.probe(backend)
        for node in self.running.router.nodes.nodes:
            yield self.running.router.nodes.probe(node)


@defer.inlineCallbacks
def v2_stack(
    testcase: Any,
    nodes: list[V2Node] | None = None,
    operator: Operator | None = None,
    clock: Any = reactor,
    **router_changes: Any,
) -> Any:
    """Certified nodes (default: one of our daemons) and a certified in-process router."""
    operator = operator or Operator()
    if nodes is None:
        nodes = [(yield start_node(testcase, operator))]
    running = yield start_router(testcase, [n.url for n in nodes], clock=clock, **router_changes)
    if not (running.router.settings.keys_dir / "router.cert").exists():
        operator.certify_router(running.router.settings.keys_dir)
    stack = Stack(operator, nodes, running)
    yield stack.probe()
    return stack


@defer.inlineCallbacks
def fault_node(
    testcase: Any, operator: Operator, script: Script | None = None, **kwargs: Any
) -> Any:
    """A node in front of the fault backend (which lists the model ``fault``)."""
    backend, url = yield start_fault_backend(testcase, script)
    backend.models = ["fault"]
    backend.owned_by = "llamacpp"
    node = yield start_front_node(testcase, operator, url, **kwargs)
    return backend, node


def chunk_lengths(raw: bytes) -> list[int]:
    return [len(data) for name, data in SSEParser().feed(raw) if name == "chunk"]


class ChatTests(TestCase):
    """Our daemon behind the gate: what v1.1 gets, v2 gets."""

    timeout = 180

    @defer.inlineCallbacks
    def test_same_answer_as_v1(self) -> Any:
        stack = yield v2_stack(self)
        request = prompt("Hello there", max_tokens=10, temperature=0.0, model=TINY)
        v1 = yield defer.Deferred.fromCoroutine(stack.running.client().complete(request))
        answer = yield stack.client().chat(request)
        self.assertEqual(answer.status, 200)
        assert isinstance(answer.final, Done)
        self.assertEqual(answer.text, v1.text)
        self.assertEqual(answer.final.completion_tokens, 10)

    @defer.inlineCallbacks
    def test_json_schema_output_and_logprobs(self) -> Any:
        stack = yield v2_stack(self)
        client = stack.client()
        request = ChatRequest.from_prompt(
            "Who?",
            model=TINY,
            response_format=ResponseFormat("json_schema", SCHEMA, "person"),
            temperature=1.0,
            seed=3,
            max_tokens=300,
        )
        answer = yield client.chat(request)
        jsonschema.validate(json.loads(answer.text), SCHEMA)
        greedy = ChatRequest.from_prompt(
            "Hi", model=TINY, logprobs=True, top_logprobs=2, max_tokens=8, temperature=0.0
        )
        answer = yield client.chat(greedy)
        expected = yield direct_logprobs(stack.nodes[0].daemon.socket, greedy, TINY)
        self.assertEqual(len(answer.logprobs), len(expected))
        for entry, (token, logprob, raw, top) in zip(answer.logprobs, expected, strict=True):
            self.assertEqual((entry.token, entry.bytes), (token, raw))
            self.assertAlmostEqual(entry.logprob, logprob, places=3)
            self.assertEqual(len(entry.top_logprobs), len(top))

    @defer.inlineCallbacks
    def test_keys_models_and_plain_refusals(self) -> Any:
        stack = yield v2_stack(self)
        document = yield stack.client().document()
        self.assertIsInstance(document, KeyDocumentV2)
        self.assertEqual([n.name for n in document.nodes], ["node-a"])
        self.assertEqual(document.nodes_for(TINY)[0].models, (TINY,))
        _, headers, body = yield http(stack.running.url, path="/api/models")
        self.assertEqual(json.loads(body)["protocols"], ["1", "1.1", "2"])
        self.assertEqual(json.loads(body)["protocol"], "1.1")
        _, headers, _ = yield http(stack.running.url, path="/api/v2/keys")
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"public, max-age=60"])
        # before the router opens anything, refusals are plain JSON, as in v1
        client = stack.client()
        body, state = yield client.seal(prompt("Hi"))
        for content_type, payload, code, want in (
            (b"application/json", body, 415, "unsupported_media_type"),
            (b"message/ohttp-req", b"\x00" * 10, 400, "bad_request"),
            (b"message/ohttp-req", b"\x77" + body[1:], 400, "key_unknown"),
            (b"message/ohttp-req", body[:-1] + bytes([body[-1] ^ 1]), 400, "decrypt_failed"),
        ):
            answer = yield client.send(payload, state, {b"Content-Type": [content_type]})
            self.assertEqual((answer.status, answer.code), (code, want))
        answer = yield client.send(body, state)  # none of that spent the request
        self.assertIsInstance(answer.final, Done)

    @defer.inlineCallbacks
    def test_without_router_certificate_v2_is_off(self) -> Any:
        stack = yield v2_stack(self)
        (stack.running.router.settings.keys_dir / "router.cert").unlink()
        status, _, body = yield http(stack.running.url, path="/api/v2/keys")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (503, "v2_unavailable"))
        status, _, body = yield http(stack.running.url, path="/api/models")
        self.assertEqual(json.loads(body)["protocols"], ["1", "1.1"])

    @defer.inlineCallbacks
    def test_sealed_refusals_after_opening(self) -> Any:
        stack = yield v2_stack(self)
        client = stack.client()
        body, state = yield client.seal(prompt("Hi", max_tokens=2))
        first = yield client.send(body, state)
        self.assertIsInstance(first.final, Done)
        replayed = yield client.send(body, state)  # the router's replay cache: outer enc
        self.assertEqual((replayed.status, replayed.code), (200, "replay"))
        self.assertEqual([name for name, _ in SSEParser().feed(replayed.raw)], ["router"])
        stale = yield client.chat(prompt("Hi"), ts=int(time.time()) - 300)
        self.assertEqual((stale.status, stale.code), (200, "stale"))
        # a model the router has no node for (a document edited by the client itself)
        document = yield client.document()
        fake = dataclasses.replace(
            document,
            nodes=tuple(dataclasses.replace(n, models=("nope",)) for n in document.nodes),
        )
        unknown = yield client.chat(prompt("Hi"), model="nope", doc=fake)
        self.assertEqual((unknown.status, unknown.code), (200, "model_unknown"))

    @defer.inlineCallbacks
    def test_node_seals_its_own_refusals(self) -> Any:
        """After the wrap opened, the node's refusals are sealed under the response secret: a
        model its certificate lists but its engine does not serve, a field our engine cannot
        enforce."""
        operator = Operator()
        node = yield start_node(self, operator, models=(TINY, "other"))
        stack = yield v2_stack(self, [node], operator)
        client = stack.client()
        answer = yield client.chat(prompt("Hi"), model="other")
        self.assertEqual(answer.status, 200)
        self.assertIsInstance(answer.final, ErrorChunk)
        self.assertIsNone(answer.refusal)  # the node's sealed final, not the router's event
        self.assertEqual(answer.code, "model_unknown")
        bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
        request = ChatRequest.from_prompt(
            "N?", model=TINY, response_format=ResponseFormat("json_schema", bounded, "n")
        )
        answer = yield client.chat(request)
        self.assertEqual(answer.code, "upstream_refused")
        self.assertIsNone(answer.refusal)  # the node's final, not the router's event

    @defer.inlineCallbacks
    def test_base_mode_and_device_auth_required(self) -> Any:
        stack = yield v2_stack(self, device_auth="required")
        base = yield stack.client(device_sk=None).chat(prompt("Hi", max_tokens=2))
        self.assertEqual(base.code, "device_auth_required")
        self.assertIsNotNone(base.refusal)
        proven = yield stack.client().chat(prompt("Hi", max_tokens=2))
        self.assertIsInstance(proven.final, Done)

    @defer.inlineCallbacks
    def test_model_routing(self) -> Any:
        """Each node serves what its certificate lists; a request goes to a node of its model."""
        operator = Operator()
        a = yield start_node(self, operator, "node-a", models=(TINY,))
        b = yield start_node(
            self, operator, "node-b", models=("other",), extra_args=["--model-name", "other"]
        )
        stack = yield v2_stack(self, [a, b], operator)
        client = stack.client()
        for model, served in ((TINY, a), ("other", b), (TINY, a), ("other", b)):
            answer = yield client.chat(prompt("Hi", max_tokens=3), model=model)
            self.assertIsInstance(answer.final, Done)
            _, _, text = yield served.daemon.request(b"GET", "/metrics")
            self.assertGreater(
                metric_value(text.decode(), "inference_gate_http_responses_total", 'status="200"'),
                0,
            )
        for node in (a, b):
            _, _, text = yield node.daemon.request(b"GET", "/metrics")
            count = metric_value(
                text.decode(), "inference_gate_http_responses_total", 'status="200"'
            )
            self.assertEqual(count, 2.0)


class PromptCacheTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_prompt_cache_key_is_the_nodes_per_proven_device(self) -> Any:
        """The node derives the cache key from the device key the wrap proved (the router
        cannot put another device on it): the same device's next request reuses its prompt;
        another device's, or a request without a device key, reuses nothing."""
        operator = Operator()
        node = yield start_node(self, operator, extra_args=["--parallel", "4"])
        stack = yield v2_stack(self, [node], operator)
        request = prompt("A long enough question about the weather in Oslo today?", max_tokens=3)
        reused = "inference_prompt_tokens_reused_total"

        @defer.inlineCallbacks
        def reused_now() -> Any:
            _, _, text = yield node.daemon.request(b"GET", "/metrics")
            return metric_value(text.decode(), reused)

        alice = stack.client()
        first = yield alice.chat(request)
        assert isinstance(first.final, Done)
        for other in (stack.client(), stack.client(device_sk=None)):
            answer = yield other.chat(request)
            self.assertIsInstance(answer.final, Done)
            self.assertEqual((yield reused_now()), 0)
        yield alice.chat(request)
        self.assertEqual((yield reused_now()), first.final.prompt_tokens - 1)


class KeyTests(TestCase):
    """Rotation and revocation of the nodes' keys and the router's (outer) keys."""

    timeout = 180

    def node_store(self, node: V2Node) -> KeyStore:
        clock = Clock()
        clock.advance(time.time())
        store = KeyStore.open(node.keys_dir, clock, None, None, create=False, node=True)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def until_node_has(self, stack: Stack, kid: str) -> Any:
        for _ in range(100):
            yield stack.probe()
            document = yield stack.client().document()
            if document.nodes and document.nodes[0].current.kid == kid:
                return document
            yield sleep(0.1)
        raise AssertionError(f"the node never published {kid} as current")

    @defer.inlineCallbacks
    def test_node_rotation_keeps_the_overlap(self) -> Any:
        stack = yield v2_stack(self)
        client = stack.client()
        before = yield client.document()
        old = yield client.seal(prompt("Hi", max_tokens=2), doc=before)
        store = yield self.node_store(stack.nodes[0])
        store.rotate()  # what `llmrouter-keys --keys-dir NODE_DIR rotate` does
        after = yield self.until_node_has(stack, store.current.kid)
        self.assertNotEqual(after.nodes[0].current.kid, before.nodes[0].current.kid)
        answer = yield client.send(*old)  # sealed to the retired key: still in its overlap
        self.assertIsInstance(answer.final, Done)
        fresh = yield client.chat(prompt("Hi", max_tokens=2), doc=after)
        self.assertIsInstance(fresh.final, Done)

    @defer.inlineCallbacks
    def test_node_revocation_is_immediate(self) -> Any:
        stack = yield v2_stack(self)
        client = stack.client()
        before = yield client.document()
        store = yield self.node_store(stack.nodes[0])
        store.revoke(before.nodes[0].current.kid)
        yield sleep(2.5)  # the node polls its key directory every 2 s
        answer = yield client.chat(prompt("Hi", max_tokens=2), doc=before)
        self.assertEqual((answer.code, answer.refusal is not None), ("key_unknown", True))
        after = yield self.until_node_has(stack, store.current.kid)  # fetch again, seal again
        answer = yield client.chat(prompt("Hi", max_tokens=2), doc=after)
        self.assertIsInstance(answer.final, Done)

    @defer.inlineCallbacks
    def test_router_rotation_and_revocation(self) -> Any:
        stack = yield v2_stack(self)
        client = stack.client()
        before = yield client.document()
        keys = stack.running.router.keys
        keys.rotate()
        answer = yield client.chat(prompt("Hi", max_tokens=2), doc=before)  # in its overlap
        self.assertIsInstance(answer.final, Done)
        keys.revoke(before.current.kid)
        answer = yield client.chat(prompt("Hi", max_tokens=2), doc=before)
        self.assertEqual((answer.status, answer.code), (400, "key_unknown"))
        after = yield client.document()
        self.assertNotEqual(after.current.kid, before.current.kid)
        answer = yield client.chat(prompt("Hi", max_tokens=2), doc=after)
        self.assertIsInstance(answer.final, Done)


class LimitTests(TestCase):
    """Admission on what the outer layer tells the router."""

    timeout = 180

    @defer.inlineCallbacks
    def test_address_and_device_limits(self) -> Any:
        stack = yield v2_stack(self, device_rate_limit_burst=1, device_rate_limit_per_minute=1)
        device = stack.client()
        first = yield device.chat(prompt("Hi", max_tokens=2))
        self.assertIsInstance(first.final, Done)
        limited = yield device.chat(prompt("Hi", max_tokens=2))
        self.assertEqual((limited.status, limited.code), (200, "device_rate_limited"))
        self.assertGreaterEqual(limited.refusal.retry_after or 0, 1)  # type: ignore[union-attr]
        other = yield stack.client().chat(prompt("Hi", max_tokens=2))  # another device
        self.assertIsInstance(other.final, Done)

    @defer.inlineCallbacks
    def test_address_limit_is_plain(self) -> Any:
        stack = yield v2_stack(self, rate_limit_burst=1, rate_limit_per_minute=1)
        yield stack.client().chat(prompt("Hi", max_tokens=2))
        limited = yield stack.client().chat(prompt("Hi", max_tokens=2))
        self.assertEqual((limited.status, limited.code), (429, "rate_limited"))

    @defer.inlineCallbacks
    def test_new_device_proof_of_work_is_sealed(self) -> Any:
        stack = yield v2_stack(self, new_device_pow_difficulty=8)
        client = stack.client()
        body, state = yield client.seal(prompt("Hi", max_tokens=2))
        refused = yield client.send(body, state)
        self.assertEqual((refused.status, refused.code), (200, "pow_required"))
        refusal = refused.refusal
        assert refusal is not None and refusal.challenge is not None
        self.assertEqual(refusal.difficulty, 8)
        header = pow.solve(refusal.challenge, state.outer_enc)
        answer = yield client.send(body, state, {pow.HEADER.encode(): [header.encode()]})
        self.assertIsInstance(answer.final, Done)
        known = yield client.chat(prompt("Hi", max_tokens=2))  # known from now on
        self.assertIsInstance(known.final, Done)

    @defer.inlineCallbacks
    def test_budget_and_stream_slots(self) -> Any:
        stack = yield v2_stack(self, epsilon_total=0.2, epsilon_per_query=0.1)
        client = stack.client()
        for _ in range(2):
            answer = yield client.chat(prompt("Hi", max_tokens=2))
            self.assertIsInstance(answer.final, Done)
        spent = yield client.chat(prompt("Hi", max_tokens=2))
        self.assertEqual(spent.code, "budget_exhausted")
        self.assertEqual(stack.running.router.admission.slots.open, 0)


class FaultTests(TestCase):
    """Faults on the node's side, injected by the fault backend behind a front-mode node."""

    timeout = 180

    @defer.inlineCallbacks
    def test_v11_output_through_a_fronting_node(self) -> Any:
        """Reasoning, tool calls and logprobs, as a llama-server-style server streams them,
        sealed by the node and opened by the client; only what the request asked for."""
        top = [{"token": "b", "logprob": -2.0, "bytes": [98]}]
        lp = [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": top}]
        events = [
            {"choices": [{"delta": {"reasoning_content": "think"}}]},
            {"choices": [{"delta": {"content": "a"}, "logprobs": {"content": lp}}]},
            {
                "choices": [
                    {
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "c1",
                                    "function": {"name": "f", "arguments": "{"},
                                }
                            ]
                        }
                    }
                ]
            },
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}}
                ]
            },
        ]
        operator = Operator()
        _, node = yield fault_node(
            self, operator, Script(events=events, finish_reason="tool_calls")
        )
        stack = yield v2_stack(self, [node], operator)
        request = ChatRequest.from_prompt(
            "x",
            model="fault",
            include_reasoning=True,
            logprobs=True,
            top_logprobs=1,
            tools=(Tool("f", None, {"type": "object"}),),
        )
        answer = yield stack.client().chat(request, model="fault")
        kinds = [type(i) for i in answer.items]
        self.assertEqual(kinds, [Reasoning, Delta, ToolCallDelta, ToolCallDelta, Done])
        self.assertEqual(answer.reasoning, "think")
        self.assertEqual(answer.tool_calls, {0: ("c1", "f", "{}")})
        self.assertEqual([(e.token, e.logprob) for e in answer.logprobs], [("a", -0.5)])
        assert isinstance(answer.final, Done)
        self.assertEqual(answer.final.finish_reason, "tool_calls")
        plain = yield stack.client().chat(prompt("x"), model="fault")  # asked for none of it
        self.assertEqual([type(i) for i in plain.items], [Delta, Done])

    @defer.inlineCallbacks
    def test_model_server_dies_mid_stream(self) -> Any:
        """The node's stream ends with its own sealed error: the node saw the break."""
        operator = Operator()
        _, node = yield fault_node(self, operator, Script(tokens=10, die_after=3))
        stack = yield v2_stack(self, [node], operator)
        answer = yield stack.client().chat(prompt("x"), model="fault")
        self.assertEqual(len([i for i in answer.items if isinstance(i, Delta)]), 3)
        self.assertEqual((answer.code, answer.refusal), ("upstream_failed", None))

    @defer.inlineCallbacks
    def test_node_dies_mid_stream(self) -> Any:
        """The router appends its own sealed event: the client still gets a verified end."""
        operator = Operator()
        _, node = yield fault_node(self, operator, Script(tokens=1000, token_delay=0.05))
        stack = yield v2_stack(self, [node], operator)
        client = stack.client()
        body, state = yield client.seal(prompt("x"), model="fault")
        status, reader = yield client.post(body, state)
        self.assertEqual(status, 200)
        yield reader.first
        node.daemon.signal("KILL")
        yield reader.ended
        final = reader.opener.close()
        self.assertEqual(final.code, "upstream_failed")
        self.assertEqual([name for name, _ in SSEParser().feed(reader.raw)][-1], "router")
        self.assertEqual(stack.running.router.admission.slots.open, 0)

    @defer.inlineCallbacks
    def test_another_candidate_before_the_first_byte(self) -> Any:
        """A candidate that is down (or answers 503) is passed over for the next one."""
        operator = Operator()
        _, a = yield fault_node(self, operator, name="node-a")
        _, b = yield fault_node(self, operator, name="node-b")
        stack = yield v2_stack(self, [a, b], operator)
        client = stack.client()
        document = yield client.document()
        yield b.daemon.stop()  # the router has not noticed: b is still a healthy candidate

        def retries() -> list[str]:
            lines = stack.running.router.metrics.render().decode().splitlines()
            return [line for line in lines if line.startswith("llmrouter_upstream_retries_t")]

        # The router tries the two in random order: until it has tried b first once (each
        # chat does with probability 1/2; 4 chats left that to chance 1 time in 16).
        for _ in range(24):
            answer = yield client.chat(prompt("x"), model="fault", doc=document)
            self.assertIsInstance(answer.final, Done)  # every answer came, from a
            if retries():
                break
        self.assertEqual(len(retries()), 1, retries())  # one node (b) was passed over
        self.assertGreater(float(retries()[0].split()[-1]), 0)

    @defer.inlineCallbacks
    def test_client_leaving_stops_the_node(self) -> Any:
        operator = Operator()
        backend, node = yield fault_node(self, operator, Script(tokens=1000, token_delay=0.02))
        stack = yield v2_stack(self, [node], operator)
        client = stack.client()
        body, state = yield client.seal(prompt("x"), model="fault")
        _, reader = yield client.post(body, state)
        yield reader.first
        reader.transport.loseConnection()  # type: ignore[attr-defined]
        for _ in range(100):
            if backend.log.cancelled:
                break
            yield sleep(0.05)
        self.assertEqual(backend.log.cancelled, 1)
        self.assertEqual(stack.running.router.relay.streams, set())
        self.assertEqual(stack.running.router.nodes.nodes[0].streams, 0)

    @defer.inlineCallbacks
    def test_a_client_that_stops_reading_is_dropped(self) -> Any:
        operator = Operator()
        backend, node = yield fault_node(self, operator, Script(tokens=3000, text="x" * 2000))
        clock = Clock()
        clock.advance(time.time())
        stack = yield v2_stack(
            self, [node], operator, clock=clock, unix=True, write_stall_seconds=30
        )
        client = stack.client()
        body, state = yield client.seal(prompt("x"), model="fault")
        _, reader = yield client.post(body, state)
        reader.transport.pauseProducing()  # type: ignore[attr-defined]  # a zero window
        (relayed,) = stack.running.router.relay.streams
        for _ in range(400):
            if relayed.response.paused:
                break
            yield sleep(0.01)
        self.assertTrue(relayed.response.paused, "the client's window never closed")
        clock.advance(29)
        self.assertEqual(stack.running.router.admission.slots.open, 1)
        clock.advance(1)
        self.assertEqual(stack.running.router.admission.slots.open, 0)
        metrics = stack.running.router.metrics.render().decode()
        self.assertEqual(
            metric_value(metrics, "llmrouter_streams_dropped_total", 'reason="write_stall"'), 1
        )
        for _ in range(100):  # the node's connection went with it: the backend stops
            if backend.log.cancelled:
                break
            yield sleep(0.05)
        self.assertEqual(backend.log.cancelled, 1)


class FrontTests(TestCase):
    """``twistd inference --front``: the gate without a model, in front of a real llama-server
    (on the tiny model), in its dialect."""

    timeout = 240

    @defer.inlineCallbacks
    def test_a_node_fronting_llama_server(self) -> Any:
        from tests.llama_server import start_llama_server

        server = yield start_llama_server(self, "tiny-ls")
        operator = Operator()
        node = yield start_front_node(
            self, operator, f"unix:{server.socket}", models=("tiny-ls",), dialect="llama-server"
        )
        stack = yield v2_stack(self, [node], operator)
        request = prompt("Hello", max_tokens=6, temperature=0.0, seed=1)
        answer = yield stack.client().chat(request, model="tiny-ls")
        assert isinstance(answer.final, Done)
        self.assertEqual(answer.final.completion_tokens, 6)
        self.assertTrue(answer.text)
        status, _, _ = yield node.daemon.request(b"GET", "/v1/models")  # no engine API here
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_model_name_pins_the_name_a_node_serves(self) -> Any:
        """llama-server run without --alias lists its file path, which is no model name: a
        fronting node serves it under --model-name (as make run BACKEND=... does)."""
        from tests.llama_server import start_llama_server

        server = yield start_llama_server(self, "/a/path/tiny.gguf")
        operator = Operator()
        args = ["--model-name", "tiny.gguf"]
        node = yield start_front_node(
            self, operator, f"unix:{server.socket}", models=("tiny.gguf",),
            dialect="llama-server", extra_args=args,
        )  # fmt: skip
        stack = yield v2_stack(self, [node], operator)
        answer = yield stack.client().chat(prompt("Hello", max_tokens=3), model="tiny.gguf")
        assert isinstance(answer.final, Done)
        self.assertEqual(answer.final.completion_tokens, 3)


class DeadlineTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_the_deadline_ends_a_relayed_stream_sealed(self) -> Any:
        operator = Operator()
        backend, node = yield fault_node(self, operator, Script(tokens=1000, token_delay=0.05))
        clock = Clock()
        clock.advance(time.time())
        stack = yield v2_stack(self, [node], operator, clock=clock, request_ttl_seconds=60)
        client = stack.client()
        body, state = yield client.seal(prompt("x"), model="fault")
        _, reader = yield client.post(body, state)
        yield reader.first
        clock.advance(60)
        yield reader.ended
        final = reader.opener.close()
        self.assertEqual((final.code, type(final).__name__), ("timeout", "RouterRefusal"))
        self.assertEqual(stack.running.router.admission.slots.open, 0)
        for _ in range(100):  # the node's connection went: the backend stops generating
            if backend.log.cancelled:
                break
            yield sleep(0.05)
        self.assertEqual(backend.log.cancelled, 1)


class StreamShapeTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_cadence_and_padding_are_the_nodes(self) -> Any:
        """The node pads and paces; the router passes the bytes on as they are."""
        operator = Operator()
        script = Script(tokens=6, text="a longer token than most ", token_delay=0.05)
        _, node = yield fault_node(
            self, operator, script, extra_args=["--stream-cadence-ms", "20", "--pad-bytes", "256"]
        )
        stack = yield v2_stack(self, [node], operator)
        answer = yield stack.client().chat(prompt("x"), model="fault")
        self.assertIsInstance(answer.final, Done)
        lengths = chunk_lengths(answer.raw)
        self.assertGreaterEqual(len(lengths), 6)
        self.assertEqual(len(set(lengths)), 1, lengths)  # one padded size for every chunk
        self.assertEqual(answer.text, "".join(f"{script.text}{i} " for i in range(6)))


class SeveralRoutersTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_two_routers_share_replay_and_limits_through_redis(self) -> Any:
        redis = start_redis(self)
        operator = Operator()
        node = yield start_node(self, operator)
        first = yield v2_stack(self, [node], operator, state_url=redis.url)
        keys_dir = first.running.router.settings.keys_dir
        second = yield v2_stack(
            self, [node], operator, state_url=redis.url, keys_dir=keys_dir, keys_role="follower"
        )
        for stack in (first, second):
            for _ in range(100):
                if stack.running.router.store.available:
                    break
                yield sleep(0.05)
        client = first.client()
        body, state = yield client.seal(prompt("Hi", max_tokens=2))
        answer = yield client.send(body, state)
        self.assertIsInstance(answer.final, Done)
        replayed = yield dataclasses.replace(client, url=second.running.url).send(body, state)
        self.assertEqual(replayed.code, "replay")


class NodeTests(TestCase):
    """The node's own checks, asked directly, as only the router may."""

    timeout = 120

    @defer.inlineCallbacks
    def test_node_refusals_before_opening_are_plain(self) -> Any:
        stack = yield v2_stack(self)
        node = stack.nodes[0]
        body, _ = yield stack.client().seal(prompt("Hi", max_tokens=2))
        secret = stack.running.router.keys.private_key_for(f"{body[0]:02x}")  # the outer kid
        assert secret is not None
        outer = open_outer(body, secret)
        forwarded = node_request_body(outer, outer.wraps[0])
        status, _, _ = yield node.daemon.request(b"POST", "/v2/chat", forwarded)
        self.assertEqual(status, 200)
        for payload, code in (
            (forwarded, "replay"),
            (b"{}", "bad_request"),
            (forwarded.replace(b'"node-a"', b'"node-z"'), "key_unknown"),
        ):
            status, _, raw = yield node.daemon.request(b"POST", "/v2/chat", payload)
            self.assertEqual(json.loads(raw)["error"]["code"], code, raw)
        status, _, raw = yield node.daemon.request(b"GET", "/v2/keys")
        entry = json.loads(raw)
        self.assertEqual(set(entry), {"certificate", "keys", "attestations"})

    @defer.inlineCallbacks
    def test_node_without_certificate(self) -> Any:
        node = yield start_node(self, None)
        status, _, raw = yield node.daemon.request(b"GET", "/v2/keys")
        self.assertEqual((status, json.loads(raw)["error"]["code"]), (503, "v2_unavailable"))
        status, _, _ = yield node.daemon.request(b"GET", "/health")  # v1 is unaffected
        self.assertEqual(status, 200)


class GateBodyTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_large_request_is_never_spooled_to_disk(self) -> Any:
        """The gate opens prompts, so its listener keeps request bodies in memory and bounded
        as every other server a prompt reaches does (issue 19, llmrouter/bodies.py): while a
        150 KB body arrives, the node holds no file in its temporary directory, and a body over
        its --max-body is refused as announced."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        operator = Operator()
        _, url = yield start_fault_backend(self)
        node = yield start_front_node(self, operator, url, env={"TMPDIR": str(tmp)})
        body = b'{"v": 2, "ct": "' + b"A" * 150_000 + b'"}'
        endpoint = UNIXClientEndpoint(reactor, str(node.daemon.socket))
        peer = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(peer.transport.loseConnection)
        peer.transport.write(
            b"POST /v2/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-1000]
        )
        yield sleep(0.5)
        self.assertEqual(files_open_under(node.daemon.pid, str(tmp)), [])
        peer.transport.write(body[-1000:])
        for _ in range(600):
            if b"\r\n\r\n" in peer.data:
                break
            yield sleep(0.1)
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 400 "), peer.data[:80])  # read, refused
        self.assertEqual(files_open_under(node.daemon.pid, str(tmp)), [])
        status, _, data = yield node.daemon.request(b"POST", "/v2/chat", b" " * (2 << 20))
        self.assertEqual((status, json.loads(data)["error"]["code"]), (413, "body_too_large"))
