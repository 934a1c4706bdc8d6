"""Effective receptive fields: a single conv's is its kernel; a U-Net's stays
inside the theoretical field, on noise and on real images, in 1D, 2D and 3D."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module
from PIL import Image

from fcn_jax.analysis import erf
from fcn_jax.data import pipeline
from fcn_jax.models import Classifier, create_model


class OneConv(nn.Module):
    """One SAME conv, no activation: [B, *S, C] -> [B, *S, features]."""

    kernel_size: int
    dilation: int
    features: int = 3

    @nn.compact
    def __call__(self, x, *, train):
        del train
        rank = x.ndim - 2
        return nn.Conv(
            self.features,
            (self.kernel_size,) * rank,
            kernel_dilation=self.dilation,
            padding="SAME",
        )(x)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _normal_variables(module, x):
    """The module's variables filled with standard normal values."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), shapes
    )


def _kernel_map(kernel, spatial, dilation, channel):
    """|kernel| placed at the centre: the gradient of one output unit summed
    over the chosen output channels, in absolute value, summed over inputs."""
    picked = kernel if channel is None else kernel[..., channel : channel + 1]
    taps = np.abs(picked.sum(axis=-1)).sum(axis=-1)
    half = (taps.shape[0] - 1) // 2 * dilation
    expected = np.zeros(spatial)
    index = tuple(slice(n // 2 - half, n // 2 + half + 1, dilation) for n in spatial)
    expected[index] = taps
    return expected


@pytest.mark.parametrize(
    "kernel_size,dilation,spatial",
    [(3, 1, (15, 15)), (3, 2, (15, 15)), (5, 1, (15, 15)), (5, 2, (15, 16))]
    + [(3, 2, (15,)), (3, 2, (9, 10, 11))],
)
def test_single_conv_erf_is_its_kernel(kernel_size, dilation, spatial):
    x = _noise((3, *spatial, 2))
    module = OneConv(kernel_size, dilation)
    variables = _normal_variables(module, x)
    kernel = np.asarray(variables["params"]["Conv_0"]["kernel"])
    centre = erf.centre_unit(spatial, spatial)[1]
    for channel in (None, 1):
        erf_map = erf.effective_receptive_field(module, variables, x, channel=channel)
        expected = _kernel_map(kernel, spatial, dilation, channel)
        np.testing.assert_allclose(erf_map, expected, rtol=1e-5, atol=0)
        summary = erf.summarize_erf(erf_map, centre)
        assert summary.support == (1 + (kernel_size - 1) * dilation,) * len(spatial)


def unet_receptive_field(depth: int, num_convs: int, kernel_size: int) -> int:
    """Theoretical receptive field of a SAME or VALID U-Net (input pixels).

    By r += (k - 1) * jump along the deepest path: the convs at level l (jump
    2**l) on the way down and back up, each 2x max pool (k = 2), and 2x2
    stride-2 transposed convs, which let one input unit reach each output.
    """
    convs = num_convs * (kernel_size - 1)
    down = sum((convs + 1) * 2**level for level in range(depth))
    up = sum(convs * 2**level for level in range(depth))
    return 1 + down + convs * 2**depth + up


def _init(model, x):
    # Threefry initialisers take tens of seconds to compile on XLA:CPU; the
    # RBG generator takes a few.
    key = jax.random.key(0, impl="rbg")
    return jax.jit(lambda x: model.init(key, x, train=False))(x)


@pytest.fixture(scope="module")
def unet():
    """The runlocal U-Net, its variables for 64x64 inputs and its field."""
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(
        "runlocal"
    )
    model = create_model(config.model)
    rf = unet_receptive_field(model.depth, model.num_convs, model.kernel_size)
    assert rf == 44  # The runlocal preset: depth 2, two 3x3 convs per block.
    variables = _init(model, np.zeros((1, 64, 64, len(config.data.mean))))
    return config, model, variables, rf


def _check_unet_erf(erf_map, centre, rf):
    summary = erf.summarize_erf(erf_map, centre)
    assert all(rf // 2 < extent <= rf for extent in summary.support)
    radii = [summary.radii[q] for q in erf.MASS_FRACTIONS]
    assert 0 < radii[0] <= radii[1] <= radii[2] <= math.sqrt(len(centre)) * rf / 2
    assert all(0 < sigma < rf / 2 for sigma in summary.sigma)
    assert 0 < summary.mass_in_sigma < 1
    np.testing.assert_allclose(summary.centroid, centre, atol=3)
    return summary


def test_unet_erf_stays_inside_the_theoretical_field(unet):
    config, model, variables, rf = unet
    x = _noise((8, 64, 64, len(config.data.mean)))
    erf_map = erf.effective_receptive_field(model, variables, x, batch_size=4)
    assert erf_map.shape == (64, 64) and np.all(np.isfinite(erf_map))
    _check_unet_erf(erf_map, erf.centre_unit((64, 64), (64, 64))[1], rf)


def test_unet_erf_on_real_images(unet, data_dir):
    config, model, variables, rf = unet
    source = pipeline.load_data_source("isbi2012_membrane", "train", data_dir)
    images = np.stack([source[i]["image"][224:288, 224:288] for i in range(4)])
    x = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    erf_map = erf.effective_receptive_field(model, variables, x)
    _check_unet_erf(erf_map, erf.centre_unit((64, 64), (64, 64))[1], rf)


def test_valid_unet_erf_is_centred_on_the_centre_unit(unet):
    config, _, variables, rf = unet
    # Padding changes no parameter, so the SAME U-Net's variables serve.
    model = create_model({**config.model.to_dict(), "padding": "VALID"})
    size = model.valid_input_sizes(60, 100)[0]
    x = _noise((4, size, size, 1))
    erf_map = erf.effective_receptive_field(model, variables, x)
    unit, centre = erf.centre_unit((size,) * 2, model.check_input_shape((size,) * 2))
    assert erf_map.shape == (size, size) and unit[0] < centre[0]
    _check_unet_erf(erf_map, centre, rf)


def test_unet_erf_in_3d(unet):
    _, model, _, _ = unet
    x = _noise((2, 24, 24, 24, 1))
    erf_map = erf.effective_receptive_field(model, _init(model, x[:1]), x)
    summary = erf.summarize_erf(erf_map, erf.centre_unit((24,) * 3, (24,) * 3)[1])
    assert erf_map.shape == (24, 24, 24) and summary.support == (24, 24, 24)


@pytest.mark.parametrize("spatial", [(40,), (40, 30), (20, 40, 30)])
def test_png_outlines_the_theoretical_field(spatial, tmp_path):
    offsets = np.indices(spatial) - np.reshape(
        [n // 2 for n in spatial], (-1,) + (1,) * len(spatial)
    )
    erf_map = np.exp(-(offsets**2).sum(axis=0) / 50.0)
    path = tmp_path / "erf.png"
    erf.write_erf_png(erf_map, path, theoretical_rf=15)
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = image.shape
    assert max(height, width) >= 256 and (len(spatial) > 1 or height < width)
    outline = np.all(image == erf.RECTANGLE_COLOUR, axis=-1)
    rows, cols = np.nonzero(outline)
    scale = width // spatial[-1]
    assert cols.max() - cols.min() + 1 == 15 * scale
    if len(spatial) > 1:
        assert rows.max() - rows.min() + 1 == 15 * scale
    # The peak (white) sits inside the outline.
    _, peak_cols = np.nonzero(np.all(image == 255, axis=-1))
    assert cols.min() < peak_cols.min() and peak_cols.max() < cols.max()


def test_erf_needs_a_dense_output():
    model = Classifier(2, backbone="resnet", base_width=4)
    x = np.zeros((1, 32, 32, 1), np.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    with pytest.raises(ValueError, match="dense output"):
        erf.effective_receptive_field(model, variables, x)


def test_gaussian_mass_within_one_sigma():
    expected = {1: 0.682689, 2: 1 - math.exp(-0.5), 3: 0.198748}
    for rank, mass in expected.items():
        assert erf.gaussian_mass_within_one_sigma(rank) == pytest.approx(mass, 1e-5)
