"""Atrous Spatial Pyramid Pooling: Chen et al., "Rethinking Atrous Convolution
for Semantic Image Segmentation" (DeepLabv3), 2017 (arXiv:1706.05587)."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.backbones import ConvNormReLU


class ImagePooling(nn.Module):
    """Image-level features: global average pool -> 1x1 conv -> norm -> ReLU,
    broadcast back over the input's spatial shape: [B, *S, C] -> [B, *S, features]."""

    features: int
    norm: str = "batch"
    num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        spatial_axes = tuple(range(1, x.ndim - 1))
        pooled = jnp.mean(x, axis=spatial_axes, keepdims=True)
        pooled = ConvNormReLU(
            self.features,
            kernel_size=1,
            norm=self.norm,
            num_groups=self.num_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(pooled, train=train)
        return jnp.broadcast_to(pooled, (*x.shape[:-1], self.features))


class ASPP(nn.Module):
    """ASPP: [B, *S, C] -> [B, *S, features].

    Parallel branches, each of `features` channels: a 1x1 conv (`conv_1x1`), a
    3x3 conv of dilation r for each r in `rates` (`atrous_0`, `atrous_1`, ...)
    and, with `image_pooling`, image pooling (`image_pool`); concatenated and
    projected by a 1x1 conv (`project`). Every conv is followed by norm and
    ReLU. Image pooling makes every output depend on the whole input, so
    without it the module is translation equivariant.
    """

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    norm: str = "batch"
    num_groups: int = 8
    image_pooling: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if any(rate < 1 for rate in self.rates):
            raise ValueError(f"rates={tuple(self.rates)} must be positive.")
        shared = {
            "norm": self.norm,
            "num_groups": self.num_groups,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        branch = functools.partial(ConvNormReLU, self.features, **shared)
        branches = [branch(kernel_size=1, name="conv_1x1")(x, train=train)]
        for i, rate in enumerate(self.rates):
            atrous = branch(kernel_size=3, dilation=rate, name=f"atrous_{i}")
            branches.append(atrous(x, train=train))
        if self.image_pooling:
            pool = ImagePooling(self.features, name="image_pool", **shared)
            branches.append(pool(x, train=train))
        y = jnp.concatenate(branches, axis=-1)
        return branch(kernel_size=1, name="project")(y, train=train)
