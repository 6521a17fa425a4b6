"""The Python client and ``llmrouter-client`` against protocol v1 and v2 handlers on real sockets.

The handlers here are the router side of each protocol in its smallest form: for v1,
protocol.py's parse_envelope/open_request/ResponseSealer behind a twisted.web resource; for v2,
llmrouter.v2's router functions (open the outer layer, seal refusals) and node functions (open
the wrap, seal the stream) in one resource. So these tests exercise the client and both halves
of the library together. The handlers can be told to misbehave (stale key, proof of work, a
stream cut short) to drive the client's error paths; the real router and node are covered by
their own end-to-end tests. Every behaviour both protocols share is tested in both
(:class:`ClientTests` and its ``V2`` subclass, and so on).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing
from twisted.internet import defer, reactor, task, utils
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import server

from llmrouter import hpke
from llmrouter import protocol as p
from llmrouter.chat import Tool
from llmrouter.client import ChatError, Client, Conversation, load_device_key
from tests.client_handlers import Handler, V2Handler
from tests.router_support import post_v2_chat, run_client_cli

ROOT = Path(__file__).resolve().parents[1]


class Fixture(TestCase):
    protocol = 1

    def setUp(self) -> None:
        self.handler: Any = Handler() if self.protocol == 1 else V2Handler()
        site = server.Site(self.handler)
        site.log = lambda request: None  # type: ignore[method-assign]
        # Absolute and short: subprocesses run elsewhere, and sun_path holds 108 bytes.
        sockdir = tempfile.mkdtemp(prefix="llmr-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        self.sock = os.path.join(sockdir, "router.sock")
        unix_port = reactor.listenUNIX(self.sock, site)  # type: ignore[attr-defined]
        tcp_port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(unix_port.stopListening)
        self.addCleanup(tcp_port.stopListening)
        self.urls = [f"unix:{self.sock}", f"http://127.0.0.1:{tcp_port.getHost().port}"]
        if self.protocol == 1:
            self.pin = bytes(self.handler.signing.verify_key)
        else:
            self.pin = self.handler.pin  # the operator's key

    def client(self, url: str | None = None, **kw: Any) -> Client:
        kw.setdefault("pin", self.pin)
        kw.setdefault("protocol", self.protocol)
        return Client(reactor, url or self.urls[0], **kw)

    async def chat(self, client: Client, prompt: str) -> tuple[str, p.Done]:
        out: list[str] = []
        done = await client.chat(p.ChatRequest.from_prompt(prompt), out.append)
        return "".join(out), done


class ClientTests(Fixture):
    @defer.inlineCallbacks
    def test_base_mode_unix_and_tcp(self) -> Any:
        for url in self.urls:
            text, done = yield defer.Deferred.fromCoroutine(
                self.chat(self.client(url), "one two three four five six seven eight nine ten")
            )
            self.assertEqual(text, "ten nine eight seven six five four three two one ")
            self.assertEqual(done, p.Done("stop", 3, 10))
        self.assertEqual(self.handler.seen_modes, ["base", "base"])

    @defer.inlineCallbacks
    def test_auth_mode_device_key(self) -> Any:
        key_file = Path(self.mktemp())
        device = load_device_key(key_file)
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(load_device_key(key_file), device)
        client = self.client(self.urls[1], device_key=device)
        text, _ = yield defer.Deferred.fromCoroutine(self.chat(client, "a b"))
        self.assertEqual(text, "b a ")
        self.assertEqual(self.handler.seen_modes, ["auth"])
        self.assertEqual(self.handler.seen_devices, [device.pk])

    def test_device_key_permissions(self) -> None:
        key_file = Path(self.mktemp())
        load_device_key(key_file)
        key_file.chmod(0o644)
        self.assertRaises(ChatError, load_device_key, key_file)

    @defer.inlineCallbacks
    def test_key_unknown_refetches_and_retries_once(self) -> Any:
        client = self.client()
        yield defer.Deferred.fromCoroutine(client.fetch_keys())
        self.handler.rotations_pending = 1
        text, _ = yield defer.Deferred.fromCoroutine(self.chat(client, "x y"))
        self.assertEqual(text, "y x ")
        self.assertEqual(self.handler.rotations_pending, 0)

    @defer.inlineCallbacks
    def test_stale_is_sealed_again_once(self) -> Any:
        """A router that just restarted refuses timestamps from before its start."""
        self.handler.stale_pending = 1
        text, _ = yield defer.Deferred.fromCoroutine(self.chat(self.client(), "x y"))
        self.assertEqual(text, "y x ")
        self.handler.stale_pending = 2
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "x"))
        self.assertEqual(cm.exception.code, "stale")

    def test_a_pin_or_trust_on_first_use_is_required(self) -> None:
        """Without ``pin`` the document's own signing key was trusted silently (issue 8)."""
        with self.assertRaises(ValueError) as caught:
            Client(reactor, self.urls[0])
        self.assertIn("tofu", str(caught.exception))

    @defer.inlineCallbacks
    def test_stale_key_document_is_refused(self) -> Any:
        """An old signed document may carry a key revoked since: refuse it (issue 8)."""
        self.handler.issued_at = p.key_document_issued_at(time.time()) - 2 * 86400
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "x"))
        self.assertEqual(cm.exception.code, "bad_key_document")
        self.assertIn("older than 24 hours", cm.exception.message)
        self.assertEqual(self.handler.seen_modes, [])

    @defer.inlineCallbacks
    def test_an_older_document_never_replaces_a_newer_one(self) -> Any:
        """An older (still fresh) document is what a replay looks like: the newer one stays."""
        client = self.client()
        first = yield defer.Deferred.fromCoroutine(client.fetch_keys())
        self.handler.issued_at = first.issued_at - 3600
        second = yield defer.Deferred.fromCoroutine(client.fetch_keys())
        self.assertIs(second, first)
        self.handler.issued_at = None  # this hour's again: it replaces the one held
        third = yield defer.Deferred.fromCoroutine(client.fetch_keys())
        self.assertIsNot(third, first)
        self.assertEqual(third.issued_at, first.issued_at)

    @defer.inlineCallbacks
    def test_pin_mismatch(self) -> Any:
        other = bytes(nacl.signing.SigningKey.generate().verify_key)
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(pin=other), "x"))
        self.assertEqual(cm.exception.code, "bad_key_document")
        self.assertEqual(self.handler.seen_modes, [])

    @defer.inlineCallbacks
    def test_solves_proof_of_work(self) -> Any:
        self.handler.pow_key = os.urandom(32)
        text, _ = yield defer.Deferred.fromCoroutine(self.chat(self.client(), "solve me"))
        self.assertEqual(text, "me solve ")

    @defer.inlineCallbacks
    def test_proof_of_work_harder_than_allowed_is_refused_at_once(self) -> Any:
        """An on-path party asking for 32 bits pinned a CPU for hours per request (issue 19):
        above 24 bits (as the TypeScript SDK) the client refuses with a typed error."""
        self.handler.pow_key = os.urandom(32)
        self.handler.pow_difficulty = 30
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "x"))
        self.assertEqual((cm.exception.code, cm.exception.status), ("pow_too_hard", 401))
        self.assertIn("30 bits", cm.exception.message)
        self.handler.pow_difficulty = 12
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(max_pow_difficulty=10), "x"))
        self.assertEqual(cm.exception.code, "pow_too_hard")

    @defer.inlineCallbacks
    def test_proof_of_work_is_cancellable(self) -> Any:
        """Cancelling a request (the proxy's client left) stops the solver's thread too."""
        self.handler.pow_key = os.urandom(32)
        self.handler.pow_difficulty = 24  # allowed, and minutes of work in Python
        pool = reactor.getThreadPool()  # type: ignore[attr-defined]
        call = defer.Deferred.fromCoroutine(self.chat(self.client(), "x"))
        for _ in range(100):
            yield deferLater(reactor, 0.05, lambda: None)
            if pool.working:
                break
        self.assertTrue(pool.working)  # solving
        call.cancel()
        yield self.assertFailure(call, defer.CancelledError)
        for _ in range(100):
            if not pool.working:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(pool.working, [])

    @defer.inlineCallbacks
    def test_truncated_stream(self) -> Any:
        self.handler.cut_after = 2
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "a b c d"))
        self.assertEqual(cm.exception.code, "truncated")

    @defer.inlineCallbacks
    def test_error_final_chunk(self) -> Any:
        self.handler.fail_with = "upstream_failed"
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "a b"))
        self.assertEqual(cm.exception.code, "upstream_failed")
        # a v1 router's chunk without a status says no more; in v2 the code's status stands
        self.assertEqual(cm.exception.status, None if self.protocol == 1 else 502)

    @defer.inlineCallbacks
    def test_sealed_refusal_is_the_same_typed_error(self) -> Any:
        """A refusal after decryption comes as a sealed final chunk (issue 19) with what a
        plain refusal said: status, Retry-After, the backend's reason."""
        self.handler.fail_with = "budget_exhausted"
        self.handler.fail_detail = {"status": 429, "retry_after": 86400}
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "a"))
        e = cm.exception
        self.assertEqual((e.code, e.status, e.retry_after), ("budget_exhausted", 429, 86400))
        self.handler.fail_with = "upstream_refused"
        self.handler.fail_detail = {
            "status": 400,
            "upstream_status": 400,
            "upstream_code": "max_tokens_exceeded",
            "upstream_param": "max_tokens",
        }
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(), "a"))
        e = cm.exception
        self.assertEqual((e.code, e.status), ("upstream_refused", 400))
        self.assertEqual(
            e.upstream,
            {
                "upstream_status": 400,
                "upstream_code": "max_tokens_exceeded",
                "upstream_param": "max_tokens",
            },
        )

    @defer.inlineCallbacks
    def test_refusal_is_reported(self) -> Any:
        client = self.client()
        yield defer.Deferred.fromCoroutine(client.fetch_keys())
        self.handler.rotations_pending = 2  # the key changes again after the client's refetch
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(client, "x"))
        self.assertEqual((cm.exception.code, cm.exception.status), ("key_unknown", 400))


class DocumentedExampleTests(Fixture):
    protocol = 2  # the library's default, as the example uses it

    @defer.inlineCallbacks
    def test_the_documented_example_runs(self) -> Any:
        """docs/clients.md's Python example, as it is, against the handler (issue 19: the
        library had no example, a printed pin failed late, the types were not exported)."""
        text = (ROOT / "docs" / "clients.md").read_text()
        example = text.split("```python\n# example: python library\n", 1)[1].split("```", 1)[0]
        script = Path(self.mktemp())
        script.write_text(example)
        env = {
            **os.environ,
            "LLMROUTER_URL": self.urls[1],
            "LLMROUTER_PIN": p.b64u_encode(self.pin),
            "PYTHONPATH": str(ROOT),
        }
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [str(script)], env=env
        )
        self.assertEqual(code, 0, err.decode())
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], "blue? sky the is Why ")
        self.assertEqual(lines[1], "[stop, 5 tokens]")
        self.assertEqual(lines[2], 'get_weather({"x": 1})')
        self.assertEqual(lines[3], '3} {"temperature": ')  # the handler reverses words
        last = self.handler.requests[-1]
        self.assertEqual(last.tool_choice, "none")
        self.assertEqual(self.handler.requests[-2].tool_choice, "get_weather")

    def test_a_pin_is_checked_when_the_client_is_made(self) -> None:
        printed = p.b64u_encode(self.pin)
        self.assertEqual(self.client(pin=printed)._pin, self.pin)  # type: ignore[attr-defined]
        for bad in ("not-a-key", b"short", printed + "A"):
            self.assertRaises(ValueError, self.client, pin=bad)


class ConversationTests(Fixture):
    @defer.inlineCallbacks
    def test_tool_round_trip_keeps_history_here(self) -> Any:
        tool = Tool("lookup", "Look it up", {"type": "object"})
        conversation = Conversation(self.client(), system="be brief", tools=(tool,))
        reply = yield defer.Deferred.fromCoroutine(conversation.say("find x"))
        self.assertEqual(reply.finish_reason, "tool_calls")
        (call,) = reply.tool_calls
        self.assertEqual((call.id, call.name, call.arguments), ("call_7", "lookup", '{"x": 1}'))
        conversation.tool_result(call.id, "x is forty two")
        reply = yield defer.Deferred.fromCoroutine(conversation.resume())
        self.assertEqual(reply.text, "two forty is x ")
        last = self.handler.requests[-1]
        self.assertEqual([m.role for m in last.messages], ["system", "user", "assistant", "tool"])
        self.assertEqual(last.messages[2].tool_calls, (call,))
        self.assertEqual(last.tools, (tool,))
        self.assertEqual(
            [m.role for m in conversation.messages],
            ["system", "user", "assistant", "tool", "assistant"],
        )

    @defer.inlineCallbacks
    def test_failed_turn_leaves_no_trace(self) -> Any:
        conversation = Conversation(self.client())
        yield defer.Deferred.fromCoroutine(conversation.say("a b"))
        self.handler.fail_with = "upstream_failed"
        yield self.assertFailure(defer.Deferred.fromCoroutine(conversation.say("c d")), ChatError)
        self.assertEqual([m.role for m in conversation.messages], ["user", "assistant"])


class CommandLine(Fixture):
    """``llmrouter-client`` as operators run it: a separate process."""

    def run_client(
        self,
        *args: str,
        stdin: bytes | None = None,
        pin: bool = True,
        env: dict[str, str] | None = None,
    ) -> Any:
        env = {
            **{k: v for k, v in os.environ.items() if k != "LLMROUTER_PIN"},
            "LLMROUTER_URL": self.urls[0],
            "LLMROUTER_PROTOCOL": str(self.protocol),
            **(env or {}),
        }
        if pin and args[0] != "open" and "--pin" not in args and "--tofu" not in args:
            args = (*args, "--pin", p.b64u_encode(self.pin))
        return run_client_cli(args, env, stdin, Path(self.mktemp()).absolute())

    @defer.inlineCallbacks
    def check_open(self, state: Path, stream: bytes, text: bytes) -> Any:
        """``open`` prints the stream's ``text``; the stream cut before its final chunk is
        reported as truncated, with exit code 1."""
        out, err, code = yield self.run_client("open", "--state", str(state), stdin=stream)
        self.assertEqual((out, code), (text, 0), err)
        cut = stream[: stream.rindex(b"event: final")]
        out, err, code = yield self.run_client("open", "--state", str(state), stdin=cut)
        self.assertEqual(code, 1)
        self.assertIn(b"truncated", err)


class CommandLineTests(CommandLine):
    @defer.inlineCallbacks
    def test_chat(self) -> Any:
        pin = p.b64u_encode(self.pin)
        out, err, code = yield self.run_client("chat", "hello there world", "--pin", pin)
        self.assertNotIn(b"warning", err)
        self.assertEqual((out, code), (b"world there hello \n", 0), err)
        self.assertIn(b"finish_reason=stop", err)

    @defer.inlineCallbacks
    def test_chat_v11_options(self) -> Any:
        schema = Path(self.mktemp()).absolute().with_name("weather report.json")
        schema.write_text('{"type": "object", "properties": {"city": {"type": "string"}}}')
        out, err, code = yield self.run_client(
            "chat", "hello there", "--model", "m2", "--json-schema", str(schema), "--show-reasoning"
        )
        self.assertEqual((out, code), (b"there hello \n", 0), err)
        self.assertIn(b"thinking it over", err)  # reasoning apart: stderr, never stdout
        sent = self.handler.requests[-1]
        self.assertEqual((sent.model, sent.include_reasoning), ("m2", True))
        assert sent.response_format is not None
        self.assertEqual(sent.response_format.name, "weather_report")
        self.assertEqual(sent.response_format.schema["properties"], {"city": {"type": "string"}})
        # without --show-reasoning nothing asks for it
        out, err, code = yield self.run_client("chat", "a b")
        self.assertNotIn(b"thinking", err)
        self.assertIsNone(self.handler.requests[-1].include_reasoning)

    @defer.inlineCallbacks
    def test_chat_refuses_a_bad_schema_before_sealing(self) -> Any:
        schema = Path(self.mktemp()).absolute()
        schema.write_text('{"$ref": "https://example.com/x.json"}')
        _, err, code = yield self.run_client("chat", "x", "--json-schema", str(schema))
        self.assertEqual(code, 1)
        self.assertIn(b"bad_request", err)
        self.assertIn(b"local $ref", err)
        schema.write_text("{not json")
        _, err, code = yield self.run_client("chat", "x", "--json-schema", str(schema))
        self.assertIn(b"bad_schema", err)
        self.assertEqual(self.handler.requests, [])

    @defer.inlineCallbacks
    def test_interactive_conversation(self) -> Any:
        out, err, code = yield self.run_client(
            "chat", "--system", "terse", stdin=b"one two\nthree four\n\n"
        )
        self.assertEqual((out, code), (b"two one \nfour three \n", 0), err)
        first, second = self.handler.requests
        self.assertEqual([m.role for m in first.messages], ["system", "user"])
        # the history travels with each turn, from the client; the router keeps nothing
        self.assertEqual(
            [(m.role, m.content) for m in second.messages],
            [
                ("system", "terse"),
                ("user", "one two"),
                ("assistant", "two one "),
                ("user", "three four"),
            ],
        )

    @defer.inlineCallbacks
    def test_interactive_turn_failure_goes_on(self) -> Any:
        self.handler.fail_requests = {1}
        out, err, code = yield self.run_client("chat", stdin=b"one two\nthree four\n")
        self.assertEqual(code, 1)  # a turn failed...
        self.assertIn(b"llmrouter-client: timeout: upstream went away", err)
        self.assertEqual(out, b"two one \nfour three \n")  # ...and the next one went on
        second = self.handler.requests[1]
        self.assertEqual([m.content for m in second.messages], ["three four"])  # no failed turn

    @defer.inlineCallbacks
    def test_models(self) -> Any:
        out, err, code = yield self.run_client("models")
        self.assertEqual((out, code), (b"m1\nm2\n", 0), err)

    @defer.inlineCallbacks
    def test_state_file_is_not_written_through_a_symlink(self) -> Any:
        target = Path(self.mktemp()).absolute()
        target.write_text("precious\n")
        link = Path(self.mktemp()).absolute()
        link.symlink_to(target)
        _out, err, code = yield self.run_client("seal", "x", "--state", str(link))
        self.assertEqual(code, 1)
        self.assertIn(b"state", err)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(target.read_text(), "precious\n")

    @defer.inlineCallbacks
    def test_chat_auth_creates_device_key(self) -> Any:
        key_file = Path(self.mktemp()).absolute()
        out, err, code = yield self.run_client("chat", "a b", "--device-key", str(key_file))
        self.assertEqual((out, code), (b"b a \n", 0), err)
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(self.handler.seen_modes, ["auth"])

    @defer.inlineCallbacks
    def test_chat_failure_exit_code(self) -> Any:
        self.handler.cut_after = 1
        _out, err, code = yield self.run_client("chat", "a b c")
        self.assertEqual(code, 1, err)
        self.assertIn(b"truncated", err)
        self.assertNotIn(b"Traceback", err)
        _, err, code = yield self.run_client("chat", "x", "--url", "unix:/nonexistent.sock")
        self.assertEqual(code, 1)
        self.assertIn(b"unreachable", err)
        self.assertNotIn(b"Traceback", err)


class ProtocolOneTests(Fixture):
    """What only protocol 1 has: trust on first use, the JSON envelope for curl."""

    @defer.inlineCallbacks
    def test_trust_on_first_use_keeps_the_first_key(self) -> Any:
        path = Path(self.mktemp())
        text, _ = yield defer.Deferred.fromCoroutine(
            self.chat(self.client(pin=None, tofu=path), "a b")
        )
        self.assertEqual(text, "b a ")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(path.read_text().strip(), p.b64u_encode(self.pin))
        yield defer.Deferred.fromCoroutine(self.chat(self.client(pin=None, tofu=path), "c"))
        self.handler.signing = nacl.signing.SigningKey.generate()  # another router, or a MITM
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(pin=None, tofu=path), "x"))
        self.assertEqual(cm.exception.code, "bad_key_document")
        self.assertEqual(path.read_text().strip(), p.b64u_encode(self.pin))
        self.assertEqual(self.handler.seen_modes, ["base", "base"])

    @defer.inlineCallbacks
    def test_trust_on_first_use_file_is_not_followed(self) -> Any:
        target = Path(self.mktemp())
        target.write_text("precious\n")
        link = Path(self.mktemp())
        link.symlink_to(target)
        with self.assertRaises(ChatError) as cm:
            yield defer.Deferred.fromCoroutine(self.chat(self.client(pin=None, tofu=link), "x"))
        self.assertEqual(cm.exception.code, "tofu")
        self.assertEqual(target.read_text(), "precious\n")

    @defer.inlineCallbacks
    def test_key_document_is_checked_before_each_seal(self) -> Any:
        """A long-running client (the proxy) kept its first document for ever: with the clock 10
        days ahead it still sealed to that key (issue 19). Now: refetched hourly, and at once
        when the current key's ``not_after`` or the document's 24 hours have passed."""
        clock = task.Clock()
        clock.advance(time.time())
        self.handler.now = clock.seconds
        client = self.client(clock=clock)
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 1)
        clock.advance(1800)
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 1)  # fresh enough
        clock.advance(1801)
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 2)  # an hour: refetched

        # The current key expires: the next request is sealed to the new one, never the old.
        self.handler.not_after = int(clock.seconds()) + 100
        yield defer.Deferred.fromCoroutine(client.fetch_keys())
        old = self.handler.kid
        self.handler.rotate()
        self.handler.not_after = 2**31
        clock.advance(100 + p.KEY_DOCUMENT_SKEW + 1)
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        self.assertNotIn(old, self.handler.seen_kids[-1:])
        self.assertEqual(self.handler.seen_kids[-1], self.handler.kid)

        # Ten days on: sealed to the key the router publishes now, not to a 10-day-old one.
        seen = len(self.handler.seen_kids)
        client = self.client(clock=clock)
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        clock.advance(10 * 86400)
        self.handler.rotate()
        yield defer.Deferred.fromCoroutine(self.chat(client, "a"))
        self.assertEqual(self.handler.seen_kids[-1], self.handler.kid)
        self.assertEqual(len(self.handler.seen_kids), seen + 2)  # no key_unknown round trip


class ProtocolOneCommandLineTests(CommandLine):
    """The command line's protocol 1 only parts."""

    @defer.inlineCallbacks
    def test_refuses_to_run_without_pin_or_tofu(self) -> Any:
        _out, err, code = yield self.run_client("chat", "x", pin=False)
        self.assertEqual(code, 2)
        self.assertIn(b"--pin", err)
        self.assertIn(b"--tofu", err)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(self.handler.seen_modes, [])
        tofu = Path(self.mktemp()).absolute()
        out, err, code = yield self.run_client("chat", "a b", "--tofu", str(tofu), pin=False)
        self.assertEqual((out, code), (b"b a \n", 0), err)
        self.assertEqual(tofu.read_text().strip(), p.b64u_encode(self.pin))
        env_pin = {"LLMROUTER_PIN": p.b64u_encode(self.pin)}
        out, err, code = yield self.run_client("keys", pin=False, env=env_pin)
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_a_pin_that_begins_with_a_dash(self) -> Any:
        """One pin in 64 begins with "-": argparse took it for an option (exit 2)."""
        signing = nacl.signing.SigningKey.generate()
        while not p.b64u_encode(bytes(signing.verify_key)).startswith("-"):
            signing = nacl.signing.SigningKey.generate()
        self.handler.signing = signing
        pin = p.b64u_encode(bytes(signing.verify_key))
        out, err, code = yield self.run_client("chat", "a b", "--pin", pin)
        self.assertEqual((out, code), (b"b a \n", 0), err)
        out, err, code = yield self.run_client("keys", "--pin", pin)
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_seal_then_open(self) -> Any:
        """The curl workflow: seal to stdout, POST it by other means, open the saved stream."""
        state = Path(self.mktemp()).absolute()
        out, err, code = yield self.run_client("seal", "alpha beta gamma", "--state", str(state))
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE(state.stat().st_mode), 0o600)
        envelope = json.loads(out)
        self.assertEqual(sorted(envelope), ["ct", "enc", "kid", "mode", "rid", "ts", "v"])
        self.assertNotIn(b"alpha", out)

        from twisted.web.client import Agent, FileBodyProducer, readBody

        from llmrouter.httpclient import agent_for

        agent, base = agent_for(reactor, self.urls[0])
        self.assertIsInstance(agent, Agent)
        from io import BytesIO

        response = yield agent.request(
            b"POST", (base + "/api/chat").encode(), None, FileBodyProducer(BytesIO(out))
        )
        stream = yield readBody(response)
        self.assertEqual(response.code, 200)

        yield self.check_open(state, stream, b"gamma beta alpha \n")
        # The same stream opened with another request's state fails authentication.
        _, _, _ = yield self.run_client("seal", "x", "--state", str(state))
        _, err, code = yield self.run_client("open", "--state", str(state), stdin=stream)
        self.assertEqual(code, 1)
        self.assertIn(b"bad_stream", err)

    @defer.inlineCallbacks
    def test_keys(self) -> Any:
        out, err, code = yield self.run_client("keys")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["signing_key"], p.b64u_encode(self.pin))
        self.assertEqual([k["kid"] for k in doc["keys"]], ["07", "ff"])


class ClientTestsV2(ClientTests):
    protocol = 2


class ConversationTestsV2(ConversationTests):
    protocol = 2


class CommandLineTestsV2(CommandLineTests):
    protocol = 2


class ProtocolTwoTests(Fixture):
    """What only protocol 2 has: nodes, candidates, sealed refusals, the operator's pin."""

    protocol = 2

    def wait(self, coroutine: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(coroutine)

    @defer.inlineCallbacks
    def test_the_router_side_sees_no_prompt(self) -> Any:
        text, _ = yield self.wait(self.chat(self.client(), "canary-93d1 alpha"))
        self.assertEqual(text, "alpha canary-93d1 ")
        (body,) = self.handler.posted
        self.assertNotIn(b"canary", body)
        self.assertEqual(body[:1], bytes([int(self.handler.world.outer_kids[0], 16)]))

    @defer.inlineCallbacks
    def test_k_candidate_nodes(self) -> Any:
        yield self.wait(self.chat(self.client(), "a"))  # m1: node-a and node-b, k = 3
        yield self.wait(self.chat(self.client(k=1), "a"))
        request = p.ChatRequest.from_prompt("b", model="m2")
        yield self.wait(self.client().chat(request))
        self.assertEqual(
            self.handler.seen_nodes[0] + self.handler.seen_nodes[2],
            ("node-a", "node-b", "node-b", "node-c"),
        )
        self.assertEqual(len(self.handler.seen_nodes[1]), 1)
        with self.assertRaises(ValueError):
            self.client(k=0)

    @defer.inlineCallbacks
    def test_a_node_that_does_not_verify_is_never_used(self) -> Any:
        node = self.handler.world.nodes[0]
        other = nacl.signing.SigningKey.generate()
        node.certificate = self.handler.world.certify(
            "node", node.name, node.signing, node.models, operator=other
        )
        for _ in range(5):
            yield self.wait(self.chat(self.client(), "a"))
        self.assertEqual(set(self.handler.seen_nodes), {("node-b",)})

    @defer.inlineCallbacks
    def test_default_model_and_models(self) -> Any:
        client = self.client()
        models = yield self.wait(client.models())
        self.assertEqual(models, ["m1", "m2"])  # the signed document's, not /api/models
        yield self.wait(self.chat(client, "a"))
        self.assertEqual(self.handler.requests[-1].model, "m1")
        self.handler.world.default_model = None
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.chat(self.client(), "a"))
        self.assertEqual(caught.exception.code, "model_required")
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.client().chat(p.ChatRequest.from_prompt("a", model="m9")))
        self.assertEqual((caught.exception.code, caught.exception.status), ("model_unknown", 404))
        self.assertEqual(len(self.handler.posted), 1)  # nothing was sent for those two

    @defer.inlineCallbacks
    def test_node_key_rotation_is_a_sealed_key_unknown(self) -> Any:
        client = self.client()
        yield self.wait(client.fetch_keys())
        self.handler.node_rotations_pending = 1
        text, _ = yield self.wait(self.chat(client, "x y"))
        self.assertEqual(text, "y x ")
        self.handler.node_rotations_pending = 2
        yield self.wait(client.fetch_keys())
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.chat(client, "x"))
        self.assertEqual((caught.exception.code, caught.exception.status), ("key_unknown", 400))

    @defer.inlineCallbacks
    def test_a_new_device_pays_a_sealed_proof_of_work(self) -> Any:
        """The router learns the device only inside the outer layer, so its challenge comes
        sealed; the client seals the request again and solves for the new body."""
        self.handler.new_device_pow = os.urandom(32)
        device = hpke.generate_key_pair()
        text, _ = yield self.wait(self.chat(self.client(device_key=device), "solve me"))
        self.assertEqual(text, "me solve ")
        first, second = self.handler.posted
        self.assertNotEqual(first[7:39], second[7:39])
        yield self.wait(self.chat(self.client(device_key=device), "again"))  # known now
        self.assertEqual(len(self.handler.posted), 3)

    @defer.inlineCallbacks
    def test_router_event_where_the_stream_breaks(self) -> Any:
        self.handler.cut_after = 1
        self.handler.router_breaks = True
        seen: list[str] = []
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.client().chat(p.ChatRequest.from_prompt("a b c"), seen.append))
        self.assertEqual((caught.exception.code, caught.exception.status), ("upstream_failed", 502))
        self.assertEqual(seen, ["c "])

    @defer.inlineCallbacks
    def test_sealed_refusals_keep_status_and_retry_after(self) -> Any:
        self.handler.refuse_with = p.ProtocolError(
            "device_rate_limited", "slow down", retry_after=9
        )
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.chat(self.client(), "a"))
        e = caught.exception
        self.assertEqual((e.code, e.message, e.status, e.retry_after),
                         ("device_rate_limited", "slow down", 429, 9))  # fmt: skip

    @defer.inlineCallbacks
    def test_pins(self) -> Any:
        """The router's own key is no operator pin; the message says what to do."""
        router_key = bytes(self.handler.world.router_signing.verify_key)
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.chat(self.client(pin=router_key), "a"))
        self.assertEqual(caught.exception.code, "bad_key_document")
        self.assertIn("protocol 1", caught.exception.message)
        self.assertEqual(self.handler.posted, [])
        with self.assertRaises(ValueError):
            self.client(tofu=Path(self.mktemp()))
        with self.assertRaises(ValueError):
            self.client(pin=None)
        with self.assertRaises(ValueError):
            self.client(protocol=3)

    @defer.inlineCallbacks
    def test_a_router_without_protocol_2(self) -> Any:
        self.handler.v2_available = False
        with self.assertRaises(ChatError) as caught:
            yield self.wait(self.chat(self.client(), "a"))
        self.assertEqual(caught.exception.code, "v2_unavailable")

    @defer.inlineCallbacks
    def test_key_document_is_checked_before_each_seal(self) -> Any:
        """As in protocol 1 (issue 19): refetched hourly and at once when it is 24 hours old;
        ten days on, sealed to the nodes' keys of now without a key_unknown round trip."""
        clock = task.Clock()
        clock.advance(time.time())
        self.handler.now = clock.seconds
        world = self.handler.world
        client = self.client(clock=clock)
        yield self.wait(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 1)
        clock.advance(1800)
        yield self.wait(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 1)  # fresh enough
        clock.advance(1801)
        world.now = clock.seconds()
        yield self.wait(self.chat(client, "a"))
        self.assertEqual(self.handler.documents_served, 2)  # an hour: refetched

        clock.advance(10 * 86400)  # every node's keys have changed since
        world.now = clock.seconds()
        for node in world.nodes:
            node.current, node.upcoming = node.upcoming, hpke.generate_key_pair()
            node.kids = (node.kids[1], f"{int(node.kids[1], 16) + 1:02x}")
        posted = len(self.handler.posted)
        text, _ = yield self.wait(self.chat(client, "b a"))
        self.assertEqual(text, "a b ")
        self.assertEqual(len(self.handler.posted), posted + 1)  # no key_unknown round trip
        self.assertEqual(self.handler.documents_served, 3)  # the held one was 10 days old


class ProtocolTwoCommandLineTests(CommandLine):
    protocol = 2

    @defer.inlineCallbacks
    def post(self, body: bytes) -> Any:
        status, _, answer = yield post_v2_chat(self.urls[0], body)
        return status, answer

    @defer.inlineCallbacks
    def test_seal_then_open(self) -> Any:
        """The curl workflow in protocol 2: a binary body, then the sealed stream opened."""
        state = Path(self.mktemp()).absolute()
        body, err, code = yield self.run_client("seal", "alpha beta gamma", "--state", str(state))
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE(state.stat().st_mode), 0o600)
        self.assertEqual(json.loads(state.read_text())["v"], "2")
        self.assertEqual(body[1:7], bytes([0, 0x20, 0, 1, 0, 3]))
        self.assertNotIn(b"alpha", body)
        status, stream = yield self.post(body)
        self.assertEqual(status, 200)
        yield self.check_open(state, stream, b"gamma beta alpha \n")
        # a sealed refusal: its code, exit status 1
        body, _, _ = yield self.run_client("seal", "x", "--state", str(state))
        self.handler.refuse_with = p.ProtocolError("budget_exhausted", "no budget left")
        _, stream = yield self.post(body)
        self.assertIn(b"event: router", stream)
        self.assertNotIn(b"budget", stream)
        _, err, code = yield self.run_client("open", "--state", str(state), stdin=stream)
        self.assertEqual(code, 1)
        self.assertIn(b"budget_exhausted: no budget left", err)
        # a plain refusal (before the router opened anything): its code too
        self.handler.rotations_pending = 1
        status, answer = yield self.post(body)
        self.assertEqual(status, 400)
        _, err, code = yield self.run_client("open", "--state", str(state), stdin=answer)
        self.assertEqual(code, 1)
        self.assertIn(b"key_unknown", err)
        self.assertNotIn(b"Traceback", err)

    @defer.inlineCallbacks
    def test_keys(self) -> Any:
        out, err, code = yield self.run_client("keys")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["protocol"], doc["router"], doc["default_model"]),
                         (2, "router-1", "m1"))  # fmt: skip
        self.assertEqual([n["name"] for n in doc["nodes"]], ["node-a", "node-b", "node-c"])
        self.assertEqual(doc["nodes"][1]["models"], ["m1", "m2"])
        self.assertEqual([k["kid"] for k in doc["keys"]], ["01", "02"])

    @defer.inlineCallbacks
    def test_trust(self) -> Any:
        _, err, code = yield self.run_client("chat", "x", pin=False)
        self.assertEqual(code, 2)
        self.assertIn(b"operator", err)
        tofu = Path(self.mktemp()).absolute()
        _, err, code = yield self.run_client("chat", "x", "--tofu", str(tofu), pin=False)
        self.assertEqual(code, 2)
        self.assertIn(b"protocol 1 only", err)
        self.assertFalse(tofu.exists())
        router_key = p.b64u_encode(bytes(self.handler.world.router_signing.verify_key))
        _, err, code = yield self.run_client("chat", "x", "--pin", router_key)
        self.assertEqual(code, 1)
        self.assertIn(b"protocol 1", err)
        _, err, code = yield self.run_client("chat", "x", env={"LLMROUTER_PROTOCOL": "3"})
        self.assertEqual(code, 2)
        self.assertEqual(self.handler.posted, [])
