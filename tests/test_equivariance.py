"""Translation equivariance of the dense models, and invariance of the
classifier, against the theory in fcn_jax/analysis/equivariance.py.

Exact equivariance holds only farther than half the receptive field from the
window edges across the shift, so each window is longer than its model's
theoretical receptive field along the shift axis and thin across it.
"""

import math

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module

from fcn_jax.analysis.equivariance import measure_equivariance, measure_invariance
from fcn_jax.data import pipeline
from fcn_jax.models import Classifier, create_model

# Relative to the mean |logit|; float32 rounding of identical sums in a
# different order stays far below it.
TOLERANCE = 1e-5


def receptive_field(layers: list[tuple[int, float]]) -> int:
    """r = 1 + sum (k - 1) * jump over (effective kernel, stride) layers.

    Upsampling by s is stride 1 / s, with the number of input units that reach
    one output as its kernel: 1 for a 2x2 stride-2 transposed conv, 2 for
    FCN's bilinear (2s, stride s) ones and for linear interpolation.
    """
    size, jump = 1.0, 1.0
    for kernel, stride in layers:
        size, jump = size + (kernel - 1) * jump, jump * stride
    return int(size)


CONV = (3, 1)
# The deepest path of each runlocal model, input to logits.
UNET_PATH = [CONV] * 2 + [(2, 2)] + [CONV] * 2 + [(2, 2)] + [CONV] * 2
UNET_PATH += [(1, 1 / 2)] + [CONV] * 2 + [(1, 1 / 2)] + [CONV] * 2
VGG_PATH = [layer for n in (2, 2, 3, 3, 3) for layer in [CONV] * n + [(2, 2)]]
FCN8S_PATH = VGG_PATH + [CONV, (1, 1), (2, 1 / 2), (2, 1 / 2), (2, 1 / 8)]
# Stem, pool, stages 2-4 (stride 16), stage 5 dilated by 2, ASPP rate 18, logits
# upsampled bilinearly by 16.
RESNET_OS16_PATH = [(7, 2), (3, 2)] + [CONV] * 4 + [(3, 2)] + [CONV] * 3
RESNET_OS16_PATH += [(3, 2)] + [CONV] * 3 + [(5, 1)] * 4
DEEPLAB_PATH = RESNET_OS16_PATH + [(37, 1), (1, 1), (2, 1 / 16)]

# name, model overrides, total stride, window (along, across the shift), field.
UNET = ("unet", {}, 4, (96, 32), receptive_field(UNET_PATH))
FCN8S = ("fcn8s", {}, 32, (448, 32), receptive_field(FCN8S_PATH))
DEEPLAB = ("deeplabv3", {"image_pooling": False}, 16, (1152, 16))
DEEPLAB += (receptive_field(DEEPLAB_PATH),)


def _init(model, x):
    """Variables of `model.init`'s structure without its compile time (seconds
    on CPU): He-normal kernels drawn with numpy, the other leaves at init's
    constants (scales and running variances 1, offsets and means 0). Any
    weights serve the theory tested here."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = math.sqrt(2 / math.prod(leaf.shape[:-1]))
            return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
        constant = np.ones if name in ("scale", "var") else np.zeros
        return constant(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _measure(case, shift, **overrides):
    """Builds the runlocal model and measures it on noise `shift` px longer
    than its window."""
    name, model_overrides, stride, window, rf = case
    config = load_config_module(REPO_ROOT / "configs" / f"{name}.py")
    config = config.get_config("runlocal")
    model = create_model({**config.model.to_dict(), **model_overrides, **overrides})
    channels = len(config.data.mean)
    variables = _init(model, np.zeros((1, *window, channels), np.float32))
    image = _noise((1, window[0] + shift, *window[1:], channels))
    return measure_equivariance(
        model, variables, image, shift, stride=stride, receptive_field=rf
    )


def _band(report, band):
    return next(row for row in report.bands if row.band == band)


def test_receptive_fields_of_the_runlocal_models():
    assert (UNET[-1], FCN8S[-1], DEEPLAB[-1]) == (44, 332, 1059)


@pytest.mark.parametrize("case", [UNET, FCN8S, DEEPLAB], ids=lambda case: case[0])
def test_stride_multiple_shift_is_exact_away_from_the_border(case):
    stride, rf = case[2], case[-1]
    report = _measure(case, max(stride, 16))
    interior = _band(report, rf // 2)
    assert interior.interior_max <= TOLERANCE
    # The zero padding at the window edges sits on different content.
    assert interior.border_max > 0.1 and _band(report, 0).interior_max > 0.1
    assert report.clean_band(TOLERANCE) <= rf // 2


def test_image_pooling_breaks_equivariance_everywhere():
    # The pooled branch adds the mean over the whole window to every unit; the
    # two windows' means differ by the content entering and leaving (measured:
    # 1.6e-2 relative beyond half the receptive field, against 2.7e-7 without).
    report = _measure(DEEPLAB, 16, image_pooling=True)
    assert _band(report, DEEPLAB[-1] // 2).interior_max > 1e-3
    assert report.clean_band(TOLERANCE) is None


def test_shift_off_the_stride_breaks_equivariance():
    # A 2 px shift regroups the U-Net's 2x2 max-pool windows (total stride 4).
    report = _measure(UNET, 2)
    assert _band(report, UNET[-1] // 2).interior_max > 0.1
    assert report.clean_band(TOLERANCE) is None


def _vgg_classifier():
    return Classifier(3, backbone="vgg", base_width=4, max_width=16)


def test_classifier_ignores_stride_shifts_of_an_isolated_patch():
    """A patch on a zero background, shifted within the window by whole strides.

    With BatchNorm at its initial running mean 0 and variance 1, zero offsets
    and bias-free convs, zero input gives zero features, the padding's own value, so the
    window edges are invisible; with the patch's whole footprint (patch plus
    half the field either side) inside both windows, the pooled features only
    move by whole units and their mean is unchanged.
    """
    half_field = receptive_field(VGG_PATH) // 2
    canvas = np.zeros((2, 448, 64, 1), np.float32)
    top, bottom, window = 192, 224, 448 - 64
    canvas[:, top:bottom, 16:48] = _noise((2, bottom - top, 32, 1))
    assert 64 <= top - half_field and bottom + half_field <= window
    model = _vgg_classifier()
    variables = _init(model, canvas[:1, :window])
    change = measure_invariance(model, variables, canvas, [1, 8, 16, 32, 64])
    assert change[32] <= TOLERANCE and change[64] <= TOLERANCE
    # Off the stride the max pools group the patch's pixels differently.
    assert min(change[1], change[8], change[16]) > 1e-2


def test_classifier_logits_change_little_on_real_images(data_dir):
    source = pipeline.load_data_source("isbi2012_membrane", "train", data_dir)
    images = np.stack([source[i]["image"][:480, :64] for i in range(4)])
    x = (images / 255.0 - 0.4912) / 0.1712
    model = _vgg_classifier()
    variables = _init(model, x[:1, :448])
    change = measure_invariance(model, variables, x, [32])
    # A 32 px shift replaces 1/14 of the window's content; measured 0.030
    # (and 0.05 to 0.07 for shifts of 1, 8 and 16 px).
    assert change[32] < 0.06


def test_image_pooling_is_a_config_field_that_drops_the_branch():
    config = load_config_module(REPO_ROOT / "configs" / "deeplabv3.py")
    config = config.get_config("runlocal")
    assert config.model.image_pooling is True
    x = np.zeros((1, 32, 32, 3), np.float32)
    for image_pooling in (True, False):
        model = create_model({**config.model.to_dict(), "image_pooling": image_pooling})
        variables = jax.eval_shape(
            lambda x, model=model: model.init(jax.random.key(0), x, train=False), x
        )
        assert ("image_pool" in variables["params"]["aspp"]) == image_pooling
