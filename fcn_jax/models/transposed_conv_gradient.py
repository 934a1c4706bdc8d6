"""Transposed convs whose kernel equals their stride (the U-Net's 2x2 up-conv),
as products, and a variant whose gradients avoid XLA:CPU's copies.

With kernel == stride and no padding every input pixel owns one disjoint
output patch, so the op is a product per kernel offset and an interleaving.
Differentiated by XLA, the backward pass slices the output cotangent g per
row offset and transposes each slice for the kernel gradient: on a 2-core CPU
the four up-convs of configs/unet.py take ~49 ms forward and backward.
`disjoint_transposed_conv_direct` writes the backward pass by hand (~18 ms):

  dx = the stride-s conv of g with the kernel (its adjoint; XLA's fast path),
  dkernel = an s x 1 filter gradient on the CPU kernel of `fcn_jax.cpu_kernels`,
      reading g in place as rows [N*H, s, W, s*F],
  dbias = per-channel sums of g.
"""

import jax
import jax.numpy as jnp
from jax import lax

from fcn_jax import cpu_kernels
from fcn_jax.models.batch_norm_relu import per_channel_sum
from fcn_jax.models.conv_gradient import DIMENSION_NUMBERS


def disjoint_transposed_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Transposed conv with stride == kernel size s, no padding:
    x [B, *S, C], kernel [s, .., s, C, F] -> [B, *(s S), F].

    One product per offset along the leading spatial axes, each giving
    [B, *S, s, F], already in output memory order; stacking them interleaves
    whole rows. A single einsum over all offsets needs transposes of the
    activation in the forward and both gradients (on a 2-core CPU,
    configs/unet.py: train step 3% and inference 7% slower).
    """
    rank = x.ndim - 2
    product = f"n{'xyz'[:rank]}c,qco->n{'xyz'[:rank]}qo"

    def patches(kernel_part: jax.Array) -> jax.Array:
        # kernel_part [*k_lead, k_last, C, F] -> [B, S_0, .., k_lead_0, S_j, .., F]
        if kernel_part.ndim == 3:
            return jnp.einsum(product, x, kernel_part)
        # The offset along spatial axis j goes right after that axis.
        j = rank - (kernel_part.ndim - 2)
        return jnp.stack([patches(k) for k in kernel_part], axis=j + 2)

    y = patches(kernel)
    out_spatial = [n * k for n, k in zip(x.shape[1:-1], kernel.shape[:rank])]
    return y.reshape(x.shape[0], *out_spatial, kernel.shape[-1])


def direct_gradient_applies(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `disjoint_transposed_conv_direct` takes its hand-written
    gradient: 1D or 2D, float32, stride * features a multiple of 16."""
    rank = x.ndim - 2
    return (
        rank in DIMENSION_NUMBERS
        and x.dtype == kernel.dtype == jnp.float32
        and (kernel.shape[0] * kernel.shape[-1]) % 16 == 0
    )


def _forward(x, kernel, bias):
    return disjoint_transposed_conv(x, kernel) + bias


@jax.custom_vjp
def _direct(x, kernel, bias):
    return _forward(x, kernel, bias)


def _direct_fwd(x, kernel, bias):
    return _forward(x, kernel, bias), (x, kernel)


def _direct_bwd(residuals, g):
    x, kernel = residuals
    rank = x.ndim - 2
    s, channels, features = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
    dx = lax.conv_general_dilated(
        g,
        jnp.swapaxes(kernel, -1, -2),
        window_strides=(s,) * rank,
        padding="VALID",
        dimension_numbers=DIMENSION_NUMBERS[rank],
    )
    width = x.shape[-2]
    if rank == 1:
        # g [B, s W, F] is [B, 1, W, s F]: a 1x1 filter gradient.
        rows = cpu_kernels.conv_filter_gradient(
            x[:, None], g.reshape(-1, 1, width, s * features), (1, 1), (0, 0)
        )[0, 0]
        dkernel = rows.reshape(channels, s, features).transpose(1, 0, 2)
    else:
        # Row h of x meets rows s h + a of g: g [B, s H, s W, F] is
        # [B H, s, W, s F], x is [B H, 1, W, C], and a height-s filter with
        # s - 1 rows of padding pairs x's row with g's row s - 1 - a.
        rows = cpu_kernels.conv_filter_gradient(
            x.reshape(-1, 1, width, channels),
            g.reshape(-1, s, width, s * features),
            (s, 1),
            (s - 1, 0),
        )[::-1, 0]
        dkernel = rows.reshape(s, channels, s, features).transpose(0, 2, 1, 3)
    return dx, dkernel, per_channel_sum(g)


_direct.defvjp(_direct_fwd, _direct_bwd)


def disjoint_transposed_conv_direct(
    x: jax.Array, kernel: jax.Array, bias: jax.Array
) -> jax.Array:
    """`disjoint_transposed_conv(x, kernel) + bias`, same result, with the
    hand-written backward pass of the module doc where it applies (see
    `direct_gradient_applies`), XLA's autodiff otherwise. CPU only."""
    if not direct_gradient_applies(x, kernel):
        return _forward(x, kernel, bias)
    return _direct(x, kernel, bias)
