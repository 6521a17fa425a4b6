"""``llmrouter-llama-build``: build and install llama-cpp-python so that it runs on this host.

llama-cpp-python's default build is ``GGML_NATIVE=ON`` (``-march=native``), which compiles in
ggml's AMX kernels wherever the CPU advertises AMX; on common cloud VMs (Sapphire Rapids class
Xeons) those kernels fault (``ldtilecfg`` in ``ggml_backend_amx_mul_mat``) and the daemon dies
on its first decode. So we build with ``GGML_NATIVE=OFF`` and name each x86 vector extension
ourselves from what this CPU advertises, AMX never unless the operator opts in (``--amx``).

pip's wheel cache is keyed by the sdist, not by ``CMAKE_ARGS``: a wheel an earlier install
built natively would silently be reused. So the wheel is built with ``--no-cache-dir`` into a
directory of our own keyed by the version and the exact CMake arguments, installed from there,
and checked afterwards against ``llama_print_system_info()`` (what the library that loads
really has compiled in).

    llmrouter-llama-build                 build (or reuse) and install into this Python, then check
    llmrouter-llama-build --cmake-args    the CMake arguments for this CPU (for llama-server too)
    llmrouter-llama-build --cache-key     the version and a digest of those arguments (cache names)
    llmrouter-llama-build --check         check the installed library only
    llmrouter-llama-build --cuda          a CUDA build (GPU nodes); --amx: opt in to AMX kernels

The same arguments build the benchmarks' and tests' llama-server, so speed comparisons compare
the same ggml code built the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AMX_OPT_IN",
    "LLAMA_CPP_VERSION",
    "PROG",
    "BuildPlan",
    "cpu_flags",
    "host_cpu_flags",
    "main",
    "plan_build",
    "runtime_refusals",
    "system_info_features",
    "unexpected_features",
]

PROG = "llmrouter-llama-build"
# The pinned version (setup.cfg's inference extra says the same; a test checks they agree).
LLAMA_CPP_VERSION = "0.3.36"
# The operator's opt-in to ggml's AMX kernels, for the build and for the daemon that loads it.
AMX_OPT_IN = "LLMROUTER_LLAMA_AMX"
X86_64 = frozenset({"x86_64", "amd64", "x86-64"})

# ggml's x86 options, each with the /proc/cpuinfo flags it needs (GGML_AVX512 compiles with
# -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw, so it needs all five, and the
# AVX512 extensions build on it).
AVX512 = frozenset({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"})
X86_OPTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("GGML_SSE42", frozenset({"sse4_2"})),
    ("GGML_AVX", frozenset({"avx"})),
    ("GGML_F16C", frozenset({"f16c"})),
    ("GGML_FMA", frozenset({"fma"})),
    ("GGML_BMI2", frozenset({"bmi2"})),
    ("GGML_AVX2", frozenset({"avx2"})),
    ("GGML_AVX_VNNI", frozenset({"avx_vnni"})),
    ("GGML_AVX512", AVX512),
    ("GGML_AVX512_VBMI", AVX512 | {"avx512vbmi"}),
    ("GGML_AVX512_VNNI", AVX512 | {"avx512_vnni"}),
    ("GGML_AVX512_BF16", AVX512 | {"avx512_bf16"}),
)
AMX_OPTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("GGML_AMX_TILE", frozenset({"amx_tile"})),
    ("GGML_AMX_INT8", frozenset({"amx_tile", "amx_int8"})),
    ("GGML_AMX_BF16", frozenset({"amx_tile", "amx_bf16"})),
)
# The name llama_print_system_info() gives each option's feature ("AVX512 = 1").
SYSTEM_INFO_NAMES: Mapping[str, str] = {
    "GGML_SSE42": "SSE3",  # ggml reports SSE3 (implied by SSE4.2), not SSE4.2 itself
    "GGML_AVX": "AVX",
    "GGML_F16C": "F16C",
    "GGML_FMA": "FMA",
    "GGML_BMI2": "BMI2",
    "GGML_AVX2": "AVX2",
    "GGML_AVX_VNNI": "AVX_VNNI",
    "GGML_AVX512": "AVX512",
    "GGML_AVX512_VBMI": "AVX512_VBMI",
    "GGML_AVX512_VNNI": "AVX512_VNNI",
    "GGML_AVX512_BF16": "AVX512_BF16",
    "GGML_AMX_INT8": "AMX_INT8",
}
# What a CPU must advertise for a library reporting each feature to run at all (a library built
# with -march=native elsewhere reports what that host had; here it would die of SIGILL).
RUNS_ON: Mapping[str, frozenset[str]] = {
    "SSE3": frozenset({"pni"}),  # /proc/cpuinfo calls SSE3 "pni"
    "SSSE3": frozenset({"ssse3"}),
    "AVX": frozenset({"avx"}),
    "F16C": frozenset({"f16c"}),
    "FMA": frozenset({"fma"}),
    "BMI2": frozenset({"bmi2"}),
    "AVX2": frozenset({"avx2"}),
    "AVX_VNNI": frozenset({"avx_vnni"}),
    "AVX512": AVX512,
    "AVX512_VBMI": frozenset({"avx512vbmi"}),
    "AVX512_VNNI": frozenset({"avx512_vnni"}),
    "AVX512_BF16": frozenset({"avx512_bf16"}),
    "AMX_INT8": frozenset({"amx_tile", "amx_int8"}),
}
ACCELERATORS: Mapping[str, str] = {"cuda": "-DGGML_CUDA=on", "vulkan": "-DGGML_VULKAN=on"}


@dataclass(frozen=True)
class BuildPlan:
    """What to build: the CMake arguments, and the features the built library must report."""

    cmake_args: tuple[str, ...]
    expected: frozenset[str]  # system-info names that must be 1
    forbidden: frozenset[str]  # system-info names that must not be 1

    @property
    def key(self) -> str:
        """The wheel cache key: the version and the exact arguments."""
        digest = hashlib.sha256("\0".join((LLAMA_CPP_VERSION, *self.cmake_args)).encode())
        return f"{LLAMA_CPP_VERSION}-{digest.hexdigest()[:16]}"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def plan_build(
    flags: Iterable[str],
    *,
    amx: bool = False,
    accelerator: str | None = None,
    machine: str = "x86_64",
) -> BuildPlan:
    """CMake arguments for a CPU with ``flags``: each extension it has, AMX only if asked.

    Other architectures than x86-64 keep llama.cpp's own (native) build: AMX is x86 only, and
    ``GGML_NATIVE=OFF`` there would drop the ARM extensions that make it fast.
    """
    have = frozenset(flags)
    extra = [ACCELERATORS[accelerator]] if accelerator is not None else []
    if machine.lower() not in X86_64:
        return BuildPlan(tuple(extra), frozenset(), frozenset({"AMX_INT8"}))
    args = ["-DGGML_NATIVE=OFF"]
    expected: set[str] = set()
    forbidden: set[str] = set()
    for option, needs in X86_OPTIONS:
        on = needs <= have
        args.append(f"-D{option}={'ON' if on else 'OFF'}")
        name = SYSTEM_INFO_NAMES[option]
        (expected if on else forbidden).add(name)
    for option, needs in AMX_OPTIONS:
        on = amx and needs <= have
        args.append(f"-D{option}={'ON' if on else 'OFF'}")
        if option in SYSTEM_INFO_NAMES:
            (expected if on else forbidden).add(SYSTEM_INFO_NAMES[option])
    return BuildPlan(tuple(args + extra), frozenset(expected), frozenset(forbidden))


def system_info_features(info: str) -> frozenset[str]:
    """The features ``llama_print_system_info()`` reports as compiled in ("AVX2 = 1")."""
    return frozenset(re.findall(r"([A-Z][A-Z0-9_]*) = 1\b", info))


def unexpected_features(plan: BuildPlan, info: str) -> list[str]:
    """What is wrong with the loaded library against ``plan``: features missing or forbidden."""
    have = system_info_features(info)
    problems = [f"{name} is compiled in" for name in sorted(plan.forbidden & have)]
    problems += [f"{name} is missing" for name in sorted(plan.expected - have)]
    return problems


def runtime_refusals(info: str, flags: frozenset[str], *, amx: bool) -> list[str]:
    """Why the library reporting ``info`` must not run on a CPU with ``flags``: ggml's AMX
    kernels without the operator's opt-in, or extensions the CPU lacks. ``flags`` may be empty
    (``/proc/cpuinfo`` hidden, as under ``ProcSubset=pid``): then only AMX is checked."""
    have = system_info_features(info)
    problems = []
    if "AMX_INT8" in have and not amx:
        problems.append(
            f"ggml's AMX kernels are compiled in (they fault on many cloud VMs; {AMX_OPT_IN}=1"
            " opts in where they run)"
        )
    if flags:
        lacking = sorted(n for n in have & RUNS_ON.keys() if not RUNS_ON[n] <= flags)
        if lacking:
            problems.append(f"it was built for another CPU ({', '.join(lacking)}: not on this one)")
    return problems


def host_cpu_flags() -> frozenset[str]:
    """This CPU's flags, empty where /proc/cpuinfo cannot be read."""
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def host_plan(*, amx: bool = False, accelerator: str | None = None) -> BuildPlan:
    """The plan for the CPU this runs on."""
    return plan_build(
        host_cpu_flags(), amx=amx, accelerator=accelerator, machine=platform.machine()
    )


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmrouter" / "wheels"


def loaded_system_info(python: str) -> str:
    """``llama_print_system_info()`` of the llama-cpp-python that ``python`` imports."""
    code = "import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"
    result = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot import llama_cpp with {python}: {result.stderr.strip()}")
    return result.stdout


def build_wheel(plan: BuildPlan, python: str, cache: Path, jobs: int) -> Path:
    """The wheel for ``plan``, built once into ``cache/<key>/`` and reused after."""
    directory = cache / plan.key
    wheels = sorted(directory.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{plan.key}.", dir=directory.parent))
    env = dict(
        os.environ, CMAKE_ARGS=" ".join(plan.cmake_args), CMAKE_BUILD_PARALLEL_LEVEL=str(jobs)
    )
    command = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
               "--no-binary", "llama-cpp-python", "-w", str(staging),
               f"llama-cpp-python=={LLAMA_CPP_VERSION}"]  # fmt: skip
    print(f"{PROG}: building llama-cpp-python {LLAMA_CPP_VERSION} (a few minutes) with "
          f"{' '.join(plan.cmake_args)}", flush=True)  # fmt: skip
    try:
        subprocess.run(command, env=env, check=True)
        (staging / "cmake-args").write_text(" ".join(plan.cmake_args) + "\n")
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(directory.glob("llama_cpp_python-*.whl"))[-1]


def install(plan: BuildPlan, python: str, cache: Path, jobs: int) -> None:
    wheel = build_wheel(plan, python, cache, jobs)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)],
        check=True,
    )
    # its own dependencies (numpy, jinja2, ...) from the index, never a cached llama-cpp-python
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True)


def check(plan: BuildPlan, python: str) -> list[str]:
    return unexpected_features(plan, loaded_system_info(python))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Build llama-cpp-python for this host's CPU (never AMX unless --amx), install it "
            "into PYTHON's environment and check what loads."
        ),
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--cmake-args", action="store_true", help="print the CMake arguments only")
    what.add_argument(
        "--cache-key", action="store_true", help="print the build's key (version and arguments)"
    )
    what.add_argument("--check", action="store_true", help="check the installed library only")
    accel = parser.add_mutually_exclusive_group()
    accel.add_argument("--cuda", action="store_true", help="build with CUDA (GPU nodes)")
    accel.add_argument("--vulkan", action="store_true", help="build with Vulkan")
    parser.add_argument(
        "--amx", action="store_true", help="compile in ggml's AMX kernels (opt-in; see above)"
    )
    parser.add_argument("--python", default=sys.executable, help="the environment to install into")
    parser.add_argument("--cache", type=Path, default=None, help="wheel cache directory")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    accelerator = "cuda" if options.cuda else "vulkan" if options.vulkan else None
    amx = options.amx or os.environ.get(AMX_OPT_IN) == "1"
    plan = host_plan(amx=amx, accelerator=accelerator)
    if options.cmake_args or options.cache_key:
        print(" ".join(plan.cmake_args) if options.cmake_args else plan.key)
        return 0
    if not options.check:
        install(plan, options.python, options.cache or cache_root(), options.jobs)
    problems = check(plan, options.python)
    if problems:
        print(f"{PROG}: the llama-cpp-python that loads is not the build for this host: "
              f"{'; '.join(problems)}. Rerun {PROG} (without --check) to rebuild it.",
              file=sys.stderr)  # fmt: skip
        return 1
    expected, forbidden = ", ".join(sorted(plan.expected)), ", ".join(sorted(plan.forbidden))
    print(f"{PROG}: llama-cpp-python {LLAMA_CPP_VERSION} loads with the expected features "
          f"({expected}; no {forbidden})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
