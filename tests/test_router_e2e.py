"""The whole path with real daemons: client -> router -> inference (tiny model) -> router -> client.

``twistd inference`` always runs as a subprocess on the tiny GGUF model over a real UNIX socket.
The router runs as a ``twistd llmrouter`` subprocess too, except in the flow-control test, which
needs to look inside it (in-process on the real reactor). Observations of the backend go through
its own /metrics (``inference_active_generations``, ``inference_requests_total{outcome}``).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone

from llmrouter import hpke
from llmrouter.chat import Tool
from llmrouter.client import ChatError, Client
from llmrouter.keystore import KeyStore
from llmrouter.protocol import Delta, Done, ErrorChunk, ResponseOpener
from tests.daemons import Daemon, start_inference, start_router_daemon
from tests.router_support import (
    daemon_pin,
    http,
    key_document,
    metric_value,
    prompt,
    sealed,
    short_tempdir,
    start_router,
)

INFERENCE_ARGS = ["--threads", "1", "--parallel", "2"]


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def inference_metrics(daemon: Daemon) -> Any:
    status, _, body = yield daemon.request(b"GET", "/metrics")
    assert status == 200
    return body.decode()


@defer.inlineCallbacks
def wait_metric(daemon: Daemon, name: str, labels: str, predicate: Any, limit: float = 60) -> Any:
    """Poll the backend's /metrics until ``predicate(value)``; bounded, not a timing assert."""
    deadline = reactor.seconds() + limit
    while True:
        text = yield inference_metrics(daemon)
        value = metric_value(text, name, labels)
        if predicate(value):
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"{name}{{{labels}}} stuck at {value}")
        yield sleep(0.05)


class _Reader(Protocol):
    """Reads a sealed stream; can pause reading (a slow client) or hang up after N deltas."""

    def __init__(self, opener: ResponseOpener, hang_up_after: int | None = None) -> None:
        self.opener = opener
        self.deltas: list[str] = []
        self.final: Done | ErrorChunk | None = None
        self.hang_up_after = hang_up_after
        self.first: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for item in self.opener.feed(data):
            if isinstance(item, Delta):
                self.deltas.append(item.text)
                if not self.first.called:
                    self.first.callback(None)
            else:
                self.final = item
        if self.hang_up_after is not None and len(self.deltas) >= self.hang_up_after:
            self.hang_up_after = None
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self.first.called:
            self.first.callback(None)
        self.ended.callback(None)


@defer.inlineCallbacks
def open_stream(url: str, body: bytes, state: Any, hang_up_after: int | None = None) -> Any:
    from io import BytesIO

    from twisted.web.client import FileBodyProducer
    from twisted.web.http_headers import Headers

    from llmrouter.httpclient import agent_for

    agent, base = agent_for(reactor, url)
    response = yield agent.request(
        b"POST",
        (base + "/api/chat").encode(),
        Headers({b"Content-Type": [b"application/json"]}),
        FileBodyProducer(BytesIO(body)),
    )
    assert response.code == 200, response.code
    reader = _Reader(ResponseOpener(state), hang_up_after)
    response.deliverBody(reader)
    return reader


class FullPathTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_base_and_auth_mode_and_sighup(self) -> Any:
        inference = yield start_inference(self, extra_args=INFERENCE_ARGS)
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{inference.socket}"])
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"

        tokens: list[str] = []
        client = Client(reactor, url, pin=daemon_pin(directory), protocol=1)
        done = yield defer.Deferred.fromCoroutine(
            client.chat(prompt("Hello there", max_tokens=8, temperature=0.0), tokens.append)
        )
        self.assertEqual((done.finish_reason, done.completion_tokens), ("length", 8))
        self.assertTrue("".join(tokens))
        self.assertGreater(done.prompt_tokens, 0)

        device = hpke.generate_key_pair()
        auth = Client(reactor, url, pin=daemon_pin(directory), device_key=device, protocol=1)
        done = yield defer.Deferred.fromCoroutine(
            auth.chat(prompt("Hello in auth mode", max_tokens=4))
        )
        self.assertEqual(done.completion_tokens, 4)

        # the metrics listener is separate; the public one has no /metrics
        status, _, text = yield http(f"unix:{directory / 'metrics.sock'}", path="/metrics")
        self.assertEqual(status, 200)
        text = text.decode()
        streamed = metric_value(text, "llmrouter_tokens_streamed_total")
        self.assertTrue(0 < streamed <= 12, streamed)  # byte tokens may end mid-character
        self.assertEqual(metric_value(text, "llmrouter_active_streams"), 0)
        self.assertEqual(metric_value(text, "llmrouter_backend_healthy", 'backend="backend-0"'), 1)
        # two key documents and two streams (plus the readiness polls of the test harness)
        self.assertGreaterEqual(
            metric_value(text, "llmrouter_http_responses_total", 'status="200"'), 4
        )
        self.assertNotIn('status="500"', text)
        status, _, _ = yield http(url, path="/metrics")
        self.assertEqual(status, 404)

        # operator rotation + SIGHUP
        before = yield key_document(url)
        operator = KeyStore.open(
            directory / "keys", reactor, rotation_seconds=None, overlap_seconds=None, create=False
        )
        operator.rotate()
        operator.close()
        router.signal("HUP")
        while True:
            after = yield key_document(url)
            if after.current().kid != before.current().kid:
                break
            yield sleep(0.05)
        done = yield defer.Deferred.fromCoroutine(
            Client(reactor, url, pin=daemon_pin(directory), protocol=1).chat(
                prompt("after rotation", max_tokens=2)
            )
        )
        self.assertEqual(done.completion_tokens, 2)

    @defer.inlineCallbacks
    def test_prompt_cache_is_per_device(self) -> Any:
        """The router sends a keyed hash of the device (auth mode) as the backend's cache key:
        the same device's next request reuses its prompt; another device's or a base-mode
        request with the same prompt reuses nothing."""
        inference = yield start_inference(self, extra_args=["--threads", "1", "--parallel", "4"])
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{inference.socket} kind=llmrouter"])
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        request = prompt("A long enough question about the weather in Oslo today?", max_tokens=3)
        reused = "inference_prompt_tokens_reused_total"

        def chat(client: Client) -> Any:
            return defer.Deferred.fromCoroutine(client.chat(request))

        pin = daemon_pin(directory)
        alice = Client(reactor, url, pin=pin, device_key=hpke.generate_key_pair(), protocol=1)
        first = yield chat(alice)
        for other in (
            Client(reactor, url, pin=pin, device_key=hpke.generate_key_pair(), protocol=1),
            Client(reactor, url, pin=pin, protocol=1),
        ):
            yield chat(other)
            text = yield inference_metrics(inference)
            self.assertEqual(metric_value(text, reused), 0)
        yield chat(alice)
        text = yield inference_metrics(inference)
        # all of the prompt but its last token (decoded again for the first output)
        self.assertEqual(metric_value(text, reused), first.prompt_tokens - 1)
        self.assertNotIn(
            "X-LLMRouter-Cache-Key".lower(), (router.log_text() + inference.log_text()).lower()
        )

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_generation(self) -> Any:
        inference = yield start_inference(
            self, extra_args=[*INFERENCE_ARGS, "--max-tokens", "4000", "--ctx", "8192"]
        )
        directory = short_tempdir(self)
        router = start_router_daemon(self, directory, [f"unix:{inference.socket}"])
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        document = yield key_document(url)
        from llmrouter.protocol import seal_request

        envelope, state = seal_request(
            document.current(), prompt("a very long story", max_tokens=4000), int(reactor.seconds())
        )
        reader = yield open_stream(url, json.dumps(envelope.to_json()).encode(), state, 3)
        yield reader.ended
        self.assertIsNone(reader.final)  # we hung up mid-stream
        cancelled = yield wait_metric(
            inference, "inference_requests_total", 'outcome="cancelled"', lambda v: v >= 1
        )
        self.assertEqual(cancelled, 1)
        yield wait_metric(inference, "inference_active_generations", "", lambda v: v == 0)
        text = yield inference_metrics(inference)
        self.assertEqual(metric_value(text, "inference_requests_total", 'outcome="ok"'), 0)


class FlowControlTests(TestCase):
    """In-process router on the real reactor, real inference daemons behind it."""

    timeout = 240

    @defer.inlineCallbacks
    def start(self, backends: int) -> Any:
        daemons = []
        for _ in range(backends):
            daemon = yield start_inference(
                self, extra_args=[*INFERENCE_ARGS, "--max-tokens", "30000", "--ctx", "32768"]
            )
            daemons.append(daemon)
        running = yield start_router(
            self,
            [f"unix:{d.socket}" for d in daemons],
            clock=reactor,
            unix=True,
            first_token_timeout_seconds=60.0,
            idle_timeout_seconds=120.0,
        )
        return daemons, running

    @defer.inlineCallbacks
    def test_slow_client_pauses_the_backend(self) -> Any:
        (inference,), running = yield self.start(1)
        body, _, state = yield sealed(running, prompt("go on forever", max_tokens=30000))
        reader = yield open_stream(running.url, body, state)
        yield reader.first
        reader.transport.pauseProducing()  # the client stops reading
        stream = next(iter(running.router.app.streams))
        call = stream.response.upstream
        for _ in range(600):  # the router pauses the upstream transport...
            if call._paused or call.over:
                break
            yield sleep(0.05)
        self.assertTrue(call._paused, "the upstream was never paused")
        self.assertFalse(call.over)
        # ...so the backend stops generating well short of max_tokens (bounded buffers)
        previous = -1.0
        for _ in range(120):
            yield sleep(0.5)
            text = yield inference_metrics(inference)
            generated = metric_value(text, "inference_tokens_generated_total")
            if generated == previous:
                break
            previous = generated
        self.assertLess(generated, 30000)
        self.assertEqual(metric_value(text, "inference_active_generations"), 1)
        received = len(reader.deltas)
        self.assertLess(received, generated)
        # the client comes back, reads a bit more, then hangs up: generation is cancelled
        reader.hang_up_after = received + 50
        reader.transport.resumeProducing()
        yield reader.ended
        self.assertGreaterEqual(len(reader.deltas), received + 50)
        yield wait_metric(
            inference, "inference_requests_total", 'outcome="cancelled"', lambda v: v == 1
        )

    @defer.inlineCallbacks
    def test_backend_killed_mid_stream_then_failover(self) -> Any:
        daemons, running = yield self.start(2)
        body, _, state = yield sealed(running, prompt("keep talking", max_tokens=30000))
        reader = yield open_stream(running.url, body, state)
        yield reader.first
        reader.transport.pauseProducing()  # keep the stream open as long as we like
        serving = None
        for daemon in daemons:
            text = yield inference_metrics(daemon)
            if metric_value(text, "inference_active_generations") == 1:
                serving = daemon
        assert serving is not None
        other = daemons[1 - daemons.index(serving)]
        os.kill(serving.pid, signal.SIGKILL)
        yield serving.wait_exit()
        reader.transport.resumeProducing()
        yield reader.ended
        # the tokens already sent arrive, then a sealed final error chunk: never a silent cut
        self.assertIsInstance(reader.final, ErrorChunk)
        self.assertEqual(reader.final.code, "upstream_failed")
        self.assertTrue(reader.deltas)

        # new requests fail over to the surviving backend (retried before any token is sent)
        for i in range(3):
            done = yield defer.Deferred.fromCoroutine(
                running.client().chat(prompt(f"after the crash {i}", max_tokens=3))
            )
            self.assertEqual(done.completion_tokens, 3)
        text = yield inference_metrics(other)
        self.assertEqual(metric_value(text, "inference_requests_total", 'outcome="ok"'), 3)
        dead = running.router.pool.backends[daemons.index(serving)]
        while dead.healthy:  # the health probe takes it out
            yield running.router.pool.probe(dead)
        self.assertTrue(running.router.pool.ready())


class DeviceAuthRequiredTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_required_mode(self) -> Any:
        inference = yield start_inference(self, extra_args=INFERENCE_ARGS)
        directory = short_tempdir(self)
        router = start_router_daemon(
            self, directory, [f"unix:{inference.socket}"], ["--device-auth", "required"]
        )
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(
                Client(reactor, url, pin=daemon_pin(directory), protocol=1).chat(prompt("hi"))
            ),
            ChatError,
        )
        self.assertEqual((e.code, e.status), ("device_auth_required", 400))
        done = yield defer.Deferred.fromCoroutine(
            Client(
                reactor,
                url,
                pin=daemon_pin(directory),
                device_key=hpke.generate_key_pair(),
                protocol=1,
            ).chat(prompt("hi", max_tokens=2))
        )
        self.assertEqual(done.completion_tokens, 2)


class ModelsTests(TestCase):
    """Two of our inference daemons serving two model names behind one real router."""

    timeout = 240

    @defer.inlineCallbacks
    def test_model_selects_the_daemon(self) -> Any:
        small = yield start_inference(self, extra_args=[*INFERENCE_ARGS, "--model-name", "small"])
        big = yield start_inference(
            self, extra_args=[*INFERENCE_ARGS, "--model-name", "big", "--max-tokens", "64"]
        )
        directory = short_tempdir(self)
        router = start_router_daemon(
            self, directory, [f"unix:{small.socket}", f"unix:{big.socket}"]
        )
        yield router.start()
        url = f"unix:{directory / 'router.sock'}"
        client = Client(reactor, url, pin=daemon_pin(directory), protocol=1)
        names = yield defer.Deferred.fromCoroutine(client.models())
        self.assertEqual(names, ["small", "big"])  # found on each daemon's GET /v1/models

        for model, count in (("big", 1), ("small", 1), ("big", 2)):
            done = yield defer.Deferred.fromCoroutine(
                client.chat(prompt("hi", model=model, max_tokens=2))
            )
            self.assertEqual(done.completion_tokens, 2)
            text = yield inference_metrics(big if model == "big" else small)
            self.assertEqual(metric_value(text, "inference_requests_total", 'outcome="ok"'), count)

        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(client.chat(prompt("hi", model="huge"))), ChatError
        )
        self.assertEqual((e.code, e.status), ("model_unknown", 404))
        # tools reach our daemon: it takes every v1.1 field (tests/test_router_inference.py)
        done = yield defer.Deferred.fromCoroutine(
            client.chat(prompt("hi", model="small", tools=(Tool("f"),), max_tokens=2))
        )
        self.assertEqual(done.completion_tokens, 2)
        # what the daemon itself refuses comes back as its error code, before any stream
        e = yield self.assertFailure(
            defer.Deferred.fromCoroutine(client.chat(prompt("hi", model="big", max_tokens=65))),
            ChatError,
        )
        self.assertEqual((e.code, e.status), ("upstream_refused", 400))
        # a seed is something it does take
        done = yield defer.Deferred.fromCoroutine(
            client.chat(prompt("hi", model="big", seed=7, max_tokens=2))
        )
        self.assertEqual(done.completion_tokens, 2)
