"""Checkerboard artifacts of transposed convolutions: theory, measurement, report.

A transposed conv with kernel k and stride s writes input pixel i to output
pixels s * i + a - p (a < k), so interior output pixels of different phases
(position mod s) are reached by different numbers of taps unless s divides k
(Odena, Dumoulin & Olah, "Deconvolution and Checkerboard Artifacts", 2016).
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fcn_jax.models.layers import TransposedConv
from fcn_jax.models.sizes import transposed_conv_output_size

# Interior periods per axis kept in `CheckerboardPattern.tile`.
TILE_PERIODS = 4


def _check_rank(rank: int) -> None:
    if not 1 <= rank <= 3:
        raise ValueError(f"spatial rank {rank} is not supported (1, 2 or 3).")


@dataclasses.dataclass(frozen=True)
class PhaseCoverage:
    """Taps (equally, input pixels) reaching one interior output pixel, per phase.

    counts: int array [s] * rank; counts[r_1, ..., r_rank] is the coverage of
      output pixels whose index along axis j is r_j mod s. Sums to k ** rank.
    variance: population variance of counts over the s ** rank phases.
    uneven: k % s != 0, which holds exactly when variance > 0.
    """

    counts: np.ndarray
    variance: float
    uneven: bool


def phase_coverage(
    kernel_size: int, stride: int, padding: int = 0, rank: int = 2
) -> PhaseCoverage:
    """Coverage per output phase of a transposed conv, from the tap arithmetic.

    Output pixel o takes tap a from input (o + p - a) / s, so only the taps with
    a = (o + p) mod s reach it: the padding shifts which phase is favoured.
    """
    _check_rank(rank)
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(f"bad kernel_size={kernel_size}, stride={stride}, {padding=}.")
    per_axis = np.array(
        [len(range((r + padding) % stride, kernel_size, stride)) for r in range(stride)]
    )
    counts = functools.reduce(np.multiply.outer, [per_axis] * rank)
    return PhaseCoverage(counts, float(np.var(counts)), kernel_size % stride != 0)


@dataclasses.dataclass(frozen=True)
class CheckerboardPattern:
    """Interior response of `TransposedConv` (ones kernel, zero bias) to ones.

    phase_mean: [s] * rank, mean output per phase (index mod s along each axis);
      equals in_channels * `phase_coverage(...).counts`.
    tile: [TILE_PERIODS * s] * rank, interior output starting at phase 0.
    relative_variation: (max - min) / mean of phase_mean; 0 when flat.
    """

    phase_mean: np.ndarray
    tile: np.ndarray
    relative_variation: float


def _interior(size: int, kernel_size: int, stride: int, padding: int) -> range:
    """Output indices, starting at phase 0, all of whose taps land on the input."""
    first = max(kernel_size - 1 - padding, 0)
    start = -(-first // stride) * stride
    stop = stride * (size - 1) - padding + 1
    return range(start, start + max(stop - start, 0) // stride * stride)


def empirical_pattern(
    kernel_size: int,
    stride: int,
    padding: int = 0,
    output_padding: int = 0,
    rank: int = 2,
    in_channels: int = 3,
    size: int | None = None,
) -> CheckerboardPattern:
    """Runs `TransposedConv` on ones [1, *[size] * rank, in_channels] and reads
    the periodic pattern of its interior.

    Args:
      size: input size per axis; None picks the smallest one (at least 8) whose
        output interior holds TILE_PERIODS periods.
    """
    _check_rank(rank)
    if size is None:
        size = 8
        while (
            len(_interior(size, kernel_size, stride, padding)) < TILE_PERIODS * stride
        ):
            size += 1
    transposed_conv_output_size(size, kernel_size, stride, padding, output_padding)
    interior = _interior(size, kernel_size, stride, padding)
    periods = len(interior) // stride
    if periods < TILE_PERIODS:
        raise ValueError(
            f"size={size} leaves {periods} interior periods (< {TILE_PERIODS}) for "
            f"kernel_size={kernel_size}, stride={stride}, padding={padding}."
        )
    model = TransposedConv(
        1,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
    )
    params = {
        "kernel": jnp.ones((*(kernel_size,) * rank, in_channels, 1)),
        "bias": jnp.zeros((1,)),
    }
    x = jnp.ones((1, *(size,) * rank, in_channels))
    y = jax.jit(model.apply)({"params": params}, x)
    core = np.asarray(y)[(0, *(slice(interior.start, interior.stop),) * rank, 0)]
    # [periods, s] per axis, then average over the period axes.
    blocks = core.reshape([n for _ in range(rank) for n in (periods, stride)])
    phase_mean = blocks.mean(axis=tuple(range(0, 2 * rank, 2)))
    tile = core[(slice(0, TILE_PERIODS * stride),) * rank]
    spread = (phase_mean.max() - phase_mean.min()) / phase_mean.mean()
    return CheckerboardPattern(phase_mean, tile, float(spread))


def write_pattern_png(
    tile: np.ndarray, path: str | os.PathLike, pixel_size: int = 16
) -> tuple[int, int]:
    """Writes a pattern tile [n], [n, m] or [n, m, l] as a greyscale PNG.

    Values are scaled by the tile's maximum to 0..255, so a flat tile is white and
    a phase reached by fewer taps is darker. 3D shows the central slice along the
    first axis; 1D repeats the row into a strip a quarter as tall as it is long.
    Each value becomes a pixel_size x pixel_size block. Returns (width, height).
    """
    image = np.asarray(tile, np.float64)
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    elif image.ndim == 1:
        image = np.broadcast_to(image, (max(image.shape[0] // 4, 1), image.shape[0]))
    elif image.ndim != 2:
        raise ValueError(f"expected a tile of rank 1, 2 or 3; got {image.shape}.")
    peak = image.max()
    scaled = image / peak * 255 if peak > 0 else np.zeros_like(image)
    pixels = np.repeat(np.repeat(scaled, pixel_size, axis=0), pixel_size, axis=1)
    Image.fromarray(np.round(pixels).astype(np.uint8)).save(path)
    return pixels.shape[1], pixels.shape[0]


@dataclasses.dataclass(frozen=True)
class TransposedConvCall:
    """One `TransposedConv` call seen while tracing a model.

    name: the module path joined by '/'; input_shape: [B, *S, C].
    """

    name: str
    kernel_size: int
    stride: int
    padding: int
    output_padding: int
    input_shape: tuple[int, ...]


def find_transposed_convs(
    model: nn.Module, input_shape: Sequence[int], dtype: Any = jnp.float32
) -> list[TransposedConvCall]:
    """Every `TransposedConv` (subclasses included) that `model.init(rng, x,
    train=False)` calls on x of `input_shape` [B, *S, C], in call order.

    Traced abstractly with `jax.eval_shape`, so no parameters are allocated.
    """
    calls = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, TransposedConv) and context.method_name == "__call__":
            calls.append(
                TransposedConvCall(
                    name="/".join(module.path),
                    kernel_size=module.kernel_size,
                    stride=module.stride,
                    padding=module.padding,
                    output_padding=module.output_padding,
                    input_shape=tuple(args[0].shape),
                )
            )
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return calls


@dataclasses.dataclass(frozen=True)
class LayerCheckerboard:
    """Checkerboard analysis of one transposed conv layer.

    coverage: [s] * rank taps per phase (see `PhaseCoverage`); variance and
    uneven from theory; relative_variation measured by `empirical_pattern`.
    """

    name: str
    kernel_size: int
    stride: int
    padding: int
    output_padding: int
    coverage: np.ndarray
    variance: float
    uneven: bool
    relative_variation: float


def checkerboard_report(
    model: nn.Module, input_shape: Sequence[int]
) -> list[LayerCheckerboard]:
    """Theory and measurement for every transposed conv of `model` on
    [B, *S, C] inputs; empty when it has none (e.g. resize-conv upsampling)."""
    layers = []
    for call in find_transposed_convs(model, input_shape):
        rank = len(call.input_shape) - 2
        conv = (call.kernel_size, call.stride, call.padding)
        theory = phase_coverage(*conv, rank=rank)
        measured = empirical_pattern(*conv, call.output_padding, rank, in_channels=1)
        layers.append(
            LayerCheckerboard(
                call.name,
                *conv,
                call.output_padding,
                theory.counts,
                theory.variance,
                theory.uneven,
                measured.relative_variation,
            )
        )
    return layers


def format_report(layers: Sequence[LayerCheckerboard]) -> str:
    """One line per layer, or a single line saying there are none."""
    if not layers:
        return "no transposed convs: upsampling adds no checkerboard."
    return "\n".join(
        f"{layer.name}: k={layer.kernel_size} s={layer.stride} p={layer.padding} "
        f"coverage={layer.coverage.tolist()} variance={layer.variance:.4g} "
        f"{'uneven' if layer.uneven else 'even'} "
        f"relative_variation={layer.relative_variation:.4g}"
        for layer in layers
    )
