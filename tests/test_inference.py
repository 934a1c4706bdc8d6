"""Whole-image, sliding-window and overlap-tile inference against direct prediction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import inference


@dataclasses.dataclass(frozen=True)
class ValidBoxFilter:
    """Two VALID 3x3 box filters: output = input - 4 per axis, any size > 4."""

    def output_size(self, n: int) -> int:
        return n - 4

    def is_valid_input_size(self, n: int) -> bool:
        return n > 4

    def __call__(self, images: jax.Array) -> jax.Array:
        channels = images.shape[-1]
        kernel = jnp.ones((3, 3, 1, channels)) / 9.0
        for _ in range(2):
            images = jax.lax.conv_general_dilated(
                images,
                kernel,
                (1, 1),
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        return images


@dataclasses.dataclass(frozen=True)
class StridedSame:
    """A SAME net of total stride 8: sizes must be multiples of 8."""

    def output_size(self, n: int) -> int:
        return n

    def is_valid_input_size(self, n: int) -> bool:
        return n % 8 == 0

    def __call__(self, images):
        assert images.shape[1] % 8 == 0 and images.shape[2] % 8 == 0
        return jnp.concatenate([images, 2 * images], axis=-1)


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("size, tile", [((37, 50), 16), ((16, 16), 16), ((9, 30), 7)])
def test_overlap_tile_equals_prediction_on_mirror_padded_whole_image(size, tile):
    net = ValidBoxFilter()
    images = _images((2, *size, 3))
    tiled = inference.predict_overlap_tile(net, images, net, tile_output_size=tile)
    padded = jnp.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    np.testing.assert_allclose(tiled, net(padded), atol=1e-5)
    assert tiled.shape == images.shape


def test_overlap_tile_rejects_an_unreachable_output_size():
    class EvenOnly(ValidBoxFilter):
        def is_valid_input_size(self, n):
            return n > 4 and n % 2 == 0

    with pytest.raises(ValueError, match="exactly 7"):
        inference.input_size_for_output(EvenOnly(), 7)


def test_whole_image_pads_to_a_valid_size_and_crops_back():
    net = StridedSame()
    images = _images((1, 21, 30, 2))
    logits = inference.predict_whole(net, images, net)
    np.testing.assert_allclose(
        logits, net.__class__.__call__(net, _pad8(images))[:, :21, :30]
    )


def _pad8(images):
    return jnp.pad(images, [(0, 0), (0, 3), (0, 2), (0, 0)], mode="reflect")


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_sliding_window_of_a_pointwise_net_equals_whole_image(overlap):
    net = StridedSame()
    images = _images((2, 40, 57, 1))
    windowed = inference.predict_sliding_window(
        net, images, net, window_size=16, overlap=overlap
    )
    np.testing.assert_allclose(
        windowed, net(_pad_to(images, 40, 64))[:, :, :57], atol=1e-5
    )


def _pad_to(images, height, width):
    pads = [(0, 0), (0, height - images.shape[1]), (0, width - images.shape[2]), (0, 0)]
    return jnp.pad(images, pads, mode="reflect")


def test_sliding_window_on_an_image_smaller_than_the_window():
    net = StridedSame()
    images = _images((1, 10, 12, 1))
    windowed = inference.predict_sliding_window(
        net, images, net, window_size=16, overlap=0.25
    )
    assert windowed.shape == (1, 10, 12, 2)
    np.testing.assert_allclose(windowed[..., :1], images, atol=1e-5)


def test_blending_weights_peak_at_the_window_centre():
    weights = np.asarray(inference._blending_weights((9, 9)))
    assert weights.argmax() == 4 * 9 + 4
    assert weights[0, 0] < weights[4, 4]


def test_inference_works_under_jit_and_for_3d():
    net = StridedSame()
    images = _images((1, 8, 12, 9, 1))
    logits = jax.jit(lambda x: inference.predict_whole(net, x, net))(images)
    assert logits.shape == (1, 8, 12, 9, 2)


class SameBoxFilter(StridedSame):
    """A 5x5 SAME box filter: depends on neighbours, so seams would show."""

    def __call__(self, images):
        kernel = jnp.ones((5, 5, 1, images.shape[-1])) / 25.0
        return jax.lax.conv_general_dilated(
            images,
            kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=images.shape[-1],
        )


def test_sliding_window_covering_the_image_equals_whole_image():
    net = SameBoxFilter()
    images = _images((2, 24, 32, 3))
    whole = inference.predict_whole(net, images, net)
    windowed = inference.predict_sliding_window(
        net, images, net, window_size=32, overlap=0.25
    )
    np.testing.assert_allclose(windowed, whole, atol=1e-5)
