r"""FCN-8s (Long, Shelhamer, Darrell 2015) on CamVid, trained from scratch.

CPU-sized default (a narrow VGG-style encoder, 256x256 crops):

  python scripts/train.py --config=configs/fcn8s.py --workdir=runs/fcn8s_camvid \
      --config.data.manual_dir=../shared/data/camvid
  python scripts/evaluate.py --config=configs/fcn8s.py --workdir=runs/fcn8s_camvid \
      --config.data.manual_dir=../shared/data/camvid --best

Presets (comma-separated after a colon):
  paper     the paper's widths (VGG-16 layout, fc6/fc7 of 4096, 7x7 fc6),
            360x480 crops, SGD with momentum 0.99, for accelerators.
  32s, 16s  the coarser variants (the variant is `model.variant`).
  resnet    a residual encoder instead of the VGG-style one.
  runlocal  a tiny model and a few steps, for smoke tests.

Result of the default (600 steps of batch 8, 41 minutes on 2 shared CPU cores),
CamVid validation (101 images, 360x480): mean IoU 0.4975, global accuracy
0.7905, class-average accuracy 0.7570.
"""

import ml_collections

from fcn_jax import config_lib
from fcn_jax.data import camvid_config

PRESETS = ("paper", "32s", "16s", "resnet", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the FCN config, with the presets named in `arg` applied."""
    presets = config_lib.parse_presets(arg, PRESETS)
    config = config_lib.default_config("fcn")
    camvid_config.use_camvid(config, class_weights=True)

    config.model.variant = "8s"
    config.model.base_width = 16
    config.model.max_width = 128
    config.model.fc_width = 256
    config.model.fc6_kernel_size = 3
    config.data.batch_size = 8
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.schedule.name = "poly"
    config.train.num_steps = 600
    config.eval.every_steps = 300

    for variant in ("32s", "16s"):
        if variant in presets:
            config.model.variant = variant
    if "resnet" in presets:
        config.model.backbone = "resnet"
    if "paper" in presets:
        config.model.base_width = 64
        config.model.max_width = 512
        config.model.fc_width = 4096
        config.model.fc6_kernel_size = 7
        config.data.crop_size = 352
        config.data.batch_size = 16
        config.optim.name = "sgd"
        config.optim.momentum = 0.99
        config.optim.learning_rate = 1e-4
        config.optim.weight_decay = 5e-4
        config.train.num_steps = 40_000
        config.eval.every_steps = 2000
    if "runlocal" in presets:
        config.model.base_width = 4
        config.model.max_width = 16
        config.model.fc_width = 16
        config.data.crop_size = 64
        config.data.batch_size = 2
        config.train.num_steps = 4
        config.train.log_every_steps = 2
        config.eval.every_steps = 2

    config_lib.validate_config(config)
    config.lock()
    return config
