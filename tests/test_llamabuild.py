"""``llmrouter-llama-build``: the CMake arguments each kind of CPU gets, and the checks of what
llama.cpp library really loads (at build time and when the daemon starts).

The CPU flag lines are those of real processors (trimmed to the flags that matter); the
system-info lines are llama_print_system_info()'s format, as the library in this venv prints it.
"""

from __future__ import annotations

import io
import os
import platform
import re
import shutil
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial import unittest

from llmrouter.ops import llamabuild
from llmrouter.ops.llamabuild import (
    BuildPlan,
    cpu_flags,
    plan_build,
    runtime_refusals,
    system_info_features,
    unexpected_features,
)

ROOT = Path(__file__).resolve().parents[1]

BASE = "fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt"
HASWELL = f"{BASE} avx f16c fma bmi1 bmi2 avx2"
SKYLAKE_X = f"{HASWELL} avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX512, no VNNI
ICE_LAKE = f"{SKYLAKE_X} avx512vbmi avx512_vnni avx512_vbmi2"
SAPPHIRE_RAPIDS = f"{ICE_LAKE} avx_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"
WESTMERE = BASE  # no AVX at all

CPUINFO = f"""processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: {SAPPHIRE_RAPIDS}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""


def info(*features: str) -> str:
    """A llama_print_system_info() line reporting ``features``."""
    return "CPU : " + "".join(f"{name} = 1 | " for name in features) + "LLAMAFILE = 1 | "


def arguments(plan: BuildPlan) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=", 1) for a in plan.cmake_args)


class CpuInfoTests(unittest.TestCase):
    def test_first_processor_flags(self) -> None:
        flags = cpu_flags(CPUINFO)
        self.assertIn("amx_int8", flags)
        self.assertIn("avx512f", flags)
        self.assertNotIn("Intel(R)", flags)
        self.assertEqual(flags, frozenset(SAPPHIRE_RAPIDS.split()))

    def test_no_flags_line(self) -> None:
        # aarch64 says "Features", and a sandboxed /proc may have nothing at all
        self.assertEqual(cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n"), frozenset())
        self.assertEqual(cpu_flags(""), frozenset())


class PlanTests(unittest.TestCase):
    def test_native_is_always_off_on_x86(self) -> None:
        for flags in (WESTMERE, HASWELL, SAPPHIRE_RAPIDS):
            plan = plan_build(flags.split())
            self.assertEqual(plan.cmake_args[0], "-DGGML_NATIVE=OFF")
            self.assertNotIn("-march=native", " ".join(plan.cmake_args))

    def test_without_avx512(self) -> None:
        args = arguments(plan_build(HASWELL.split()))
        for option in ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2"):
            self.assertEqual(args[f"GGML_{option}"], "ON", option)
        for option in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
            self.assertEqual(args[f"GGML_{option}"], "OFF", option)

    def test_avx512_without_vnni(self) -> None:
        plan = plan_build(SKYLAKE_X.split())
        args = arguments(plan)
        self.assertEqual(args["GGML_AVX512"], "ON")
        self.assertEqual(args["GGML_AVX512_VNNI"], "OFF")
        self.assertEqual(args["GGML_AVX512_VBMI"], "OFF")
        self.assertIn("AVX512", plan.expected)
        self.assertIn("AVX512_VNNI", plan.forbidden)

    def test_avx512_extensions_need_the_base(self) -> None:
        # GGML_AVX512 compiles with all five base flags; a CPU missing one gets none of it
        partial = HASWELL + " avx512f avx512_vnni avx512vbmi"
        args = arguments(plan_build(partial.split()))
        self.assertEqual(
            [args[f"GGML_AVX512{s}"] for s in ("", "_VBMI", "_VNNI", "_BF16")], ["OFF"] * 4
        )

    def test_amx_host_without_opt_in(self) -> None:
        plan = plan_build(SAPPHIRE_RAPIDS.split())
        args = arguments(plan)
        self.assertEqual(
            [args["GGML_AMX_TILE"], args["GGML_AMX_INT8"], args["GGML_AMX_BF16"]], ["OFF"] * 3
        )
        self.assertIn("AMX_INT8", plan.forbidden)
        # every vector extension this CPU has is still there
        for option in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
            self.assertEqual(args[f"GGML_{option}"], "ON", option)

    def test_amx_host_with_opt_in(self) -> None:
        plan = plan_build(SAPPHIRE_RAPIDS.split(), amx=True)
        args = arguments(plan)
        self.assertEqual(
            [args["GGML_AMX_TILE"], args["GGML_AMX_INT8"], args["GGML_AMX_BF16"]], ["ON"] * 3
        )
        self.assertIn("AMX_INT8", plan.expected)
        self.assertNotEqual(plan.key, plan_build(SAPPHIRE_RAPIDS.split()).key)

    def test_opt_in_is_no_amx_where_the_cpu_has_none(self) -> None:
        self.assertEqual(plan_build(ICE_LAKE.split(), amx=True), plan_build(ICE_LAKE.split()))

    def test_old_cpu_gets_baseline_only(self) -> None:
        args = arguments(plan_build(WESTMERE.split()))
        self.assertEqual(args["GGML_SSE42"], "ON")
        self.assertTrue(all(v == "OFF" for k, v in args.items() if k.startswith("GGML_A")))

    def test_accelerators(self) -> None:
        cuda = plan_build(HASWELL.split(), accelerator="cuda")
        self.assertEqual(cuda.cmake_args[-1], "-DGGML_CUDA=on")
        self.assertEqual(cuda.cmake_args[:-1], plan_build(HASWELL.split()).cmake_args)
        self.assertIn("-DGGML_VULKAN=on", plan_build((), accelerator="vulkan").cmake_args)

    def test_other_architectures_keep_llama_cpp_defaults(self) -> None:
        plan = plan_build((), machine="aarch64")
        self.assertEqual(plan.cmake_args, ())
        self.assertEqual(plan.forbidden, {"AMX_INT8"})
        self.assertEqual(
            plan_build((), machine="aarch64", accelerator="cuda").cmake_args[-1:],
            ("-DGGML_CUDA=on",),
        )

    def test_key_follows_version_and_arguments(self) -> None:
        a, b = plan_build(HASWELL.split()), plan_build(SKYLAKE_X.split())
        self.assertRegex(a.key, rf"^{re.escape(llamabuild.LLAMA_CPP_VERSION)}-[0-9a-f]{{16}}$")
        self.assertNotEqual(a.key, b.key)
        self.assertEqual(a.key, plan_build(HASWELL.split()).key)

    def test_version_is_setup_cfg_pin(self) -> None:
        pins = re.findall(r"llama-cpp-python==([0-9.]+)", (ROOT / "setup.cfg").read_text())
        self.assertEqual(pins, [llamabuild.LLAMA_CPP_VERSION])


class SystemInfoTests(unittest.TestCase):
    def test_features_reported_as_one(self) -> None:
        text = "CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | AMX_INT8 = 1 | OPENMP = 1 | "
        self.assertEqual(system_info_features(text), {"SSE3", "AVX", "AMX_INT8", "OPENMP"})
        cuda = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : AVX2 = 1"
        self.assertEqual(system_info_features(cuda), {"USE_GRAPHS", "AVX2"})

    def test_library_built_for_the_plan_passes(self) -> None:
        plan = plan_build(SAPPHIRE_RAPIDS.split())
        self.assertEqual(unexpected_features(plan, info(*sorted(plan.expected), "SSSE3")), [])

    def test_catches_an_amx_build(self) -> None:
        plan = plan_build(SAPPHIRE_RAPIDS.split())
        problems = unexpected_features(plan, info(*sorted(plan.expected), "AMX_INT8"))
        self.assertEqual(problems, ["AMX_INT8 is compiled in"])

    def test_catches_a_missing_feature(self) -> None:
        plan = plan_build(SKYLAKE_X.split())
        problems = unexpected_features(plan, info(*sorted(plan.expected - {"AVX512"})))
        self.assertEqual(problems, ["AVX512 is missing"])

    def test_catches_a_build_for_another_cpu(self) -> None:
        plan = plan_build(HASWELL.split())
        problems = unexpected_features(plan, info(*sorted(plan.expected), "AVX512"))
        self.assertEqual(problems, ["AVX512 is compiled in"])

    def test_what_loads_here_is_the_build_for_this_host(self) -> None:
        """The venv running these tests holds the library built for this CPU, not a wheel pip
        had cached from a native build (make installs it through llmrouter-llama-build)."""
        amx = os.environ.get(llamabuild.AMX_OPT_IN) == "1"
        plan = llamabuild.host_plan(amx=amx)
        self.assertEqual(llamabuild.check(plan, sys.executable), [])


class RuntimeRefusalTests(unittest.TestCase):
    """What ``twistd inference`` refuses to start with (tests/test_inference_startup.py runs it)."""

    def test_amx_without_opt_in(self) -> None:
        flags = frozenset(SAPPHIRE_RAPIDS.split())
        problems = runtime_refusals(info("AVX2", "AMX_INT8"), flags, amx=False)
        self.assertEqual(len(problems), 1)
        self.assertIn("AMX", problems[0])
        self.assertIn("LLMROUTER_LLAMA_AMX=1", problems[0])
        self.assertEqual(runtime_refusals(info("AVX2", "AMX_INT8"), flags, amx=True), [])

    def test_amx_refused_even_where_cpuinfo_is_hidden(self) -> None:
        self.assertEqual(len(runtime_refusals(info("AMX_INT8"), frozenset(), amx=False)), 1)

    def test_features_this_cpu_lacks(self) -> None:
        problems = runtime_refusals(
            info("AVX2", "AVX512", "AVX512_VNNI"), frozenset(HASWELL.split()), amx=False
        )
        self.assertEqual(
            problems, ["it was built for another CPU (AVX512, AVX512_VNNI: not on this one)"]
        )
        # unknown where /proc/cpuinfo is hidden: not refused
        self.assertEqual(runtime_refusals(info("AVX512"), frozenset(), amx=False), [])

    def test_this_hosts_library_runs_here(self) -> None:
        import llama_cpp

        here = llama_cpp.llama_print_system_info().decode()
        amx = os.environ.get(llamabuild.AMX_OPT_IN) == "1"
        self.assertEqual(runtime_refusals(here, llamabuild.host_cpu_flags(), amx=amx), [])


class CommandLineTests(unittest.TestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = llamabuild.main(argv)
        return code, out.getvalue(), err.getvalue()

    def test_cmake_args_and_key(self) -> None:
        code, out, _ = self.run_main("--cmake-args")
        self.assertEqual((code, out.split()), (0, list(llamabuild.host_plan().cmake_args)))
        code, out, _ = self.run_main("--cache-key")
        self.assertEqual((code, out.strip()), (0, llamabuild.host_plan().key))

    def test_amx_opt_in_by_flag_or_environment(self) -> None:
        self.patch(llamabuild, "host_cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS.split()))
        self.patch(platform, "machine", lambda: "x86_64")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if "AMX" not in k})
        _, without, _ = self.run_main("--cmake-args")
        _, flag, _ = self.run_main("--cmake-args", "--amx")
        os.environ[llamabuild.AMX_OPT_IN] = "1"
        _, env, _ = self.run_main("--cmake-args")
        self.assertIn("-DGGML_AMX_INT8=OFF", without)
        self.assertIn("-DGGML_AMX_INT8=ON", flag)
        self.assertEqual(flag, env)

    def test_check_fails_on_a_library_that_is_not_this_hosts_build(self) -> None:
        """``--check`` against an interpreter whose llama.cpp reports AMX (the fault: a fake
        interpreter that prints such a report) exits 1 and says how to fix it."""
        plan = llamabuild.host_plan()
        report = info(*sorted(plan.expected), "AMX_INT8")
        directory = Path(tempfile.mkdtemp(prefix="llmr-"))
        self.addCleanup(shutil.rmtree, directory, True)
        fake = directory / "python"
        fake.write_text(f"#!/bin/sh\nprintf '%s' '{report}'\n")
        fake.chmod(0o755)
        code, _, err = self.run_main("--check", "--python", str(fake))
        self.assertEqual(code, 1)
        self.assertIn("AMX_INT8 is compiled in", err)
        self.assertIn("Rerun llmrouter-llama-build", err)
