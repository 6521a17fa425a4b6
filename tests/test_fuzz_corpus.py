"""The fuzz targets on their seed corpus: every seed is handled without an uncaught exception.

The coverage-guided runs are ``make fuzz`` (part of ``make test``); this keeps the targets and
the committed corpus working under trial too.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"


class SeedCorpusTests(SynchronousTestCase):
    def test_every_target_has_seeds_and_handles_them(self) -> None:
        for name, target in TARGETS.items():
            seeds = sorted((CORPUS / name).iterdir())
            self.assertTrue(seeds, name)
            for seed in seeds:
                target(seed.read_bytes())

    def test_the_finding_6_input_is_handled(self) -> None:
        """A role that is a list raised TypeError (a 500) before issue 8."""
        TARGETS["plaintext"](b'{"messages":[{"role":["user"],"content":"x"}]}')
