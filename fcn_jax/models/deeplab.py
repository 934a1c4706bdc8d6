"""DeepLabv3: Chen et al., "Rethinking Atrous Convolution for Semantic Image
Segmentation", 2017 (arXiv:1706.05587), with the optional DeepLabv3+ decoder
of Chen et al., ECCV 2018 (arXiv:1802.02611)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.aspp import ASPP
from fcn_jax.models.backbones import (
    ConvNormReLU,
    ResNetEncoder,
    SameSizeGeometry,
    pad_to_multiple,
)
from fcn_jax.models.heads import SegmentationHead
from fcn_jax.models.layers import ConvBlock, Resize, center_crop

# aspp_rates are given for this output stride and scaled for the others.
REFERENCE_OUTPUT_STRIDE = 16
LOW_LEVEL_STRIDE = 4


def _resize(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """Bilinear (half-pixel-aligned) resize of [B, *S, C] to [B, *spatial, C]."""
    return Resize("linear")(x, spatial)


class DeepLabV3(SameSizeGeometry, nn.Module):
    """DeepLabv3: [B, *S, C] -> float32 logits [B, *S, K].

    An atrous ResNetEncoder (`backbone`) at `output_stride` 8 or 16, ASPP
    (`aspp`) with rates aspp_rates * 16 / output_stride (so (6, 12, 18) at 16
    becomes (12, 24, 36) at 8) and, with `image_pooling`, its image-level
    branch, a 1x1 classifier (`classifier`) and bilinear upsampling of the
    logits. With `decoder` (DeepLabv3+), the ASPP output is
    upsampled to stride 4, joined with the stride-4 features reduced by a 1x1
    conv (`low_level_proj`), refined by two 3x3 convs (`decoder_block`) and
    classified there.

    Sizes: the input is zero-padded to a multiple of output_stride and the
    logits are centre-cropped back, so any size works and S' = S.
    """

    num_classes: int
    output_stride: int = 16
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    multi_grid: Sequence[int] = ()
    aspp_features: int = 256
    aspp_rates: Sequence[int] = (6, 12, 18)
    image_pooling: bool = True
    decoder: bool = False
    low_level_features: int = 48
    decoder_features: int = 256
    norm: str = "batch"
    num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        spatial = self.check_input_shape(x.shape[1:-1])
        x = pad_to_multiple(x, self.output_stride)
        shared = {
            "norm": self.norm,
            "num_groups": self.num_groups,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        features = ResNetEncoder(
            stage_sizes=tuple(self.stage_sizes),
            base_width=self.base_width,
            output_stride=self.output_stride,
            multi_grid=tuple(self.multi_grid),
            name="backbone",
            **shared,
        )(x, train=train)
        y = ASPP(
            self.aspp_features,
            rates=self.scaled_rates(),
            image_pooling=self.image_pooling,
            name="aspp",
            **shared,
        )(features[self.output_stride], train=train)
        if self.decoder:
            low = ConvNormReLU(
                self.low_level_features, kernel_size=1, name="low_level_proj", **shared
            )(features[LOW_LEVEL_STRIDE], train=train)
            y = _resize(y, low.shape[1:-1])
            y = ConvBlock(
                self.decoder_features, num_convs=2, name="decoder_block", **shared
            )(jnp.concatenate([low, y], axis=-1), train=train)
        logits = SegmentationHead(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(y)
        return center_crop(_resize(logits, x.shape[1:-1]), spatial)

    def scaled_rates(self) -> tuple[int, ...]:
        """The ASPP rates at this output stride."""
        scale = REFERENCE_OUTPUT_STRIDE / self.output_stride
        return tuple(max(1, round(rate * scale)) for rate in self.aspp_rates)
