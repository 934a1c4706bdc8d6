"""Tests for fcn_jax.metrics."""

import functools
import json
import math
import warnings

import jax
import numpy as np
import pytest

from fcn_jax import metrics

IGNORE = 255
NUM_CLASSES = 4


def _reference_confusion_matrix(predictions, labels, mask):
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for p, y, m in zip(predictions.ravel(), labels.ravel(), mask.ravel()):
        if m and y != IGNORE and 0 <= y < NUM_CLASSES and 0 <= p < NUM_CLASSES:
            cm[y, p] += 1
    return cm


@pytest.mark.parametrize("shape", [(3, 11), (2, 5, 6), (1, 3, 4, 5)])
def test_confusion_matrix_matches_loop_under_jit(shape):
    rng = np.random.default_rng(sum(shape))
    # -1, 5 and 6 are out of range: dropped, never spilled into another cell.
    predictions = rng.choice([0, 1, 2, 3, 0, 1, 2, 3, 5], size=shape)
    labels = rng.choice([-1, 0, 1, 2, 3, 6, IGNORE], size=shape)
    mask = rng.random(shape) > 0.3
    cm_fn = jax.jit(
        functools.partial(
            metrics.confusion_matrix, num_classes=NUM_CLASSES, ignore_label=IGNORE
        )
    )
    cm = cm_fn(predictions, labels, mask=mask)
    assert cm.dtype == np.int32 and cm.shape == (NUM_CLASSES, NUM_CLASSES)
    expected = _reference_confusion_matrix(predictions, labels, mask)
    np.testing.assert_array_equal(cm, expected)
    assert int(cm.sum()) < labels.size  # some pixels really were dropped


def test_confusion_matrix_rows_are_true_classes():
    cm = metrics.confusion_matrix(
        np.array([[1, 1, 0]]), np.array([[0, 0, 0]]), num_classes=2, ignore_label=-1
    )
    np.testing.assert_array_equal(cm, [[1, 2], [0, 0]])


def test_logits_at_ignored_and_masked_pixels_change_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, NUM_CLASSES))
    labels = np.where(
        rng.random((2, 6, 5)) < 0.3, IGNORE, rng.integers(0, NUM_CLASSES, (2, 6, 5))
    )
    mask = rng.random((2, 6, 5)) > 0.3
    unused = (labels == IGNORE) | ~mask
    perturbed = np.where(unused[..., None], rng.normal(size=logits.shape), logits)
    cm = metrics.confusion_matrix(
        logits.argmax(-1),
        labels,
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE,
        mask=mask,
    )
    cm_perturbed = metrics.confusion_matrix(
        perturbed.argmax(-1),
        labels,
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE,
        mask=mask,
    )
    np.testing.assert_array_equal(cm, cm_perturbed)
    assert int(cm.sum()) == int((~unused).sum())


def test_summary_of_hand_made_matrix():
    # Class 2 is predicted once but never present; class 3 appears nowhere.
    cm = np.array(
        [
            [5, 1, 1, 0],
            [2, 3, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    names = ["road", "car", "sky", "boat"]
    summary = metrics.summarize_confusion_matrix(cm, names)
    # road: tp 5, fp 2, fn 2; car: tp 3, fp 1, fn 2; sky: tp 0, fp 1, fn 0.
    expected = {
        "iou/road": 5 / 9,
        "iou/car": 3 / 6,
        "iou/sky": 0.0,
        "dice/road": 10 / 14,
        "dice/car": 6 / 9,
        "dice/sky": 0.0,
        "accuracy/road": 5 / 7,
        "accuracy/car": 3 / 5,
        "mean_iou": (5 / 9 + 3 / 6 + 0.0) / 3,
        "mean_dice": (10 / 14 + 6 / 9 + 0.0) / 3,
        "pixel_accuracy": 8 / 12,
        "mean_accuracy": (5 / 7 + 3 / 5) / 2,
    }
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    for key in ("iou/boat", "dice/boat", "accuracy/boat", "accuracy/sky"):
        assert math.isnan(summary[key]), key
    assert all(type(value) is float for value in summary.values())
    json.dumps(summary)


def test_summary_default_names_and_empty_matrix():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = metrics.summarize_confusion_matrix(np.zeros((2, 2), np.int64))
    assert {"iou/0", "iou/1", "dice/1", "accuracy/0"} <= set(summary)
    assert all(math.isnan(value) for value in summary.values())
    with pytest.raises(ValueError):
        metrics.summarize_confusion_matrix(np.eye(3), ["a", "b"])


def test_format_metrics_table():
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    summary = metrics.summarize_confusion_matrix(cm, ["background", "cell", "void"])
    table = metrics.format_metrics_table(summary, ["background", "cell", "void"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "Dice", "accuracy"]
    assert lines[1].split() == ["background", "0.7500", "0.8571", "0.7500"]
    assert lines[3].split() == ["void", "-", "-", "-"]
    assert "mean_iou: 0.7083" in table
    assert metrics.format_metrics_table(summary) == table
