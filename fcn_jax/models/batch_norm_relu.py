"""BatchNorm followed by ReLU as one op with a hand-written gradient.

Training-mode BatchNorm over every axis but the last, then ReLU, with the
backward pass in two sweeps over the activations: one for the two per-channel
sums (of g and of g * x_hat, where g is the cotangent masked by the ReLU) and
one elementwise pass for dx. XLA's autodiff of `nn.BatchNorm` + `nn.relu`
reduces each activation several times more; on the CPU that is ~2x the time
(see README, Performance). The math, with m values per channel:

  x_hat = (x - mean) * inv,  inv = 1 / sqrt(var + eps),  y = relu(scale x_hat + bias)
  dbias = sum(g),  dscale = sum(g x_hat)
  dx = scale inv (g - dbias / m - x_hat dscale / m) + dmean / m + dvar 2 (x - mean) / m

where dmean, dvar are the cotangents of the returned batch statistics (zero in
training, where they only update running averages).

With `kernel_sums` the four per-channel sums (of x and x^2 forward, of g and
g x_hat backward) come from the CPU kernels of `fcn_jax.cpu_kernels`, which
read x, y and dy once each, where XLA:CPU writes g to memory before summing.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax import lax

from fcn_jax import cpu_kernels


def per_channel_sum(a: jax.Array) -> jax.Array:
    """Sum of a [B, *S, C] over all axes but the last -> [C], in a's dtype.

    A vector-matrix product over the leading axes, then a reduction of the small
    [S_last, C] partial sums. XLA:CPU splits a plain `jnp.sum` over millions of
    values into reduce-windows that stride over channels (~3x slower); one long
    dot would accumulate ~100x more rounding error. Rows of ~1e3 values keep the
    error at the level of a pairwise sum (see tests/test_batch_norm_relu.py).
    """
    rows = math.prod(a.shape[:-2])
    partial = jnp.dot(
        jnp.ones((rows,), a.dtype),
        a.reshape(rows, -1),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.sum(partial.reshape(-1, a.shape[-1]), axis=0)


def kernel_sums_apply(x: jax.Array) -> bool:
    """Whether the CPU kernels can take the sums of x [..., C]: float32, with C
    a multiple of their register width."""
    return x.dtype == jnp.float32 and x.shape[-1] % cpu_kernels.CHANNEL_MULTIPLE == 0


def _forward(x, scale, bias, epsilon, kernel_sums):
    x32 = x.astype(jnp.float32)
    count = x32.size // x32.shape[-1]
    if kernel_sums and kernel_sums_apply(x):
        total, total_sq = cpu_kernels.channel_moments(x32)
    else:
        total, total_sq = per_channel_sum(x32), per_channel_sum(x32 * x32)
    mean = total / count
    # E[x^2] - E[x]^2, clipped at 0 against rounding, as nn.BatchNorm computes it.
    var = jnp.maximum(total_sq / count - mean * mean, 0.0)
    inv = lax.rsqrt(var + epsilon)
    y = jnp.maximum((x32 - mean) * (inv * scale) + bias, 0.0).astype(x.dtype)
    return (y, mean, var), (x, y, mean, inv, scale, bias)


def _backward(epsilon, kernel_sums, residuals, cotangents):
    del epsilon
    x, y, mean, inv, scale, bias = residuals
    dy, dmean, dvar = cotangents
    x32 = x.astype(jnp.float32)
    count = x32.size // x32.shape[-1]
    centred = x32 - mean
    x_hat = centred * inv
    on_kernel = kernel_sums and kernel_sums_apply(x) and dy.dtype == jnp.float32
    gain = inv * scale
    if on_kernel:
        # The ReLU mask from x, exactly as the forward pass rounded it (the sign
        # of round(p + bias) is that of p + bias): y need not be kept or read.
        passed = centred * gain > -bias
    else:
        passed = y > 0
    g = jnp.where(passed, dy.astype(jnp.float32), 0.0)
    if on_kernel:
        dbias, dscale = cpu_kernels.relu_batch_norm_gradient_sums(
            x, dy, mean, inv, gain, bias
        )
    else:
        dbias, dscale = per_channel_sum(g), per_channel_sum(g * x_hat)
    dx = (
        gain * (g - dbias / count - x_hat * (dscale / count))
        + dmean / count
        + dvar * (2.0 / count) * centred
    )
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    kernel_sums: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """relu(BatchNorm(x)) with batch statistics: x [B, *S, C], scale/bias [C]
    (float32) -> (y [B, *S, C] in x's dtype, mean [C], biased var [C]).

    `kernel_sums` takes the per-channel sums on the CPU kernels where
    `kernel_sums_apply(x)` (CPU only); elsewhere XLA's.
    """
    return _forward(x, scale, bias, epsilon, kernel_sums)[0]


batch_norm_relu.defvjp(_forward, _backward)


class BatchNormReLU(nn.Module):
    """`nn.relu(nn.BatchNorm(...)(x))` with `batch_norm_relu`'s gradient in training.

    Same variables as `nn.BatchNorm` ('scale', 'bias' params; 'mean', 'var'
    batch stats), the same running-average update and the same outputs, so
    checkpoints move freely between the two. Statistics are float32 whatever
    `dtype` the output has. With `use_running_average` it is the plain
    inference formula, differentiated by XLA. `kernel_sums` (CPU only) takes
    the training sums on the CPU kernels (see `batch_norm_relu`).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_sums: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32)
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones(features, jnp.float32)
        )
        dtype = self.dtype or x.dtype
        scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
        if self.use_running_average:
            inv = lax.rsqrt(ra_var.value + self.epsilon)
            y = (x.astype(jnp.float32) - ra_mean.value) * (inv * scale32) + bias32
            return jnp.maximum(y, 0.0).astype(dtype)
        y, mean, var = batch_norm_relu(
            x.astype(dtype), scale32, bias32, self.epsilon, self.kernel_sums
        )
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
