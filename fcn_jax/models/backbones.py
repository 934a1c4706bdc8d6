"""Classification backbones as encoders: VGG (Simonyan & Zisserman 2015,
arXiv:1409.1556) and ResNet (He et al. 2016, arXiv:1512.03385) with atrous
stages (Chen et al. 2017, arXiv:1706.05587), plus padding to their total stride.

Both return features keyed by stride, like `Encoder`; the largest key is the
bottleneck. Both are trained from scratch (no pretrained weights).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.layers import ConvBlock, Downsample, MaxPool, create_norm

BACKBONES = ("vgg", "resnet")


class ConvNormReLU(nn.Module):
    """One conv -> norm -> ReLU with a stride and a dilation (ConvBlock has neither).

    A dilated conv of kernel k and dilation d spans k_eff = 1 + (k - 1) * d.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    norm: str = "batch"
    num_groups: int = 8
    relu: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        rank = x.ndim - 2
        make_norm = create_norm(
            self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            num_groups=self.num_groups,
        )
        x = nn.Conv(
            self.features,
            kernel_size=(self.kernel_size,) * rank,
            strides=(self.stride,) * rank,
            kernel_dilation=(self.dilation,) * rank,
            padding="SAME",
            use_bias=make_norm is None,
            kernel_init=nn.initializers.kaiming_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        if make_norm is not None:
            x = make_norm(self.features, train=train, name="norm")(x)
        return nn.relu(x) if self.relu else x


class VGGEncoder(nn.Module):
    """VGG: [B, *S, C] -> {2**i: pool{i} output [B, *S / 2**i, width_i]}, i >= 1.

    Stage i (conv{i}, a ConvBlock of num_convs[i-1] 3x3 convs) has
    min(base_width * 2**(i-1), max_width) channels and is followed by the 2x max
    pool pool{i}; five stages reach stride 32. The entry at stride 2**i is the
    pooled output, as FCN's pool3 / pool4 / pool5 taps expect.
    """

    base_width: int = 64
    max_width: int = 512
    num_convs: Sequence[int] = (2, 2, 3, 3, 3)
    norm: str = "batch"
    num_groups: int = 8
    max_pool_gradient: str = "xla"
    batch_norm_relu: str = "xla"
    conv_filter_gradient: str = "xla"
    conv_forward: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[int, jax.Array]:
        features = {}
        for i, num_convs in enumerate(self.num_convs, start=1):
            x = ConvBlock(
                min(self.base_width * 2 ** (i - 1), self.max_width),
                norm=self.norm,
                num_convs=num_convs,
                num_groups=self.num_groups,
                batch_norm_relu=self.batch_norm_relu,
                conv_filter_gradient=self.conv_filter_gradient,
                conv_forward=self.conv_forward,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x, train=train)
            x = Downsample(max_pool_gradient=self.max_pool_gradient, name=f"pool{i}")(x)
            features[2**i] = x
        return features


class ResidualBlock(nn.Module):
    """Basic residual block: relu(x' + norm(conv(relu(norm(conv(x)))))).

    The shortcut x' is x, or a strided 1x1 conv + norm (`proj`) when the stride
    or width changes. Both 3x3 convs use `dilation`.
    """

    features: int
    stride: int = 1
    dilation: int = 1
    norm: str = "batch"
    num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        layer = functools.partial(
            ConvNormReLU,
            self.features,
            norm=self.norm,
            num_groups=self.num_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        y = layer(stride=self.stride, dilation=self.dilation, name="conv_a")(
            x, train=train
        )
        y = layer(dilation=self.dilation, relu=False, name="conv_b")(y, train=train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = layer(kernel_size=1, stride=self.stride, relu=False, name="proj")(
                x, train=train
            )
        return nn.relu(x + y)


def _check_output_stride(output_stride: int, nominal: int) -> None:
    powers = [2**i for i in range(2, nominal.bit_length())]
    if output_stride not in powers:
        raise ValueError(
            f"output_stride={output_stride} must be one of {powers} for this "
            f"ResNet (stride {nominal} without dilation)."
        )


class ResNetEncoder(nn.Module):
    """ResNet of basic blocks: [B, *S, C] -> {stride: [B, *S / stride, C_stride]}.

    conv1 (stem_kernel_size conv, stride 2) and a 3x3 stride-2 max pool reach
    stride 4; stage s (blocks conv{s}_1, conv{s}_2, ...) has base_width *
    2**(s-2) channels and halves the resolution for s > 2. Once the stride
    reaches `output_stride` the remaining stages keep it and double their
    dilation instead (DeepLab's atrous ResNet). `multi_grid`, if given, scales
    the dilation of the last stage's blocks one by one (DeepLabv3, Sec. 3.2).
    Keys: 2 (conv1), 4, 8, ..., output_stride; each holds the last feature at
    that stride, so the largest key is the bottleneck.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    stem_kernel_size: int = 7
    output_stride: int = 32
    multi_grid: Sequence[int] = ()
    norm: str = "batch"
    num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def nominal_stride(self) -> int:
        return 4 * 2 ** (len(self.stage_sizes) - 1)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[int, jax.Array]:
        _check_output_stride(self.output_stride, self.nominal_stride)
        if self.multi_grid and len(self.multi_grid) != self.stage_sizes[-1]:
            raise ValueError(
                f"multi_grid={tuple(self.multi_grid)} needs one rate per block of "
                f"the last stage ({self.stage_sizes[-1]})."
            )
        shared = {
            "norm": self.norm,
            "num_groups": self.num_groups,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        x = ConvNormReLU(
            self.base_width,
            kernel_size=self.stem_kernel_size,
            stride=2,
            name="conv1",
            **shared,
        )(x, train=train)
        features = {2: x}
        x = MaxPool(window=3, stride=2, padding="SAME", name="pool1")(x)
        stride, dilation = 4, 1
        for s, num_blocks in enumerate(self.stage_sizes, start=2):
            block_stride = 1
            if s > 2 and stride < self.output_stride:
                block_stride, stride = 2, stride * 2
            elif s > 2:
                dilation *= 2
            last = s == len(self.stage_sizes) + 1
            for j in range(num_blocks):
                grid = self.multi_grid[j] if last and self.multi_grid else 1
                x = ResidualBlock(
                    self.base_width * 2 ** (s - 2),
                    stride=block_stride if j == 0 else 1,
                    dilation=dilation * grid,
                    name=f"conv{s}_{j + 1}",
                    **shared,
                )(x, train=train)
            features[stride] = x
        return features


def create_backbone(
    backbone: str,
    *,
    base_width: int,
    max_width: int,
    vgg_num_convs: Sequence[int],
    resnet_stage_sizes: Sequence[int],
    norm: str,
    num_groups: int,
    max_pool_gradient: str,
    dtype: Dtype,
    param_dtype: Dtype,
    batch_norm_relu: str = "xla",
    conv_filter_gradient: str = "xla",
    conv_forward: str = "xla",
) -> nn.Module:
    """A stride-32 VGGEncoder or ResNetEncoder named 'backbone'.

    `batch_norm_relu`, `conv_filter_gradient` and `conv_forward` apply to
    VGG's conv blocks;
    ResNet's blocks add the shortcut between norm and ReLU, so they keep XLA's
    gradients.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not one of {', '.join(BACKBONES)}.")
    shared = {
        "base_width": base_width,
        "norm": norm,
        "num_groups": num_groups,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "name": "backbone",
    }
    if backbone == "vgg":
        return VGGEncoder(
            max_width=max_width,
            num_convs=tuple(vgg_num_convs),
            max_pool_gradient=max_pool_gradient,
            batch_norm_relu=batch_norm_relu,
            conv_filter_gradient=conv_filter_gradient,
            conv_forward=conv_forward,
            **shared,
        )
    return ResNetEncoder(stage_sizes=tuple(resnet_stage_sizes), **shared)


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads [B, *S, C] to the next multiple of `multiple` per spatial dim.

    The padding is split as `center_crop` splits a surplus (the extra row on
    the high side), so `center_crop(y, S)` undoes it.
    """
    pads = [(-n % multiple) for n in x.shape[1:-1]]
    return jnp.pad(x, [(0, 0), *((p // 2, p - p // 2) for p in pads), (0, 0)])


class SameSizeGeometry:
    """Size planning for models that pad the input to their total stride inside
    and crop the logits back: every size n >= 1 is valid and maps to n."""

    def output_size(self, input_size: int) -> int:
        """The output size along one spatial dim: the input size."""
        if input_size < 1:
            raise ValueError(f"input size {input_size} must be at least 1.")
        return input_size

    def is_valid_input_size(self, input_size: int) -> bool:
        """Whether `output_size(input_size)` succeeds (any n >= 1)."""
        return input_size >= 1

    def check_input_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The output spatial shape (the input's); raises on an empty dim."""
        return tuple(self.output_size(n) for n in spatial_shape)
