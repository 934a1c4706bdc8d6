"""The U-Net contracting path: conv blocks and 2x downsampling, features by stride."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.layers import Downsample, conv_block_class


class Encoder(nn.Module):
    """Contracting path: [B, *S, C] -> {stride: [B, *S_i, base_width * 2**i]}.

    Level i (0..depth) works at stride 2**i with base_width * 2**i channels; the
    entry at stride 2**depth is the bottleneck. Submodules, in data-flow order:
    enc_block_0, down_1, enc_block_1, ..., down_{depth}, bottleneck.
    """

    depth: int = 4
    base_width: int = 64
    kernel_size: int = 3
    padding: str = "SAME"
    norm: str = "batch"
    num_convs: int = 2
    num_groups: int = 8
    batch_norm_relu: str = "xla"
    conv_filter_gradient: str = "xla"
    conv_forward: str = "xla"
    downsample: str = "max_pool"
    max_pool_gradient: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[int, jax.Array]:
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be at least 1.")
        features = {}
        for level in range(self.depth + 1):
            if level > 0:
                x = Downsample(
                    self.downsample,
                    factor=2,
                    max_pool_gradient=self.max_pool_gradient,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"down_{level}",
                )(x)
            name = "bottleneck" if level == self.depth else f"enc_block_{level}"
            x = conv_block_class(self.remat)(
                self.base_width * 2**level,
                kernel_size=self.kernel_size,
                padding=self.padding,
                norm=self.norm,
                num_convs=self.num_convs,
                num_groups=self.num_groups,
                batch_norm_relu=self.batch_norm_relu,
                conv_filter_gradient=self.conv_filter_gradient,
                conv_forward=self.conv_forward,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x, train)
            features[2**level] = x
        return features
