"""Test-time augmentation: horizontal flips and multiple scales, averaged."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

PredictFn = Callable[[jax.Array], jax.Array]


def predict_with_augmentation(
    predict_fn: PredictFn,
    images: jax.Array,
    *,
    flip: bool,
    scales: Sequence[float],
) -> jax.Array:
    """Averages class probabilities over flips and scales.

    Args:
      predict_fn: images [B, *S', C] -> logits [B, *S', K] at the images' size
        (e.g. `inference.predict` with a mode), for any size S'.
      images: [B, *S, C].
      flip: also predict the image mirrored along its last spatial axis (width)
        and mirror the prediction back.
      scales: input rescaling factors; images are resized (multi-)linearly and
        the logits resized back to S before the softmax.

    Returns:
      log of the mean probability [B, *S, K]: its argmax is the ensemble's.
    """
    if not scales:
        raise ValueError("scales must name at least one factor, e.g. (1.0,).")
    batch, *spatial, channels = images.shape
    total, count = None, 0
    for scale in scales:
        size = tuple(max(1, round(n * scale)) for n in spatial)
        scaled = images
        if size != tuple(spatial):
            scaled = jax.image.resize(images, (batch, *size, channels), "linear")
        for mirrored in (False, True) if flip else (False,):
            x = jnp.flip(scaled, axis=-2) if mirrored else scaled
            logits = predict_fn(x)
            if mirrored:
                logits = jnp.flip(logits, axis=-2)
            if size != tuple(spatial):
                shape = (batch, *spatial, logits.shape[-1])
                logits = jax.image.resize(logits, shape, "linear")
            probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            total = probabilities if total is None else total + probabilities
            count += 1
    return jnp.log(jnp.maximum(total / count, jnp.finfo(jnp.float32).tiny))
