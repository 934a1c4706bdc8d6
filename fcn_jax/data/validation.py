"""Checks on segmentation images and label maps, with errors that name the culprit."""

import os
from collections.abc import Mapping

import numpy as np
from PIL import Image


def read_png(path: str | os.PathLike, *, mode: str = "L") -> np.ndarray:
    """Reads an image file fully into a uint8 array `[H, W]` (or `[H, W, C]`).

    Raises:
      ValueError: naming `path` when the file is missing, truncated or not an
        image (PIL opens lazily, so the pixels are decoded here, not later).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != mode:
                image = image.convert(mode)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"Cannot read image file {os.fspath(path)}: {error}"
        ) from error


def check_same_size(
    image: np.ndarray,
    label: np.ndarray,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
) -> None:
    """Raises ValueError naming both files if `image` and `label` differ in H, W."""
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(
            f"Image {os.fspath(image_path)} is {image.shape[0]}x{image.shape[1]} "
            f"but label {os.fspath(label_path)} is "
            f"{label.shape[0]}x{label.shape[1]} (HxW)."
        )


def remap_label(
    label: np.ndarray, mapping: Mapping[int, int], path: str | os.PathLike
) -> np.ndarray:
    """Maps stored label values to class ids, e.g. `{0: 0, 255: 1}`.

    Raises:
      ValueError: naming `path` and the values found if any value is not a
        key of `mapping`.
    """
    lookup = np.full(256, -1, dtype=np.int64)
    for stored, class_id in mapping.items():
        lookup[stored] = class_id
    remapped = lookup[label]
    if (remapped < 0).any():
        unexpected = sorted(int(v) for v in np.unique(label[remapped < 0]))
        raise ValueError(
            f"Label file {os.fspath(path)} has values {unexpected}; "
            f"expected only {sorted(mapping)}."
        )
    return remapped.astype(label.dtype)


def check_label_values(
    label: np.ndarray, num_classes: int, ignore_label: int, example_id: object
) -> None:
    """Raises ValueError naming `example_id` if `label` has values outside
    `[0, num_classes)` other than `ignore_label`."""
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_label)
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise ValueError(
            f"Example {example_id} has label values {values} outside "
            f"[0, {num_classes}) that are not the ignore label {ignore_label}."
        )
