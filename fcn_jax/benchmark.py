"""Speed measurements of a config: compile time, step time, FLOP/s against this
machine's matmul peak measured in the same run, memory, input pipeline rate."""

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcn_jax import sharding, steps
from fcn_jax.experiment import create_experiment, create_train_iterator


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` (which must block until its work is done)."""
    timers = {"fn": fn}
    return alternating_medians(timers, rounds=1, repeats=repeats, warmup=warmup)["fn"]


def matmul_peak_flops(
    size: int = 4096, repeats: int = 5, dtype: str = "float32"
) -> float:
    """FLOP/s of a jitted size x size matmul (2 n^3 FLOPs) in `dtype`, median
    time; the model's compute dtype, so that bf16 steps meet a bf16 peak."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(
        lambda: matmul(a, b).block_until_ready(), repeats=repeats, warmup=2
    )
    return 2 * size**3 / seconds


_MATMUL_PROGRAM = """
import sys
from fcn_jax.benchmark import matmul_peak_flops
print(matmul_peak_flops(int(sys.argv[1]), dtype=sys.argv[2]))
"""


def default_flags_matmul_peak_flops(size: int = 4096, dtype: str = "float32") -> float:
    """`matmul_peak_flops` in a fresh process with XLA's default CPU flags.

    This process turns XLA:CPU's YNNPACK fusions off (faster convolutions,
    see fcn_jax/cpu_flags.py), which also moves matmuls from YNNPACK to a
    slower Eigen kernel; the machine's peak is the faster of the two, so the
    benchmark measures both. NaN if the subprocess fails.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    result = subprocess.run(
        [sys.executable, "-c", _MATMUL_PROGRAM, str(size), dtype],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        return float("nan")
    return float(result.stdout.strip().splitlines()[-1])


def lowered_flops(lowered) -> float:
    """FLOPs of one call from XLA's cost analysis of the lowered (not yet
    compiled) computation: the same count on every backend, whereas compiled
    GPU executables leave the FLOPs of cuDNN convolutions out. NaN where the
    backend offers no analysis before compiling."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float((analysis or {}).get("flops", float("nan")))


def allocator() -> str:
    """'jemalloc' where it is preloaded; 'libc+hugepages' where glibc's malloc
    backs its large blocks with transparent huge pages (GLIBC_TUNABLES
    glibc.malloc.hugetlb=1 or 2, as `make train` sets); else 'libc'."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return "jemalloc"
    tunables = dict(
        item.split("=", 1)
        for item in os.environ.get("GLIBC_TUNABLES", "").split(":")
        if "=" in item
    )
    if tunables.get("glibc.malloc.hugetlb") in ("1", "2"):
        return "libc+hugepages"
    return "libc"


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_memory_gb() -> float:
    """Peak memory in use on the first accelerator so far; NaN where the
    backend keeps no statistics (the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def _synthetic_batch(config, mesh, batch_size: int, spatial: tuple[int, ...]):
    rng = np.random.default_rng(0)
    channels = len(config.data.mean)
    batch = {
        "image": rng.normal(size=(batch_size, *spatial, channels)).astype(np.float32),
        "label": rng.integers(
            0, config.model.num_classes, size=(batch_size, *spatial)
        ).astype(np.int32),
    }
    return sharding.to_global_batch(batch, mesh)


def alternating_medians(
    timers: dict[str, Callable[[], object]],
    *,
    rounds: int,
    repeats: int,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per call of each timer, the timers taking turns.

    Each of `rounds` rounds makes `repeats` calls of every timer in order, so a
    slow spell of a shared machine falls on all of them alike and the ratios of
    the medians stay fair. Each `fn()` must block until its work is done.
    """
    for fn in timers.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, fn in timers.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compile_train_and_inference(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    spatial: tuple[int, ...],
) -> tuple[dict[str, float], dict[str, Callable[[], object]]]:
    """Compiles the train step and inference once.

    Returns (figures that need no timing: compile seconds, FLOPs, parameter
    count, XLA scratch and the peak memory after two train steps; timers
    {'train_step': ..., 'inference': ...} for `alternating_medians`).
    """
    experiment = create_experiment(config)
    mesh = experiment.mesh
    batch = _synthetic_batch(config, mesh, batch_size, spatial)
    train_step = steps.jit_train_step(config, mesh)

    start = time.perf_counter()
    lowered_train = train_step.lower(experiment.state, batch)
    compiled_train = lowered_train.compile()
    train_compile = time.perf_counter() - start

    def forward(state, images):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return state.apply_fn(variables, images, train=False)

    start = time.perf_counter()
    lowered_forward = jax.jit(forward).lower(experiment.state, batch["image"])
    compiled_forward = lowered_forward.compile()
    forward_compile = time.perf_counter() - start

    num_params = sum(x.size for x in jax.tree.leaves(experiment.state.params))
    state = experiment.state

    def one_train_step():
        nonlocal state
        state, step_metrics = compiled_train(state, batch)
        jax.block_until_ready(step_metrics)

    def one_forward():
        compiled_forward(state, batch["image"]).block_until_ready()

    for _ in range(2):
        one_train_step()
    # XLA counts no FLOPs inside custom calls (the CPU kernels), so the count
    # comes from the same step with XLA's own ops, lowered only.
    counted_train, counted_forward = lowered_train, lowered_forward
    model = experiment.model
    xla_ops = {
        key: xla_choice
        for key, kernel, xla_choice in (
            ("conv_filter_gradient", "direct", "xla"),
            ("conv_forward", "direct", "xla"),
            ("batch_norm_relu", "kernel", "fused"),
        )
        if getattr(model, key, None) == kernel
    }
    if xla_ops:
        xla_model = model.clone(**xla_ops)
        xla_state = experiment.state.replace(apply_fn=xla_model.apply)
        counted_train = train_step.lower(xla_state, batch)
        counted_forward = jax.jit(forward).lower(xla_state, batch["image"])
    figures = {
        "num_params": num_params,
        "train_compile_s": train_compile,
        "train_gflop_per_step": lowered_flops(counted_train) / 1e9,
        # Measured before anything else (e.g. a PyTorch twin) runs in the process.
        "train_peak_memory_gb": peak_memory_gb(),
        "train_device_peak_memory_gb": device_peak_memory_gb(),
        # XLA's scratch for one step: activations kept for the backward pass.
        "train_xla_temp_memory_gb": (
            compiled_train.memory_analysis().temp_size_in_bytes / 2**30
        ),
        "inference_compile_s": forward_compile,
        "inference_gflop": lowered_flops(counted_forward) / 1e9,
    }
    return figures, {"train_step": one_train_step, "inference": one_forward}


def speed_figures(
    figures: dict[str, float], *, train_s: float, inference_s: float, batch_size: int
) -> dict[str, float]:
    """Adds the timed figures (seconds per train step and per forward pass)."""
    return {
        **figures,
        "train_step_s": train_s,
        "train_steps_per_s": 1 / train_s,
        "train_images_per_s": batch_size / train_s,
        "train_gflop_per_s": figures["train_gflop_per_step"] / train_s,
        "inference_s": inference_s,
        "inference_images_per_s": batch_size / inference_s,
        "inference_gflop_per_s": figures["inference_gflop"] / inference_s,
    }


def input_pipeline_batches_per_s(
    config: ml_collections.ConfigDict, num_batches: int = 20
) -> float:
    """Batches/s of the configured training loader alone (after its first batch)."""
    mesh = sharding.create_mesh(config.mesh.spatial)
    iterator = create_train_iterator(config, mesh)
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches / (time.perf_counter() - start)


README_BEGIN = "<!-- benchmark table: begin -->"
README_END = "<!-- benchmark table: end -->"


def _cpu_model(cpuinfo_path: str) -> tuple[str, bool]:
    """(model name, has AVX-512) from a Linux /proc/cpuinfo; ('', False) elsewhere."""
    try:
        with open(cpuinfo_path) as f:
            text = f.read()
    except OSError:
        return "", False
    model = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1]
            break
    for noise in ("(R)", "(TM)", "Processor", "processor"):
        model = model.replace(noise, "")
    model = " ".join(model.split("@")[0].split())
    return model, " avx512f" in text


def device_description(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """'2x NVIDIA H200'; on the CPU also the model, cores and AVX-512, e.g.
    '1x cpu (Intel Xeon, 2 cores, AVX-512)': CPU rows of different machines
    differ by 2x in speed and must not replace each other in the table."""
    device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    if jax.default_backend() != "cpu":
        return device
    model, avx512 = _cpu_model(cpuinfo_path)
    details = [model or "unknown model", f"{os.cpu_count()} cores"]
    if avx512:
        details.append("AVX-512")
    return f"{device} ({', '.join(details)})"


def markdown_table(results: list[dict]) -> str:
    """One row per benchmark result, as written by scripts/benchmark.py."""
    header = (
        "| case | batch | input | device | train steps/s | images/s "
        "| % of matmul peak | compile s | PyTorch step s | speed vs PyTorch "
        "| inference images/s |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        torch_step, speedup = "-", "-"
        if "torch_train_step_s" in r:
            torch_step = f"{r['torch_train_step_s']:.3g}"
            speedup = f"{r['train_speedup_vs_torch']:.2f}x"
        size = "x".join(str(n) for n in r["input_size"])
        cells = [
            r["name"],
            str(r["batch_size"]),
            size,
            r["device"],
            f"{r['train_steps_per_s']:.3f}",
            f"{r['train_images_per_s']:.2f}",
            f"{100 * r['train_fraction_of_peak']:.0f}%",
            f"{r['train_compile_s']:.1f}",
            torch_step,
            speedup,
            f"{r['inference_images_per_s']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme_path: str, results: list[dict]) -> None:
    """Rewrites the README's benchmark table: one row per result, keeping the
    rows of other (case, device) pairs, so that CPU and accelerator rows
    measured on different machines live side by side."""
    with open(readme_path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme_path} has no '{README_BEGIN}' ... '{README_END}'.")
    head, rest = text.split(README_BEGIN, 1)
    old_table, tail = rest.split(README_END, 1)
    new_lines = markdown_table(results).split("\n")
    new_keys = {_row_key(line) for line in new_lines[2:]}
    kept = [
        line
        for line in old_table.strip().split("\n")[2:]
        if line.startswith("|") and _row_key(line) not in new_keys
    ]
    rows = sorted(kept + new_lines[2:], key=_row_key)
    table = "\n".join(new_lines[:2] + rows)
    with open(readme_path, "w") as f:
        f.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def _row_key(line: str) -> tuple[str, str]:
    """(device, case) of a table row."""
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    return cells[3], cells[0]
