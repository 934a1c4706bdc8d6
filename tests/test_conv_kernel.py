"""The CPU conv kernel equals the convolution it replaces, and its gradients
equal autodiff of the plain conv.

y[n, h, w, o] = sum_{a,b,i} x[n, h + a - pad_h, w + b - pad_w, i] k[a, b, i, o];
the input gradient is the same stride-1 conv of the output cotangent with the
flipped, transposed kernel, padded by kernel - 1 - pad, so the kernel serves
both. Only the order of the float32 sums may differ from XLA's (measured
within 3e-6 of the largest output).
"""

import functools
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, em_image
from model_tester import assert_unet_gradients_match, train_loss_and_grads

from fcn_jax import cpu_kernels
from fcn_jax.models import UNet, conv_gradient, create_model

_CONV_CALL = "@fcn_jax_conv("
_DIRECT = functools.partial(conv_gradient.conv_general_dilated, direct_conv=True)


def _float64_conv(x, kernel, pads, output_size):
    """The defining sum, in float64 numpy."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    k_h, k_w = kernel.shape[:2]
    (pad_h, pad_w), (out_h, out_w) = pads, output_size
    padded = np.zeros(
        (x.shape[0], out_h + k_h - 1, out_w + k_w - 1, x.shape[-1]), np.float64
    )
    rows = min(x.shape[1], padded.shape[1] - pad_h)
    cols = min(x.shape[2], padded.shape[2] - pad_w)
    padded[:, pad_h : pad_h + rows, pad_w : pad_w + cols] = x[:, :rows, :cols]
    y = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for a in range(k_h):
        for b in range(k_w):
            window = padded[:, a : a + out_h, b : b + out_w]
            y += np.einsum("nhwi,io->nhwo", window, kernel[a, b])
    return y


@pytest.mark.parametrize(
    "x_shape, kernel_shape, pads, output_size",
    [
        ((2, 19, 37, 16), (3, 3, 16, 16), (1, 1), (19, 37)),  # SAME, rows in chunks
        ((1, 12, 13, 3), (3, 3, 3, 32), (1, 1), (12, 13)),  # RGB input
        ((2, 9, 40, 17), (5, 3, 17, 48), (2, 1), (9, 40)),  # 48: one register blocks
        ((1, 10, 11, 32), (3, 3, 32, 64), (0, 0), (8, 9)),  # VALID
        ((1, 6, 7, 16), (3, 3, 16, 16), (2, 2), (8, 9)),  # the input gradient's pads
        ((2, 1, 29, 24), (1, 5, 24, 16), (0, 2), (1, 29)),  # a 1D conv as 2D
        ((1, 5, 1, 16), (3, 3, 16, 128), (1, 1), (5, 1)),  # one pixel wide
        ((1, 8, 8, 16), (2, 2, 16, 16), (0, 0), (6, 6)),  # high side cropped
    ],
    ids=str,
)
def test_conv_kernel_equals_the_defining_sum(x_shape, kernel_shape, pads, output_size):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    got = jax.jit(cpu_kernels.conv, static_argnums=(2, 3))(x, kernel, pads, output_size)
    expected = _float64_conv(x, kernel, pads, output_size)
    magnitude = _float64_conv(np.abs(x), np.abs(kernel), pads, output_size)
    assert got.shape == expected.shape
    # float32 rounding of a sum of K terms: well within 1e-6 of sum |terms|.
    assert np.max(np.abs(got - expected) / np.maximum(magnitude, 1e-30)) < 1e-6


def _conv_grads(shape, kernel_size, padding, features, conv_fn):
    x = jax.random.normal(jax.random.key(0), shape)
    conv = nn.Conv(features, kernel_size, padding=padding, conv_general_dilated=conv_fn)
    variables = conv.init(jax.random.key(1), x)

    def loss(variables, x):
        y = conv.apply(variables, x)
        return jnp.sum(jnp.sin(y)), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (dvariables, dx), y = grad(variables, x)
    return y, dvariables["params"]["kernel"], dx, jax.jit(grad).lower(variables, x)


@pytest.mark.parametrize(
    "shape, kernel_size, padding, features",
    [
        ((2, 20, 24, 16), (3, 3), "SAME", 16),
        ((2, 20, 24, 32), (3, 3), "SAME", 64),
        ((3, 19, 13, 16), (5, 3), "VALID", 32),
        ((2, 12, 10, 3), (3, 3), "SAME", 16),  # dx stays XLA's: 3 channels
        ((2, 40, 16), (3,), "SAME", 48),
        ((2, 40, 32), (5,), "VALID", 16),
    ],
    ids=str,
)
def test_direct_conv_and_gradients_equal_autodiff(
    shape, kernel_size, padding, features
):
    y0, dw0, dx0, _ = _conv_grads(shape, kernel_size, padding, features, None)
    y, dw, dx, lowered = _conv_grads(shape, kernel_size, padding, features, _DIRECT)
    text = lowered.as_text()
    # The forward pass and, with a multiple of 16 input channels, the input
    # gradient: two calls; else one.
    assert text.count(_CONV_CALL) == (2 if shape[-1] % 16 == 0 else 1)
    for got, expected in ((y, y0), (dw, dw0), (dx, dx0)):
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=3e-6 * scale)


def test_wide_convs_keep_xla_and_results_are_deterministic():
    """From 256 x 128 channels XLA's conv is faster; below, the kernel's
    results (and the filter gradient's, summed in fixed parts on XLA's
    thread pool) are bitwise the same from call to call."""
    *_, lowered = _conv_grads((1, 8, 8, 256), (3, 3), "SAME", 128, _DIRECT)
    assert _CONV_CALL not in lowered.as_text()
    first = _conv_grads((4, 32, 32, 32), (3, 3), "SAME", 32, _DIRECT)[:3]
    second = _conv_grads((4, 32, 32, 32), (3, 3), "SAME", 32, _DIRECT)[:3]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_unet_on_an_em_image_equals_xla():
    """A depth-3 U-Net on a real ISBI-2012 crop, one training pass: the
    logits, loss and every gradient with the conv kernel match XLA's convs."""
    image = em_image(64, 96)
    images = jnp.asarray(np.stack([image, image[::-1]])[..., None] - 0.5)
    labels = (images[..., 0] > 0).astype(jnp.int32)
    passes = {
        choice: train_loss_and_grads(
            UNet(2, depth=3, base_width=16, conv_forward=choice), images, labels
        )
        for choice in ("xla", "direct")
    }
    expected, got = passes["xla"], passes["direct"]
    np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-6)
    scale = float(jnp.max(jnp.abs(expected.logits)))
    np.testing.assert_allclose(got.logits, expected.logits, rtol=0, atol=1e-5 * scale)
    assert_unet_gradients_match(got.grads, expected.grads)


def test_auto_conv_forward(monkeypatch, caplog):
    config = {"name": "unet", "num_classes": 2, "conv_forward": "auto"}
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert create_model(config).conv_forward == ("direct" if single_cpu else "xla")

    def fail():
        raise cpu_kernels.KernelUnavailableError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "load", fail)
    with caplog.at_level(logging.WARNING):
        assert create_model(config).conv_forward == "xla"
    with pytest.raises(ValueError, match="conv_forward='fast'"):
        UNet(2, depth=1, base_width=16, conv_forward="fast").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False
        )


_ONE_CORE_CHECK = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from fcn_jax import cpu_flags
cpu_flags.configure()
import jax, jax.numpy as jnp
from fcn_jax.models import UNet
model = UNet(2, depth=2, base_width=16, conv_forward="direct",
             conv_filter_gradient="direct", batch_norm_relu="kernel")
x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
variables = model.init(jax.random.key(1), x, train=False)
def loss(params):
    y, _ = model.apply({**variables, "params": params}, x, train=True,
                       mutable=["batch_stats"])
    return jnp.mean(y ** 2)
grads = jax.jit(jax.grad(loss))(variables["params"])
print(sum(float(jnp.sum(g)) for g in jax.tree.leaves(grads)))
"""


def test_kernels_finish_on_a_single_core():
    """On one core XLA's thread pool may run the kernels' helper tasks on the
    calling thread or not at all; the kernels must still finish."""
    result = subprocess.run(
        [sys.executable, "-c", _ONE_CORE_CHECK],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.isfinite(float(result.stdout.split()[-1]))


def test_kernel_rejects_mismatched_shapes():
    cpu_kernels.load()
    x = jnp.zeros((1, 8, 8, 16))
    with pytest.raises(Exception, match="shapes do not match"):
        jax.ffi.ffi_call(
            "fcn_jax_conv", jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
        )(x, jnp.zeros((3, 3, 8, 16)), pad_h=np.int64(1), pad_w=np.int64(1))
