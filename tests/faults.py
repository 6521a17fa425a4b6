"""Fault injection for the real daemons: ``twistd`` with one fault in inference's llama.cpp.

    python -m tests.faults FAULT TWISTD-ARGUMENTS...

runs ``twistd`` as usual; only when the plugin is ``inference`` is the fault put in, and
nothing else changes. ``twistd_on_path`` writes a ``twistd`` that does this, for scripts that
find twistd on ``PATH`` (etc/dev/stack). FAULT is one of:

- ``none``: nothing (a control);
- ``segfault-at-start``: the process dies of SIGSEGV in its first ``llama_decode``, as it did
  where ggml's AMX kernels fault (issue 18); that first decode is the start-up self-test;
- ``segfault-on-request:N``: dies of SIGSEGV when the Nth generation is submitted (after
  N - 1 answers);
- ``decode-error``: every ``llama_decode`` returns an error status;
- ``slow-self-test:SECONDS``: the self-test starts SECONDS late (a window to look in);
- ``amx-build``: ``llama_print_system_info()`` reports ggml's AMX kernels compiled in.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _segfault() -> None:
    """SIGSEGV in the calling thread, as a fault in llama.cpp's kernels raises it."""
    signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)


def install(fault: str) -> None:
    import llama_cpp

    from inference import batched, model

    name, _, argument = fault.partition(":")
    if name == "none":
        return
    if name == "segfault-at-start":

        def crash(*args: Any) -> int:
            _segfault()
            return -1

        llama_cpp.llama_decode = crash
    elif name == "segfault-on-request":
        submit = batched.BatchedScheduler.submit
        count = [0]

        def submit_or_crash(self: Any, *args: Any) -> Any:
            count[0] += 1
            if count[0] >= int(argument):
                _segfault()
            return submit(self, *args)

        batched.BatchedScheduler.submit = submit_or_crash  # type: ignore[method-assign,assignment]
    elif name == "decode-error":
        llama_cpp.llama_decode = lambda *args: -1
    elif name == "slow-self-test":
        self_test = model.LlamaModel.self_test

        def slow(self: Any, *args: Any) -> int:
            print("tests.faults: the self-test waits", file=sys.stderr, flush=True)
            time.sleep(float(argument))
            return self_test(self, *args)

        model.LlamaModel.self_test = slow  # type: ignore[method-assign,assignment]
    elif name == "amx-build":
        report = llama_cpp.llama_print_system_info().decode()
        amx = report.replace("| LLAMAFILE", "| AMX_INT8 = 1 | LLAMAFILE").encode()
        assert amx != report.encode(), report
        llama_cpp.llama_print_system_info = lambda: amx
    else:
        raise SystemExit(f"tests.faults: unknown fault {fault!r}")


def twistd_on_path(directory: Path, fault: str) -> Path:
    """A ``twistd`` in ``directory`` (put it first on PATH) that runs with ``fault``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "twistd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.faults {fault} "$@"\n')
    script.chmod(0o755)
    return script


def main() -> None:
    fault, *argv = sys.argv[1:]
    if "inference" in argv:
        install(fault)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


if __name__ == "__main__":
    main()
