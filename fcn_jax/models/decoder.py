"""The U-Net expanding path: upsample, join the skip, conv block, level by level."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.layers import (
    SKIP_CONVS,
    Upsample,
    center_crop,
    conv_block_class,
)


def _match_skip(skip: jax.Array, up: jax.Array, padding: str, level: int) -> jax.Array:
    """Centre-crops skip [B, *S, C] to up's spatial size (needed with 'VALID')."""
    skip_size, up_size = skip.shape[1:-1], up.shape[1:-1]
    if skip_size == up_size:
        return skip
    if padding == "SAME":
        raise ValueError(
            f"decoder level {level}: the upsampled size {up_size} differs from the "
            f"skip size {skip_size}. With 'SAME' padding every input size must be a "
            "multiple of 2**depth (pad the input) and the upsampling must double it."
        )
    if any(u > s for u, s in zip(up_size, skip_size)):
        raise ValueError(
            f"decoder level {level}: the upsampled size {up_size} exceeds the skip "
            f"size {skip_size}, so the skip cannot be cropped to it."
        )
    return center_crop(skip, up_size)


class Decoder(nn.Module):
    """Expanding path: features {stride: [B, *S_i, C_i]} -> [B, *S', base_width].

    Level i (depth-1..0) upsamples to base_width * 2**i channels, centre-crops the
    stride-2**i skip to the upsampled size, concatenates [skip, up] on channels
    and applies a conv block. `skip_conv='split'` gives the block (skip, up),
    whose first conv takes them as their concatenation without making it (same
    parameters and outputs; faster on CPU). In 'SAME' mode sizes must match exactly (odd sizes
    raise ValueError rather than being silently padded). Submodules, in data-flow
    order: up_{depth-1}, dec_block_{depth-1}, ..., up_0, dec_block_0.
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
    skip_conv: str = "concat"
    upsample: str = "transposed_conv"
    up_kernel_size: int = 2
    up_stride: int = 2
    up_padding: int = 0
    up_output_padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, features: dict[int, jax.Array], *, train: bool) -> jax.Array:
        if self.skip_conv not in SKIP_CONVS:
            raise ValueError(
                f"skip_conv={self.skip_conv!r} is not one of {', '.join(SKIP_CONVS)}."
            )
        x = features[2**self.depth]
        for level in reversed(range(self.depth)):
            width = self.base_width * 2**level
            up = Upsample(
                width,
                method=self.upsample,
                kernel_size=self.up_kernel_size,
                stride=self.up_stride,
                padding=self.up_padding,
                output_padding=self.up_output_padding,
                conv_filter_gradient=self.conv_filter_gradient,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"up_{level}",
            )(x)
            skip = _match_skip(features[2**level], up, self.padding, level)
            if self.skip_conv == "split":
                x = (skip, up)
            else:
                x = jnp.concatenate([skip, up], axis=-1)
            x = conv_block_class(self.remat)(
                width,
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
                name=f"dec_block_{level}",
            )(x, train)
        return x
