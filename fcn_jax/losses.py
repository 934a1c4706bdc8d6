"""Segmentation losses: cross-entropy with ignore label and class weights, soft Dice."""

import jax
import jax.numpy as jnp


def _pixel_weights(
    labels: jax.Array,
    *,
    num_classes: int,
    ignore_label: int,
    mask: jax.Array | None,
) -> jax.Array:
    """Float32 weights [B, *spatial]: 0 at ignored, out-of-range or masked pixels."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    weights = valid.astype(jnp.float32)
    if mask is not None:
        weights = weights * mask.astype(jnp.float32)
    return weights


def _safe_divide(
    numerator: jax.Array, denominator: jax.Array, default: float
) -> jax.Array:
    """numerator / denominator, `default` where the denominator is 0."""
    # The inner where keeps the untaken branch finite so its gradient is not NaN.
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), default)


def _check_classes(logits: jax.Array, num_classes: int) -> None:
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[-1]} classes, expected num_classes="
            f"{num_classes}."
        )


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int,
    class_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Weighted mean softmax cross-entropy over valid pixels.

    The mean is sum(w_y * m * ce) / sum(w_y * m), as in PyTorch, so class weights
    rescale pixels relative to each other, not the loss as a whole.

    Args:
      logits: [B, *spatial, K], any float dtype; computed in float32.
      labels: int [B, *spatial]; `ignore_label` and labels outside [0, K) count
        nowhere.
      ignore_label: label value of pixels to skip.
      class_weights: optional [K] weight per true class.
      mask: optional [B, *spatial], 1 at valid pixels, 0 at padding; other values
        act as per-pixel weights.

    Returns:
      Scalar float32 loss; 0 when no pixel is valid.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    weights = _pixel_weights(
        labels, num_classes=num_classes, ignore_label=ignore_label, mask=mask
    )
    # A one-hot product instead of a gather: XLA fuses it into the log-softmax
    # (a gather of the true-class logit costs a separate pass on the CPU). Ignored
    # labels (often 255) get an all-zero row and weight 0.
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        weights = weights * jnp.sum(one_hot * class_weights, axis=-1)
    true_logit = jnp.sum(one_hot * logits, axis=-1)
    per_pixel = jax.nn.logsumexp(logits, axis=-1) - true_logit
    # where, not a product, so non-finite logits at padded pixels cannot leak.
    total = jnp.sum(jnp.where(weights > 0, per_pixel * weights, 0.0))
    return _safe_divide(total, jnp.sum(weights), 0.0)


def soft_dice_from_probs(
    probs: jax.Array,
    onehot_targets: jax.Array,
    *,
    weights: jax.Array,
    epsilon: float,
) -> jax.Array:
    """Per-class soft Dice (2 sum(p t) + eps) / (sum(p) + sum(t) + eps).

    Sums run over batch and space, each pixel scaled by `weights`. A class with
    no predicted and no target mass is 0/0 when epsilon is 0; it gets Dice 1,
    the limit of the smoothed formula as both sums vanish (nothing to find,
    nothing found). Any predicted mass on an absent class gives Dice 0 at
    epsilon 0, which is why a small positive epsilon is the usual choice.

    Args:
      probs: [B, *spatial, K] class probabilities.
      onehot_targets: [B, *spatial, K] one-hot (or soft) targets.
      weights: [B, *spatial], 0 at ignored or padded pixels.
      epsilon: smoothing added to numerator and denominator.

    Returns:
      Dice per class, float32 [K].
    """
    weights = weights.astype(jnp.float32)[..., None]
    # where, not only a product, so non-finite values at padded pixels cannot leak.
    keep = weights > 0
    probs = jnp.where(keep, probs.astype(jnp.float32), 0.0)
    targets = jnp.where(keep, onehot_targets.astype(jnp.float32), 0.0)
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(weights * probs * targets, axis=axes)
    denominator = (
        jnp.sum(weights * probs, axis=axes)
        + jnp.sum(weights * targets, axis=axes)
        + epsilon
    )
    return _safe_divide(2.0 * intersection + epsilon, denominator, 1.0)


def soft_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    ignore_label: int,
    epsilon: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """1 - mean over classes of the soft Dice of softmax probabilities.

    Ignored and masked pixels are left out of both the predicted and the target
    sums. See `soft_dice_from_probs` for classes absent when epsilon is 0.

    Args:
      logits: [B, *spatial, K]; computed in float32.
      labels: int [B, *spatial].

    Returns:
      Scalar float32 loss in [0, 1].
    """
    _check_classes(logits, num_classes)
    weights = _pixel_weights(
        labels, num_classes=num_classes, ignore_label=ignore_label, mask=mask
    )
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    targets = jax.nn.one_hot(jnp.where(weights > 0, labels, 0), num_classes)
    dice = soft_dice_from_probs(probs, targets, weights=weights, epsilon=epsilon)
    return 1.0 - jnp.mean(dice)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    ignore_label: int,
    cross_entropy_weight: float = 1.0,
    dice_weight: float = 0.0,
    dice_epsilon: float = 1.0,
    class_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """cross_entropy_weight * CE + dice_weight * Dice loss.

    Both parts are always computed so they can be logged whatever their weights.

    Args:
      logits: [B, *spatial, K]; computed in float32.
      labels: int [B, *spatial].

    Returns:
      (scalar loss, {'cross_entropy': scalar, 'dice': scalar}).
    """
    _check_classes(logits, num_classes)
    cross_entropy = cross_entropy_loss(
        logits,
        labels,
        ignore_label=ignore_label,
        class_weights=class_weights,
        mask=mask,
    )
    dice = soft_dice_loss(
        logits,
        labels,
        num_classes=num_classes,
        ignore_label=ignore_label,
        epsilon=dice_epsilon,
        mask=mask,
    )
    loss = cross_entropy_weight * cross_entropy + dice_weight * dice
    return loss, {"cross_entropy": cross_entropy, "dice": dice}
