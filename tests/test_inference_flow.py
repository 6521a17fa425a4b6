"""Flow control, cancellation, admission, time budget and loading, against a real daemon.

Long generations use ``max_tokens`` 4000 on the tiny model: about 750 KB of SSE, more than the
socket buffers and Twisted's write buffer hold, so a client that stops reading really does fill
them. Waits poll ``/metrics``; nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.daemons import Daemon, open_stream, start_inference
from tests.test_inference_api import chat, metric

LONG = ["--max-tokens", "4000", "--ctx", "4200"]


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def metrics(daemon: Daemon) -> Any:
    _, _, text = yield daemon.request(b"GET", "/metrics")
    return text


@defer.inlineCallbacks
def wait_for(daemon: Daemon, name: str, value: float, attempts: int = 600) -> Any:
    for _ in range(attempts):
        text = yield metrics(daemon)
        if metric(text, name) == value:
            return text
        yield sleep(0.05)
    raise AssertionError(f"{name} never became {value}")


@defer.inlineCallbacks
def wait_stable(daemon: Daemon, name: str, polls: int = 8, attempts: int = 400) -> Any:
    """Poll until ``name`` has kept one value across ``polls`` consecutive scrapes."""
    last, same = None, 0
    for _ in range(attempts):
        text = yield metrics(daemon)
        value = metric(text, name)
        same = same + 1 if value == last else 0
        last = value
        if same >= polls:
            return value
        yield sleep(0.1)
    raise AssertionError(f"{name} never settled")


class CancellationTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_disconnect_stops_generation_and_frees_slot(self) -> Any:
        daemon = yield start_inference(self, extra_args=[*LONG, "--parallel", "1"])
        status, _, reader = yield open_stream(
            daemon, "/v1/chat/completions", chat(max_tokens=4000, stream=True)
        )
        self.assertEqual(status, 200)
        yield reader.wait_events(5)
        reader.disconnect()
        text = yield wait_for(daemon, "inference_active_generations", 0)
        stopped_at = yield wait_stable(daemon, "inference_tokens_generated_total")
        self.assertLess(stopped_at, 4000)
        text = yield metrics(daemon)
        self.assertIn('inference_requests_total{outcome="cancelled"} 1.0', text.decode())
        self.assertIn('inference_requests_total{outcome="ok"} 0.0', text.decode())

        # The freed slot (the only one) serves the next request.
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", chat(max_tokens=3))
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 3)


class BackpressureTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_slow_client_pauses_generation(self) -> Any:
        daemon = yield start_inference(self, extra_args=LONG)
        status, _, reader = yield open_stream(
            daemon, "/v1/chat/completions", chat(max_tokens=4000, stream=True)
        )
        self.assertEqual(status, 200)
        yield reader.wait_events(1)
        reader.pause()
        paused_at = yield wait_stable(daemon, "inference_tokens_generated_total")
        text = yield metrics(daemon)
        # Still running, but stopped well short of the end: nothing is buffered beyond the
        # transport's bounded buffers.
        self.assertEqual(metric(text, "inference_active_generations"), 1)
        self.assertLess(paused_at, 4000)
        self.assertGreater(paused_at, 0)

        reader.resume()
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        final = json.loads(events[-2])
        self.assertEqual(final["choices"][0]["finish_reason"], "length")
        self.assertEqual(final["usage"]["completion_tokens"], 4000)
        text = yield wait_for(daemon, "inference_active_generations", 0)
        self.assertEqual(metric(text, "inference_tokens_generated_total"), 4000)

    @defer.inlineCallbacks
    def test_paused_stream_does_not_block_others(self) -> Any:
        daemon = yield start_inference(self, extra_args=[*LONG, "--parallel", "2"])
        _, _, slow = yield open_stream(
            daemon, "/v1/chat/completions", chat(max_tokens=4000, stream=True)
        )
        yield slow.wait_events(1)
        slow.pause()
        yield wait_stable(daemon, "inference_tokens_generated_total")
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", chat(max_tokens=50))
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 50)
        slow.disconnect()
        yield wait_for(daemon, "inference_active_generations", 0)


class AdmissionTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_queue_limit(self) -> Any:
        """One slot, one queue place: the third request gets 503 + Retry-After."""
        daemon = yield start_inference(self, extra_args=[*LONG, "--parallel", "1", "--queue", "1"])
        long = chat(max_tokens=4000, stream=True)
        _, _, first = yield open_stream(daemon, "/v1/chat/completions", long)
        yield first.wait_events(1)
        first.pause()  # holds the slot
        status, _, second = yield open_stream(daemon, "/v1/chat/completions", long)
        self.assertEqual(status, 200)
        yield wait_for(daemon, "inference_queue_depth", 1)

        status, headers, data = yield daemon.request(b"POST", "/v1/chat/completions", long)
        self.assertEqual(status, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(json.loads(data)["error"]["code"], "overloaded")
        text = yield metrics(daemon)
        self.assertIn('inference_requests_total{outcome="rejected"} 1.0', text.decode())

        # Cancelling the running one lets the queued one run.
        first.disconnect()
        yield second.wait_events(3)
        yield wait_for(daemon, "inference_queue_depth", 0)
        second.disconnect()
        yield wait_for(daemon, "inference_active_generations", 0)

    @defer.inlineCallbacks
    def test_queued_request_cancelled_by_disconnect(self) -> Any:
        daemon = yield start_inference(self, extra_args=[*LONG, "--parallel", "1"])
        long = chat(max_tokens=4000, stream=True)
        _, _, first = yield open_stream(daemon, "/v1/chat/completions", long)
        yield first.wait_events(1)
        first.pause()
        _, _, second = yield open_stream(daemon, "/v1/chat/completions", long)
        yield wait_for(daemon, "inference_queue_depth", 1)
        second.disconnect()
        yield wait_for(daemon, "inference_queue_depth", 0)
        first.disconnect()
        yield wait_for(daemon, "inference_active_generations", 0)
        # the gauges read the worker's state at once; outcomes are counted when the worker's
        # report reaches the reactor, a moment later
        yield wait_for(daemon, 'inference_requests_total{outcome="cancelled"}', 2)

    @defer.inlineCallbacks
    def test_time_budget(self) -> Any:
        """A generation past its budget ends with finish_reason length (a paused one too)."""
        daemon = yield start_inference(self, extra_args=[*LONG, "--time-budget", "0.5"])
        status, _, reader = yield open_stream(
            daemon, "/v1/chat/completions", chat(max_tokens=4000, stream=True)
        )
        self.assertEqual(status, 200)
        yield reader.wait_events(1)
        reader.pause()  # keeps it from finishing on its own
        yield wait_for(daemon, "inference_active_generations", 0)
        reader.resume()
        events = yield reader.done
        self.assertEqual(events[-1], "[DONE]")
        final = json.loads(events[-2])
        self.assertEqual(final["choices"][0]["finish_reason"], "length")
        self.assertLess(final["usage"]["completion_tokens"], 4000)
        text = yield metrics(daemon)
        self.assertIn('inference_requests_total{outcome="timeout"} 1.0', text.decode())


class LoadingTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_health_while_loading(self) -> Any:
        """The reactor answers while the model loads (delay injected through the env)."""
        daemon = yield start_inference(self, env={"INFERENCE_TEST_LOAD_DELAY": "3"}, wait=False)
        status = None
        for _ in range(400):
            try:
                status, _, data = yield daemon.request(b"GET", "/health")
                break
            except Exception:
                yield sleep(0.05)
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(data), {"status": "loading"})
        status, headers, data = yield daemon.request(
            b"POST", "/v1/chat/completions", chat(max_tokens=2)
        )
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(data)["error"]["code"], "loading")
        self.assertTrue(headers.hasHeader(b"retry-after"))
        text = yield metrics(daemon)
        self.assertEqual(metric(text, "inference_model_loaded"), 0)
        while status != 200:
            yield sleep(0.1)
            status, _, data = yield daemon.request(b"GET", "/health")
        self.assertEqual(json.loads(data), {"status": "ok"})
        _, _, data = yield daemon.request(b"POST", "/v1/chat/completions", chat(max_tokens=2))
        self.assertEqual(json.loads(data)["usage"]["completion_tokens"], 2)

    @defer.inlineCallbacks
    def test_missing_model_exits_nonzero(self) -> Any:
        daemon = yield start_inference(self, model=Path("/no/such.gguf"), wait=False)
        code = yield daemon.wait_exit()
        self.assertNotEqual(code, 0)
        self.assertIn("model failed to load", daemon.log_text())
