"""FCN: Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 (arXiv:1411.4038)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from fcn_jax.models.backbones import (
    ConvNormReLU,
    SameSizeGeometry,
    create_backbone,
    pad_to_multiple,
)
from fcn_jax.models.layers import TransposedConv, center_crop

VARIANTS = ("32s", "16s", "8s")
TOTAL_STRIDE = 32


def bilinear_kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32):
    """Transposed-conv kernel [*k, C_in, C_out] that upsamples bilinearly.

    Each spatial axis gets the triangle 1 - |a - c| / f with f = ceil(k / 2) and
    c its centre; channel i maps to channel i only (zero off the diagonal). With
    kernel 2f, stride f and padding f / 2, it is half-pixel-aligned bilinear
    interpolation by f away from the borders.
    """
    del key  # Deterministic.
    *kernel_size, c_in, c_out = shape
    weights = np.ones((), np.float64)
    for k in kernel_size:
        factor = (k + 1) // 2
        centre = factor - 1 if k % 2 else factor - 0.5
        triangle = 1 - np.abs(np.arange(k) - centre) / factor
        weights = np.multiply.outer(weights, triangle)
    kernel = weights[..., None, None] * np.eye(c_in, c_out)
    return jnp.asarray(kernel, dtype)


class BilinearTransposedConv(TransposedConv):
    """`TransposedConv` whose kernel starts as `bilinear_kernel_init`."""

    def param(self, name, init_fn, *init_args, **init_kwargs):
        if name == "kernel":
            init_fn = bilinear_kernel_init
        return super().param(name, init_fn, *init_args, **init_kwargs)


class FCN(SameSizeGeometry, nn.Module):
    """FCN-32s / 16s / 8s (`variant`): [B, *S, C] -> float32 logits [B, *S, K].

    The backbone's pool5 goes through fc6 (fc6_kernel_size conv) and fc7 (1x1),
    both of fc_width channels, to score_fr. 32s upsamples it by 32 (upscore32).
    16s upsamples it by 2 (upscore2), adds score_pool4 (fuse_pool4) and
    upsamples by 16 (upscore16). 8s upsamples fuse_pool4 by 2 (upscore_pool4),
    adds score_pool3 (fuse_pool3) and upsamples by 8 (upscore8). Every upscore
    is a transposed conv (kernel 2f, stride f, padding f / 2) initialised to
    bilinear interpolation; score_pool4 and score_pool3 start at zero, so a
    finer variant starts as the coarser one (the paper's net surgery).

    Sizes: the input is zero-padded to a multiple of 32 and the logits are
    centre-cropped back, so any size works and S' = S.
    """

    num_classes: int
    variant: str = "8s"
    backbone: str = "vgg"
    base_width: int = 64
    max_width: int = 512
    vgg_num_convs: Sequence[int] = (2, 2, 3, 3, 3)
    resnet_stage_sizes: Sequence[int] = (2, 2, 2, 2)
    fc_width: int = 4096
    fc6_kernel_size: int = 7
    norm: str = "batch"
    num_groups: int = 8
    max_pool_gradient: str = "xla"
    # 'fused': VGG's BatchNorm + ReLU as one op with a hand-written gradient;
    # 'kernel': its per-channel sums on compiled CPU kernels too.
    batch_norm_relu: str = "xla"
    # 'direct': 2D/1D conv filter gradients on a compiled CPU kernel.
    conv_filter_gradient: str = "xla"
    # 'direct': VGG's stride-1 convs (forward and input gradient) on one too.
    conv_forward: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant={self.variant!r} is not one of {', '.join(VARIANTS)}."
            )
        spatial = self.check_input_shape(x.shape[1:-1])
        features = create_backbone(
            self.backbone,
            base_width=self.base_width,
            max_width=self.max_width,
            vgg_num_convs=self.vgg_num_convs,
            resnet_stage_sizes=self.resnet_stage_sizes,
            norm=self.norm,
            num_groups=self.num_groups,
            max_pool_gradient=self.max_pool_gradient,
            batch_norm_relu=self.batch_norm_relu,
            conv_filter_gradient=self.conv_filter_gradient,
            conv_forward=self.conv_forward,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(pad_to_multiple(x, TOTAL_STRIDE), train=train)
        if max(features) != TOTAL_STRIDE:
            raise ValueError(
                f"FCN needs a stride-{TOTAL_STRIDE} backbone; this one reaches "
                f"{max(features)}."
            )
        fc = {
            "norm": self.norm,
            "num_groups": self.num_groups,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        # The paper's fully connected fc6 / fc7, recast as convolutions.
        y = ConvNormReLU(self.fc_width, self.fc6_kernel_size, name="fc6", **fc)(
            features[32], train=train
        )
        y = ConvNormReLU(self.fc_width, 1, name="fc7", **fc)(y, train=train)
        y = self._score(y, "score_fr")
        if self.variant == "32s":
            y = self._upscore(y, 32, "upscore32")
        else:
            y = self._upscore(y, 2, "upscore2")
            y = _fuse(y, self._score(features[16], "score_pool4", zero=True))
            if self.variant == "16s":
                y = self._upscore(y, 16, "upscore16")
            else:
                y = self._upscore(y, 2, "upscore_pool4")
                y = _fuse(y, self._score(features[8], "score_pool3", zero=True))
                y = self._upscore(y, 8, "upscore8")
        return center_crop(y, spatial).astype(jnp.float32)

    def _score(self, x: jax.Array, name: str, zero: bool = False) -> jax.Array:
        init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
        return nn.Conv(
            self.num_classes,
            kernel_size=(1,) * (x.ndim - 2),
            kernel_init=init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    def _upscore(self, x: jax.Array, factor: int, name: str) -> jax.Array:
        return BilinearTransposedConv(
            self.num_classes,
            kernel_size=2 * factor,
            stride=factor,
            padding=factor // 2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)


def _fuse(up: jax.Array, skip: jax.Array) -> jax.Array:
    """fuse_pool4 / fuse_pool3: the sum, after cropping both to the smaller size."""
    spatial = tuple(min(u, s) for u, s in zip(up.shape[1:-1], skip.shape[1:-1]))
    return center_crop(up, spatial) + center_crop(skip, spatial)
