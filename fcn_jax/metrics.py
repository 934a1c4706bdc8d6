"""Confusion matrix on device and the segmentation metrics derived from it on host."""

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    predictions: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    ignore_label: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Pixel counts per (true class, predicted class), int32 [K, K].

    Rows are true classes, columns predicted ones. Pixels labelled
    `ignore_label`, with mask 0, or with a label or prediction outside [0, K)
    count nowhere. Counts are int32, so sum batches on host in int64.

    Args:
      predictions: int [B, *spatial] predicted classes.
      labels: int [B, *spatial] true classes.
      mask: optional [B, *spatial], nonzero at valid pixels.
    """
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} differ."
        )
    # int32 first: uint8 labels would overflow in labels * K + predictions.
    labels = labels.astype(jnp.int32)
    predictions = predictions.astype(jnp.int32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    valid &= (predictions >= 0) & (predictions < num_classes)
    if mask is not None:
        valid &= mask != 0
    # Invalid pixels land in cell 0 with weight 0, so they never move a count.
    cells = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.bincount(
        cells.ravel(),
        weights=valid.ravel().astype(jnp.int32),
        length=num_classes * num_classes,
    )
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio, NaN where the denominator is 0."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) if there are none."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def summarize_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Per-class and mean IoU, Dice and accuracy from a [K, K] confusion matrix.

    Per-class IoU and Dice are NaN for a class in neither labels nor
    predictions; per-class accuracy (recall) is NaN for a class absent from the
    labels. Means skip NaN entries, so a class predicted but never present
    counts in mean IoU and Dice (as 0) but not in mean accuracy.

    Args:
      cm: [K, K] counts, rows true class, columns predicted class.
      class_names: K names for the per-class keys; defaults to '0', '1', ...

    Returns:
      Plain floats keyed 'mean_iou', 'mean_dice', 'pixel_accuracy',
      'mean_accuracy' and 'iou/<name>', 'dice/<name>', 'accuracy/<name>'.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"Confusion matrix must be square [K, K], got {cm.shape}.")
    num_classes = cm.shape[0]
    if class_names is None:
        class_names = [str(k) for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")

    true_positives = np.diag(cm)
    false_positives = cm.sum(axis=0) - true_positives
    false_negatives = cm.sum(axis=1) - true_positives
    iou = _divide(true_positives, true_positives + false_positives + false_negatives)
    dice = _divide(
        2 * true_positives, 2 * true_positives + false_positives + false_negatives
    )
    accuracy = _divide(true_positives, true_positives + false_negatives)

    summary = {
        "mean_iou": _nanmean(iou),
        "mean_dice": _nanmean(dice),
        "pixel_accuracy": float(_divide(np.trace(cm), cm.sum())),
        "mean_accuracy": _nanmean(accuracy),
    }
    for name, values in (("iou", iou), ("dice", dice), ("accuracy", accuracy)):
        for class_name, value in zip(class_names, values):
            summary[f"{name}/{class_name}"] = float(value)
    return summary


def _format_value(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def format_metrics_table(
    summary: Mapping[str, float], class_names: Sequence[str] | None = None
) -> str:
    """A console table of per-class IoU, Dice and accuracy, then the means.

    `summary` is the output of `summarize_confusion_matrix`; class names default
    to those found in its 'iou/<name>' keys. NaN (class absent) prints as '-'.
    """
    if class_names is None:
        class_names = [key[4:] for key in summary if key.startswith("iou/")]
    width = max([len("class"), *(len(name) for name in class_names)])
    lines = [f"{'class':<{width}}  {'IoU':>8}  {'Dice':>8}  {'accuracy':>8}"]
    for name in class_names:
        cells = [
            _format_value(summary[f"{metric}/{name}"]).rjust(8)
            for metric in ("iou", "dice", "accuracy")
        ]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    for key in ("mean_iou", "mean_dice", "pixel_accuracy", "mean_accuracy"):
        lines.append(f"{key}: {_format_value(summary[key])}")
    return "\n".join(lines)
