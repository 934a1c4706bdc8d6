"""Class pixel statistics of a split and the loss weights derived from them."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fcn_jax.data import validation


class ClassFrequencies(NamedTuple):
    """Per-class pixel statistics, each a tuple of length K.

    `pixels[c]` counts the pixels labelled c; `image_pixels[c]` counts the
    labelled pixels (ignore label excluded) of the images in which c occurs.
    """

    pixels: tuple[int, ...]
    image_pixels: tuple[int, ...]


def class_frequencies(
    source: Sequence[dict[str, Any]], num_classes: int, ignore_label: int
) -> ClassFrequencies:
    """Counts class pixels over every example of `source`, skipping
    `ignore_label`; any other value outside `[0, num_classes)` raises."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for i in range(len(source)):
        example = source[i]
        label = np.asarray(example["label"])
        validation.check_label_values(
            label, num_classes, ignore_label, example.get("id", i)
        )
        counts = np.bincount(label[label != ignore_label], minlength=num_classes)
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return ClassFrequencies(
        tuple(int(n) for n in pixels), tuple(int(n) for n in image_pixels)
    )


def median_frequency_weights(counts: ClassFrequencies) -> tuple[float, ...]:
    """Median frequency balancing (Eigen & Fergus 2015, as SegNet used it on
    CamVid): `weight_c = median(freq) / freq_c` with `freq_c = pixels[c] /
    image_pixels[c]`, so rare classes weigh more than 1 and common ones less.

    A class that never occurs gets weight 0 (it contributes no loss anyway)
    and is left out of the median.
    """
    pixels = np.asarray(counts.pixels, np.float64)
    image_pixels = np.asarray(counts.image_pixels, np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError("No class occurs in the labels: no weights to derive.")
    freq = np.zeros_like(pixels)
    freq[present] = pixels[present] / image_pixels[present]
    weights = np.zeros_like(pixels)
    weights[present] = np.median(freq[present]) / freq[present]
    return tuple(float(w) for w in weights)
