"""Colourised masks and image | ground truth | prediction panels as PNG files."""

import os

import numpy as np
from PIL import Image

IGNORE_COLOR = (255, 255, 255)


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct colours [K, 3] uint8: class 0 black, then bit-interleaved RGB."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for class_id in range(num_classes):
        value, color = class_id, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                color[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[class_id] = color
    return palette


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_label: int) -> np.ndarray:
    """Maps labels [H, W] to colours [H, W, 3]; ignored or unknown ids are white."""
    known = (labels >= 0) & (labels < len(palette))
    rgb = palette[np.where(known, labels, 0)]
    rgb[~known | (labels == ignore_label)] = IGNORE_COLOR
    return rgb


def to_uint8_rgb(image: np.ndarray, mean, std) -> np.ndarray:
    """Undoes the input normalisation of image [H, W, C] for display."""
    pixels = image * np.asarray(std) + np.asarray(mean)
    pixels = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def save_panel(
    path: str,
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    *,
    mean,
    std,
    ignore_label: int,
    palette: np.ndarray,
) -> None:
    """Writes image | ground truth | prediction side by side to `path`."""
    panel = np.concatenate(
        [
            to_uint8_rgb(image, mean, std),
            colorize(label, palette, ignore_label),
            colorize(prediction, palette, ignore_label),
        ],
        axis=1,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(panel).save(path)
