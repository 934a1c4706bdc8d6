"""A drop-in `lax.conv_general_dilated` whose filter gradient, and optionally
the conv itself and its input gradient, run on the CPU kernels of
`fcn_jax.cpu_kernels`.

XLA:CPU computes the filter gradient of a 3x3 conv as a convolution over the
batch, with transposes of both operands to batch-last layouts first; at full
resolution with 16-64 channels that runs at 30-85 GFLOP/s on 2 cores, and
those gradients take about a third of the U-Net train step. The kernel reads
x and the output cotangent once per kernel offset and keeps its sums in
registers (190-310 GFLOP/s). XLA's forward conv packs image patches for a
GEMM, which with 16-128 channels costs about as much as the multiply; the
conv kernel (`direct_conv`) keeps blocks of output pixels in registers
instead (1.1-1.7x faster there) and serves the input gradient too, a conv of
the output cotangent with the flipped, transposed kernel, which the kernel
library copies (XLA:CPU's copy of a [3, 3, 1024, 1024] kernel takes ~70 ms).
Used for stride-1, undilated, ungrouped 1D and 2D float32 convs with
channels last and a multiple of 16 output channels; any other conv takes
XLA's path unchanged. With wide channels on small images the filter gradient
stays XLA's (see `_xla_filter_gradient_is_faster`), and from 256 x 128
channels on so do the conv and input gradient (`_xla_conv_is_faster`).
"""

import functools
import math
from collections.abc import Sequence

import jax
from jax import lax

from fcn_jax import cpu_kernels

# Channels-last layouts of the 1D and 2D convs that take the CPU kernels.
DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def _plain_conv(x, kernel, pads, precision):
    rank = x.ndim - 2
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * rank,
        padding=pads,
        dimension_numbers=DIMENSION_NUMBERS[rank],
        precision=precision,
    )


def _kernel_conv(x, kernel, pads, output_size):
    """The stride-1 conv on the CPU kernel; 1D convs as [N, 1, W, C]."""
    if x.ndim == 3:
        return cpu_kernels.conv(
            x[:, None], kernel[None], (0, pads[0][0]), (1, *output_size)
        )[:, 0]
    return cpu_kernels.conv(x, kernel, (pads[0][0], pads[1][0]), output_size)


def _output_size(x, kernel, pads):
    return tuple(
        n + lo + hi - k + 1 for n, k, (lo, hi) in zip(x.shape[1:-1], kernel.shape, pads)
    )


def _forward(x, kernel, pads, precision, conv_on_kernel):
    if conv_on_kernel:
        return _kernel_conv(x, kernel, pads, _output_size(x, kernel, pads))
    return _plain_conv(x, kernel, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, pads, precision, filter_gradient_on_kernel, conv_on_kernel):
    return _forward(x, kernel, pads, precision, conv_on_kernel)


def _conv_fwd(x, kernel, pads, precision, filter_gradient_on_kernel, conv_on_kernel):
    return _forward(x, kernel, pads, precision, conv_on_kernel), (x, kernel)


def _input_gradient(x, kernel, pads, precision, g, conv_on_kernel):
    """dx: the stride-1 conv of g with the flipped, transposed kernel, padded
    by kernel - 1 - pad on each side (the size formula gives x's size back)."""
    if not all(0 <= p <= k - 1 for k, pad in zip(kernel.shape, pads) for p in pad):
        _, input_vjp = jax.vjp(lambda x: _plain_conv(x, kernel, pads, precision), x)
        return input_vjp(g)[0]
    rank = x.ndim - 2
    flipped = cpu_kernels.flipped_transposed_kernel(
        kernel.reshape((1,) * (2 - rank) + kernel.shape)
    ).reshape(kernel.shape[:rank] + (kernel.shape[-1], kernel.shape[-2]))
    input_pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape, pads)]
    if conv_on_kernel and x.shape[-1] % cpu_kernels.CHANNEL_MULTIPLE == 0:
        return _kernel_conv(g, flipped, input_pads, x.shape[1:-1])
    return _plain_conv(g, flipped, input_pads, precision)


def _conv_bwd(pads, precision, filter_gradient_on_kernel, conv_on_kernel, residuals, g):
    x, kernel = residuals
    dx = _input_gradient(x, kernel, pads, precision, g, conv_on_kernel)
    if not filter_gradient_on_kernel:
        _, filter_vjp = jax.vjp(lambda k: _plain_conv(x, k, pads, precision), kernel)
        return dx, filter_vjp(g)[0]
    if x.ndim == 3:  # [N, W, C] as [N, 1, W, C].
        dw = cpu_kernels.conv_filter_gradient(
            x[:, None], g[:, None], (1, kernel.shape[0]), (0, pads[0][0])
        )[0]
    else:
        dw = cpu_kernels.conv_filter_gradient(
            x, g, kernel.shape[:2], (pads[0][0], pads[1][0])
        )
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _channels_last(dimension_numbers, rank: int) -> bool:
    if dimension_numbers is None:
        return False
    expected = lax.conv_dimension_numbers(
        (1,) * (rank + 2), (1,) * (rank + 2), DIMENSION_NUMBERS[rank]
    )
    given = lax.conv_dimension_numbers(
        (1,) * (rank + 2), (1,) * (rank + 2), dimension_numbers
    )
    return given == expected


def _all_ones(values) -> bool:
    return values is None or all(v == 1 for v in values)


def _xla_filter_gradient_is_faster(x_shape, kernel_shape) -> bool:
    """Wide channels on small images: XLA's filter gradient, a matmul over the
    few pixels, beats the kernel's row streams (2 cores, batch 2: 16x16 at
    1024 -> 1024 channels 44 vs 72 ms; 32x32 at 1024 -> 512 89 vs 99 ms; the
    kernel wins at 64x64 and above and below 512 x 512 channels)."""
    pixels = math.prod(x_shape[1:-1])
    return pixels <= 32 * 32 and kernel_shape[-2] * kernel_shape[-1] >= 512 * 512


def _xla_conv_is_faster(x_shape, kernel_shape) -> bool:
    """XLA's GEMM beats the kernel's pixel blocks from 256 x 128 channels on
    (2 cores, batch 4, 3x3: 16x16 at 128 -> 256 2.20 vs 2.47 ms, 32x32 at
    256 -> 128 8.01 vs 7.92 ms; at 128 -> 128 and below the kernel is 1.1-1.7x
    faster, most at full resolution with 16-32 channels)."""
    return kernel_shape[-2] * kernel_shape[-1] >= 256 * 128


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    direct_filter_gradient: bool = True,
    direct_conv: bool = False,
) -> jax.Array:
    """`lax.conv_general_dilated`, same arguments and result; where it applies
    (see the module doc) the filter gradient runs on the CPU kernel unless
    `direct_filter_gradient` is False, and with `direct_conv` the conv and its
    input gradient run on the CPU conv kernel too."""
    rank = lhs.ndim - 2
    pads = padding
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(
            lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding
        )
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    applies = (
        rank in DIMENSION_NUMBERS
        and _channels_last(dimension_numbers, rank)
        and _all_ones(window_strides)
        and _all_ones(lhs_dilation)
        and _all_ones(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype == "float32"
        and rhs.shape[-1] % 16 == 0
        and all(lo >= 0 and hi >= 0 for lo, hi in pads)
    )
    if not applies:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    filter_gradient_on_kernel = (
        direct_filter_gradient
        and not _xla_filter_gradient_is_faster(lhs.shape, rhs.shape)
    )
    conv_on_kernel = direct_conv and not _xla_conv_is_faster(lhs.shape, rhs.shape)
    return _conv(lhs, rhs, pads, precision, filter_gradient_on_kernel, conv_on_kernel)
