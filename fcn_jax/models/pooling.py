"""Max pooling whose backward pass routes gradients through saved argmax indices.

XLA:CPU differentiates `reduce_window` max pooling with a select-and-scatter
that is slow on CPU; for non-overlapping windows (window = stride) the same
gradient is a one-hot scatter of the saved window argmax, which is cheap. Ties
go to the first maximum in the window, as with a plain argmax.
"""

import functools

import jax
import jax.numpy as jnp


def _window_permutation(rank: int) -> tuple[int, ...]:
    """[B, s1, f, s2, f, ..., C] -> [B, s1, s2, ..., f, f, ..., C].

    Channels stay innermost, so the transpose moves whole channel vectors.
    """
    outer = [1 + 2 * axis for axis in range(rank)]
    inner = [2 + 2 * axis for axis in range(rank)]
    return (0, *outer, *inner, 2 * rank + 1)


def _to_windows(x: jax.Array, factor: int) -> jax.Array:
    """[B, *S, C] -> [B, *S/f, f**rank, C]."""
    rank = x.ndim - 2
    split = [x.shape[0]]
    for size in x.shape[1:-1]:
        if size % factor:
            raise ValueError(f"spatial size {size} is not divisible by {factor}.")
        split += [size // factor, factor]
    split.append(x.shape[-1])
    windows = x.reshape(split).transpose(_window_permutation(rank))
    return windows.reshape(*windows.shape[: rank + 1], factor**rank, x.shape[-1])


def _from_windows(windows: jax.Array, factor: int, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `_to_windows`: [B, *S/f, f**rank, C] -> `shape` [B, *S, C]."""
    rank = len(shape) - 2
    expanded = windows.reshape(*windows.shape[:-2], *(factor,) * rank, shape[-1])
    permutation = _window_permutation(rank)
    inverse = tuple(permutation.index(axis) for axis in range(len(permutation)))
    return expanded.transpose(inverse).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_argmax_gradient(x: jax.Array, factor: int) -> jax.Array:
    """Max pooling of [B, *S, C] with window = stride = `factor`: [B, *S/f, C]."""
    return _to_windows(x, factor).max(axis=-2)


def _forward(x: jax.Array, factor: int):
    windows = _to_windows(x, factor)
    index = jnp.argmax(windows, axis=-2)
    pooled = jnp.take_along_axis(windows, index[..., None, :], axis=-2)[..., 0, :]
    # Saving the small index instead of x keeps the residual a quarter the size.
    index_dtype = jnp.int8 if windows.shape[-2] <= 127 else jnp.int32
    return pooled, (index.astype(index_dtype), x.shape)


def _backward(factor: int, residuals, grad: jax.Array):
    index, shape = residuals
    one_hot = jax.nn.one_hot(
        index, factor ** (len(shape) - 2), axis=-2, dtype=grad.dtype
    )
    return (_from_windows(one_hot * grad[..., None, :], factor, shape),)


max_pool_argmax_gradient.defvjp(_forward, _backward)
