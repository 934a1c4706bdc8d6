"""Layer equivalences as tools: folded 1x1 convs, 1x1 conv = per-pixel dense,
average pooling = depthwise conv, transposed conv = transpose of a conv.

Every function takes any spatial rank 1-3, with arrays laid out [B, *S, C] and
kernels [*k, C_in, C_out] as in `flax.linen.Conv`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fcn_jax.models.sizes import conv_output_size


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
    if not 1 <= rank <= 3:
        raise ValueError(f"spatial rank {rank} is not supported (1, 2 or 3).")
    spatial = "DHW"[-rank:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _check_pointwise(kernel: jax.Array) -> None:
    if kernel.ndim < 3 or any(n != 1 for n in kernel.shape[:-2]):
        raise ValueError(
            f"expected a 1x1 kernel [1, ..., 1, C_in, C_out]; got {kernel.shape}."
        )


def fold_pointwise_convs(
    layers: Sequence[tuple[jax.Array, jax.Array]],
) -> tuple[jax.Array, jax.Array]:
    """Folds linear 1x1 convs applied in order into one (kernel, bias).

    Args:
      layers: (kernel [1, ..., 1, C_i, C_{i+1}], bias [C_{i+1}]) pairs, all of
        the same rank, with no activation between them.

    Returns:
      kernel [1, ..., 1, C_0, C_n] = W_1 W_2 ... W_n (matrices [C_in, C_out]) and
      bias [C_n] = (...(b_1 W_2 + b_2) W_3 + ...) + b_n.
    """
    if not layers:
        raise ValueError("need at least one layer to fold.")
    first_kernel, bias = layers[0]
    _check_pointwise(first_kernel)
    ones = first_kernel.shape[:-2]
    weights = first_kernel.reshape(first_kernel.shape[-2:])
    for kernel, layer_bias in layers[1:]:
        _check_pointwise(kernel)
        if kernel.shape[:-2] != ones:
            raise ValueError(f"kernel {kernel.shape} differs in rank from {ones}.")
        matrix = kernel.reshape(kernel.shape[-2:])
        weights, bias = weights @ matrix, bias @ matrix + layer_bias
    return weights.reshape(*ones, *weights.shape), bias


def pointwise_conv_param_count(in_channels: int, out_channels: int) -> int:
    """Parameters of a 1x1 conv with bias: C_out * (C_in + 1), for any rank."""
    return out_channels * (in_channels + 1)


def dense_params_from_pointwise_conv(
    params: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """`nn.Conv` 1x1 params {'kernel': [1, ..., 1, C_in, C_out], 'bias'} as the
    `nn.Dense` params {'kernel': [C_in, C_out], 'bias'} that give the same output
    when the dense layer is applied at every pixel of [B, *S, C_in]."""
    kernel = params["kernel"]
    _check_pointwise(kernel)
    return {"kernel": kernel.reshape(kernel.shape[-2:]), "bias": params["bias"]}


def avg_pool_kernel(window: int, channels: int, rank: int) -> jax.Array:
    """Depthwise kernel [*[window] * rank, 1, channels] of weights 1 / window**rank."""
    shape = (*(window,) * rank, 1, channels)
    return jnp.full(shape, 1.0 / window**rank, jnp.float32)


def avg_pool_as_depthwise_conv(x: jax.Array, window: int) -> jax.Array:
    """Average pooling (window = stride, 'VALID') of x [B, *S, C] as a depthwise
    conv: [B, *floor(S / window), C], like `flax.linen.avg_pool`."""
    rank, channels = x.ndim - 2, x.shape[-1]
    return lax.conv_general_dilated(
        x,
        avg_pool_kernel(window, channels, rank).astype(x.dtype),
        window_strides=(window,) * rank,
        padding="VALID",
        dimension_numbers=_dimension_numbers(rank),
        # One group per channel: each output channel sees only its own input.
        feature_group_count=channels,
    )


def strided_conv(
    z: jax.Array, kernel: jax.Array, stride: int, padding: int
) -> jax.Array:
    """Cross-correlation of z [B, *S', F] with kernel [*k, F, C], zero padding
    `padding` on both sides: [B, *S, C], S = floor((S' + 2p - k) / s) + 1."""
    rank = z.ndim - 2
    return lax.conv_general_dilated(
        z,
        kernel,
        window_strides=(stride,) * rank,
        padding=[(padding, padding)] * rank,
        dimension_numbers=_dimension_numbers(rank),
    )


def matching_output_padding(
    output_size: int, kernel_size: int, stride: int, padding: int
) -> int:
    """The `TransposedConv` output_padding that maps the output of `strided_conv`
    on size `output_size` back to `output_size`: (S' + 2p - k) mod s, the
    trailing pixels the conv's floor dropped."""
    conv_output_size(output_size, kernel_size, stride, padding)  # Fails if empty.
    return (output_size + 2 * padding - kernel_size) % stride


def transposed_kernel(conv_kernel: jax.Array) -> jax.Array:
    """The `TransposedConv` kernel [*k, C, F] whose layer is the transpose of
    `strided_conv` with conv_kernel [*k, F, C].

    Only the channel axes swap; there is no spatial flip. The conv's output i
    reads input s * i + a - p through tap a, and `TransposedConv` writes input
    i to output s * i + a - p through the same tap a. (The flip lives inside
    `TransposedConv`'s implementation as a dilated conv, not in its layout.)
    """
    return jnp.swapaxes(conv_kernel, -1, -2)


def conv_transpose_by_autodiff(
    y: jax.Array,
    conv_kernel: jax.Array,
    stride: int,
    padding: int,
    output_spatial: Sequence[int],
) -> jax.Array:
    """`jax.linear_transpose` of z -> `strided_conv(z, conv_kernel, stride,
    padding)` applied to y [B, *S, C]: [B, *output_spatial, F]."""
    z = jax.ShapeDtypeStruct(
        (y.shape[0], *output_spatial, conv_kernel.shape[-2]), y.dtype
    )
    transpose = jax.linear_transpose(
        lambda z: strided_conv(z, conv_kernel, stride, padding), z
    )
    (result,) = transpose(y)
    return result
