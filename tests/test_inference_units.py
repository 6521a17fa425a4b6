"""Small pure parts of the inference daemon: stop strings, settings, metrics."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, utils
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
        self.assertEqual(settings.embedded, "smollm2-135m-instruct")
        self.assertEqual((settings.gpu_layers, settings.flash_attn), (0, "auto"))
        self.assertEqual(settings.cache_ttl, 300)

    def test_model_by_name_or_path(self) -> None:
        settings = settings_from({"model": "gemma-3-270m"}, {})
        self.assertEqual((settings.model, settings.embedded), (None, "gemma-3-270m"))
        settings = settings_from({}, {"INFERENCE_MODEL": "/srv/m.gguf"})
        self.assertEqual(settings.model, Path("/srv/m.gguf"))

    def test_gpu_options(self) -> None:
        settings = settings_from({"gpu-layers": "-1", "flash-attn": "on"}, {})
        self.assertEqual((settings.gpu_layers, settings.flash_attn), (-1, "on"))
        settings = settings_from({}, {"INFERENCE_GPU_LAYERS": "0", "INFERENCE_CACHE_TTL": "0"})
        self.assertEqual((settings.gpu_layers, settings.cache_ttl), (0, 0))
        for bad in ({"gpu-layers": "-2"}, {"flash-attn": "yes"}, {"cache-ttl": "-1"}):
            with self.assertRaises(usage.UsageError):
                settings_from(bad, {})

    def test_gpu_options_reach_llama_cpp(self) -> None:
        """The values llama.cpp gets: n_gpu_layers (-1 means every layer) and the flash
        attention type."""
        from inference.config import FLASH_ATTN
        from inference.model import context_params, model_params

        self.assertEqual(model_params(0).n_gpu_layers, 0)
        self.assertEqual(model_params(12).n_gpu_layers, 12)
        self.assertGreaterEqual(model_params(-1).n_gpu_layers, 1 << 30)
        for name, value in (("on", 1), ("off", 0), ("auto", -1)):
            params = context_params(
                n_ctx_seq=256, n_seq=2, threads=1, batch=64, flash_attn=FLASH_ATTN[name]
            )
            self.assertEqual(params.flash_attn_type, value)
            self.assertEqual((params.n_ctx, params.n_seq_max), (512, 2))
            self.assertFalse(params.kv_unified)
        unified = context_params(
            n_ctx_seq=256, n_seq=2, threads=1, batch=64, flash_attn=-1, kv_unified=True
        )
        self.assertTrue(unified.kv_unified)

    def test_kv_unified_flag(self) -> None:
        self.assertFalse(settings_from({}, {}).kv_unified)
        self.assertTrue(settings_from({"kv-unified": 1}, {}).kv_unified)
        self.assertTrue(settings_from({}, {"INFERENCE_KV_UNIFIED": "1"}).kv_unified)

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
            "INFERENCE_CACHE_TTL",
            "INFERENCE_GPU_LAYERS",
            "INFERENCE_FLASH_ATTN",
            "INFERENCE_KV_UNIFIED",
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


class MissingExtraTests(unittest.TestCase):
    """``pip install llmrouter`` without the inference extra, then ``twistd inference``."""

    @defer.inlineCallbacks
    def test_one_line_naming_the_extra(self) -> Any:
        script = (
            "import sys; sys.modules['llama_cpp'] = None\n"  # as if it were not installed
            "sys.argv = ['twistd', '-n', '--pidfile=', 'inference']\n"
            "from twisted.scripts.twistd import run; run()\n"
        )
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-c", script], env=dict(os.environ)
        )
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"Traceback", out + err)
        self.assertEqual(
            err.strip().decode(),
            "twistd inference: llama-cpp-python is not installed; install the inference extra:"
            " pip install 'llmrouter[inference]'",
        )


class OffloadTests(unittest.TestCase):
    """inference.gpu: the start-up refusal and the layer counts the metrics export."""

    def test_refusal(self) -> None:
        from inference.gpu import offload_refusal

        self.assertIsNone(offload_refusal(0, False, False))  # no GPU asked for
        self.assertIsNone(offload_refusal(-1, True, False))  # a build that can offload
        self.assertIsNone(offload_refusal(-1, False, True))  # fallback allowed on purpose
        message = offload_refusal(20, False, False)
        assert message is not None
        self.assertIn("--gpu-layers 20", message)

    def test_layers(self) -> None:
        from inference.gpu import offloaded_layers, requested_layers

        # llama.cpp counts n_layer repeating layers plus the output layer
        self.assertEqual(requested_layers(-1, 30), 31)
        self.assertEqual(requested_layers(12, 30), 12)
        self.assertEqual(requested_layers(99, 30), 31)
        self.assertEqual(requested_layers(0, 30), 0)
        self.assertEqual(offloaded_layers(-1, 30, True), 31)
        self.assertEqual(offloaded_layers(-1, 30, False), 0)
