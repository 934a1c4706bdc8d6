"""Shared config defaults, strict preset parsing and config validation."""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np

from fcn_jax.data import keyed_source

# Every choice-valued field and what it accepts; checked by `validate_config`.
CHOICES: Mapping[str, tuple[str, ...]] = {
    "model.name": ("unet", "fcn", "deeplabv3"),
    "model.variant": ("32s", "16s", "8s"),
    "model.backbone": ("vgg", "resnet"),
    "model.output_stride": (8, 16, 32),
    "model.padding": ("SAME", "VALID"),
    "model.norm": ("batch", "group", "none"),
    "model.downsample": ("max_pool", "avg_pool", "strided_conv"),
    "model.max_pool_gradient": ("auto", "argmax", "xla"),
    "model.batch_norm_relu": ("auto", "kernel", "fused", "xla"),
    "model.conv_filter_gradient": ("auto", "direct", "xla"),
    "model.conv_forward": ("auto", "direct", "xla"),
    "model.skip_conv": ("auto", "split", "concat"),
    "model.upsample": ("transposed_conv", "resize_conv"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "optim.name": ("adam", "adamw", "sgd"),
    "schedule.name": ("constant", "cosine", "poly"),
    "eval.mode": ("whole", "sliding_window", "overlap_tile"),
}

POSITIVE_INTS = (
    "model.num_classes",
    "model.depth",
    "model.base_width",
    "model.kernel_size",
    "data.batch_size",
    "data.eval_batch_size",
    "train.num_steps",
    "train.log_every_steps",
    "eval.every_steps",
    "ckpt.max_to_keep",
    "mesh.spatial",
)


def parse_presets(arg: str | None, known: Iterable[str]) -> set[str]:
    """Parses `file.py:a,b` preset arguments, rejecting unknown names.

    Args:
      arg: the text after the colon in `--config=configs/x.py:arg`, or None.
      known: the preset names the config file defines.

    Returns:
      The set of requested preset names.
    """
    known = tuple(known)
    requested = {token.strip() for token in (arg or "").split(",") if token.strip()}
    unknown = sorted(requested - set(known))
    if unknown:
        raise ValueError(
            f"Unknown config preset(s) {unknown} in argument {arg!r}; "
            f"this config file accepts: {', '.join(known) or '(none)'} "
            "(comma-separated, e.g. 'configs/unet.py:runlocal')."
        )
    return requested


def model_defaults(name: str) -> ml_collections.ConfigDict:
    """`config.model` for model `name`: every field of its module, with defaults.

    Deriving the group from the module keeps one source of truth for defaults;
    `create_model` rejects any key the module lacks.
    """
    from fcn_jax.models import MODELS  # Deferred: configs load before jax is set up.

    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {', '.join(MODELS)}.")
    group = ml_collections.ConfigDict({"name": name, "num_classes": 2})
    for field in dataclasses.fields(MODELS[name]):
        if field.name in ("parent", "name", "num_classes"):
            continue
        value = field.default
        if isinstance(value, type):  # A dtype such as jnp.float32.
            value = np.dtype(value).name
        group[field.name] = value
    # CPU-fast gradients on the CPU, XLA's own on accelerators (create_model).
    for key in (
        "max_pool_gradient",
        "batch_norm_relu",
        "conv_filter_gradient",
        "conv_forward",
        "skip_conv",
    ):
        if key in group:
            group[key] = "auto"
    return group


def default_config(model_name: str = "unet") -> ml_collections.ConfigDict:
    """Defaults shared by every config file; a config overrides what it needs."""
    config = ml_collections.ConfigDict()

    config.model = model_defaults(model_name)

    config.data = ml_collections.ConfigDict()
    config.data.name = "isbi2012_membrane"
    # Empty means $FCN_JAX_DATA_DIR or ~/.cache/fcn_jax/tensorflow_datasets.
    config.data.data_dir = ""
    # Raw files for builders that read a manual directory (e.g. CamVid); empty
    # means the builder's environment variable (FCN_JAX_CAMVID_DIR).
    config.data.manual_dir = ""
    # Any TFDS data set: the features holding the image and the label map, and
    # 'stored:class' pairs for label values that are not class ids yet, e.g.
    # '1:0,2:1,3:255' (values not listed pass through unchanged).
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.label_mapping = ""
    # A grayscale image where the config expects RGB is an error unless this
    # is set, which repeats it into three channels.
    config.data.convert_grayscale = False
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.class_names = ("membrane", "cell")
    config.data.ignore_label = 255
    config.data.crop_size = 256
    # Global batch sizes: split evenly over processes, then over devices.
    config.data.batch_size = 4
    config.data.eval_batch_size = 1
    # Per-channel statistics on the [0, 1] scale (ISBI-2012 training slices).
    config.data.mean = (0.4912,)
    config.data.std = (0.1712,)
    config.data.worker_count = 0
    config.data.augment = ml_collections.ConfigDict()
    config.data.augment.flips = True
    config.data.augment.rotations = True
    config.data.augment.vertical_flips = True
    # Elastic deformation: displacements with std `elastic_sigma` pixels on a
    # coarse `elastic_grid_size`^2 grid, spread smoothly over the image.
    config.data.augment.elastic_probability = 0.0
    config.data.augment.elastic_sigma = 10.0
    config.data.augment.elastic_grid_size = 3

    config.loss = ml_collections.ConfigDict()
    config.loss.cross_entropy_weight = 1.0
    config.loss.dice_weight = 0.0
    config.loss.dice_epsilon = 1.0
    # Empty, or one weight per class.
    config.loss.class_weights = ()

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.optim.momentum = 0.9
    config.optim.grad_clip_norm = 0.0

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "cosine"
    config.schedule.warmup_steps = 0
    config.schedule.end_factor = 0.01
    config.schedule.power = 0.9

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.num_steps = 1000
    config.train.log_every_steps = 10
    # Persistent XLA cache in <workdir>/xla_cache for compiles slower than this.
    config.train.compilation_cache = True
    config.train.cache_min_compile_seconds = 0.5
    # A non-finite loss or gradient norm stops training; with this set, such
    # updates are skipped instead (parameters and optimizer state kept) and
    # counted in train/nonfinite_updates.
    config.train.skip_nonfinite_updates = False

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 200
    config.eval.mode = "whole"
    config.eval.window_size = 256
    config.eval.overlap = 0.25
    # Output tile edge for overlap-tile inference with VALID padding.
    config.eval.tile_output_size = 388
    config.eval.num_images_to_save = 5
    # Test-time augmentation: horizontal flip and input scales, probabilities averaged.
    config.eval.flip = False
    config.eval.scales = (1.0,)

    # Devices: `spatial` of them split each image's first spatial axis (for
    # inputs too large for one device); the rest split the batch.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.spatial = 1

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.max_to_keep = 2
    config.ckpt.async_save = True
    # Extra checkpoints between evaluations every this many steps (0: none).
    config.ckpt.every_steps = 0
    return config


_ABSENT = object()


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value at `dotted`; _ABSENT for a model field this model lacks."""
    value = config
    for part in dotted.split("."):
        if part not in value and dotted.startswith("model."):
            return _ABSENT
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key at fault if the config cannot run."""
    for key, accepted in CHOICES.items():
        value = _lookup(config, key)
        if value is not _ABSENT and value not in accepted:
            raise ValueError(
                f"config.{key}={value!r} is not one of {', '.join(accepted)}."
            )
    for key in POSITIVE_INTS:
        value = _lookup(config, key)
        if value is _ABSENT:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer.")
    num_classes = config.model.num_classes
    _check_length(config, "data.class_names", num_classes, allow_empty=False)
    _check_length(config, "loss.class_weights", num_classes, allow_empty=True)
    channels = config.data.mean
    _check_length(
        config,
        "data.mean",
        len(channels) if isinstance(channels, tuple) else 1,
        allow_empty=False,
    )
    _check_length(config, "data.std", len(channels), allow_empty=False)
    if 0 <= config.data.ignore_label < num_classes:
        raise ValueError(
            f"config.data.ignore_label={config.data.ignore_label} is a real class id "
            f"(model.num_classes={num_classes}); use a value outside [0, "
            f"{num_classes}), e.g. 255."
        )
    keyed_source.parse_label_mapping(config.data.label_mapping)
    if config.data.crop_size % config.mesh.spatial:
        raise ValueError(
            f"config.data.crop_size={config.data.crop_size} must be divisible by "
            f"config.mesh.spatial={config.mesh.spatial}."
        )
    if not 0.0 <= config.eval.overlap < 1.0:
        raise ValueError(
            f"config.eval.overlap={config.eval.overlap} must be in [0, 1)."
        )
    if config.loss.cross_entropy_weight < 0 or config.loss.dice_weight < 0:
        raise ValueError("config.loss.*_weight must be non-negative.")
    if config.loss.cross_entropy_weight + config.loss.dice_weight == 0:
        raise ValueError(
            "config.loss.cross_entropy_weight and config.loss.dice_weight are both 0."
        )


def _check_length(
    config: ml_collections.ConfigDict, key: str, expected: int, *, allow_empty: bool
) -> None:
    value = _lookup(config, key)
    if not isinstance(value, tuple):
        example = tuple(value) if isinstance(value, list) else (0.5, 0.5, 0.5)
        raise TypeError(f"config.{key}={value!r} must be a tuple, e.g. {example!r}.")
    if allow_empty and not value:
        return
    if len(value) != expected:
        raise ValueError(
            f"config.{key} has {len(value)} entries ({value!r}); expected {expected}."
        )
