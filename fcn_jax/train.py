"""The training loop: resume, train, evaluate, checkpoint, report."""

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from fcn_jax import checkpointing, evaluation, reporting, run_record, sharding, steps
from fcn_jax.experiment import create_experiment, create_train_iterator, eval_batches


def _evaluate_and_save(experiment, manager, data_iterator, writer, step) -> dict:
    config = experiment.config
    summary = evaluation.evaluate_batches(
        experiment.eval_step,
        experiment.state,
        eval_batches(config, experiment.mesh, config.data.eval_split),
        experiment.mesh,
        config,
    )
    writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items()})
    logging.info("eval step %d: %s", step, reporting.format_scalars(summary))
    checkpointing.save(manager, experiment.state, data_iterator, summary)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Returns the last evaluation summary (per-class IoU, mean IoU, accuracies).
    """
    experiment = create_experiment(config)
    run_record.record_run(workdir, config)
    data_iterator = create_train_iterator(config, experiment.mesh)
    manager = checkpointing.create_checkpoint_manager(workdir, config)
    if manager.latest_step() is not None:
        experiment.state = checkpointing.restore_state(
            manager, manager.latest_step(), experiment.state, data_iterator
        )
        logging.info("Resumed from step %d in %s", manager.latest_step(), workdir)
    train_step = steps.jit_train_step(config, experiment.mesh)
    writer = reporting.MetricWriter(workdir)
    step = int(jax.device_get(experiment.state.step))
    summary = {}
    progress = reporting.create_progress_bar(config.train.num_steps, step)
    window_metrics, window_start, window_steps = [], time.perf_counter(), 0
    while step < config.train.num_steps:
        batch = sharding.to_global_batch(next(data_iterator), experiment.mesh)
        experiment.state, step_metrics = train_step(experiment.state, batch)
        step += 1
        window_metrics.append(step_metrics)
        window_steps += 1
        progress.update(1)
        if step % config.train.log_every_steps == 0 or step == config.train.num_steps:
            scalars = _average(jax.device_get(window_metrics))
            elapsed = time.perf_counter() - window_start
            scalars["steps_per_second"] = window_steps / elapsed
            scalars["images_per_second"] = (
                window_steps * config.data.batch_size / elapsed
            )
            writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
            window_metrics, window_start, window_steps = [], time.perf_counter(), 0
        if step % config.eval.every_steps == 0 or step == config.train.num_steps:
            summary = _evaluate_and_save(
                experiment, manager, data_iterator, writer, step
            )
            progress.write(
                f"step {step}: eval mean_iou={summary['mean_iou']:.4f} "
                f"pixel_accuracy={summary['pixel_accuracy']:.4f}"
            )
            window_start = time.perf_counter()
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return summary


def _average(metric_dicts: list[dict]) -> dict[str, float]:
    keys = metric_dicts[0].keys()
    return {k: float(np.mean([float(m[k]) for m in metric_dicts])) for k in keys}
