"""Test-time augmentation against what flips and scales must leave unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import tta


def _pointwise(images):
    """A per-pixel classifier: commutes with flips, and with resizing up to
    interpolation of its (linear) logits."""
    return jnp.concatenate([images, -images], axis=-1)


def _images():
    return jax.random.normal(jax.random.key(0), (2, 12, 16, 1))


def test_plain_call_returns_log_softmax_of_the_prediction():
    images = _images()
    out = tta.predict_with_augmentation(_pointwise, images, flip=False, scales=(1.0,))
    np.testing.assert_allclose(out, jax.nn.log_softmax(_pointwise(images)), atol=1e-5)


def test_flip_of_a_flip_equivariant_net_changes_nothing():
    images = _images()
    out = tta.predict_with_augmentation(_pointwise, images, flip=True, scales=(1.0,))
    np.testing.assert_allclose(out, jax.nn.log_softmax(_pointwise(images)), atol=1e-5)


def test_flip_undoes_the_mirror_for_a_position_dependent_net():
    images = jnp.zeros((1, 4, 6, 1))

    def left_half_is_class_one(x):
        column = jnp.arange(x.shape[2])[None, None, :, None]
        one = jnp.where(column < x.shape[2] // 2, 5.0, -5.0) + 0 * x
        return jnp.concatenate([-one, one], axis=-1)

    out = tta.predict_with_augmentation(
        left_half_is_class_one, images, flip=True, scales=(1.0,)
    )
    # Mirrored back, the flipped prediction says the right half is class one:
    # the average is undecided everywhere.
    np.testing.assert_allclose(jnp.exp(out), 0.5, atol=1e-5)


def test_multi_scale_of_a_constant_image_equals_single_scale():
    images = jnp.full((1, 8, 8, 1), 0.7)
    out = tta.predict_with_augmentation(
        _pointwise, images, flip=True, scales=(0.5, 1.0, 1.5)
    )
    assert out.shape == (1, 8, 8, 2)
    np.testing.assert_allclose(out, jax.nn.log_softmax(_pointwise(images)), atol=1e-5)


def test_no_scale_is_an_error():
    with pytest.raises(ValueError, match="scales"):
        tta.predict_with_augmentation(_pointwise, _images(), flip=False, scales=())
