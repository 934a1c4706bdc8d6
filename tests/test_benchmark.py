"""The README performance table (rows from different machines live side by side)
and the matmul peak measured with XLA's default flags."""

import math
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fcn_jax import benchmark


def _result(name: str, device: str, steps_per_s: float) -> dict:
    return {
        "name": name,
        "batch_size": 2,
        "input_size": [256, 256],
        "device": device,
        "train_steps_per_s": steps_per_s,
        "train_images_per_s": 2 * steps_per_s,
        "train_fraction_of_peak": 0.5,
        "train_compile_s": 4.0,
        "inference_images_per_s": 10.0,
    }


def test_update_readme_replaces_same_case_and_device_and_keeps_others(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{benchmark.README_BEGIN}\nstale\n{benchmark.README_END}\noutro\n"
    )
    benchmark.update_readme(str(readme), [_result("a", "1x cpu", 0.25)])
    benchmark.update_readme(str(readme), [_result("a", "1x NVIDIA H200", 150.0)])
    benchmark.update_readme(str(readme), [_result("a", "1x cpu", 0.5)])

    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    rows = [line for line in text.splitlines() if line.startswith("| a |")]
    assert len(rows) == 2
    assert any("1x NVIDIA H200" in row and "150.000" in row for row in rows)
    assert any("1x cpu" in row and "0.500" in row for row in rows)
    assert "0.250" not in text and "stale" not in text


def test_default_flags_matmul_peak_runs_in_a_subprocess_with_xla_defaults(
    monkeypatch,
):
    # Our own flags (YNNPACK fusions off) must not reach the subprocess; a
    # malformed flag would make it fail, and the result NaN.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=bogus")
    flops = benchmark.default_flags_matmul_peak_flops(size=256)
    assert flops > 1e8


def test_alternating_medians_takes_turns_and_times_each_call(monkeypatch):
    clock = [0.0]
    calls = []

    def timer(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds

        return fn

    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    medians = benchmark.alternating_medians(
        {"jax": timer("jax", 1.0), "torch": timer("torch", 3.0)},
        rounds=2,
        repeats=2,
        warmup=1,
    )
    assert medians == {"jax": 1.0, "torch": 3.0}
    warmup, timed = calls[:2], calls[2:]
    assert warmup == ["jax", "torch"]
    assert timed == ["jax", "jax", "torch", "torch"] * 2


def test_cpu_device_description_names_the_model_cores_and_avx512(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.1GHz\n"
        "flags\t\t: fpu sse avx2 avx512f avx512bw\n"
    )
    described = benchmark.device_description(str(cpuinfo))
    assert described.startswith("1x cpu (Intel Xeon, ")
    assert described.endswith(" cores, AVX-512)")
    cpuinfo.write_text("model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: avx2\n")
    assert "(AMD EPYC 7B13 64-Core, " in benchmark.device_description(str(cpuinfo))
    assert "AVX-512" not in benchmark.device_description(str(cpuinfo))
    assert "(unknown model, " in benchmark.device_description(str(tmp_path / "none"))


def test_allocator_names_a_preloaded_jemalloc(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert benchmark.allocator() == "jemalloc"
    monkeypatch.delenv("LD_PRELOAD")
    assert benchmark.allocator() == "libc"
    monkeypatch.setenv(
        "GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert benchmark.allocator() == "libc+hugepages"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert benchmark.allocator() == "libc"


# C's malloc, not numpy's (which asks for huge pages itself).
_TOUCH_64_MB = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")) if name == "glibc" else ()


@pytest.mark.skipif(
    _thp_mode() not in ("madvise", "always") or _glibc_version() < (2, 35),
    reason="needs transparent huge pages and glibc >= 2.35",
)
def test_glibc_huge_pages_cut_the_page_faults_of_a_large_block():
    """What `make train` relies on: with glibc.malloc.hugetlb=1 a fresh 64 MB
    block faults in mostly 2 MB pages (measured 544 faults), not 4 KB ones
    (16,385)."""

    def faults(tunables):
        env = {**os.environ, "GLIBC_TUNABLES": tunables}
        env.pop("LD_PRELOAD", None)
        out = subprocess.run(
            [sys.executable, "-c", _TOUCH_64_MB],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)

    plain, huge = faults(""), faults("glibc.malloc.hugetlb=1")
    assert plain > 16_000
    assert huge < plain / 10


def test_lowered_flops_counts_a_matmul_and_is_nan_without_an_analysis():
    a = jnp.ones((32, 48))
    b = jnp.ones((48, 16))
    lowered = jax.jit(jnp.matmul).lower(a, b)
    assert benchmark.lowered_flops(lowered) == 2 * 32 * 48 * 16

    class NoAnalysis:
        """A lowered step of a backend that analyses only compiled code."""

        def cost_analysis(self):
            return None

    assert math.isnan(benchmark.lowered_flops(NoAnalysis()))
