"""Prediction heads that turn decoder features into per-pixel logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype


class SegmentationHead(nn.Module):
    """A 1x1 conv scoring every pixel: [B, *S, C] -> float32 logits [B, *S, K].

    The logits are cast to float32 whatever the compute dtype, so the loss and
    softmax never run in half precision.
    """

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        logits = nn.Conv(
            self.num_classes,
            kernel_size=(1,) * (x.ndim - 2),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        return logits.astype(jnp.float32)
