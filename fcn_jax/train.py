"""The training loop: resume, train, evaluate, checkpoint, report."""

import contextlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from fcn_jax import (
    checkpointing,
    evaluation,
    reporting,
    run_record,
    sharding,
    steps,
    xla_cache,
)
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
    if config.train.compilation_cache:
        xla_cache.use_persistent_cache(workdir, config.train.cache_min_compile_seconds)
    experiment = create_experiment(config)
    run_record.record_run(workdir, config)
    data_iterator = create_train_iterator(config, experiment.mesh)
    manager = checkpointing.create_checkpoint_manager(workdir, config)
    writer = reporting.MetricWriter(workdir)
    try:
        latest = manager.latest_step()
        if latest is not None:
            experiment.state = checkpointing.restore_state(
                manager, latest, experiment.state, data_iterator
            )
            logging.info("Resumed from step %d in %s", latest, workdir)
        summary = _train_loop(experiment, data_iterator, manager, writer)
        manager.wait_until_finished()
    finally:
        manager.close()
        writer.close()
    return summary


def _train_loop(experiment, data_iterator, manager, writer) -> dict:
    config = experiment.config
    num_steps = config.train.num_steps
    train_step = steps.jit_train_step(config, experiment.mesh)
    step = int(jax.device_get(experiment.state.step))
    summary = {}
    window = _MetricWindow(config.data.batch_size)
    with reporting.create_progress_bar(num_steps, step) as progress:
        while step < num_steps:
            batch = sharding.to_global_batch(next(data_iterator), experiment.mesh)
            experiment.state, step_metrics = train_step(experiment.state, batch)
            step += 1
            window.add(step_metrics)
            progress.update(1)
            if step % config.train.log_every_steps == 0 or step == num_steps:
                scalars = window.flush()
                writer.write_scalars(
                    step, {f"train/{k}": v for k, v in scalars.items()}
                )
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
            if step % config.eval.every_steps == 0 or step == num_steps:
                with window.paused():
                    summary = _evaluate_and_save(
                        experiment, manager, data_iterator, writer, step
                    )
                progress.write(
                    f"step {step}: eval mean_iou={summary['mean_iou']:.4f} "
                    f"pixel_accuracy={summary['pixel_accuracy']:.4f}"
                )
    return summary


class _MetricWindow:
    """Averages step metrics between log steps and measures training throughput."""

    def __init__(self, global_batch_size: int):
        self._batch_size = global_batch_size
        self._metrics = []
        self._start = time.perf_counter()

    def add(self, step_metrics: dict) -> None:
        self._metrics.append(step_metrics)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) is not training time."""
        paused_at = time.perf_counter()
        yield
        self._start += time.perf_counter() - paused_at

    def flush(self) -> dict[str, float]:
        fetched = jax.device_get(self._metrics)
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        elapsed = time.perf_counter() - self._start
        scalars["steps_per_second"] = len(fetched) / elapsed
        scalars["images_per_second"] = len(fetched) * self._batch_size / elapsed
        self._metrics, self._start = [], time.perf_counter()
        return scalars
