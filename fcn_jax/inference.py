"""Dense prediction of whole images of any size: padded whole-image, sliding-window
and overlap-tile (Ronneberger et al. 2015, Fig. 2) inference.

Every function takes `apply_fn(images [B, *spatial, C]) -> logits [B, *spatial', K]`
and a `geometry` object with `output_size(n) -> int` and `is_valid_input_size(n)
-> bool` per spatial axis (a `UNet` is one), and returns logits [B, *spatial, K]
aligned with the input pixels. All are traceable under `jax.jit`.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp

ApplyFn = Callable[[jax.Array], jax.Array]
# Searching this far above a size for a valid one covers any total stride in use.
_MAX_SIZE_SEARCH = 4096


class Geometry(Protocol):
    def output_size(self, input_size: int) -> int: ...

    def is_valid_input_size(self, input_size: int) -> bool: ...


def _first_input_size(
    geometry: Geometry, start: int, gives_output: Callable[[int, int], bool]
) -> int | None:
    """The smallest valid input n >= start with gives_output(n, output_size(n))."""
    for candidate in range(start, start + _MAX_SIZE_SEARCH):
        if geometry.is_valid_input_size(candidate) and gives_output(
            candidate, geometry.output_size(candidate)
        ):
            return candidate
    return None


def smallest_same_size_at_least(geometry: Geometry, size: int) -> int:
    """The smallest valid input size >= `size` whose output has the same size."""
    found = _first_input_size(geometry, size, lambda n, out: out == n)
    if found is None:
        raise ValueError(
            f"No input size in [{size}, {size + _MAX_SIZE_SEARCH}) keeps its size "
            "through this network; a VALID-padding network needs "
            "eval.mode='overlap_tile'."
        )
    return found


def input_size_for_output(geometry: Geometry, output_size: int) -> int:
    """The input tile size whose output is exactly `output_size` (VALID nets)."""
    found = _first_input_size(geometry, output_size, lambda n, out: out == output_size)
    if found is None:
        raise ValueError(
            f"No input tile gives an output of exactly {output_size} pixels; choose "
            "config.eval.tile_output_size = output_size(n) for a valid input size n."
        )
    return found


def _reflect_pad(images: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    return jnp.pad(images, [(0, 0), *pads, (0, 0)], mode="reflect")


def _crop(x: jax.Array, starts: Sequence[int], sizes: Sequence[int]) -> jax.Array:
    index = (slice(None),) + tuple(slice(s, s + n) for s, n in zip(starts, sizes))
    return x[index]


def predict_whole(
    apply_fn: ApplyFn, images: jax.Array, geometry: Geometry
) -> jax.Array:
    """Mirror-pads each axis up to a size the network keeps, predicts, crops back."""
    spatial = images.shape[1:-1]
    padded_sizes = [smallest_same_size_at_least(geometry, n) for n in spatial]
    pads = [(0, p - n) for n, p in zip(spatial, padded_sizes)]
    logits = apply_fn(_reflect_pad(images, pads))
    return _crop(logits, [0] * len(spatial), spatial)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - window, 0) + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _blending_weights(window: Sequence[int]) -> jax.Array:
    """Separable Gaussian weights [*window]: window centres count most."""
    weights = jnp.ones(())
    for n in window:
        position = jnp.arange(n) - (n - 1) / 2
        axis_weights = jnp.exp(-0.5 * (position / (n / 4)) ** 2)
        weights = weights[..., None] * axis_weights
    return weights


def predict_sliding_window(
    apply_fn: ApplyFn,
    images: jax.Array,
    geometry: Geometry,
    *,
    window_size: int,
    overlap: float,
) -> jax.Array:
    """Windows of `window_size` with fractional `overlap`, blended by Gaussian weights.

    Logits of overlapping windows are averaged with weights that fall off from each
    window's centre, so seams from border effects are suppressed. Along an axis
    the window covers, it shrinks to the whole-image size, so a window covering
    the image gives exactly `predict_whole`.
    """
    spatial = images.shape[1:-1]
    largest = smallest_same_size_at_least(geometry, window_size)
    window = tuple(
        min(largest, smallest_same_size_at_least(geometry, n)) for n in spatial
    )
    pads = [(0, max(w - n, 0)) for n, w in zip(spatial, window)]
    images = _reflect_pad(images, pads)
    padded = images.shape[1:-1]
    weights = _blending_weights(window)[None, ..., None]
    total = None
    weight_sum = jnp.zeros((1, *padded, 1))
    for starts in itertools.product(
        *(
            _window_starts(n, w, max(1, int(w * (1 - overlap))))
            for n, w in zip(padded, window)
        )
    ):
        logits = apply_fn(_crop(images, starts, window)) * weights
        index = (slice(None),) + tuple(slice(s, s + w) for s, w in zip(starts, window))
        if total is None:
            total = jnp.zeros((images.shape[0], *padded, logits.shape[-1]))
        total = total.at[index].add(logits)
        weight_sum = weight_sum.at[index].add(weights)
    return _crop(total / weight_sum, [0] * len(spatial), spatial)


def predict_overlap_tile(
    apply_fn: ApplyFn,
    images: jax.Array,
    geometry: Geometry,
    *,
    tile_output_size: int,
) -> jax.Array:
    """Overlap-tile prediction for VALID-padding networks.

    The image is mirror-padded by the network's border loss (plus enough to fill the
    last tile); input tiles of size `input_size_for_output(tile_output_size)` are
    taken with a stride of `tile_output_size`, so their outputs tile the image
    exactly, without overlap or seams.
    """
    tile_in = input_size_for_output(geometry, tile_output_size)
    margin, odd = divmod(tile_in - tile_output_size, 2)
    if odd:
        raise ValueError(
            f"Input tile {tile_in} and output {tile_output_size} differ by an odd "
            "number of pixels; the output cannot be centred on the input."
        )
    spatial = images.shape[1:-1]
    counts = [math.ceil(n / tile_output_size) for n in spatial]
    pads = [
        (margin, margin + c * tile_output_size - n) for n, c in zip(spatial, counts)
    ]
    images = _reflect_pad(images, pads)
    tile_window = (tile_in,) * len(spatial)
    tile_starts = list(
        itertools.product(
            *(range(0, c * tile_output_size, tile_output_size) for c in counts)
        )
    )
    tiles = jnp.stack([_crop(images, starts, tile_window) for starts in tile_starts])
    # One tile position at a time bounds memory by a single tile batch.
    outputs = jax.lax.map(apply_fn, tiles)  # [T, B, *tile_out, K]
    grid = outputs.reshape(*counts, *outputs.shape[1:])
    rank = len(spatial)
    # [c1..cr, B, o1..or, K] -> [B, c1, o1, ..., cr, or, K] -> [B, c1*o1, ..., K]
    order = [rank] + [a for axis in range(rank) for a in (axis, rank + 1 + axis)]
    grid = grid.transpose(*order, 2 * rank + 1)
    stitched = grid.reshape(
        grid.shape[0], *(c * tile_output_size for c in counts), grid.shape[-1]
    )
    return _crop(stitched, [0] * rank, spatial)


def predict(
    apply_fn: ApplyFn,
    images: jax.Array,
    geometry: Geometry,
    *,
    mode: str,
    window_size: int = 256,
    overlap: float = 0.25,
    tile_output_size: int = 388,
) -> jax.Array:
    """Dispatches on `mode` in {'whole', 'sliding_window', 'overlap_tile'}."""
    if mode == "whole":
        return predict_whole(apply_fn, images, geometry)
    if mode == "sliding_window":
        return predict_sliding_window(
            apply_fn, images, geometry, window_size=window_size, overlap=overlap
        )
    if mode == "overlap_tile":
        return predict_overlap_tile(
            apply_fn, images, geometry, tile_output_size=tile_output_size
        )
    raise ValueError(
        f"Unknown inference mode {mode!r}; use whole, sliding_window or overlap_tile."
    )
