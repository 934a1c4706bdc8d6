"""Metrics to TensorBoard event files and the console, from process 0 only."""

import math
import os
from collections.abc import Mapping

import jax
import tensorboardX
import tqdm


class MetricWriter:
    """Writes scalar metrics as TensorBoard events under `workdir`."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            self._writer = tensorboardX.SummaryWriter(logdir=os.path.abspath(workdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not math.isnan(value):
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def create_progress_bar(num_steps: int, initial_step: int) -> tqdm.tqdm:
    """A console bar showing step, loss, steps/s and ETA (process 0 only)."""
    return tqdm.tqdm(
        total=num_steps,
        initial=initial_step,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=jax.process_index() != 0,
    )


def format_scalars(scalars: Mapping[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(scalars.items()))
