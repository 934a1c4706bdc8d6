r"""Expands a config file's `sweep()` into runs: prints, runs or summarises them.

  python scripts/sweep.py --config=configs/unet.py:camvid \
      --workdir_root=runs/unet_camvid_sweep [--set=data.manual_dir=...] \
      [--run_local | --summarize | --tpu_name=NAME --zone=ZONE]

Without --run_local or --summarize it prints each run's train command (and,
with --tpu_name, the line launching it on a TPU VM through scripts/tpu_vm.sh).
--run_local trains the runs one after another, skipping finished ones;
--summarize prints a table ranked by best validation mean IoU.
"""

from absl import app, flags

from fcn_jax import sweep_runs, sweeps

_CONFIG = flags.DEFINE_string(
    "config", None, "Config file with a sweep(), optionally with presets: file.py:a,b"
)
_WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", None, "Directory holding one workdir per run."
)
_RUN_LOCAL = flags.DEFINE_bool("run_local", False, "Train the runs here, in turn.")
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "Print the runs' results.")
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value override common to all runs, e.g. data.data_dir=/data."
)
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "TPU VM for printed commands.")
_ZONE = flags.DEFINE_string("zone", None, "Zone of --tpu_name.")
flags.mark_flags_as_required(["workdir_root"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _SUMMARIZE.value:
        print(sweep_runs.format_summary(sweep_runs.summarize(_WORKDIR_ROOT.value)))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required unless --summarize.")
    config, root = _CONFIG.value, _WORKDIR_ROOT.value
    common = sweeps.parse_assignments(config, _SET.value)
    if _RUN_LOCAL.value:
        sweep_runs.run_local(config, root, common=common)
        print(sweep_runs.format_summary(sweep_runs.summarize(root)))
        return
    lines = sweeps.local_commands(config, root, common=common)
    if _TPU_NAME.value:
        if _ZONE.value is None:
            raise app.UsageError("--zone is required with --tpu_name.")
        lines += sweeps.tpu_commands(
            config, root, tpu_name=_TPU_NAME.value, zone=_ZONE.value, common=common
        )
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
