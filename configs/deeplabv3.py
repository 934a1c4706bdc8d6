r"""DeepLabv3 (Chen et al. 2017): dilated residual encoder + ASPP, on CamVid.

CPU-sized default (a narrow ResNet-18-style encoder at output stride 16):

  python scripts/train.py --config=configs/deeplabv3.py --workdir=runs/deeplab_camvid \
      --config.data.manual_dir=../shared/data/camvid
  python scripts/evaluate.py --config=configs/deeplabv3.py \
      --workdir=runs/deeplab_camvid --config.data.manual_dir=../shared/data/camvid --best

Presets (comma-separated after a colon):
  paper     base width 64, output stride 8 (ASPP rates doubled to 12/24/36),
            multi-grid (1, 2, 4), 352x480 crops, SGD with poly decay; for
            accelerators.
  os8       output stride 8 at CPU size.
  plus      the DeepLabv3+ decoder (stride-4 low-level skip).
  runlocal  a tiny model and a few steps, for smoke tests.

Result of the default (400 steps of batch 8, 9 minutes on 2 CPU cores),
CamVid validation (101 images, 360x480): mean IoU 0.4370, global accuracy
0.7209, class-average accuracy 0.6844.
"""

import ml_collections

from fcn_jax import config_lib
from fcn_jax.data import camvid_config

PRESETS = ("paper", "os8", "plus", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the DeepLabv3 config, with the presets named in `arg` applied."""
    presets = config_lib.parse_presets(arg, PRESETS)
    config = config_lib.default_config("deeplabv3")
    camvid_config.use_camvid(config, class_weights=True)

    config.model.output_stride = 16
    config.model.base_width = 16
    config.model.aspp_features = 64
    config.model.low_level_features = 16
    config.model.decoder_features = 64
    config.data.batch_size = 8
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.schedule.name = "poly"
    config.train.num_steps = 400
    config.eval.every_steps = 200

    if "os8" in presets:
        config.model.output_stride = 8
    if "plus" in presets:
        config.model.decoder = True
    if "paper" in presets:
        config.model.output_stride = 8
        config.model.base_width = 64
        config.model.multi_grid = (1, 2, 4)
        config.model.aspp_features = 256
        config.model.low_level_features = 48
        config.model.decoder_features = 256
        config.data.crop_size = 352
        config.data.batch_size = 16
        config.optim.name = "sgd"
        config.optim.momentum = 0.9
        config.optim.learning_rate = 7e-3
        config.optim.weight_decay = 1e-4
        config.train.num_steps = 30_000
        config.eval.every_steps = 2000
    if "runlocal" in presets:
        config.model.base_width = 4
        config.model.aspp_features = 8
        config.model.low_level_features = 4
        config.model.decoder_features = 8
        config.data.crop_size = 64
        config.data.batch_size = 2
        config.train.num_steps = 4
        config.train.log_every_steps = 2
        config.eval.every_steps = 2

    config_lib.validate_config(config)
    config.lock()
    return config
