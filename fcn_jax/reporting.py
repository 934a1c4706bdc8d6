"""Metrics to TensorBoard event files and the console, from process 0 only."""

import glob
import math
import os
import struct
from collections.abc import Mapping

import jax
import tensorboardX
import tqdm
from tensorboardX.proto import event_pb2


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


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of one scalar (e.g. 'train/loss') from every event file in
    `workdir`, oldest file first, so a resumed run's values replace the
    pre-emption's. Reads TFRecord framing: length (u64), its CRC (u32), the
    Event proto, its CRC (u32); CRCs are not checked."""
    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            if len(record) < length:  # Cut short by a kill mid-write.
                break
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


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
