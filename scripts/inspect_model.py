r"""Looks inside the network a config builds: layer table with receptive fields,
parameters and FLOPs; checkerboard analysis of transposed convs; effective
receptive field; translation equivariance.

  python scripts/inspect_model.py --config=configs/deeplabv3.py
  python scripts/inspect_model.py --config=configs/unet.py --workdir=runs/unet_isbi \
      --sections=table,erf --erf_inputs=data --input_shape=256,256

Without --workdir the model is at initialisation; with it, the checkpoint
(latest, --step or --best) is restored. PNGs go to --output_dir (default: the
workdir, else the current directory).
"""

from fcn_jax import cpu_flags

cpu_flags.configure()

from absl import app, flags, logging
from ml_collections import config_flags

from fcn_jax import inspection

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with presets.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Restore the model from this workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the best checkpoint by mean IoU.")
_INPUT_SHAPE = flags.DEFINE_list(
    "input_shape", [], "Spatial input size, e.g. 360,480 (default: the training crop)."
)
_SECTIONS = flags.DEFINE_list(
    "sections", ["table", "checkerboard"], f"Any of {', '.join(inspection.SECTIONS)}."
)
_ERF_INPUTS = flags.DEFINE_enum(
    "erf_inputs", "random", ["random", "data"], "ERF over random or real images."
)
_ERF_SAMPLES = flags.DEFINE_integer("erf_samples", 8, "Inputs averaged for the ERF.")
_SHIFT = flags.DEFINE_integer(
    "shift", None, "Equivariance shift in pixels (default: the total stride)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where PNGs are written.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_SECTIONS.value) - set(inspection.SECTIONS))
    if unknown:
        raise app.UsageError(
            f"Unknown sections {unknown}; choose from {', '.join(inspection.SECTIONS)}."
        )
    if _BEST.value and _STEP.value is not None:
        raise app.UsageError("Give at most one of --step and --best.")
    logging.set_verbosity(logging.WARNING)
    print(
        inspection.inspect_model(
            _CONFIG.value,
            workdir=_WORKDIR.value,
            step=_STEP.value,
            best=_BEST.value,
            spatial=tuple(int(n) for n in _INPUT_SHAPE.value),
            sections=tuple(_SECTIONS.value),
            erf_inputs=_ERF_INPUTS.value,
            erf_samples=_ERF_SAMPLES.value,
            shift=_SHIFT.value,
            output_dir=_OUTPUT_DIR.value or _WORKDIR.value or ".",
        )
    )


if __name__ == "__main__":
    app.run(main)
