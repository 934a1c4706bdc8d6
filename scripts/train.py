r"""Trains a model from a config; rerunning on the same workdir resumes.

  python scripts/train.py --config=configs/unet.py --workdir=runs/unet_isbi \
      [--config.optim.learning_rate=3e-4]

SIGTERM or Ctrl-C stops after the current step, saves a checkpoint and exits
with 128 + the signal number; rerunning the command resumes exactly.

Multi-process: run the same command on every host. TPU VM pod slices, SLURM
and Open MPI jobs start jax.distributed by themselves; elsewhere add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import sys

from fcn_jax import cpu_flags

cpu_flags.configure()

from absl import app, flags, logging
from ml_collections import config_flags

from fcn_jax import distributed, preemption, train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with presets: file.py:preset,...",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir with a config that differs from the one it recorded.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_flags()
    try:
        train.train_and_evaluate(
            _CONFIG.value,
            _WORKDIR.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        )
    except preemption.Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except train.NonFiniteError as error:
        print(error, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
