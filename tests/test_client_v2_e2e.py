"""The Python client, ``llmrouter-client`` and its proxy on protocol v2, against real daemons: a
certified ``twistd inference`` node on the tiny model behind a certified router (the stack of
tests/test_v2_e2e.py), trusting only the operator's pin, as an app would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from llmrouter.chat import ChatRequest
from llmrouter.client import ChatError, Client, Conversation, load_device_key
from llmrouter.protocol import b64u_encode
from tests.router_support import post_v2_chat, run_client_cli
from tests.test_client_proxy import run_proxy
from tests.test_v2_e2e import v2_stack
from tests.v2_support import TINY

CANARY = "canary-c1e7 tell me a story"


class ClientOnV2(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.stack = yield v2_stack(self)
        self.url = self.stack.running.url
        self.pin = self.stack.operator.pin

    def client(self, **kw: Any) -> Client:
        kw.setdefault("pin", self.pin)
        return Client(reactor, self.url, **kw)

    @defer.inlineCallbacks
    def test_library(self) -> Any:
        client = self.client(device_key=load_device_key(Path(self.mktemp())))
        models = yield defer.Deferred.fromCoroutine(client.models())
        self.assertEqual(models, [TINY])
        seen: list[str] = []
        request = ChatRequest.from_prompt(CANARY, model=TINY, max_tokens=6)
        reply = yield defer.Deferred.fromCoroutine(client.complete(request, seen.append))
        self.assertEqual(reply.done.completion_tokens, 6)
        self.assertEqual("".join(seen), reply.text)
        self.assertTrue(reply.text)
        # a conversation: the history travels sealed with each turn
        conversation = Conversation(client, model=TINY, max_tokens=3)
        yield defer.Deferred.fromCoroutine(conversation.say("hello"))
        second = yield defer.Deferred.fromCoroutine(conversation.say("and again"))
        self.assertEqual(second.done.completion_tokens, 3)
        self.assertEqual(len(conversation.messages), 4)

    @defer.inlineCallbacks
    def test_wrong_pins_seal_nothing(self) -> Any:
        router_key = bytes(self.stack.running.router.keys.signing_key.verify_key)
        for pin, text in ((router_key, "protocol 1"), (bytes(32), "does not verify")):
            client = self.client(pin=pin)
            with self.assertRaises(ChatError) as caught:
                yield defer.Deferred.fromCoroutine(
                    client.chat(ChatRequest.from_prompt("x", model=TINY))
                )
            self.assertEqual(caught.exception.code, "bad_key_document")
            self.assertIn(text, caught.exception.message)

    def run_client(self, *args: str, stdin: bytes | None = None) -> Any:
        env = {
            "PATH": "/usr/bin:/bin",
            "LLMROUTER_URL": self.url,
            "LLMROUTER_PIN": b64u_encode(self.pin),
        }
        return run_client_cli(args, env, stdin, Path(self.mktemp()).absolute())

    @defer.inlineCallbacks
    def test_command_line(self) -> Any:
        out, err, code = yield self.run_client(
            "chat", "--model", TINY, "--max-tokens", "4", "hello"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"completion_tokens=4", err)
        out, err, code = yield self.run_client("keys")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual([(n["name"], n["models"]) for n in doc["nodes"]], [("node-a", [TINY])])
        # the curl workflow: seal, POST the binary body, open the stream
        state = Path(self.mktemp()).absolute()
        body, err, code = yield self.run_client(
            "seal", "--model", TINY, "--max-tokens", "3", CANARY, "--state", str(state)
        )
        self.assertEqual(code, 0, err)
        self.assertNotIn(b"canary", body)
        status, _, stream = yield post_v2_chat(self.url, body)
        self.assertEqual(status, 200)
        out, err, code = yield self.run_client("open", "--state", str(state), stdin=stream)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.strip())
        # the same body again: the router refuses it, sealed
        _, _, stream = yield post_v2_chat(self.url, body)
        self.assertIn(b"event: router", stream)
        _, err, code = yield self.run_client("open", "--state", str(state), stdin=stream)
        self.assertEqual(code, 1)
        self.assertIn(b"replay", err)

    @defer.inlineCallbacks
    def test_proxy(self) -> Any:
        proxy = run_proxy(
            self, "--listen", "127.0.0.1:0", "--url", self.url, "--pin", b64u_encode(self.pin)
        )
        base_url = yield proxy.url
        client = openai.OpenAI(base_url=base_url, api_key=proxy.token, max_retries=0, timeout=60)
        models = yield threads.deferToThread(client.models.list)
        self.assertEqual([m.id for m in models.data], ["llmrouter", TINY])
        completion = yield threads.deferToThread(
            client.chat.completions.create,
            model=TINY,
            messages=[{"role": "user", "content": CANARY}],
            max_tokens=5,
        )
        self.assertEqual(completion.usage.completion_tokens, 5)
        self.assertTrue(completion.choices[0].message.content)
        self.assertNotIn(b"canary", proxy.output)
