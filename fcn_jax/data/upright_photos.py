"""Settings shared by data sets of upright photographs (road scenes, pets)."""

import ml_collections


def use_upright_photo_augment(config: ml_collections.ConfigDict) -> None:
    """256x256 training crops, horizontal mirrors only (photographs have an
    up), no elastic warps, and one whole image per evaluation batch."""
    config.data.crop_size = 256
    config.data.eval_batch_size = 1
    config.data.augment.flips = True
    config.data.augment.rotations = False
    config.data.augment.vertical_flips = False
    config.data.augment.elastic_probability = 0.0
