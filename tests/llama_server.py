"""A stock llama-server on the tiny test model, for the router's end-to-end tests.

``make test`` builds it (``bench/build-llama-server``, from the llama.cpp vendored in the pinned
llama-cpp-python) into a cache directory outside the checkout and passes its path in
``LLMR_LLAMA_SERVER``; without that, the same cache path is tried. The tiny GGUF carries a real
chat template from ``tests/data/templates`` (see the README there), so llama-server applies that
model's reasoning and tool-call formats.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest

from llmrouter.ops.llamabuild import AMX_OPT_IN, host_plan
from tests.daemons import Daemon
from tests.tinymodel import tiny_model_path

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
QWQ = "Qwen-QwQ-32B"
HERMES = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"
GPT_OSS = "openai-gpt-oss-120b"


def binary() -> Path:
    """The llama-server to run; SkipTest (with the command that builds it) when there is none."""
    configured = os.environ.get("LLMR_LLAMA_SERVER")
    if configured:
        path = Path(configured)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        key = host_plan(amx=os.environ.get(AMX_OPT_IN) == "1").key  # as the Makefile's
        path = cache / "llmrouter" / f"llama-server-{key}" / "llama-server"
    if not path.exists():
        raise SkipTest(f"no llama-server at {path}: `make llama-server` builds it")
    return path.resolve()


def start_llama_server(
    testcase: Any, alias: str, template: str | None = None, extra: Sequence[str] = ()
) -> defer.Deferred[Daemon]:
    """llama-server --jinja on the tiny model (with ``template``, a file stem in
    tests/data/templates), serving ``alias`` on ``<tmp>/llama.sock``; stopped at cleanup."""
    server = binary()
    chat_template = (TEMPLATES / f"{template}.jinja").read_text() if template else None
    model = tiny_model_path(chat_template=chat_template)
    directory = Path(tempfile.mkdtemp(prefix="llmr-ls-"))
    sock = directory / "llama.sock"
    args = ["-m", str(model), "--host", str(sock), "--alias", alias, "--jinja", "--no-webui"]
    # One thread (OpenMP spins badly on a shared 2-core machine), 2 slots of 4096 tokens: the
    # tool-use templates alone are a thousand tokens of a byte-level vocabulary.
    args += ["--threads", "1", "--parallel", "2", "--ctx-size", "8192", "--no-warmup", *extra]
    daemon = Daemon(
        "llama-server",
        args,
        command=[str(server)],
        health=f"unix:{sock}",
        env={"LD_LIBRARY_PATH": str(server.parent)},
        directory=directory,
    )
    daemon.socket = sock

    def cleanup() -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = daemon.stop()
        d.addBoth(lambda result: shutil.rmtree(directory, ignore_errors=True) or result)
        return d

    testcase.addCleanup(cleanup)
    started: defer.Deferred[Daemon] = daemon.start()
    return started
