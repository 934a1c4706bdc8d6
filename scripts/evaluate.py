r"""Evaluates a checkpoint of a workdir on a split and prints a metrics table.

  python scripts/evaluate.py --config=configs/unet.py --workdir=runs/unet_isbi \
      [--step=N | --best] [--split=validation]

Writes eval_<split>_<step>.json and image | ground truth | prediction PNGs
(eval_<split>_<step>/) into the workdir.
"""

from fcn_jax import cpu_flags

cpu_flags.configure()

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fcn_jax import distributed, evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with presets: file.py:preset,...",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the best checkpoint by mean IoU.")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: config.data.eval_split).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _BEST.value and _STEP.value is not None:
        raise app.UsageError("Give at most one of --step and --best.")
    logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_flags()
    step, _, table = evaluate.evaluate_checkpoint(
        _CONFIG.value,
        _WORKDIR.value,
        step=_STEP.value,
        best=_BEST.value,
        split=_SPLIT.value,
    )
    if jax.process_index() == 0:
        print(f"step {step}, workdir {_WORKDIR.value}")
        print(table)


if __name__ == "__main__":
    app.run(main)
