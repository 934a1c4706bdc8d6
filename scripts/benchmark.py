r"""Measures the speed of a config on this machine, in one run.

  python scripts/benchmark.py --config=configs/unet.py --workdir=/tmp/bench \
      --batch_size=2 --input_size=256,256 --config.model.base_width=64

Reports XLA compile time of the train and inference steps, train steps/s and
images/s, inference images/s, FLOPs per step from XLA's cost analysis and the
achieved FLOP/s, the matmul FLOP/s of
this machine measured in the same run (on the CPU, the faster of this process's
flags and XLA's defaults, in a subprocess) and the ratio of the two, peak
resident memory, and the input pipeline's own batches/s. When PyTorch is
installed, a PyTorch twin of the same U-Net is timed too. Each step is compiled
once; then JAX's and PyTorch's train steps and forward passes take turns for
--rounds rounds of --repeats calls each, and every figure is a median over
all rounds, so the ratios are measured under the same machine load.
Prints a table and writes benchmark_<name>.json into the workdir.
"""

import glob
import json
import math
import os
import sys

from fcn_jax import cpu_flags

cpu_flags.configure()

import jax
from absl import app, flags
from ml_collections import config_flags

from fcn_jax import benchmark

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the JSON.")
_NAME = flags.DEFINE_string("name", "config", "Name of this case in the output.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: config).")
_SIZE = flags.DEFINE_list("input_size", None, "H,W (default: config crop).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 4, "Rounds in which JAX and PyTorch take turns."
)
_PYTORCH = flags.DEFINE_bool("pytorch", True, "Time a PyTorch twin if installed.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "Matmul size for the peak.")
_README = flags.DEFINE_string(
    "readme",
    None,
    "If set, rewrite this file's benchmark table from every "
    "benchmark_*.json in --workdir.",
)
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Measure the input pipeline.")
flags.mark_flags_as_required(["config", "workdir"])


def _pytorch_twin():
    if not _PYTORCH.value:
        return None
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pytorch_unet_twin
    except ImportError:
        return None
    return pytorch_unet_twin


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    batch_size = _BATCH.value or config.data.batch_size
    spatial = tuple(int(n) for n in _SIZE.value or [config.data.crop_size] * 2)
    peak = benchmark.matmul_peak_flops(_MATMUL.value, dtype=config.model.dtype)
    default_flags_peak = float("nan")
    if jax.default_backend() == "cpu":
        default_flags_peak = benchmark.default_flags_matmul_peak_flops(
            _MATMUL.value, dtype=config.model.dtype
        )
    in_process_peak = peak
    if not math.isnan(default_flags_peak):
        peak = max(peak, default_flags_peak)
    figures, jax_timers = benchmark.compile_train_and_inference(
        config, batch_size=batch_size, spatial=spatial
    )
    timers = {f"jax_{name}": fn for name, fn in jax_timers.items()}
    # Imported only now, so the peak memory above is JAX's alone.
    twin = _pytorch_twin()
    twin_facts = None
    if twin is not None and config.model.padding == "SAME" and len(spatial) == 2:
        twin_facts, twin_timers = twin.prepare(
            batch_size=batch_size,
            height=spatial[0],
            width=spatial[1],
            in_channels=len(config.data.mean),
            num_classes=config.model.num_classes,
            depth=config.model.depth,
            base_width=config.model.base_width,
            dtype=config.model.dtype,
        )
        timers.update({f"torch_{name}": fn for name, fn in twin_timers.items()})
    medians = benchmark.alternating_medians(
        timers, rounds=_ROUNDS.value, repeats=_REPEATS.value
    )
    result = benchmark.speed_figures(
        figures,
        train_s=medians["jax_train_step"],
        inference_s=medians["jax_inference"],
        batch_size=batch_size,
    )
    if twin_facts is not None:
        result.update(
            torch_train_step_s=medians["torch_train_step"],
            torch_inference_s=medians["torch_inference"],
            torch_version=twin_facts["torch_version"],
            torch_num_params=twin_facts["num_params"],
            train_speedup_vs_torch=medians["torch_train_step"]
            / medians["jax_train_step"],
            inference_speedup_vs_torch=medians["torch_inference"]
            / medians["jax_inference"],
        )
    result.update(
        name=_NAME.value,
        device=benchmark.device_description(),
        allocator=benchmark.allocator(),
        batch_size=batch_size,
        input_size=list(spatial),
        matmul_peak_gflop_per_s=peak / 1e9,
        matmul_in_process_gflop_per_s=in_process_peak / 1e9,
        matmul_xla_default_flags_gflop_per_s=default_flags_peak / 1e9,
        train_fraction_of_peak=result["train_gflop_per_s"] * 1e9 / peak,
    )
    if _PIPELINE.value:
        result["pipeline_batches_per_s"] = benchmark.input_pipeline_batches_per_s(
            config
        )
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, f"benchmark_{_NAME.value}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for key, value in result.items():
        print(
            f"{key:32s} {value:.4g}"
            if isinstance(value, float)
            else f"{key:32s} {value}"
        )
    print(f"wrote {path}")
    if _README.value:
        paths = sorted(glob.glob(os.path.join(_WORKDIR.value, "benchmark_*.json")))
        results = []
        for result_path in paths:
            with open(result_path) as f:
                results.append(json.load(f))
        benchmark.update_readme(_README.value, results)
        print(f"updated the benchmark table in {_README.value}")


if __name__ == "__main__":
    app.run(main)
