"""Rank-agnostic building blocks: norms, conv blocks, cropping, down/upsampling.

Every module reads the spatial rank from its input x of shape [B, *spatial, C]
(1, 2 or 3 spatial dims) and expands its int kernel sizes and strides to it.
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer
from jax import lax

from fcn_jax.models import conv_gradient
from fcn_jax.models.batch_norm_relu import BatchNormReLU
from fcn_jax.models.pooling import max_pool_argmax_gradient
from fcn_jax.models.sizes import transposed_conv_output_size
from fcn_jax.models.transposed_conv_gradient import (
    disjoint_transposed_conv,
    disjoint_transposed_conv_direct,
)

NORMS = ("batch", "group", "none")
PADDINGS = ("SAME", "VALID")
DOWNSAMPLE_METHODS = ("max_pool", "avg_pool", "strided_conv")
UPSAMPLE_METHODS = ("transposed_conv", "resize_conv")
MAX_POOL_GRADIENTS = ("xla", "argmax")
BATCH_NORM_RELUS = ("xla", "fused", "kernel")
SKIP_CONVS = ("concat", "split")
CONV_FILTER_GRADIENTS = ("xla", "direct")
CONV_FORWARDS = ("xla", "direct")
INTERPOLATIONS = ("nearest", "linear")

# (features, *, train, name) -> a norm module, built inside the caller's scope.
NormFactory = Callable[..., nn.Module]


def _check_choice(name: str, value: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(accepted)}.")


def _spatial_rank(x: jax.Array) -> int:
    if x.ndim < 3:
        raise ValueError(f"expected x of shape [B, *spatial, C]; got {x.shape}.")
    return x.ndim - 2


def _largest_divisor_at_most(features: int, limit: int) -> int:
    return max(g for g in range(1, min(features, limit) + 1) if features % g == 0)


def create_norm(
    norm: str, *, dtype: Dtype, param_dtype: Dtype, num_groups: int
) -> NormFactory | None:
    """Returns a factory `(features, *, train, name) -> module`, or None for 'none'.

    'group' uses the largest group count <= num_groups that divides the features
    (e.g. 8 requested on 12 channels gives 6), so narrow test models still work.
    """
    _check_choice("norm", norm, NORMS)
    if norm == "none":
        return None
    if norm == "batch":
        batch_norm = functools.partial(
            nn.BatchNorm, momentum=0.9, dtype=dtype, param_dtype=param_dtype
        )

        def make_batch_norm(features: int, *, train: bool, name: str | None = None):
            del features  # BatchNorm infers it.
            return batch_norm(use_running_average=not train, name=name)

        return make_batch_norm
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be a positive integer.")
    group_norm = functools.partial(nn.GroupNorm, dtype=dtype, param_dtype=param_dtype)

    def make_group_norm(features: int, *, train: bool, name: str | None = None):
        del train  # No running statistics.
        groups = _largest_divisor_at_most(features, num_groups)
        return group_norm(num_groups=groups, name=name)

    return make_group_norm


def _channels_last_dimension_numbers(rank: int) -> lax.ConvDimensionNumbers:
    """[B, *S, C] inputs and outputs, [*K, C_in, C_out] kernels, as nn.Conv."""
    spatial = tuple(range(1, rank + 1))
    return lax.ConvDimensionNumbers(
        (0, rank + 1, *spatial), (rank + 1, rank, *range(rank)), (0, rank + 1, *spatial)
    )


class ConcatConv(nn.Module):
    """A stride-1 conv of inputs concatenated on channels, without the concatenation.

    conv(concat(x_1, ..., x_n), W) = sum_i conv(x_i, W_i), W_i the input-channel
    slice of W that meets x_i (the conv is linear in its input). inputs: n arrays
    [B, *S, C_i] -> [B, *S', features]. The parameters ('kernel' [*K, sum C_i,
    features], 'bias'), their initialisation and the outputs are those of
    `nn.Conv` applied to the concatenation, so the two are interchangeable; but
    no concatenated copy is written in the forward pass nor sliced apart in the
    backward pass (on 2 CPU cores: 43 -> 33 ms for the conv of [16 + 16]
    channels at 256^2, batch 4, forward and backward).
    """

    features: int
    kernel_size: Sequence[int]
    padding: str = "SAME"
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    conv_general_dilated: Callable | None = None

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
        widths = [x.shape[-1] for x in inputs]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*self.kernel_size, sum(widths), self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        *inputs, kernel, bias = promote_dtype(*inputs, kernel, bias, dtype=self.dtype)
        conv = self.conv_general_dilated or lax.conv_general_dilated
        rank = len(self.kernel_size)
        y, start = None, 0
        for x, width in zip(inputs, widths):
            part = conv(
                x,
                kernel[..., start : start + width, :],
                (1,) * rank,
                self.padding,
                dimension_numbers=_channels_last_dimension_numbers(rank),
            )
            y = part if y is None else y + part
            start += width
        return y if bias is None else y + bias


def _conv_function(filter_gradient: str, forward: str) -> Callable | None:
    """The conv op for `nn.Conv`'s `conv_general_dilated`: None (XLA's) unless
    part of it runs on the CPU kernels."""
    if filter_gradient == forward == "xla":
        return None
    return functools.partial(
        conv_gradient.conv_general_dilated,
        direct_filter_gradient=filter_gradient == "direct",
        direct_conv=forward == "direct",
    )


class ConvBlock(nn.Module):
    """`num_convs` x (conv -> norm -> ReLU): [B, *S, C] -> [B, *S', features].

    x may also be a tuple of arrays [B, *S, C_i], which the first conv takes as
    their concatenation on channels without making it (`ConcatConv`; same
    parameters and outputs as concatenating first). With 'VALID' padding each
    conv trims kernel_size - 1 from every spatial dim. Convs carry no bias when a norm follows (the norm's shift replaces it).
    `batch_norm_relu='fused'` runs norm='batch' + ReLU as one `BatchNormReLU`
    (same variables and outputs, a two-sweep backward pass; fast on CPU);
    'kernel' is 'fused' with its per-channel sums on the CPU kernels (CPU
    only); 'xla' differentiates `nn.BatchNorm` and `nn.relu` with XLA's autodiff.
    `conv_filter_gradient='direct'` computes the convs' filter gradients on the
    CPU kernel of `conv_gradient`, `conv_forward='direct'` the convs
    themselves and their input gradients (CPU only; same parameters and
    outputs).
    """

    features: int
    kernel_size: int = 3
    padding: str = "SAME"
    norm: str = "batch"
    num_convs: int = 2
    num_groups: int = 8
    batch_norm_relu: str = "xla"
    conv_filter_gradient: str = "xla"
    conv_forward: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array | tuple[jax.Array, ...], *, train: bool
    ) -> jax.Array:
        _check_choice("padding", self.padding, PADDINGS)
        _check_choice("batch_norm_relu", self.batch_norm_relu, BATCH_NORM_RELUS)
        _check_choice(
            "conv_filter_gradient", self.conv_filter_gradient, CONV_FILTER_GRADIENTS
        )
        _check_choice("conv_forward", self.conv_forward, CONV_FORWARDS)
        rank = _spatial_rank(x[0] if isinstance(x, tuple) else x)
        make_norm = create_norm(
            self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            num_groups=self.num_groups,
        )
        conv_args = {
            "features": self.features,
            "kernel_size": (self.kernel_size,) * rank,
            "padding": self.padding,
            "use_bias": make_norm is None,
            # He initialisation, as in the U-Net paper, suits the ReLUs.
            "kernel_init": nn.initializers.kaiming_normal(),
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "conv_general_dilated": _conv_function(
                self.conv_filter_gradient, self.conv_forward
            ),
        }
        fused = self.norm == "batch" and self.batch_norm_relu != "xla"
        for i in range(self.num_convs):
            if isinstance(x, tuple):
                x = ConcatConv(**conv_args, name=f"conv_{i}")(x)
            else:
                x = nn.Conv(**conv_args, name=f"conv_{i}")(x)
            if fused:
                x = BatchNormReLU(
                    use_running_average=not train,
                    momentum=0.9,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_sums=self.batch_norm_relu == "kernel",
                    name=f"norm_{i}",
                )(x)
                continue
            if make_norm is not None:
                x = make_norm(self.features, train=train, name=f"norm_{i}")(x)
            x = nn.relu(x)
        return x


def center_crop(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Crops the centre [B, *spatial_shape, C] out of x: [B, *spatial, C].

    An odd surplus leaves the extra row on the high side.
    """
    spatial = x.shape[1:-1]
    target = tuple(spatial_shape)
    if len(target) != len(spatial):
        raise ValueError(
            f"cannot crop spatial shape {spatial} to rank-{len(target)} {target}."
        )
    if any(t > s or t < 0 for t, s in zip(target, spatial)):
        raise ValueError(f"cannot crop spatial shape {spatial} to larger {target}.")
    index = tuple(
        slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(spatial, target)
    )
    return x[(slice(None), *index, slice(None))]


class Resize(nn.Module):
    """Interpolates [B, *S, C] to [B, *spatial_shape, C] ('nearest' or 'linear',
    half-pixel aligned). No parameters; a module so analysis tools see it."""

    method: str = "linear"

    @nn.compact
    def __call__(self, x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
        _check_choice("interpolation", self.method, INTERPOLATIONS)
        shape = (x.shape[0], *spatial_shape, x.shape[-1])
        return jax.image.resize(x, shape, method=self.method)


class MaxPool(nn.Module):
    """Max pooling of [B, *S, C] with a `window`-wide, `stride` step window and
    'SAME' or 'VALID' padding. No parameters; a module so analysis tools see it."""

    window: int = 3
    stride: int = 2
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rank = _spatial_rank(x)
        return nn.max_pool(
            x,
            (self.window,) * rank,
            strides=(self.stride,) * rank,
            padding=self.padding,
        )


class Downsample(nn.Module):
    """Downsamples [B, *S, C] by `factor`: [B, *floor(S / factor), C'].

    Pools use window = stride = factor; 'strided_conv' is a learned conv with
    kernel = stride = factor and `features` outputs (default: C).
    `max_pool_gradient='argmax'` differentiates max pooling through saved
    argmax indices (fast on CPU); 'xla' uses XLA's own gradient.
    """

    method: str = "max_pool"
    factor: int = 2
    features: int | None = None
    max_pool_gradient: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_choice("downsample", self.method, DOWNSAMPLE_METHODS)
        window = (self.factor,) * _spatial_rank(x)
        if self.method == "max_pool":
            _check_choice(
                "max_pool_gradient", self.max_pool_gradient, MAX_POOL_GRADIENTS
            )
            if self.max_pool_gradient == "argmax":
                return max_pool_argmax_gradient(x, self.factor)
            return nn.max_pool(x, window, strides=window, padding="VALID")
        if self.method == "avg_pool":
            return nn.avg_pool(x, window, strides=window, padding="VALID")
        return nn.Conv(
            self.features or x.shape[-1],
            kernel_size=window,
            strides=window,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
    if not 1 <= rank <= 3:
        raise ValueError(f"spatial rank {rank} is not supported (1, 2 or 3).")
    spatial = "DHW"[-rank:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _transposed_conv_general(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, output_padding: int
) -> jax.Array:
    """Transposed conv as a conv of the stride-dilated input with the flipped kernel."""
    rank = x.ndim - 2
    kernel_size = kernel.shape[:rank]
    pads = [(k - 1 - padding, k - 1 - padding + output_padding) for k in kernel_size]
    return lax.conv_general_dilated(
        x,
        jnp.flip(kernel, axis=tuple(range(rank))),
        window_strides=(1,) * rank,
        padding=pads,
        lhs_dilation=(stride,) * rank,
        dimension_numbers=_dimension_numbers(rank),
    )


class TransposedConv(nn.Module):
    """Transposed conv with PyTorch's size semantics: [B, *S, C] -> [B, *S', features].

    S' = stride * (S - 1) + kernel_size - 2 * padding + output_padding. Input
    pixel i adds x[i] * kernel[a] to output pixel stride * i + a - padding.
    Params: 'kernel' [*k, C, features] and 'bias' [features], whichever path runs.
    With kernel_size == stride and no padding it runs as products
    (`disjoint_transposed_conv`); `conv_filter_gradient='direct'` then
    takes the hand-written CPU backward pass of `transposed_conv_gradient`.
    """

    features: int
    kernel_size: int = 2
    stride: int = 2
    padding: int = 0
    output_padding: int = 0
    use_fast_path: bool = True
    conv_filter_gradient: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_choice(
            "conv_filter_gradient", self.conv_filter_gradient, CONV_FILTER_GRADIENTS
        )
        rank = _spatial_rank(x)
        for n in x.shape[1:-1]:  # Fails early, with the sizes, on unusable configs.
            transposed_conv_output_size(
                n, self.kernel_size, self.stride, self.padding, self.output_padding
            )
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*(self.kernel_size,) * rank, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # XLA:CPU lowers a strided transposed conv's kernel grad to a slow dilated conv.
        disjoint = self.kernel_size == self.stride and self.padding == 0
        if not (self.use_fast_path and disjoint and self.output_padding == 0):
            y = _transposed_conv_general(
                x, kernel, self.stride, self.padding, self.output_padding
            )
            return y + bias
        if self.conv_filter_gradient == "direct":
            return disjoint_transposed_conv_direct(x, kernel, bias)
        return disjoint_transposed_conv(x, kernel) + bias


class Upsample(nn.Module):
    """Upsamples [B, *S, C] to [B, *S', features].

    'transposed_conv': S' = stride * (S - 1) + kernel_size - 2 * padding +
    output_padding (see `TransposedConv`). 'resize_conv': `interpolation` resize
    by `stride`, then a 'SAME' conv of kernel_size, so S' = stride * S.
    """

    features: int
    method: str = "transposed_conv"
    kernel_size: int = 2
    stride: int = 2
    padding: int = 0
    output_padding: int = 0
    interpolation: str = "nearest"
    use_fast_path: bool = True
    conv_filter_gradient: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_choice("upsample", self.method, UPSAMPLE_METHODS)
        if self.method == "transposed_conv":
            return TransposedConv(
                self.features,
                kernel_size=self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                output_padding=self.output_padding,
                use_fast_path=self.use_fast_path,
                conv_filter_gradient=self.conv_filter_gradient,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv_transpose",
            )(x)
        _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if self.padding or self.output_padding:
            raise ValueError(
                f"padding={self.padding} and output_padding={self.output_padding} "
                "only apply to 'transposed_conv'; set them to 0 for 'resize_conv'."
            )
        rank = _spatial_rank(x)
        shape = tuple(n * self.stride for n in x.shape[1:-1])
        x = Resize(self.interpolation, name="resize")(x, shape)
        return nn.Conv(
            self.features,
            kernel_size=(self.kernel_size,) * rank,
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class _PositionalTrainConvBlock(ConvBlock):
    """ConvBlock taking `train` positionally, as `nn.remat`'s static_argnums need."""

    def __call__(self, x: jax.Array | tuple[jax.Array, ...], train: bool) -> jax.Array:
        return super().__call__(x, train=train)


# Recomputes the block's activations in the backward pass instead of storing them.
_RematConvBlock = nn.remat(_PositionalTrainConvBlock, static_argnums=(2,))


def conv_block_class(remat: bool) -> type[nn.Module]:
    """A ConvBlock class called as `block(x, train)`, rematerialised if `remat`.

    Both variants have the same parameter tree, so checkpoints are interchangeable.
    """
    return _RematConvBlock if remat else _PositionalTrainConvBlock
