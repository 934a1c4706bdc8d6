"""CamVid settings shared by every config file that trains on it."""

import ml_collections

from fcn_jax.data import camvid, upright_photos

# Over the 367 training images, [0, 1] scale, RGB; from
# fcn_jax.data.pipeline.compute_mean_std on the train split.
MEAN = (0.4119, 0.4251, 0.4327)
STD = (0.3071, 0.3116, 0.3072)
# Median-frequency balancing (SegNet) over the train split, from
# fcn_jax.data.class_weights.median_frequency_weights(class_frequencies(...)).
MEDIAN_FREQUENCY_WEIGHTS = (
    0.2794, 0.2018, 4.7889, 0.1491, 1.0, 0.4235,
    3.8464, 1.9798, 0.7890, 6.3847, 8.8193,
)  # fmt: skip


def use_camvid(config: ml_collections.ConfigDict, *, class_weights: bool) -> None:
    """Points `config.data` at CamVid (11 classes, void ignored) in place.

    The raw files come from `config.data.manual_dir` or $FCN_JAX_CAMVID_DIR.
    """
    config.data.name = "camvid"
    config.data.class_names = camvid.CLASS_NAMES
    config.data.ignore_label = camvid.IGNORE_LABEL
    config.data.mean = MEAN
    config.data.std = STD
    upright_photos.use_upright_photo_augment(config)
    config.model.num_classes = camvid.NUM_CLASSES
    config.loss.class_weights = MEDIAN_FREQUENCY_WEIGHTS if class_weights else ()
