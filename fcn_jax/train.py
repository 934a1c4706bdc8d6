"""The training loop: resume, train, evaluate, checkpoint, report."""

import contextlib
import functools
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fcn_jax import (
    checkpointing,
    config_lib,
    evaluation,
    preemption,
    reporting,
    run_record,
    sharding,
    steps,
    xla_cache,
)
from fcn_jax.experiment import (
    check_data,
    create_experiment,
    create_train_iterator,
    eval_batches,
)


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


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm of a step was NaN or infinite."""


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
) -> dict:
    """Trains `config` in `workdir`, resuming from its newest usable checkpoint.

    Returns the last evaluation summary (per-class IoU, mean IoU, accuracies).

    Raises:
      preemption.Preempted: after SIGTERM / SIGINT, once the checkpoint of the
        current step is written.
      NonFiniteError: on a non-finite loss or gradient norm (unless
        `train.skip_nonfinite_updates`); nothing from that step on is saved.
    """
    # Bad configs and data fail here, before anything is written to the workdir.
    config_lib.validate_config(config)
    check_data(config, sharding.create_mesh(config.mesh.spatial))
    experiment = create_experiment(config)
    run_record.record_run(workdir, config, allow_config_change=allow_config_change)
    if config.train.compilation_cache:
        xla_cache.use_persistent_cache(workdir, config.train.cache_min_compile_seconds)
    data_iterator = create_train_iterator(config, experiment.mesh)
    manager = checkpointing.create_checkpoint_manager(workdir, config)
    writer = reporting.MetricWriter(workdir)
    try:
        restored = checkpointing.restore_newest_usable(
            manager, experiment.state, data_iterator
        )
        if restored is not None:
            experiment.state, step = restored
            logging.info("Resumed from step %d in %s", step, workdir)
        with preemption.stop_on_signals() as stop:
            summary = _train_loop(experiment, data_iterator, manager, writer, stop)
        manager.wait_until_finished()
    finally:
        manager.close()
        writer.close()
    return summary


def _train_loop(experiment, data_iterator, manager, writer, stop) -> dict:
    config = experiment.config
    num_steps = config.train.num_steps
    train_step = steps.jit_train_step(config, experiment.mesh)
    step = int(jax.device_get(experiment.state.step))
    summary = {}
    window = _MetricWindow(config.data.batch_size)
    guard = functools.partial(_check_finite, window, manager, config)
    with reporting.create_progress_bar(num_steps, step) as progress:
        while step < num_steps:
            batch = sharding.to_global_batch(next(data_iterator), experiment.mesh)
            experiment.state, step_metrics = train_step(experiment.state, batch)
            step += 1
            window.add(step, step_metrics)
            progress.update(1)
            if step % config.train.log_every_steps == 0 or step == num_steps:
                guard()
                scalars = window.flush()
                writer.write_scalars(
                    step, {f"train/{k}": v for k, v in scalars.items()}
                )
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
            saved = False
            if step % config.eval.every_steps == 0 or step == num_steps:
                guard()
                with window.paused():
                    summary = _evaluate_and_save(
                        experiment, manager, data_iterator, writer, step
                    )
                saved = True
                progress.write(
                    f"step {step}: eval mean_iou={summary['mean_iou']:.4f} "
                    f"pixel_accuracy={summary['pixel_accuracy']:.4f}"
                )
            preempted = _any_process(bool(stop)) or manager.reached_preemption(step)
            every = config.ckpt.every_steps
            if not saved and (every and step % every == 0 or preempted):
                guard()
                checkpointing.save(manager, experiment.state, data_iterator, {})
            if preempted:
                manager.wait_until_finished()
                raise preemption.Preempted(
                    step,
                    stop.signal_name or "SIGTERM",
                    os.path.dirname(manager.directory),
                )
    return summary


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (a signal may reach only one host;
    all must stop at the same step to save the same checkpoint)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def _check_finite(window, manager, config) -> None:
    """Raises NonFiniteError naming the first bad step since the last check."""
    if config.train.skip_nonfinite_updates:
        return
    bad = window.first_nonfinite()
    if bad is None:
        return
    step, values = bad
    culprit = "loss" if not math.isfinite(values["loss"]) else "grad_norm"
    last = manager.latest_step()
    saved = (
        f"the last good checkpoint is step {last} in {manager.directory}"
        if last is not None
        else "no checkpoint was written yet"
    )
    raise NonFiniteError(
        f"Step {step}: {culprit} is {values[culprit]} (loss {values['loss']}, "
        f"grad_norm {values['grad_norm']}). Training stopped and nothing from this "
        f"step on was saved; {saved}. Lower optim.learning_rate, or set "
        "train.skip_nonfinite_updates=True to skip such updates."
    )


class _MetricWindow:
    """Averages step metrics between log steps and measures training throughput."""

    def __init__(self, global_batch_size: int):
        self._batch_size = global_batch_size
        self._metrics = []
        self._steps = []
        self._start = time.perf_counter()

    def add(self, step: int, step_metrics: dict) -> None:
        self._steps.append(step)
        self._metrics.append(step_metrics)

    def first_nonfinite(self) -> tuple[int, dict[str, float]] | None:
        """(step, metrics) of the first step in the window with a non-finite
        loss or gradient norm, or None."""
        for step, values in zip(self._steps, jax.device_get(self._metrics)):
            if values["nonfinite_updates"] > 0:
                return step, {k: float(v) for k, v in values.items()}
        return None

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) is not training time."""
        paused_at = time.perf_counter()
        yield
        self._start += time.perf_counter() - paused_at

    def flush(self) -> dict[str, float]:
        fetched = jax.device_get(self._metrics)
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        # A count over the window, not a mean.
        scalars["nonfinite_updates"] = float(
            sum(m["nonfinite_updates"] for m in fetched)
        )
        elapsed = time.perf_counter() - self._start
        scalars["steps_per_second"] = len(fetched) / elapsed
        scalars["images_per_second"] = len(fetched) * self._batch_size / elapsed
        self._metrics, self._steps, self._start = [], [], time.perf_counter()
        return scalars
