"""Orbax checkpoints of the train state and the data iterator's position.

A workdir keeps the latest checkpoint and the best one by validation mean IoU.
With `max_to_keep` plus `best_fn` alone, orbax would rank *all* checkpoints by
the metric and could delete the latest, which a resume needs; the explicit
preservation policy below keeps both.
"""

import math
import os
import shutil
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from fcn_jax.train_state import TrainState

BEST_METRIC = "mean_iou"
STATE_ITEM = "state"
DATA_ITEM = "data_iterator"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _best_metric(metrics: dict) -> float:
    value = metrics.get(BEST_METRIC, float("nan"))
    # NaN compares false with everything; rank it below any real score.
    return float("-inf") if math.isnan(value) else value


def create_checkpoint_manager(
    workdir: str, config: ml_collections.ConfigDict, *, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager keeping the newest `ckpt.max_to_keep` steps and the best by mIoU."""
    policy = preservation_policy.AnyPreservationPolicy(
        policies=[
            preservation_policy.LatestN(n=config.ckpt.max_to_keep),
            preservation_policy.BestN(get_metric_fn=_best_metric, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric,
        best_mode="max",
        preservation_policy=policy,
        enable_async_checkpointing=config.ckpt.async_save and not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_names=(STATE_ITEM, DATA_ITEM),
    )


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_iterator: grain.DataLoaderIterator,
    metrics: dict[str, float],
) -> None:
    """Saves the state and the iterator's position at `state.step` (async)."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
            }
        ),
        metrics=metrics,
    )


def restore_state(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: TrainState,
    data_iterator: grain.DataLoaderIterator | None = None,
) -> TrainState:
    """Restores the state at `step` (and the iterator in place, if given).

    Raises a ValueError that names the workdir if the checkpoint was written by a
    model or optimizer whose parameter tree differs from `abstract_state`.
    """
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"The checkpoint at step {step} in {manager.directory} does not fit the "
            "configured model and optimizer (different architecture, widths, "
            "classes or optimizer?). Use a fresh --workdir for a new config. "
            f"Orbax said: {error}"
        ) from error
    return restored[STATE_ITEM]


def damaged_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "damaged_checkpoints")


def restore_newest_usable(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    data_iterator: grain.DataLoaderIterator,
) -> tuple[TrainState, int] | None:
    """Restores the newest checkpoint that reads back whole; None if there is none.

    Orbax only gives a step its final name once it is fully written, so a kill
    during a save leaves no partial step behind. A step damaged later
    (truncated or missing files) is skipped with a warning naming it, and once
    an older step restores, moved to <workdir>/damaged_checkpoints/ so that
    the resumed run never writes into it. If no step restores, the newest
    step's error is raised (a checkpoint of another model fails at every step).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            state = restore_state(manager, step, abstract_state, data_iterator)
        except Exception as error:  # noqa: BLE001 - any failure means unusable
            path = os.path.join(manager.directory, str(step))
            logging.warning(
                "Checkpoint %s cannot be restored, skipped: %s", path, error
            )
            errors.append((step, error))
            continue
        if errors:
            _quarantine(manager, [s for s, _ in errors])
        return state, step
    if errors:
        raise errors[0][1]
    return None


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged steps out of the checkpoint directory, keeping their files."""
    if jax.process_index() != 0:
        multihost_utils.sync_global_devices("fcn_jax_quarantine")
        manager.reload()
        return
    target = os.path.join(damaged_dir(os.path.dirname(manager.directory)))
    os.makedirs(target, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
        source = os.path.join(manager.directory, str(step))
        destination = os.path.join(target, f"{step}_{stamp}")
        shutil.move(source, destination)
        logging.warning("Moved damaged checkpoint %s to %s", source, destination)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fcn_jax_quarantine")
    manager.reload()
