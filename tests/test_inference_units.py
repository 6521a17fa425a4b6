"""Small pure parts of the inference daemon: stop strings, settings, metrics."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage
from twisted.trial import unittest

from inference.batched import StopFilter
from inference.config import DEFAULT_LISTEN
from inference.metrics import OUTCOMES, Metrics
from inference.tap import Options, settings_from


class StopFilterTests(unittest.TestCase):
    def feed_all(self, stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
        stop_filter = StopFilter(stops)
        out = []
        for piece in pieces:
            text, hit = stop_filter.feed(piece)
            out.append(text)
            if hit:
                return "".join(out), True
        return "".join(out) + stop_filter.flush(), False

    def test_no_stops_passes_through(self) -> None:
        self.assertEqual(self.feed_all((), ["a", "b"]), ("ab", False))

    def test_stop_across_pieces(self) -> None:
        self.assertEqual(self.feed_all(("END",), ["abc E", "N", "Dxyz"]), ("abc ", True))

    def test_partial_match_released(self) -> None:
        stop_filter = StopFilter(("END",))
        self.assertEqual(stop_filter.feed("abE"), ("ab", False))
        self.assertEqual(stop_filter.feed("Nx"), ("ENx", False))

    def test_earliest_of_several(self) -> None:
        self.assertEqual(self.feed_all(("yz", "b"), ["abcxyz"]), ("a", True))

    def test_unfinished_prefix_flushed_at_end(self) -> None:
        self.assertEqual(self.feed_all(("END",), ["xx", "EN"]), ("xxEN", False))


class SettingsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        settings = settings_from({}, {})
        self.assertEqual(settings.listen, (DEFAULT_LISTEN,))
        self.assertIsNone(settings.model)

    def test_environment_fallbacks(self) -> None:
        environ = {
            "INFERENCE_LISTEN": "unix:/tmp/a.sock, unix:/tmp/b.sock tcp:1:interface=127.0.0.1",
            "INFERENCE_MODEL": "/m.gguf",
            "INFERENCE_THREADS": "3",
            "INFERENCE_CTX": "512",
            "INFERENCE_PARALLEL": "2",
            "INFERENCE_MAX_TOKENS": "100",
            "INFERENCE_QUEUE": "5",
            "INFERENCE_TIME_BUDGET": "2.5",
            "INFERENCE_TLS_CA": "/ca.pem",
        }
        settings = settings_from({}, environ)
        self.assertEqual(
            settings.listen,
            ("unix:/tmp/a.sock", "unix:/tmp/b.sock", "tcp:1:interface=127.0.0.1"),
        )
        self.assertEqual(settings.model, Path("/m.gguf"))
        self.assertEqual(
            (settings.threads, settings.ctx, settings.parallel, settings.max_tokens),
            (3, 512, 2, 100),
        )
        self.assertEqual((settings.queue, settings.time_budget), (5, 2.5))
        self.assertEqual(settings.tls_ca, Path("/ca.pem"))

    def test_command_line_wins(self) -> None:
        options = Options()
        options.parseOptions(["--listen", "unix:/tmp/x.sock", "--ctx", "64", "--model", "/a.gguf"])
        settings = settings_from(options, {"INFERENCE_CTX": "512", "INFERENCE_LISTEN": "unix:/y"})
        self.assertEqual((settings.listen, settings.ctx), (("unix:/tmp/x.sock",), 64))

    def test_bad_values(self) -> None:
        for environ in ({"INFERENCE_CTX": "big"}, {"INFERENCE_PARALLEL": "0"}):
            with self.assertRaises(usage.UsageError):
                settings_from({}, environ)

    def test_help_documents_every_variable(self) -> None:
        text = str(Options())
        for name in (
            "INFERENCE_LISTEN",
            "INFERENCE_MODEL",
            "INFERENCE_MODEL_NAME",
            "INFERENCE_THREADS",
            "INFERENCE_CTX",
            "INFERENCE_PARALLEL",
            "INFERENCE_MAX_TOKENS",
            "INFERENCE_QUEUE",
            "INFERENCE_TIME_BUDGET",
            "INFERENCE_TLS_CERT",
            "INFERENCE_TLS_KEY",
            "INFERENCE_TLS_CA",
        ):
            self.assertIn(name, text)


class MetricsTests(unittest.TestCase):
    def test_names_and_labels(self) -> None:
        metrics = Metrics()
        metrics.watch(lambda: 2, lambda: 3)
        metrics.outcome("ok")
        text = metrics.render().decode()
        self.assertIn("inference_active_generations 2.0", text)
        self.assertIn("inference_queue_depth 3.0", text)
        self.assertIn('inference_requests_total{outcome="ok"} 1.0', text)
        for outcome in OUTCOMES:
            self.assertIn(f'outcome="{outcome}"', text)
        labels = {
            line.split("{", 1)[1].split("=", 1)[0]
            for line in text.splitlines()
            if "{" in line and not line.startswith("#")
        }
        self.assertEqual(labels, {"outcome", "le"})
