"""Several models behind one router, backend dialects, and the v1.1 relay, in-process.

The router runs in-process on real sockets in front of fault backends (``router_support``), which
list the model names and ``owned_by`` they are told to on ``GET /v1/models`` and stream scripted
chat completion chunks (reasoning, tool-call fragments, logprobs) exactly as llama-server shapes
them; the real llama-server and our daemon are in ``test_router_llama_server`` and
``test_router_e2e``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmrouter import hpke
from llmrouter.chat import Message, Tool
from llmrouter.client import ChatError
from llmrouter.protocol import (
    ErrorChunk,
    ProtocolError,
    ResponseOpener,
    ResponseSealer,
    b64u_decode,
)
from llmrouter.router.metrics import RouterMetrics
from llmrouter.router.settings import Endpoint
from llmrouter.sse import SSEParser
from llmrouter.terminate.backends import Backend, BackendPool
from llmrouter.terminate.breaker import CircuitBreaker
from llmrouter.terminate.dialects import EVERYTHING, models_from, template_limits
from tests.router_support import (
    Script,
    http,
    post_chat,
    prompt,
    refusal,
    sealed,
    start_fault_backend,
    start_router,
)

TOOLS = (Tool("get_weather", "Weather", {"type": "object"}),)


def event(**delta: Any) -> dict[str, Any]:
    return {"choices": [{"delta": delta, "finish_reason": None}]}


def logprob(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": []}


# What llama-server streams for a reasoning model that then answers and calls a tool.
RICH = [
    event(role="assistant", content=None),
    event(reasoning_content="Let me think"),
    event(reasoning_content=" about it."),
    {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [logprob("Hi")]}}]},
    event(
        tool_calls=[
            {
                "index": 0,
                "id": "call_A",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    ),
    event(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}]),
    event(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
]


@defer.inlineCallbacks
def backend(testcase: Any, models: list[str] | None, owned_by: str = "fault", **script: Any) -> Any:
    fake, url = yield start_fault_backend(testcase, Script(**script))
    fake.models = models
    fake.owned_by = owned_by
    return fake, url


class ParsingTests(SynchronousTestCase):
    def test_models_from(self) -> None:
        body = json.dumps(
            {
                "data": [
                    {"id": "small", "owned_by": "llamacpp"},
                    {"id": "bad name"},
                    {"id": "small"},
                    "junk",
                    {"id": "big"},
                ]
            }
        ).encode()
        self.assertEqual(models_from(body), (("small", "big"), "llama-server"))
        self.assertEqual(models_from(b"{"), ((), None))
        self.assertEqual(models_from(b'{"data": {}}'), ((), None))
        many = {"data": [{"id": f"m{i}", "owned_by": "vllm"} for i in range(100)]}
        names, kind = models_from(json.dumps(many).encode())
        self.assertEqual((len(names), kind), (64, "vllm"))

    def test_template_limits(self) -> None:
        caps = {"supports_tools": False, "supports_tool_calls": False}
        caps["supports_reasoning_effort"] = False
        limits = template_limits(json.dumps({"chat_template_caps": caps}).encode())
        self.assertEqual(limits, {"tools", "parallel_tool_calls", "reasoning_effort"})
        self.assertEqual(template_limits(b'{"chat_template_caps": {}}'), frozenset())
        self.assertEqual(template_limits(b"[]"), frozenset())


class RouteTests(SynchronousTestCase):
    """BackendPool.route without sockets: which backends a request may use, or why none."""

    def pool(self, *endpoints: Endpoint, default: str | None = None) -> BackendPool:
        clock = Clock()
        backends = [
            Backend(f"backend-{i}", e.url, None, "", CircuitBreaker(clock, 5, 30), e)  # type: ignore[arg-type]
            for i, e in enumerate(endpoints)
        ]
        return BackendPool(clock, backends, RouterMetrics(), 5.0, 5.0, default)

    def assertRefused(self, pool: BackendPool, code: str, status: int, *args: Any) -> str:
        with self.assertRaises(ProtocolError) as cm:
            pool.route(*args)
        self.assertEqual((cm.exception.code, cm.exception.status), (code, status))
        return cm.exception.message

    def test_routes(self) -> None:
        pool = self.pool(
            Endpoint("unix:/a", ("small",), "llmrouter"),
            Endpoint("unix:/b", ("big", "big-alias"), "llama-server"),
            Endpoint("unix:/c", ("big",), "vllm"),
            Endpoint("unix:/d", ("local",), "ollama"),
        )
        for b in pool.backends:
            b.healthy = True
        self.assertEqual(pool.models(), ["small", "big", "big-alias", "local"])
        self.assertEqual(len(pool.route(None).backends), 4)  # no default: any backend, as in v1
        self.assertEqual([b.name for b in pool.route("big").backends], ["backend-1", "backend-2"])
        self.assertRefused(pool, "model_unknown", 404, "huge")
        wanted = frozenset({"parallel_tool_calls"})
        message = self.assertRefused(pool, "unsupported_field", 400, "local", wanted)
        self.assertIn("parallel_tool_calls", message)
        # our daemon takes every v1.1 field
        self.assertEqual(len(pool.route("small", EVERYTHING).backends), 1)
        self.assertEqual(len(pool.route("big", frozenset({"tools", "logprobs"})).backends), 2)
        # round robin within the model's pool
        route = pool.route("big")
        chosen = [pool.choose((), route) for _ in range(4)]
        self.assertEqual([b.name for b in chosen if b], ["backend-1", "backend-2"] * 2)

    def test_default_model_and_health(self) -> None:
        pool = self.pool(
            Endpoint("unix:/a", ("small",)), Endpoint("unix:/b", ("big",)), default="small"
        )
        pool.backends[1].healthy = True
        # the default model's only backend is down: overloaded, with a Retry-After
        with self.assertRaises(ProtocolError) as cm:
            pool.route(None)
        self.assertEqual(
            (cm.exception.code, cm.exception.extra), ("overloaded", {"retry_after": 5})
        )
        pool.backends[0].healthy = True
        self.assertEqual([b.name for b in pool.route(None).backends], ["backend-0"])

    def test_unknown_until_every_backend_listed_its_models(self) -> None:
        pool = self.pool(Endpoint("unix:/a", ("small",)), Endpoint("unix:/b"))
        self.assertRefused(pool, "no_backend", 503, "big")  # backend-1 may serve it
        pool.backends[1].discovered(("big",), "ollama")
        pool.backends[1].healthy = True
        self.assertEqual(pool.route("big").backends, (pool.backends[1],))
        self.assertRefused(pool, "model_unknown", 404, "huge")
        # pins win over what a backend lists
        pool.backends[0].discovered(("other",), None)
        self.assertEqual(pool.backends[0].models, ("small",))


class ModelsTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_select_by_model_and_list(self) -> Any:
        small, url0 = yield backend(self, ["small"], text="s")
        big, url1 = yield backend(self, ["big", "big-2"], text="b")
        running = yield start_router(self, [url0, url1], default_model="small")
        status, headers, body = yield http(running.url, path="/api/models")
        self.assertEqual(status, 200)
        doc = json.loads(body)
        self.assertEqual(
            ([m["id"] for m in doc["data"]], doc["default"]), (["small", "big", "big-2"], "small")
        )
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"public, max-age=30"])
        client = running.client()
        for model, expected in (("big", "b0 "), ("big-2", "b0 "), ("small", "s0 "), (None, "s0 ")):
            reply = yield defer.Deferred.fromCoroutine(client.complete(prompt("hi", model=model)))
            self.assertTrue(reply.text.startswith(expected), (model, reply.text))
        # each backend got the model it serves by name (vLLM and Ollama need it)
        self.assertEqual([b["model"] for b in big.log.bodies], ["big", "big-2"])
        self.assertEqual([b["model"] for b in small.log.bodies], ["small", "small"])
        listed = yield defer.Deferred.fromCoroutine(client.models())
        self.assertEqual(listed, ["small", "big", "big-2"])

    @defer.inlineCallbacks
    def test_refusals_are_sealed_and_spend_nothing(self) -> Any:
        """What the chosen model cannot do is refused after decryption: sealed (issue 19: a
        plain ``unsupported_field`` named the feature to every hop), the same ChatError."""
        fake, url = yield backend(self, ["ours"], owned_by="llamacpp")
        fake.props = {
            "chat_template_caps": {
                "supports_tools": False,
                "supports_tool_calls": False,
                "supports_reasoning_effort": False,
            }
        }
        running = yield start_router(self, [url])
        client = running.client()
        cases = [
            (prompt("hi", model="nope"), "model_unknown", 404),
            (prompt("hi", model="ours", tools=TOOLS), "unsupported_field", 400),
            (prompt("hi", reasoning_effort="low"), "unsupported_field", 400),
            (prompt("hi", tools=TOOLS, parallel_tool_calls=False), "unsupported_field", 400),
        ]
        for request, code, status in cases:
            e = yield self.assertFailure(
                defer.Deferred.fromCoroutine(client.complete(request)), ChatError
            )
            self.assertEqual((e.code, e.status), (code, status))
        self.assertEqual(fake.log.requests, 0)  # none of them reached the backend
        self.assertEqual(running.router.app.streams, set())
        self.assertEqual(running.router.admission.slots.open, 0)  # the stream slots came back
        fake.healthy = False
        yield running.router.pool.probe(running.router.pool.backends[0])
        body, _, _ = yield sealed(running, prompt("hi", model="ours"))
        status, headers, answer = yield post_chat(running.url, body)
        got, error, was_sealed = refusal(body, status, headers, answer)
        self.assertEqual((got, error["code"], was_sealed), (503, "overloaded", True))
        # retry once the next health probe may have found it back (the tests probe hourly)
        self.assertEqual(error["retry_after"], 3600)
        self.assertIsNone(headers.getRawHeaders(b"retry-after"))

    @defer.inlineCallbacks
    def test_dialects(self) -> Any:
        vllm, url0 = yield backend(self, ["v"], owned_by="vllm")
        llama, url1 = yield backend(self, ["l"], owned_by="llamacpp")
        llama.props = {
            "chat_template_caps": {"supports_tools": False, "supports_tool_calls": False}
        }
        running = yield start_router(self, [url0, url1])
        client = running.client()
        yield defer.Deferred.fromCoroutine(client.complete(prompt("hi", model="v", max_tokens=3)))
        yield defer.Deferred.fromCoroutine(client.complete(prompt("hi", model="l", max_tokens=3)))
        self.assertEqual(vllm.log.bodies[0]["max_completion_tokens"], 3)
        self.assertNotIn("max_tokens", vllm.log.bodies[0])
        self.assertEqual(llama.log.bodies[0]["max_tokens"], 3)
        # llama-server's template cannot carry tools: refused by name, not sent
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(client.complete(prompt("hi", model="l", tools=TOOLS))),
            ChatError,
        )
        self.assertEqual(e.code, "unsupported_field")
        self.assertIn("tools", e.message)
        self.assertEqual(len(llama.log.bodies), 1)

    @defer.inlineCallbacks
    def test_cache_key_only_to_our_daemon(self) -> Any:
        """An auth-mode request's prompt-cache key goes to our daemon only (the same key for
        the same device); any other kind would only get a tag to link a device's requests by.
        "Ours" means configured so (``kind=llmrouter``): a backend whose model list merely says
        ``owned_by: "llmrouter"`` gets nothing (issue 19)."""
        ours, url0 = yield backend(self, ["ours"], owned_by="llmrouter")
        llama, url1 = yield backend(self, ["l"], owned_by="llamacpp")
        claims, url2 = yield backend(self, ["claims"], owned_by="llmrouter")
        running = yield start_router(self, [f"{url0} kind=llmrouter", url1, url2])
        device = running.client(device_key=hpke.generate_key_pair())
        for model in ("ours", "l", "ours", "claims"):
            yield defer.Deferred.fromCoroutine(device.complete(prompt("hi", model=model)))
        yield defer.Deferred.fromCoroutine(running.client().complete(prompt("hi", model="ours")))
        first, again, base = ours.log.cache_keys
        self.assertRegex(first or b"", rb"^[A-Za-z0-9_-]{43}$")
        self.assertEqual((again, base), (first, None))  # base mode: no device, no key
        self.assertEqual(llama.log.cache_keys, [None])
        self.assertEqual(claims.log.cache_keys, [None])

    @defer.inlineCallbacks
    def test_shared_prompt_caches_are_isolated(self) -> Any:
        """vLLM's prefix cache and llama-server's slots are shared between users: vLLM gets a
        cache_salt, the device's keyed cache key as our daemon gets it (base mode: a fresh one
        per request), llama-server gets cache_prompt false (tests.test_router_llama_server runs
        the latter against a real llama-server)."""
        ours, url0 = yield backend(self, ["ours"], owned_by="llmrouter")
        vllm, url1 = yield backend(self, ["v"], owned_by="vllm")
        llama, url2 = yield backend(self, ["l"], owned_by="llamacpp")
        running = yield start_router(self, [f"{url0} kind=llmrouter", url1, url2])
        device = running.client(device_key=hpke.generate_key_pair())
        other = running.client(device_key=hpke.generate_key_pair())
        for client, model in ((device, "ours"), (device, "v"), (device, "v"), (other, "v")):
            yield defer.Deferred.fromCoroutine(client.complete(prompt("hi", model=model)))
        for _ in range(2):
            yield defer.Deferred.fromCoroutine(running.client().complete(prompt("hi", model="v")))
        yield defer.Deferred.fromCoroutine(device.complete(prompt("hi", model="l")))
        salts = [body["cache_salt"] for body in vllm.log.bodies]
        (key,) = ours.log.cache_keys
        self.assertEqual(salts[:2], [key.decode(), key.decode()])  # one device, its key
        self.assertEqual(len(set(salts)), 4)  # another device, and each base-mode request
        self.assertNotIn("cache_prompt", vllm.log.bodies[0])
        self.assertIs(llama.log.bodies[0]["cache_prompt"], False)
        self.assertNotIn("cache_salt", llama.log.bodies[0])
        self.assertNotIn("cache_salt", ours.log.bodies[0])

    @defer.inlineCallbacks
    def test_backend_refusal_names_its_code(self) -> Any:
        error = {
            "code": 400,
            "message": "tools + stream: CANARY",
            "type": "invalid_request_error",
            "param": "tools",
        }
        error_body = json.dumps({"error": error}).encode()
        _, url = yield backend(self, None, status=400, error_body=error_body)
        running = yield start_router(self, [url])
        body, _, _ = yield sealed(running, prompt("hi", tools=TOOLS, logprobs=True))
        status, headers, answer = yield post_chat(running.url, body)
        got, doc, was_sealed = refusal(body, status, headers, answer)
        self.assertEqual((got, was_sealed), (400, True))  # what the backend said: sealed
        self.assertEqual(
            (doc["code"], doc["upstream_status"], doc["upstream_code"]),
            ("upstream_refused", 400, "invalid_request_error"),
        )
        self.assertEqual(doc["upstream_param"], "tools")
        self.assertNotIn(b"CANARY", answer)  # the backend's message may quote the request
        self.assertNotIn("CANARY", doc["message"])


class RelayTests(TestCase):
    """Each kind of output reaches only a request that asked for it."""

    timeout = 30

    @defer.inlineCallbacks
    def test_v11_request_gets_everything(self) -> Any:
        _, url = yield backend(self, None, events=RICH, finish_reason="tool_calls")
        running = yield start_router(self, [url])
        request = prompt("hi", tools=TOOLS, include_reasoning=True, logprobs=True)
        reasoning: list[str] = []
        reply = yield defer.Deferred.fromCoroutine(
            running.client().complete(request, on_reasoning=reasoning.append)
        )
        self.assertEqual((reply.text, reply.reasoning), ("Hi", "Let me think about it."))
        self.assertEqual(reasoning, ["Let me think", " about it."])
        (call,) = reply.tool_calls
        self.assertEqual(
            (call.id, call.name, json.loads(call.arguments)),
            ("call_A", "get_weather", {"city": "Oslo"}),
        )
        self.assertEqual(
            [(lp.token, lp.logprob, lp.bytes) for lp in reply.logprobs], [("Hi", -0.25, (72, 105))]
        )
        self.assertEqual(reply.finish_reason, "tool_calls")
        # the assistant message for the next turn carries the call
        self.assertEqual(reply.message(), Message("assistant", "Hi", (call,)))

    @defer.inlineCallbacks
    def test_v1_request_gets_v1_bytes(self) -> Any:
        """Byte for byte: the stream a v1 request gets from a backend that reasons, calls tools and
        sends logprobs is what the v1 sealer makes of its text alone."""
        _, url = yield backend(self, None, events=RICH, finish_reason="tool_calls")
        running = yield start_router(self, [url])
        body, envelope, state = yield sealed(running, prompt("hi"))
        status, _, raw = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        events = SSEParser().feed(raw)
        self.assertEqual([name for name, _ in events], ["init", "chunk", "final"])
        nonce = b64u_decode(json.loads(events[0][1])["response_nonce"], "nonce", 32)
        v1 = ResponseSealer(state.secret, envelope.enc, response_nonce=nonce)
        # tool_calls is no v1 finish reason: a v1 client sees "stop"
        expected = v1.init_event() + v1.delta("Hi") + v1.done("stop", 3, 7)
        self.assertEqual(raw.replace(b": keepalive\n\n", b""), expected)

    @defer.inlineCallbacks
    def test_reasoning_only_is_progress_for_v1(self) -> Any:
        """A v1 request to a thinking model: the stream opens (keepalives can flow), no retry."""
        events = [event(reasoning_content=f"step {i} ") for i in range(3)]
        fake, url = yield backend(self, None, events=events, die_after=3)
        running = yield start_router(self, [url], retry_max=2)
        body, _, state = yield sealed(running, prompt("hi"))
        status, _, raw = yield post_chat(running.url, body)
        self.assertEqual(status, 200)  # opened on the first reasoning output...
        opener = ResponseOpener(state)
        items = opener.feed(raw)
        self.assertEqual(
            items, [ErrorChunk("upstream_failed", "the inference backend stream ended early", 502)]
        )
        self.assertEqual(fake.log.requests, 1)  # ...so the failure was not retried elsewhere

    @defer.inlineCallbacks
    def test_tool_call_without_id(self) -> Any:
        """Some backends give no id; the client names the call so it can go back in history."""
        events = [
            event(tool_calls=[{"index": 0, "function": {"name": "get_weather", "arguments": "{}"}}])
        ]
        _, url = yield backend(self, None, events=events, finish_reason="tool_calls")
        running = yield start_router(self, [url])
        reply = yield defer.Deferred.fromCoroutine(
            running.client().complete(prompt("hi", tools=TOOLS))
        )
        self.assertEqual(reply.tool_calls[0].id, "call_0")
        self.assertEqual(reply.message().tool_calls[0].name, "get_weather")

    @defer.inlineCallbacks
    def test_backend_error_after_output_is_sealed(self) -> Any:
        events = [event(content="Hi"), {"error": {"code": 500, "message": "quoting CANARY"}}]
        _, url = yield backend(self, None, events=events)
        running = yield start_router(self, [url])
        body, _, state = yield sealed(running, prompt("hi"))
        status, _, raw = yield post_chat(running.url, body)
        self.assertEqual(status, 200)
        items = ResponseOpener(state).feed(raw)
        # the backend's own message (it may quote the request) stays inside
        self.assertEqual(
            items[-1], ErrorChunk("upstream_failed", "the inference backend failed", 502)
        )

    @defer.inlineCallbacks
    def test_malformed_upstream_tool_call(self) -> Any:
        events = [event(content="x"), event(tool_calls=[{"index": "zero"}])]
        _, url = yield backend(self, None, events=events)
        running = yield start_router(self, [url])
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(running.client().complete(prompt("hi", tools=TOOLS))),
            ChatError,
        )
        self.assertEqual((e.code, e.message), ("upstream_failed", "malformed upstream tool call"))
