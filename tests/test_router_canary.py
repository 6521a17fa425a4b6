"""The canary no-leak test: user data goes through the whole stack and comes out nowhere.

Unique canary strings are sent as prompt content, as the device key, and in headers (User-Agent,
X-Forwarded-For, a custom header, the URL path), through real ``twistd llmrouter`` and
``twistd inference`` subprocesses whose output is captured to files. Good requests, rejected
ones (replay, rate limit, bad JSON quoting the canary, unknown route) and a client that hangs up
mid-stream all happen. Protocol v1.1 adds its own: tool definitions, a JSON schema and tool
results in the request; tool-call arguments (forced out of a real llama-server and of our own
daemon by their grammars) and reasoning text in the response (from a scripted backend, since no
random model writes a canary while it thinks, and our daemon's own reasoning, whose random text
is then looked for like a canary); a backend refusal whose message quotes the canary; malformed
v1.1 fields. Then no log, no /metrics output of any daemon and no file any daemon wrote (key
directory, working and temp directories) may contain any canary.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from llmrouter import hpke
from llmrouter.chat import ChatRequest, Message, ResponseFormat, Tool
from llmrouter.client import ChatError, Client
from llmrouter.protocol import b64u_encode, seal_request
from tests.daemons import start_inference, start_router_daemon
from tests.llama_server import HERMES, start_llama_server
from tests.router_support import (
    Script,
    daemon_pin,
    http,
    key_document,
    prompt,
    short_tempdir,
    start_fault_backend,
)
from tests.test_router_e2e import INFERENCE_ARGS, open_stream
from tests.tinymodel import tiny_model_path


def _files(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            found.extend(Path(dirpath) / name for name in names)
    return found


class CanaryTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_canaries_leak_nowhere(self) -> Any:
        tag = uuid.uuid4().hex[:12]
        prompt_canary = f"PROMPTCANARY{tag}"
        agent_canary = f"AGENTCANARY{tag}"
        header_canary = f"HEADERCANARY{tag}"
        path_canary = f"PATHCANARY{tag}"
        forwarded = f"10.{int(tag[:2], 16)}.{int(tag[2:4], 16)}.{int(tag[4:6], 16)}"
        device = hpke.generate_key_pair()
        device_canaries = [b64u_encode(device.pk), device.pk.hex()]

        tmp = short_tempdir(self)
        inference = yield start_inference(
            self,
            extra_args=[*INFERENCE_ARGS, "--max-tokens", "2000"],
            env={"TMPDIR": str(tmp)},
        )
        thinker = yield start_inference(
            self,
            model=tiny_model_path("deepseek-r1"),
            extra_args=[*INFERENCE_ARGS, "--model-name", "thinker"],
            env={"TMPDIR": str(tmp)},
        )
        tool_canary = f"TOOLCANARY{tag}"
        reasoning_canary = f"REASONINGCANARY{tag}"
        llama = yield start_llama_server(self, "tools", HERMES)
        scripted, scripted_url = yield start_fault_backend(
            self, Script(events=_v11_output(reasoning_canary, tool_canary))
        )
        scripted.models = ["scripted"]
        directory = short_tempdir(self)
        router = start_router_daemon(
            self,
            directory,
            [
                f"unix:{inference.socket} model=tiny",
                f"unix:{thinker.socket}",
                f"unix:{llama.socket}",
                f"{scripted_url} model=scripted",
            ],
            env={
                "TMPDIR": str(tmp),
                "RATE_LIMIT_PER_MINUTE": "60",
                "RATE_LIMIT_BURST": "29",  # the v1.1 requests, a proof of work and junk count too
                "TRUSTED_PROXIES": "127.0.0.1",
                "DEFAULT_MODEL": "tiny",  # v1 requests: never the thinker, whose text is reasoning
            },
        )
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        headers = {
            b"User-Agent": [agent_canary.encode()],
            b"X-Forwarded-For": [forwarded.encode()],
            b"X-Canary": [header_canary.encode()],
        }

        # a full chat in auth mode with the canary prompt
        tokens: list[str] = []
        done = yield defer.Deferred.fromCoroutine(
            Client(reactor, url, pin=daemon_pin(directory), device_key=device, protocol=1).chat(
                prompt(f"Repeat after me: {prompt_canary}", model="tiny", max_tokens=16),
                tokens.append,
            )
        )
        self.assertEqual(done.completion_tokens, 16)

        # v1.1: tool arguments and reasoning come back (sealed), tools and schemas go out
        client = Client(reactor, url, pin=daemon_pin(directory), device_key=device, protocol=1)
        yield self._v11(client, tool_canary, reasoning_canary, prompt_canary)
        base = Client(
            reactor, url, pin=daemon_pin(directory), protocol=1
        )  # past this device's burst
        thought = yield self._ours(base, tool_canary, prompt_canary)

        # the same envelope twice (replay), with canary headers
        document = yield key_document(url)
        envelope, state = seal_request(
            document.current(),
            prompt(f"again {prompt_canary}", max_tokens=2),
            int(reactor.seconds()),
            device,
        )
        body = json.dumps(envelope.to_json()).encode()
        chat_headers = {**headers, b"Content-Type": [b"application/json"]}
        status, _, _ = yield http(url, b"POST", "/api/chat", body, chat_headers)
        self.assertEqual(status, 200)
        status, _, answer = yield http(url, b"POST", "/api/chat", body, chat_headers)
        self.assertEqual(status, 409)
        self.assertNotIn(prompt_canary.encode(), answer)

        # malformed requests that quote the canaries back at us
        bad = json.dumps({prompt_canary: header_canary}).encode()
        status, _, answer = yield http(url, b"POST", "/api/chat", bad, chat_headers)
        self.assertEqual(status, 400)
        status, _, answer2 = yield http(url, b"POST", "/api/chat", b"{" + bad, chat_headers)
        self.assertEqual(status, 400)
        status, _, answer3 = yield http(url, b"GET", f"/{path_canary}", None, headers)
        self.assertEqual(status, 404)
        for text in (answer, answer2, answer3):
            for canary in (prompt_canary, header_canary, path_canary):
                self.assertNotIn(canary.encode(), text)

        # a client that hangs up mid-stream
        envelope, state = seal_request(
            document.current(),
            prompt(f"long {prompt_canary}", max_tokens=2000),
            int(reactor.seconds()),
            device,
        )
        reader = yield open_stream(url, json.dumps(envelope.to_json()).encode(), state, 2)
        yield reader.ended

        # until the per-IP limit answers 429 (its security event carries a hashed address)
        for _ in range(30):
            envelope, _ = seal_request(
                document.current(),
                prompt(prompt_canary, model="tiny", max_tokens=1),
                int(reactor.seconds()),
            )
            status, _, answer = yield http(
                url, b"POST", "/api/chat", json.dumps(envelope.to_json()).encode(), chat_headers
            )
            if status == 429:
                break
        self.assertEqual(status, 429, answer)

        # metrics of both daemons
        _, _, router_metrics = yield http(f"unix:{directory / 'metrics.sock'}", path="/metrics")
        _, _, inference_metrics = yield inference.request(b"GET", "/metrics")
        _, _, thinker_metrics = yield thinker.request(b"GET", "/metrics")
        self.assertIn(b"llmrouter_admission_rejections_total", router_metrics)

        yield router.stop()
        yield inference.stop()
        yield thinker.stop()
        router_log = router.log_text()
        self.assertIn('"event":"replay"', router_log)  # the security log did run...
        self.assertIn('"event":"rate_limited"', router_log)

        canaries = [prompt_canary, agent_canary, header_canary, path_canary, forwarded]
        canaries += [tool_canary, reasoning_canary, thought, *device_canaries]
        sources: dict[str, bytes] = {
            "router /metrics": router_metrics,
            "inference /metrics": inference_metrics,
            "thinker /metrics": thinker_metrics,
        }
        for path in _files(directory, inference.directory, thinker.directory, tmp):
            if path.is_file():
                sources[str(path)] = path.read_bytes()
        self.assertIn(str(router.log_path), sources)
        self.assertIn(str(inference.log_path), sources)
        self.assertIn(str(thinker.log_path), sources)
        self.assertTrue(any("keys" in name for name in sources))
        for name, data in sources.items():
            for canary in canaries:
                self.assertNotIn(canary.encode(), data, f"{canary} leaked into {name}")
                self.assertNotIn(canary.lower().encode(), data.lower(), f"{name}")

    @defer.inlineCallbacks
    def _v11(self, client: Client, tool_canary: str, reasoning_canary: str, other: str) -> Any:
        # llama-server's grammar forces the canary into the arguments (a const in the schema)
        secret = {"type": "object", "properties": {"secret": {"const": tool_canary}}}
        secret["required"] = ["secret"]
        tool = Tool("remember", f"Remember {tool_canary}", secret)
        request = ChatRequest(
            (Message("user", f"{other} {tool_canary}"), Message("assistant", "<tool_call>\n")),
            model="tools",
            tools=(tool,),
            tool_choice="required",
            temperature=0.0,
            max_tokens=150,
        )
        reply = yield defer.Deferred.fromCoroutine(client.complete(request))
        self.assertEqual(json.loads(reply.tool_calls[0].arguments), {"secret": tool_canary})
        # the call and its result go back in the history, with a canary JSON schema
        follow_up = ChatRequest(
            (
                Message("user", other),
                Message("assistant", None, (reply.tool_calls[0],)),
                Message("tool", f"stored {tool_canary}", (), reply.tool_calls[0].id),
            ),
            model="tools",
            tools=(tool,),
            tool_choice="none",
            response_format=ResponseFormat("json_schema", secret, "canary"),
            max_tokens=150,
        )
        answer = yield defer.Deferred.fromCoroutine(client.complete(follow_up))
        self.assertEqual(json.loads(answer.text), {"secret": tool_canary})
        # reasoning and a tool call from the scripted backend
        request = prompt(other, model="scripted", tools=(tool,), include_reasoning=True)
        reply = yield defer.Deferred.fromCoroutine(client.complete(request))
        self.assertIn(reasoning_canary, reply.reasoning)
        self.assertIn(tool_canary, reply.tool_calls[0].arguments)
        # the same output to a v1 request: dropped, never logged
        yield defer.Deferred.fromCoroutine(client.complete(prompt(other, model="scripted")))
        # llama-server refuses (logprobs with tools while streaming): its message stays inside
        bad = ChatRequest((Message("user", other),), model="tools", tools=(tool,), logprobs=True)
        e = yield self.assertFailure(defer.Deferred.fromCoroutine(client.complete(bad)), ChatError)
        self.assertEqual(e.code, "upstream_refused")
        # malformed v1.1 fields quoting the canaries are refused without them
        for broken in (
            prompt(other, tools=(Tool(f"bad name {tool_canary}"),)),
            prompt(other, model=f"{tool_canary} model"),
            ChatRequest((Message("tool", tool_canary, (), tool_canary),), model="tools"),
            prompt(other, tools=(Tool("f", None, {"$ref": f"https://{tool_canary}"}),)),
        ):
            e = yield self.assertFailure(
                defer.Deferred.fromCoroutine(client.complete(broken)), ChatError
            )
            self.assertEqual(e.code, "bad_payload")
            self.assertNotIn(tool_canary, e.message)
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(client.complete(prompt(other, model=tool_canary))),
            ChatError,
        )
        self.assertEqual(e.code, "model_unknown")
        self.assertNotIn(tool_canary, e.message)

    @defer.inlineCallbacks
    def _ours(self, client: Client, tool_canary: str, other: str) -> Any:
        """Our daemon: its grammar forces the canary into a call's arguments, and what it
        reasons (random text, returned to be looked for like a canary) arrives apart."""
        secret = {"type": "object", "properties": {"secret": {"const": tool_canary}}}
        secret["required"] = ["secret"]
        tool = Tool("remember", f"Remember {tool_canary}", secret)
        request = prompt(
            f"{other} {tool_canary}",
            model="thinker",
            tools=(tool,),
            tool_choice="remember",
            parallel_tool_calls=False,
            max_tokens=150,
        )
        reply = yield defer.Deferred.fromCoroutine(client.complete(request))
        self.assertEqual(json.loads(reply.tool_calls[0].arguments), {"secret": tool_canary})
        request = prompt(
            other, model="thinker", include_reasoning=True, temperature=1.0, seed=3, max_tokens=40
        )
        reply = yield defer.Deferred.fromCoroutine(client.complete(request))
        self.assertEqual(reply.text, "")
        self.assertGreater(len(set(reply.reasoning)), 10)  # distinctive enough to look for
        return reply.reasoning


def _v11_output(reasoning: str, arguments: str) -> list[dict[str, Any]]:
    """Chunks as llama-server streams them: reasoning, then one tool call in fragments."""

    def delta(**fields: Any) -> dict[str, Any]:
        return {"choices": [{"delta": fields}]}

    first = {"index": 0, "id": "call_1", "type": "function"}
    first["function"] = {"name": "remember", "arguments": ""}
    rest = {"index": 0, "function": {"arguments": json.dumps({"secret": arguments})}}
    return [
        delta(reasoning_content=f"I must keep {reasoning} secret."),
        delta(tool_calls=[first]),
        delta(tool_calls=[rest]),
    ]
