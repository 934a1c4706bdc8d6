"""Predict masks for image files with a trained checkpoint; write colourised PNGs."""

import functools
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from fcn_jax import steps, visualize
from fcn_jax.evaluate import restore_experiment


def load_image(path: str, num_channels: int) -> np.ndarray:
    """Reads an image file as uint8 [H, W, num_channels] (1 = gray, 3 = RGB)."""
    modes = {1: "L", 3: "RGB"}
    if num_channels not in modes:
        raise ValueError(f"Cannot read images with {num_channels} channels from files.")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert(modes[num_channels]))
    except OSError as error:
        raise ValueError(f"Cannot read image file {path}: {error}") from error
    return pixels.reshape(*pixels.shape[:2], num_channels)


def predict_files(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: Sequence[str],
    output_dir: str,
    *,
    step: int | None = None,
    best: bool = False,
) -> list[str]:
    """Writes `<stem>_mask.png` (colours) and `<stem>_labels.png` (class ids).

    Images of any size are predicted whole with `config.eval.mode` (and its
    test-time augmentation). Returns the paths of the colour masks.
    """
    experiment, _ = restore_experiment(config, workdir, step=step, best=best)
    predict = jax.jit(
        functools.partial(
            steps.predict_logits, geometry=experiment.model, config=config
        )
    )
    mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
    palette = visualize.default_palette(config.model.num_classes)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in paths:
        pixels = load_image(path, len(config.data.mean))
        image = (pixels.astype(np.float32) / 255.0 - mean) / std
        logits = predict(experiment.state, image[None])
        labels = np.asarray(jax.device_get(logits.argmax(-1)))[0].astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        mask_path = os.path.join(output_dir, f"{stem}_mask.png")
        colors = visualize.colorize(labels, palette, config.data.ignore_label)
        Image.fromarray(colors).save(mask_path)
        Image.fromarray(labels).save(os.path.join(output_dir, f"{stem}_labels.png"))
        written.append(mask_path)
    return written
