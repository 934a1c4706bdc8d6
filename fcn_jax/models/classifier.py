"""Image classifier on the segmentation backbones (VGG, arXiv:1409.1556; ResNet,
arXiv:1512.03385): the translation-invariant counterpart of the dense models."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fcn_jax.models.backbones import create_backbone


class Classifier(nn.Module):
    """Backbone -> global average pool -> dense: [B, *S, C] -> float32 [B, K].

    Pooling the stride-32 features over all positions makes the prediction
    (nearly) invariant to translations of the input, where the dense models are
    equivariant. VGG's max pools drop incomplete windows, so it needs S >= 32;
    ResNet takes any size.
    """

    num_classes: int
    backbone: str = "resnet"
    base_width: int = 64
    max_width: int = 512
    vgg_num_convs: Sequence[int] = (2, 2, 3, 3, 3)
    resnet_stage_sizes: Sequence[int] = (2, 2, 2, 2)
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
        self.check_input_shape(x.shape[1:-1])
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
        )(x, train=train)
        y = features[max(features)]
        y = jnp.mean(y, axis=tuple(range(1, y.ndim - 1)))
        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc"
        )(y)
        return logits.astype(jnp.float32)

    def _min_input_size(self) -> int:
        return 2 ** len(self.vgg_num_convs) if self.backbone == "vgg" else 1

    def is_valid_input_size(self, input_size: int) -> bool:
        """Whether the backbone keeps at least one position at its last stride."""
        return input_size >= self._min_input_size()

    def check_input_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Returns () (the logits have no spatial dims); raises for a size too small."""
        for axis, n in enumerate(spatial_shape):
            if not self.is_valid_input_size(n):
                raise ValueError(
                    f"input size {n} along axis {axis} is below the "
                    f"{self.backbone} backbone's minimum {self._min_input_size()}; "
                    "pad the input."
                )
        return ()
