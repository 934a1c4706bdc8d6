"""Checkerboard analysis: coverage theory, its measurement, the layer finder, PNG."""

import itertools

import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module
from PIL import Image

from fcn_jax import models
from fcn_jax.analysis import checkerboard


def _model(config_file: str, **overrides):
    config = load_config_module(REPO_ROOT / "configs" / config_file).get_config(
        "runlocal"
    )
    for key, value in overrides.items():
        config.model[key] = value
    return models.create_model(config.model)


@pytest.mark.parametrize("rank", [1, 2])
def test_coverage_is_flat_exactly_when_stride_divides_kernel(rank):
    for k, s, p in itertools.product(range(1, 7), range(1, 5), range(3)):
        coverage = checkerboard.phase_coverage(k, s, p, rank=rank)
        assert coverage.counts.shape == (s,) * rank
        # Each interior pixel of the input spreads all k ** rank taps over phases.
        assert coverage.counts.sum() == k**rank
        assert (coverage.variance == 0) == (k % s == 0), (k, s, p)
        assert coverage.uneven == (k % s != 0)


def test_padding_shifts_the_favoured_phase():
    unpadded = checkerboard.phase_coverage(3, 2, 0, rank=1).counts
    padded = checkerboard.phase_coverage(3, 2, 1, rank=1).counts
    np.testing.assert_array_equal(unpadded, [2, 1])
    np.testing.assert_array_equal(padded, [1, 2])


@pytest.mark.parametrize(
    "k,s,p,o,rank",
    [
        (3, 2, 0, 0, 2),
        (4, 2, 0, 0, 2),
        (3, 2, 1, 1, 2),
        (4, 2, 1, 0, 2),
        (5, 3, 1, 2, 2),
        (2, 2, 0, 0, 2),
        (6, 4, 2, 0, 1),
        (3, 3, 0, 0, 1),
        (3, 2, 0, 0, 3),
    ],
)
def test_measured_pattern_matches_theory(k, s, p, o, rank):
    in_channels = 3
    pattern = checkerboard.empirical_pattern(
        k, s, p, o, rank=rank, in_channels=in_channels
    )
    expected = in_channels * checkerboard.phase_coverage(k, s, p, rank=rank).counts
    np.testing.assert_allclose(pattern.phase_mean, expected, rtol=1e-6)
    # Every period of the interior repeats the phase pattern exactly.
    tile = np.tile(expected, (checkerboard.TILE_PERIODS,) * rank)
    np.testing.assert_allclose(pattern.tile, tile, rtol=1e-6)
    if k % s:
        assert pattern.relative_variation > 0
    else:
        assert pattern.relative_variation == pytest.approx(0, abs=1e-6)


def test_checkerboard_and_flat_numbers():
    checker = checkerboard.empirical_pattern(3, 2, rank=2, in_channels=1, size=16)
    flat = checkerboard.empirical_pattern(4, 2, rank=2, in_channels=1, size=16)
    np.testing.assert_allclose(checker.phase_mean, [[4, 2], [2, 1]])
    assert checker.relative_variation == pytest.approx(3 / 2.25)
    np.testing.assert_allclose(flat.phase_mean, [[4, 4], [4, 4]])
    assert flat.relative_variation == pytest.approx(0, abs=1e-6)


def test_too_small_input_is_rejected():
    with pytest.raises(ValueError, match="interior periods"):
        checkerboard.empirical_pattern(3, 2, rank=1, size=4)


def test_finds_unet_up_convs():
    calls = checkerboard.find_transposed_convs(_model("unet.py"), (1, 32, 32, 1))
    # runlocal has depth 2: one Upsample per decoder level.
    assert [c.name for c in calls] == [
        "decoder/up_1/conv_transpose",
        "decoder/up_0/conv_transpose",
    ]
    assert {(c.kernel_size, c.stride, c.padding) for c in calls} == {(2, 2, 0)}
    assert [c.input_shape[1:3] for c in calls] == [(8, 8), (16, 16)]


def test_finds_fcn8s_upscores():
    model = _model("fcn8s.py")
    calls = checkerboard.find_transposed_convs(model, (1, 32, 32, 3))
    found = [(c.name, c.kernel_size, c.stride, c.padding) for c in calls]
    assert found == [
        ("upscore2", 4, 2, 1),
        ("upscore_pool4", 4, 2, 1),
        ("upscore8", 16, 8, 4),
    ]
    report = checkerboard.checkerboard_report(model, (1, 32, 32, 3))
    # FCN's upscores use kernel 2f and stride f, so coverage is flat.
    assert all(not layer.uneven and layer.variance == 0 for layer in report)
    assert all(layer.relative_variation == 0 for layer in report)
    assert "upscore8: k=16 s=8 p=4" in checkerboard.format_report(report)


def test_resize_conv_has_no_transposed_convs():
    model = _model("unet.py", upsample="resize_conv")
    report = checkerboard.checkerboard_report(model, (1, 32, 32, 1))
    assert report == []
    assert checkerboard.format_report(report).startswith("no transposed convs")


@pytest.mark.parametrize("rank,size", [(1, (8 * 16, 2 * 16)), (2, (128, 128))])
def test_png_has_expected_size(tmp_path, rank, size):
    pattern = checkerboard.empirical_pattern(3, 2, rank=rank, in_channels=1)
    path = tmp_path / "pattern.png"
    assert checkerboard.write_pattern_png(pattern.tile, path) == size
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image)
    # k=3, s=2: the weakest phase has 1/4 (2D) or 1/2 (1D) of the peak coverage.
    assert pixels.max() == 255
    assert pixels.min() == {1: 128, 2: 64}[rank]


def test_png_of_3d_pattern_is_its_central_slice(tmp_path):
    pattern = checkerboard.empirical_pattern(3, 2, rank=3, in_channels=1)
    size = checkerboard.write_pattern_png(pattern.tile, tmp_path / "p.png", 4)
    assert size == (4 * 8, 4 * 8)
