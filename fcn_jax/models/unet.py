"""U-Net: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015 (arXiv:1505.04597)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.decoder import Decoder
from fcn_jax.models.encoder import Encoder
from fcn_jax.models.heads import SegmentationHead
from fcn_jax.models.layers import DOWNSAMPLE_METHODS, PADDINGS, UPSAMPLE_METHODS
from fcn_jax.models.sizes import (
    conv_output_size,
    pool_output_size,
    transposed_conv_output_size,
)


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015): [B, *S, C] -> float32 logits [B, *S', K].

    An encoder of `depth` 2x downsamplings, a decoder joining the skips, and a
    1x1 head. With padding='VALID' (the paper) every conv trims the border and
    S' < S: depth 4, 572 -> 388. With 'SAME', S' = S for sizes that are multiples
    of 2**depth. The size methods below need no parameters, e.g.
    `UNet(2, padding="VALID").nearest_valid_input_sizes(570)`.
    """

    num_classes: int
    depth: int = 4
    base_width: int = 64
    kernel_size: int = 3
    padding: str = "SAME"
    norm: str = "batch"
    num_groups: int = 8
    downsample: str = "max_pool"
    max_pool_gradient: str = "xla"
    # 'fused': BatchNorm + ReLU as one op with a hand-written gradient (CPU);
    # 'kernel': its per-channel sums on compiled CPU kernels too.
    batch_norm_relu: str = "xla"
    # 'direct': 2D/1D conv filter gradients and the up-convs' backward pass on a
    # compiled CPU kernel.
    conv_filter_gradient: str = "xla"
    # 'direct': stride-1 convs (forward pass and input gradient) on a compiled
    # CPU kernel that packs no image patches.
    conv_forward: str = "xla"
    # 'split': each decoder block's first conv takes [skip, up] as two convs
    # with the two halves of its kernel, summed: no concatenated copy (CPU).
    skip_conv: str = "concat"
    upsample: str = "transposed_conv"
    up_kernel_size: int = 2
    up_stride: int = 2
    up_padding: int = 0
    up_output_padding: int = 0
    num_convs: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Recompute conv-block activations in the backward pass (less memory).
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim < 3:
            raise ValueError(f"expected x of shape [B, *spatial, C]; got {x.shape}.")
        self.check_input_shape(x.shape[1:-1])
        shared = {
            "depth": self.depth,
            "base_width": self.base_width,
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "norm": self.norm,
            "num_convs": self.num_convs,
            "num_groups": self.num_groups,
            "batch_norm_relu": self.batch_norm_relu,
            "conv_filter_gradient": self.conv_filter_gradient,
            "conv_forward": self.conv_forward,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "remat": self.remat,
        }
        features = Encoder(
            downsample=self.downsample,
            max_pool_gradient=self.max_pool_gradient,
            name="encoder",
            **shared,
        )(x, train=train)
        y = Decoder(
            skip_conv=self.skip_conv,
            upsample=self.upsample,
            up_kernel_size=self.up_kernel_size,
            up_stride=self.up_stride,
            up_padding=self.up_padding,
            up_output_padding=self.up_output_padding,
            name="decoder",
            **shared,
        )(features, train=train)
        return SegmentationHead(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(y)

    def _check_config(self) -> None:
        choices = (
            ("padding", self.padding, PADDINGS),
            ("downsample", self.downsample, DOWNSAMPLE_METHODS),
            ("upsample", self.upsample, UPSAMPLE_METHODS),
        )
        for name, value, accepted in choices:
            if value not in accepted:
                raise ValueError(
                    f"{name}={value!r} is not one of {', '.join(accepted)}."
                )
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be at least 1.")

    def _block_size(self, size: int, where: str) -> int:
        if self.padding == "SAME":
            return size
        for _ in range(self.num_convs):
            try:
                size = conv_output_size(size, self.kernel_size)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        return size

    def _upsampled_size(self, size: int, level: int) -> int:
        if self.upsample == "resize_conv":
            return size * self.up_stride
        try:
            return transposed_conv_output_size(
                size,
                self.up_kernel_size,
                self.up_stride,
                self.up_padding,
                self.up_output_padding,
            )
        except ValueError as error:
            raise ValueError(f"up_{level}: {error}") from error

    def output_size(self, input_size: int) -> int:
        """Output size along one spatial dim, following the net's size formulas.

        Raises:
          ValueError: saying where, if some level cannot take its size (e.g. an
            odd size before a 2x downsampling, or a VALID conv with no room).
        """
        self._check_config()
        if input_size < 1:
            raise ValueError(f"input size {input_size} must be at least 1.")
        size, skips = input_size, []
        for level in range(self.depth + 1):
            if level > 0:
                if size % 2:
                    raise ValueError(
                        f"enc_block_{level - 1} gives odd size {size} before the 2x "
                        f"{self.downsample}."
                    )
                if self.downsample == "strided_conv":
                    size = conv_output_size(size, 2, stride=2)
                else:
                    size = pool_output_size(size, 2)
            name = "bottleneck" if level == self.depth else f"enc_block_{level}"
            size = self._block_size(size, name)
            skips.append(size)
        for level in reversed(range(self.depth)):
            up, skip = self._upsampled_size(size, level), skips[level]
            if up > skip or (self.padding == "SAME" and up != skip):
                raise ValueError(
                    f"up_{level} gives size {up}, which cannot be joined with the "
                    f"size-{skip} skip from enc_block_{level}."
                )
            size = self._block_size(up, f"dec_block_{level}")
        return size

    def is_valid_input_size(self, input_size: int) -> bool:
        """Whether `output_size(input_size)` succeeds."""
        self._check_config()  # A config error is not a size error.
        try:
            self.output_size(input_size)
        except ValueError:
            return False
        return True

    def valid_input_sizes(self, lo: int, hi: int) -> list[int]:
        """The valid input sizes n with lo <= n <= hi (both ends included)."""
        return [n for n in range(max(lo, 1), hi + 1) if self.is_valid_input_size(n)]

    def nearest_valid_input_sizes(self, n: int) -> tuple[int | None, int | None]:
        """The largest valid size below n and the smallest above; None if none."""
        # Valid sizes, where any exist, recur every 2**depth well within this span.
        span = 2**self.depth * (8 + 8 * self.num_convs * self.kernel_size)
        below = range(n - 1, max(n - span, 0), -1)
        above = range(max(n + 1, 1), n + span)
        return (
            next((m for m in below if self.is_valid_input_size(m)), None),
            next((m for m in above if self.is_valid_input_size(m)), None),
        )

    def check_input_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Returns the output spatial shape, or raises a ValueError that names the
        nearest valid sizes (and their outputs) for each unusable axis."""
        self._check_config()
        out = []
        for axis, n in enumerate(spatial_shape):
            try:
                out.append(self.output_size(n))
            except ValueError as error:
                nearest = [m for m in self.nearest_valid_input_sizes(n) if m]
                options = ", ".join(f"{m} (-> {self.output_size(m)})" for m in nearest)
                raise ValueError(
                    f"input size {n} along axis {axis} is not valid for a "
                    f"{self.padding} U-Net of depth {self.depth}; nearest valid "
                    f"sizes: {options or 'none found'}. Pad or crop the input to "
                    f"one of them. Cause: {error}"
                ) from error
        return tuple(out)
