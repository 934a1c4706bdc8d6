"""Evaluation of a split: confusion matrix over every example once, metrics, panels."""

import json
import os
from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fcn_jax import metrics, sharding, visualize
from fcn_jax.train_state import TrainState

ARRAY_KEYS = ("image", "label", "mask")


def evaluate_batches(
    eval_step: Callable,
    state: TrainState,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    *,
    panel_dir: str | None = None,
) -> dict[str, float]:
    """Runs `eval_step` over `batches` and summarises the summed confusion matrix.

    If `panel_dir` is given, process 0 writes image | ground truth | prediction
    PNGs for the first `config.eval.num_images_to_save` examples there.
    """
    num_classes = config.model.num_classes
    confusion = np.zeros((num_classes, num_classes), np.int64)
    palette = visualize.default_palette(num_classes)
    saved = 0
    for local_batch in batches:
        global_batch = sharding.to_global_batch(
            {key: local_batch[key] for key in ARRAY_KEYS if key in local_batch}, mesh
        )
        batch_confusion, predictions = eval_step(state, global_batch)
        confusion += np.asarray(jax.device_get(batch_confusion), np.int64)
        wanted = config.eval.num_images_to_save - saved
        if panel_dir and wanted > 0 and jax.process_index() == 0:
            saved += _save_panels(
                panel_dir, local_batch, predictions, wanted, palette, config
            )
    summary = metrics.summarize_confusion_matrix(confusion, config.data.class_names)
    summary["num_pixels"] = int(confusion.sum())
    return summary


def _save_panels(panel_dir, local_batch, predictions, wanted, palette, config) -> int:
    local_predictions = sharding.local_rows(predictions)
    count = 0
    for row in range(len(local_predictions)):
        if count == wanted:
            break
        if "mask" in local_batch and not local_batch["mask"][row].any():
            continue
        example_id = int(local_batch["id"][row]) if "id" in local_batch else row
        visualize.save_panel(
            os.path.join(panel_dir, f"example_{example_id}.png"),
            local_batch["image"][row],
            local_batch["label"][row],
            local_predictions[row],
            mean=config.data.mean,
            std=config.data.std,
            ignore_label=config.data.ignore_label,
            palette=palette,
        )
        count += 1
    return count


def write_eval_json(
    workdir: str, split: str, step: int, summary: dict[str, float]
) -> str:
    """Writes `eval_<split>_<step>.json` into `workdir` and returns its path."""
    path = os.path.join(workdir, f"eval_{split}_{step}.json")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump({"split": split, "step": step, **summary}, f, indent=2)
    return path
