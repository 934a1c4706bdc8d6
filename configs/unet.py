r"""U-Net (Ronneberger, Fischer, Brox 2015) on the ISBI-2012 EM membranes.

Default (CPU-sized, what `make train` runs):

  python scripts/train.py --config=configs/unet.py --workdir=runs/unet_isbi
  python scripts/evaluate.py --config=configs/unet.py --workdir=runs/unet_isbi --best

Presets (comma-separated after a colon, e.g. `configs/unet.py:runlocal`):
  paper     the paper's network: depth 4, base width 64, VALID convolutions,
            572x572 input tiles (388x388 output), overlap-tile evaluation,
            SGD with momentum 0.99, batch 1, elastic deformations. For
            accelerators.
  valid     VALID padding and overlap-tile evaluation at CPU size.
  camvid    CamVid road scenes (11 classes, void ignored), median-frequency
            class weights, 256x256 crops with horizontal flips, whole-image
            (360x480) evaluation. Raw files from --config.data.manual_dir or
            $FCN_JAX_CAMVID_DIR (train/, trainannot/, val/, valannot/).
  pets      Oxford-IIIT Pet from the TFDS catalogue (pet / background, the
            trimap's outline ignored), read from --config.data.data_dir (a
            local folder or gs:// bucket holding the prepared data set).
  runlocal  a tiny model and a few steps, for smoke tests.

Result of the default preset on a 2-core CPU (`make train`, 10 minutes): on
slices 25-29, pixel accuracy 0.9226, mean IoU 0.7906.

Result of `camvid` (600 steps of batch 8, 60 minutes on 2 shared CPU cores):

  python scripts/train.py --config=configs/unet.py:camvid --workdir=runs/unet_camvid \
      --config.data.manual_dir=../shared/data/camvid
  python scripts/evaluate.py --config=configs/unet.py:camvid --workdir=runs/unet_camvid \
      --config.data.manual_dir=../shared/data/camvid --best

CamVid validation (101 images, 360x480): mean IoU 0.3513, global accuracy
0.6917, class-average accuracy 0.5918.

`sweep()` crosses three learning rates with two losses (6 runs, one after
another; `--summarize` ranks them by validation mean IoU):

  python scripts/sweep.py --config=configs/unet.py:camvid \
      --workdir_root=runs/unet_camvid_sweep --run_local \
      --set=data.manual_dir=../shared/data/camvid
  python scripts/sweep.py --config=configs/unet.py:camvid \
      --workdir_root=runs/unet_camvid_sweep --summarize
"""

import ml_collections

from fcn_jax import config_lib
from fcn_jax.data import camvid_config, oxford_pet_config

PRESETS = ("camvid", "pets", "paper", "valid", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the U-Net config, with the presets named in `arg` applied."""
    presets = config_lib.parse_presets(arg, PRESETS)
    config = config_lib.default_config()

    config.model.depth = 4
    config.model.base_width = 16
    config.data.crop_size = 256
    config.data.batch_size = 4
    config.data.augment.elastic_probability = 0.5
    config.optim.name = "adam"
    config.optim.learning_rate = 2e-3
    config.schedule.name = "cosine"
    config.schedule.warmup_steps = 20
    config.train.num_steps = 600
    config.eval.every_steps = 200

    if "camvid" in presets:
        camvid_config.use_camvid(config, class_weights=True)
        config.data.batch_size = 8
        config.optim.learning_rate = 1e-3
        config.train.num_steps = 600
        config.eval.every_steps = 300
    if "pets" in presets:
        oxford_pet_config.use_oxford_pet(config)
        config.data.batch_size = 8
        config.optim.learning_rate = 1e-3
        config.train.num_steps = 3000
        config.eval.every_steps = 1000
    if "valid" in presets or "paper" in presets:
        config.model.padding = "VALID"
        config.eval.mode = "overlap_tile"
        config.data.crop_size = 252
        config.eval.tile_output_size = 164
    if "paper" in presets:
        config.model.base_width = 64
        config.data.crop_size = 572
        config.data.batch_size = 1
        config.eval.tile_output_size = 388
        config.data.augment.elastic_probability = 1.0
        config.optim.name = "sgd"
        config.optim.momentum = 0.99
        config.optim.learning_rate = 1e-2
        config.schedule.name = "constant"
        config.schedule.warmup_steps = 0
        config.train.num_steps = 20_000
        config.eval.every_steps = 1000
    if "runlocal" in presets:
        config.model.depth = 2
        config.model.base_width = 4
        config.data.crop_size = 64
        config.data.batch_size = 2
        config.data.augment.elastic_probability = 0.0
        config.eval.tile_output_size = 64
        config.train.num_steps = 6
        config.train.log_every_steps = 2
        config.eval.every_steps = 3

    config_lib.validate_config(config)
    config.lock()
    return config


def sweep() -> list[dict]:
    """Learning rate x loss: cross-entropy alone, or cross-entropy plus Dice."""
    losses = (
        {"loss.dice_weight": 0.0, "loss.cross_entropy_weight": 1.0},
        {"loss.dice_weight": 1.0},
    )
    return [
        {"optim.learning_rate": learning_rate, **loss}
        for learning_rate in (3e-4, 1e-3, 3e-3)
        for loss in losses
    ]
