"""Effective receptive fields: Luo, Li, Urtasun & Zemel, "Understanding the
Effective Receptive Field in Deep Convolutional Neural Networks", NIPS 2016
(arXiv:1701.04128)."""

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

MASS_FRACTIONS = (0.5, 0.9, 0.99)
RECTANGLE_COLOUR = (0, 255, 255)


def centre_unit(
    input_spatial: Sequence[int], output_spatial: Sequence[int]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The central output unit (index S' // 2 per axis) and the input position
    below it, in input pixels.

    Outputs smaller than the input (a VALID U-Net) sit centred on it, so output
    index o lies over input position o + (S - S') / 2.
    """
    unit = tuple(n // 2 for n in output_spatial)
    centre = tuple(
        o + (n - m) / 2 for o, n, m in zip(unit, input_spatial, output_spatial)
    )
    return unit, centre


def _forward(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


# Modules hash by their fields, so a repeated call with the same model and
# shapes reuses the compiled function.
@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _summed_gradient(
    model: nn.Module,
    variables: Any,
    x: jax.Array,
    unit: tuple[int, ...],
    channel: int | None,
) -> jax.Array:
    """sum_n |d y_n[unit, channel] / d x_n| summed over channels: [*S]."""
    y, vjp = jax.vjp(lambda x: _forward(model, variables, x), x)
    pick = slice(None) if channel is None else channel
    # Samples do not interact in eval mode, so one backward pass of the summed
    # centre units gives every sample's own gradient.
    (grad,) = vjp(jnp.zeros_like(y).at[(slice(None), *unit, pick)].set(1.0))
    return jnp.abs(grad).sum(axis=(0, grad.ndim - 1))


def effective_receptive_field(
    model: nn.Module,
    variables: Any,
    inputs: jax.Array | np.ndarray,
    *,
    channel: int | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """|d y[centre] / d x| summed over input channels, averaged over inputs.

    Args:
      model: a dense model, [B, *S, C] -> [B, *S', K], run with train=False (so
        BatchNorm uses its running statistics).
      inputs: [N, *S, C], e.g. standard normal noise or normalised images.
      channel: the output channel to differentiate; None sums all K.
      batch_size: inputs per backward pass.

    Returns:
      The ERF map, float32 [*S]; `centre_unit(S, S')[1]` is its centre.
    """
    inputs = jnp.asarray(inputs, jnp.float32)
    spatial = inputs.shape[1:-1]
    out = jax.eval_shape(functools.partial(_forward, model), variables, inputs[:1])
    if out.ndim != inputs.ndim:
        raise ValueError(
            f"the ERF needs a dense output [B, *S', K]; got {out.shape} for an "
            f"input of shape {inputs[:1].shape}."
        )
    unit, _ = centre_unit(spatial, out.shape[1:-1])
    total = np.zeros(spatial, np.float64)
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size]
        grad = _summed_gradient(model, variables, batch, unit, channel)
        total += np.asarray(grad, np.float64)
    return (total / inputs.shape[0]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ERFSummary:
    """Summaries of an ERF map; every length is in input pixels.

    Attributes:
      centre: the input position of the central output unit, per axis.
      radii: mass fraction -> the smallest Euclidean distance from `centre`
        within which that fraction of the gradient mass lies.
      centroid, sigma: mean and moment-matched standard deviation per axis.
      mass_in_sigma: the mass inside the ellipsoid of semi-axes `sigma` about
        `centroid`; `gaussian_mass_in_sigma` is the same for a Gaussian of this
        rank (0.683, 0.393, 0.199 in 1D, 2D, 3D).
      support: extent (last - first + 1) of the non-zero entries per axis, the
        receptive field these weights and inputs realise; never larger than
        the theoretical one.
    """

    centre: tuple[float, ...]
    radii: dict[float, float]
    centroid: tuple[float, ...]
    sigma: tuple[float, ...]
    mass_in_sigma: float
    gaussian_mass_in_sigma: float
    support: tuple[int, ...]


def gaussian_mass_within_one_sigma(rank: int) -> float:
    """P(chi-squared with `rank` degrees of freedom <= 1)."""
    # The regularised lower gamma P(a, 1/2), stepped up from a = 1/2 or 1 by
    # P(a + 1, x) = P(a, x) - x^a e^-x / Gamma(a + 1).
    x = 0.5
    a, p = (0.5, math.erf(math.sqrt(x))) if rank % 2 else (1.0, 1 - math.exp(-x))
    while a < rank / 2:
        p -= x**a * math.exp(-x) / math.gamma(a + 1)
        a += 1
    return p


def summarize_erf(
    erf: np.ndarray, centre: Sequence[float], threshold: float = 0.0
) -> ERFSummary:
    """Radii, Gaussian fit and support of an ERF map [*S] about `centre`.

    Entries at most `threshold` times the peak count as zero for `support`.
    """
    erf = np.asarray(erf, np.float64)
    total = erf.sum()
    if not total > 0:
        raise ValueError("the ERF map has no gradient mass.")
    grid = np.indices(erf.shape, np.float64)
    offsets = grid - np.reshape(centre, (-1,) + (1,) * erf.ndim)
    distance = np.sqrt((offsets**2).sum(axis=0)).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(erf.ravel()[order])
    radii = {
        q: float(distance[order][np.searchsorted(cumulative, q * cumulative[-1])])
        for q in MASS_FRACTIONS
    }
    weights = erf / total
    centroid = (grid * weights).sum(axis=tuple(range(1, erf.ndim + 1)))
    deviation = grid - centroid.reshape((-1,) + (1,) * erf.ndim)
    sigma = np.sqrt((deviation**2 * weights).sum(axis=tuple(range(1, erf.ndim + 1))))
    scale = np.where(sigma > 0, sigma, 1.0).reshape((-1,) + (1,) * erf.ndim)
    inside = ((deviation / scale) ** 2).sum(axis=0) <= 1.0
    nonzero = erf > threshold * erf.max()
    support = []
    for axis in range(erf.ndim):
        hits = np.flatnonzero(
            nonzero.any(axis=tuple(a for a in range(erf.ndim) if a != axis))
        )
        support.append(int(hits[-1] - hits[0] + 1))
    return ERFSummary(
        centre=tuple(float(c) for c in centre),
        radii=radii,
        centroid=tuple(float(c) for c in centroid),
        sigma=tuple(float(s) for s in sigma),
        mass_in_sigma=float(weights[inside].sum()),
        gaussian_mass_in_sigma=gaussian_mass_within_one_sigma(erf.ndim),
        support=tuple(support),
    )


def _colour_ramp(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 [H, W, 3], black -> red -> yellow -> white."""
    t = np.clip(values, 0.0, 1.0)[..., None] * 3 - np.arange(3)
    return (np.clip(t, 0.0, 1.0) * 255).round().astype(np.uint8)


def _plane(
    erf: np.ndarray, centre: list[float], rf: list[float] | None
) -> tuple[np.ndarray, list[float], list[float] | None]:
    """The 2D view of a 1D, 2D or 3D map, with its centre and field size."""
    if erf.ndim == 3:
        return erf[round(centre[0])], centre[1:], rf and rf[1:]
    if erf.ndim == 1:
        return erf[None], [0.0, *centre], rf and [1, *rf]
    return erf, centre, rf


def write_erf_png(
    erf: np.ndarray,
    path: str | os.PathLike,
    *,
    centre: Sequence[float] | None = None,
    theoretical_rf: int | Sequence[int] | None = None,
    min_size: int = 256,
) -> None:
    """Writes the ERF map [*S] as a heatmap PNG scaled to its peak.

    2D maps are drawn as they are, 3D maps by the slice through the centre
    along the first axis, 1D maps as a strip. A theoretical receptive field
    (input pixels, per axis or one size for all) is outlined about `centre`
    (default: index S // 2, a SAME model's centre unit). Small maps are
    enlarged by nearest neighbour to about `min_size` pixels on the long side.
    """
    erf = np.asarray(erf, np.float64)
    if erf.ndim not in (1, 2, 3):
        raise ValueError(f"expected a 1D, 2D or 3D ERF map; got shape {erf.shape}.")
    strip = erf.ndim == 1
    if centre is None:
        centre = [n // 2 for n in erf.shape]
    rf = theoretical_rf
    if rf is not None:
        rf = [rf] * erf.ndim if np.isscalar(rf) else list(rf)
    plane, (cy, cx), rf = _plane(erf, list(centre), rf)
    peak = plane.max()
    image = Image.fromarray(_colour_ramp(plane / peak if peak > 0 else plane))
    height, width = plane.shape
    scale = max(1, math.ceil(min_size / max(height, width)))
    row_scale = max(scale, math.ceil(min_size / 8)) if strip else scale
    image = image.resize((width * scale, height * row_scale), Image.NEAREST)
    if rf is not None:
        # Pixel i covers [i * scale, (i + 1) * scale); the field spans rf
        # pixels centred on the unit's pixel (a 1D strip's one row is its height).
        ry, rx = rf
        edges = (
            (cx + 0.5 - rx / 2) * scale,
            (cy + 0.5 - ry / 2) * row_scale,
            (cx + 0.5 + rx / 2) * scale,
            (cy + 0.5 + ry / 2) * row_scale,
        )
        # Round halves up (not to even), so the box spans rf * scale pixels.
        left, top, right, bottom = (math.floor(edge + 0.5) for edge in edges)
        box = (left, top, right - 1, bottom - 1)
        width_px = max(1, scale // 4)
        ImageDraw.Draw(image).rectangle(box, outline=RECTANGLE_COLOUR, width=width_px)
    image.save(path)
