r"""Writes colourised predicted masks for image files, from a trained workdir.

  python scripts/predict.py --config=configs/unet.py --workdir=runs/unet_isbi \
      --output_dir=/tmp/masks [--best] image1.png image2.png ...
"""

from fcn_jax import cpu_flags

cpu_flags.configure()

from absl import app, flags, logging
from ml_collections import config_flags

from fcn_jax import predict_files

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file the workdir was trained with.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write the masks.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the best checkpoint by mean IoU.")
flags.mark_flags_as_required(["config", "workdir", "output_dir"])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Give one or more image files to predict.")
    logging.set_verbosity(logging.WARNING)
    written = predict_files.predict_files(
        _CONFIG.value,
        _WORKDIR.value,
        argv[1:],
        _OUTPUT.value,
        step=_STEP.value,
        best=_BEST.value,
    )
    for path in written:
        print(path)


if __name__ == "__main__":
    app.run(main)
