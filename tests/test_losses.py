"""Tests for fcn_jax.losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import losses

IGNORE = 255
NUM_CLASSES = 3


def _random_batch(seed: int, shape: tuple[int, ...] = (2, 5, 4)):
    """Logits [*shape, K], labels with ~25% ignored, mask with ~25% zeros."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=shape)
    labels = np.where(rng.random(shape) < 0.25, IGNORE, labels)
    mask = (rng.random(shape) > 0.25).astype(np.float32)
    return logits, labels, mask


LOSSES = {
    "cross_entropy": functools.partial(losses.cross_entropy_loss, ignore_label=IGNORE),
    "cross_entropy_weighted": functools.partial(
        losses.cross_entropy_loss,
        ignore_label=IGNORE,
        class_weights=jnp.array([0.5, 2.0, 1.0]),
    ),
    "dice": functools.partial(
        losses.soft_dice_loss, num_classes=NUM_CLASSES, ignore_label=IGNORE
    ),
    "combined": lambda *args, **kwargs: losses.segmentation_loss(
        *args,
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE,
        dice_weight=0.5,
        **kwargs,
    )[0],
}


@pytest.mark.parametrize("use_weights", [False, True])
def test_binary_dice_gradient_matches_closed_form(use_weights):
    # For 1 - D with D = 2 sum(w p t) / S, S = sum(w p) + sum(w t):
    # d(1 - D)/dp_k = w_k (D - 2 t_k) / S.
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.uniform(0.05, 0.95, size=(2, 6, 5)), jnp.float32)
    t = jnp.asarray(rng.random((2, 6, 5)) < 0.4, jnp.float32)
    # Fractional weights with some zeros, as a soft mask with padding.
    w = rng.random((2, 6, 5)) * (rng.random((2, 6, 5)) < 0.7)
    w = jnp.asarray(w if use_weights else np.ones((2, 6, 5)), jnp.float32)

    def dice(p):
        return losses.soft_dice_from_probs(
            p[..., None], t[..., None], weights=w, epsilon=0.0
        )[0]

    grad = jax.grad(lambda p: 1.0 - dice(p))(p)
    d = dice(p)
    s = jnp.sum(w * p) + jnp.sum(w * t)
    np.testing.assert_allclose(grad, w * (d - 2 * t) / s, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_and_masked_pixels_change_nothing(name):
    loss_fn = LOSSES[name]
    logits, labels, mask = _random_batch(1)
    unused = (labels == IGNORE) | (mask == 0)
    noise = 100.0 * np.random.default_rng(2).normal(size=logits.shape)
    perturbed = np.where(unused[..., None], logits + noise, logits)

    loss = loss_fn(logits, labels, mask=mask)
    np.testing.assert_allclose(loss_fn(perturbed, labels, mask=mask), loss, rtol=1e-6)
    grad = jax.grad(lambda x: loss_fn(x, labels, mask=mask))(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[unused] == 0)
    assert np.any(np.asarray(grad)[~unused] != 0)


def test_cross_entropy_by_hand_with_class_weights():
    # Pixel 1: logits (0, 0), label 0 -> ln 2. Pixel 2: logits (ln 3, 0),
    # label 1 -> ln 4. Pixel 3 is ignored. Weights (1, 3):
    # (1 ln 2 + 3 ln 4) / (1 + 3) = 7/4 ln 2.
    logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0], [9.0, -9.0]]])
    labels = jnp.array([[0, 1, IGNORE]])
    loss = losses.cross_entropy_loss(
        logits, labels, ignore_label=IGNORE, class_weights=jnp.array([1.0, 3.0])
    )
    np.testing.assert_allclose(loss, 7 / 4 * np.log(2.0), rtol=1e-6)


def test_cross_entropy_matches_numpy_on_random_data():
    logits, labels, mask = _random_batch(3)
    class_weights = np.array([0.5, 2.0, 1.0])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = (labels != IGNORE) & (mask > 0)
    safe = np.where(valid, labels, 0)
    nll = -np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
    w = class_weights[safe] * valid
    expected = (w * nll).sum() / w.sum()
    loss = losses.cross_entropy_loss(
        logits, labels, ignore_label=IGNORE, class_weights=class_weights, mask=mask
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("epsilon", [1.0, 0.0])
@pytest.mark.parametrize("case", ["all_ignored", "all_masked"])
def test_no_valid_pixel_gives_zero_loss(epsilon, case):
    logits, labels, _ = _random_batch(4)
    if case == "all_ignored":
        labels, mask = np.full_like(labels, IGNORE), None
    else:
        mask = np.zeros(labels.shape)

    def total(logits):
        return losses.segmentation_loss(
            logits,
            labels,
            num_classes=NUM_CLASSES,
            ignore_label=IGNORE,
            dice_weight=1.0,
            dice_epsilon=epsilon,
            mask=mask,
        )

    loss, parts = total(logits)
    assert float(loss) == 0.0
    assert float(parts["cross_entropy"]) == 0.0
    assert float(parts["dice"]) == 0.0
    grad = jax.grad(lambda x: total(x)[0])(jnp.asarray(logits))
    assert np.all(np.asarray(grad) == 0)


def test_dice_loss_vanishes_for_perfect_predictions():
    _, labels, _ = _random_batch(5)
    logits = 50.0 * jax.nn.one_hot(np.where(labels == IGNORE, 0, labels), 3)
    loss = losses.soft_dice_loss(
        logits, labels, num_classes=NUM_CLASSES, ignore_label=IGNORE, epsilon=1e-6
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    wrong = losses.soft_dice_loss(
        -logits, labels, num_classes=NUM_CLASSES, ignore_label=IGNORE, epsilon=1e-6
    )
    assert float(wrong) > 0.9


def test_dice_of_class_absent_everywhere_without_smoothing_is_one():
    probs = jnp.array([[[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]]])
    targets = jnp.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    dice = losses.soft_dice_from_probs(
        probs, targets, weights=jnp.ones((1, 2)), epsilon=0.0
    )
    # Class 0: 2 * 1 / (1.3 + 1); class 1: 2 * 0.7 / (0.7 + 1); class 2: 0/0.
    np.testing.assert_allclose(dice, [2 / 2.3, 1.4 / 1.7, 1.0], rtol=1e-6)
    grad = jax.grad(
        lambda p: losses.soft_dice_from_probs(
            p, targets, weights=jnp.ones((1, 2)), epsilon=0.0
        ).mean()
    )(probs)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("shape", [(2, 7), (1, 3, 4, 2)])
def test_segmentation_loss_is_weighted_sum_for_any_rank(shape):
    logits, labels, mask = _random_batch(6, shape)
    loss_fn = jax.jit(
        functools.partial(
            losses.segmentation_loss,
            num_classes=NUM_CLASSES,
            ignore_label=IGNORE,
            cross_entropy_weight=0.3,
            dice_weight=2.0,
        )
    )
    loss, parts = loss_fn(logits, labels, mask=mask)
    assert set(parts) == {"cross_entropy", "dice"}
    np.testing.assert_allclose(
        loss, 0.3 * parts["cross_entropy"] + 2.0 * parts["dice"], rtol=1e-6
    )


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels, mask = _random_batch(7)
    logits = jnp.asarray(logits, jnp.bfloat16)
    loss, parts = losses.segmentation_loss(
        logits,
        labels,
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE,
        dice_weight=1.0,
        mask=mask,
    )
    assert loss.dtype == jnp.float32
    assert parts["cross_entropy"].dtype == parts["dice"].dtype == jnp.float32
    expected, _ = losses.segmentation_loss(
        logits.astype(jnp.float32),
        labels,
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE,
        dice_weight=1.0,
        mask=mask,
    )
    assert float(loss) == float(expected)
