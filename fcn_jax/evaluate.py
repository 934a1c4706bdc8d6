"""Evaluate a checkpoint of a workdir on a split: table, JSON and PNG panels."""

import os

import ml_collections

from fcn_jax import checkpointing, evaluation, metrics
from fcn_jax.experiment import Experiment, create_experiment, eval_batches


def select_step(manager, *, step: int | None, best: bool) -> int:
    """The checkpoint step asked for: an explicit step, the best, or the latest."""
    available = sorted(manager.all_steps())
    if not available:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}; train first with "
            "scripts/train.py --workdir=<the same workdir>."
        )
    if step is not None:
        if step not in available:
            raise ValueError(
                f"No checkpoint at step {step} in {manager.directory}; "
                f"available steps: {available}."
            )
        return step
    return manager.best_step() if best else manager.latest_step()


def restore_experiment(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    best: bool = False,
) -> tuple[Experiment, int]:
    """The experiment of `config` with its state restored from `workdir`."""
    experiment = create_experiment(config, abstract=True)
    manager = checkpointing.create_checkpoint_manager(workdir, config, read_only=True)
    try:
        step = select_step(manager, step=step, best=best)
        experiment.state = checkpointing.restore_state(manager, step, experiment.state)
    finally:
        manager.close()
    return experiment, step


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    best: bool = False,
    split: str | None = None,
) -> tuple[int, dict[str, float], str]:
    """Restores a checkpoint of `workdir` and evaluates it on `split`.

    Writes `eval_<split>_<step>.json` and PNG panels under
    `<workdir>/eval_<split>_<step>/`. Returns (step, summary, table text).
    """
    split = split or config.data.eval_split
    experiment, step = restore_experiment(config, workdir, step=step, best=best)
    summary = evaluation.evaluate_batches(
        experiment.eval_step,
        experiment.state,
        eval_batches(config, experiment.mesh, split),
        experiment.mesh,
        config,
        panel_dir=os.path.join(workdir, f"eval_{split}_{step}"),
    )
    evaluation.write_eval_json(workdir, split, step, summary)
    table = metrics.format_metrics_table(summary, config.data.class_names)
    return step, summary, table
