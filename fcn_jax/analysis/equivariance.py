"""Translation equivariance of the dense models and invariance of the
classifier, measured on two overlapping windows of one input.

Shift the input window by t along one axis and a dense model's output should
shift by t with it: output(window2)[i] = output(window1)[i + t]. For a pure
fully convolutional net (convolutions, BatchNorm in eval mode, ReLU, pooling
and upsampling) this holds exactly, up to float rounding, when t is a
multiple of the net's total stride, so that every pooling or strided window
falls on the same content in both windows, and the unit is farther than half
its receptive field from the window edges. Near an edge it fails: each layer
zero-pads its input, and the padding sits at the window edge, which is a
different content position in the two windows. Only the edges across the
shift axis matter, since along the other axes both windows span the same
content. Shifts that are not a multiple of the stride change which pixels
share a pooling window, so the outputs differ everywhere. Global operations
break equivariance everywhere too: DeepLabv3's ASPP image-pooling branch
adds the mean over the whole window to every position, and GroupNorm (or
BatchNorm in train mode) normalises by statistics of the whole window; both
change when the window moves.

A classifier pools its last features over all positions, so its logits are
invariant up to the content that enters and leaves the window (and the
edge effects above).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BandDifference:
    """Output differences split at a border band of `band` input pixels.

    Interior units lie at least `band` pixels from both windows' edges along
    the shift axis, border units closer. Differences are relative to the
    report's `scale`; NaN where a region is empty.
    """

    band: int
    interior_max: float
    interior_mean: float
    border_max: float
    border_mean: float


@dataclasses.dataclass(frozen=True)
class EquivarianceReport:
    """The comparison of output(window2)[i] with output(window1)[i + shift].

    Attributes:
      scale: mean |output| over both windows, the unit of every difference.
      bands: differences inside and outside each border band.
      profile: [D], the largest relative difference among the units at
        distance d (input pixels) from the nearest window edge along `axis`.
    """

    shift: int
    axis: int
    stride: int | None
    scale: float
    bands: tuple[BandDifference, ...]
    profile: np.ndarray

    def clean_band(self, tolerance: float = 1e-5) -> int | None:
        """The smallest band beyond which every relative difference is at most
        `tolerance`; None if even the innermost units differ more."""
        dirty = np.flatnonzero(self.profile > tolerance)
        if not dirty.size:
            return 0
        band = int(dirty[-1]) + 1
        return band if band < self.profile.size else None

    def format(self) -> str:
        """A header line, then one row of relative differences per band."""
        if self.stride is None:
            alignment = ""
        else:
            aligned = self.shift % self.stride == 0
            alignment = f" (stride {self.stride}, {'' if aligned else 'not '}aligned)"
        clean = self.clean_band()
        header = (
            f"shift {self.shift} px along spatial axis {self.axis}{alignment}; "
            f"unit: mean |output| = {self.scale:.4g}; "
            + ("no clean interior" if clean is None else f"clean beyond {clean} px")
        )
        columns = ("band", "interior max", "interior mean", "border max", "border mean")
        lines = [header, "  ".join(f"{name:>13}" for name in columns)]
        for row in self.bands:
            values = dataclasses.astuple(row)[1:]
            lines.append(
                f"{row.band:>13}  " + "  ".join(f"{value:>13.3e}" for value in values)
            )
        return "\n".join(lines)


def shifted_windows(
    image: jax.Array | np.ndarray, shift: int, axis: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two windows of [B, *L, C], offset by `shift` along spatial `axis`.

    Returns:
      [B, *W, C] twice, W = L less `shift` along `axis`: the first starting at
      0, the second at `shift`; both hold only real content.
    """
    image = np.asarray(image, np.float32)
    length = image.shape[axis + 1]
    if not 0 <= shift < length:
        raise ValueError(f"shift {shift} must lie in [0, {length}) along axis {axis}.")
    first = np.take(image, np.arange(length - shift), axis=axis + 1)
    second = np.take(image, np.arange(shift, length), axis=axis + 1)
    return first, second


# Modules hash by their fields, so repeated calls with the same model and
# shapes reuse the compiled function.
@functools.partial(jax.jit, static_argnums=0)
def _forward(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


def _apply(model: nn.Module, variables: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, variables, jnp.asarray(x)), np.float64)


def _summarise(values: np.ndarray) -> tuple[float, float]:
    if not values.size:
        return math.nan, math.nan
    return float(values.max()), float(values.mean())


def measure_equivariance(
    model: nn.Module,
    variables: Any,
    image: jax.Array | np.ndarray,
    shift: int,
    *,
    axis: int = 0,
    stride: int | None = None,
    receptive_field: int | None = None,
    bands: Sequence[int] | None = None,
) -> EquivarianceReport:
    """Compares a dense model's outputs on two windows offset by `shift` px.

    Args:
      model: [B, *W, C] -> [B, *W', K]; W' < W (a VALID U-Net) is taken as
        centred on the input.
      image: [B, *L, C], longer than the window by `shift` along `axis`.
      stride: the model's total stride (in input pixels), for the default bands
        and to label the shift aligned or not.
      receptive_field: the theoretical receptive field (input pixels); half of
        it is added to the default bands.
      bands: border-band widths in input pixels; by default 0, 1, 2 and 4
        strides (or 0 alone) and half the receptive field.
    """
    first, second = shifted_windows(image, shift, axis)
    outputs = _apply(model, variables, np.concatenate([first, second]))
    out1, out2 = np.split(outputs, 2)
    if out1.ndim != first.ndim:
        raise ValueError(f"expected a dense output [B, *W', K]; got {out1.shape}.")
    window, size = first.shape[axis + 1], out1.shape[axis + 1]
    offset = (window - size) // 2
    overlap = size - shift
    if overlap < 1:
        raise ValueError(f"shift {shift} leaves no overlap of outputs of size {size}.")
    scale = float(np.mean(np.abs(outputs))) or 1.0
    # Unit i of window 2 sees the content of unit i + shift of window 1.
    second_units = np.take(out2, np.arange(overlap), axis=axis + 1)
    first_units = np.take(out1, np.arange(shift, size), axis=axis + 1)
    diff = np.abs(second_units - first_units) / scale
    position = np.arange(overlap) + offset
    distance = np.minimum(position, window - 1 - position - shift)
    per_unit = np.moveaxis(diff, axis + 1, 0).reshape(overlap, -1)
    profile = np.zeros(distance.max() + 1)
    np.maximum.at(profile, distance, per_unit.max(axis=1))
    if bands is None:
        bands = [0] if stride is None else [k * stride for k in (0, 1, 2, 4)]
        if receptive_field is not None:
            bands.append(receptive_field // 2)
    rows = []
    for band in sorted(set(bands)):
        interior = distance >= band
        rows.append(
            BandDifference(
                band, *_summarise(per_unit[interior]), *_summarise(per_unit[~interior])
            )
        )
    return EquivarianceReport(shift, axis, stride, scale, tuple(rows), profile)


def measure_invariance(
    model: nn.Module,
    variables: Any,
    image: jax.Array | np.ndarray,
    shifts: Sequence[int],
    *,
    axis: int = 0,
) -> dict[int, float]:
    """Relative change of a classifier's logits when its window moves.

    Windows of size L - max(shifts) along `axis` start at 0 and at each shift
    t of `image` [B, *L, C]; the model maps [B, *W, C] -> logits [B, K].

    Returns:
      t -> max over the batch of ||logits_t - logits_0|| / ||logits_0||.
    """
    image = np.asarray(image, np.float32)
    width = image.shape[axis + 1] - max(shifts)
    if width < 1:
        raise ValueError(f"shifts {tuple(shifts)} leave no window in {image.shape}.")
    starts = [0, *shifts]
    windows = [
        np.take(image, np.arange(start, start + width), axis=axis + 1)
        for start in starts
    ]
    logits = np.split(_apply(model, variables, np.concatenate(windows)), len(starts))
    reference = np.linalg.norm(logits[0], axis=-1)
    return {
        t: float(np.max(np.linalg.norm(out - logits[0], axis=-1) / reference))
        for t, out in zip(shifts, logits[1:])
    }
