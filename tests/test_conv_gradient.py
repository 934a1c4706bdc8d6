"""The CPU filter-gradient kernel equals autodiff of the plain convolution.

dW[a, b, i, o] = sum_{n,h,w} x[n, h + a - pad_h, w + b - pad_w, i] g[n, h, w, o]
is the gradient of sum(g * conv(x, W)); the kernel computes it directly, so
every conv it serves must give the gradients XLA's autodiff gives (up to the
order of float32 sums: measured within 1e-6 of the largest entry).
"""

import logging
import os
import platform
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

_KERNEL_CALL = "fcn_jax_conv_filter_gradient"


def _grads(features, kernel_size, padding, x, conv_fn, **conv_args):
    conv = nn.Conv(
        features,
        kernel_size,
        padding=padding,
        conv_general_dilated=conv_fn,
        **conv_args,
    )
    variables = conv.init(jax.random.key(1), x)

    def loss(variables, x):
        return jnp.sum(jnp.sin(conv.apply(variables, x)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad(variables, x), jax.jit(grad).lower(variables, x).as_text()


@pytest.mark.parametrize(
    "shape, kernel_size, padding, features",
    [
        ((2, 20, 24, 3), (3, 3), "SAME", 16),
        ((2, 20, 24, 20), (3, 3), "SAME", 48),
        ((3, 19, 13, 17), (5, 3), "VALID", 32),
        ((2, 17, 9, 16), (2, 2), "SAME", 16),
        ((1, 8, 8, 40), (1, 1), "SAME", 16),
        ((2, 12, 10, 10), (3, 3), "SAME", 64),
        ((2, 9, 11, 6), (3, 3), "VALID", 128),
        ((2, 40, 7), (3,), "SAME", 48),
        ((2, 40, 33), (5,), "VALID", 16),
    ],
    ids=str,
)
def test_direct_filter_gradient_equals_autodiff(shape, kernel_size, padding, features):
    x = jax.random.normal(jax.random.key(0), shape)
    (expected, expected_dx), _ = _grads(features, kernel_size, padding, x, None)
    (got, got_dx), lowered = _grads(
        features, kernel_size, padding, x, conv_gradient.conv_general_dilated
    )
    assert _KERNEL_CALL in lowered
    dw, expected_dw = got["params"]["kernel"], expected["params"]["kernel"]
    scale = float(jnp.max(jnp.abs(expected_dw)))
    np.testing.assert_allclose(dw, expected_dw, rtol=0, atol=2e-6 * scale)
    np.testing.assert_array_equal(got["params"]["bias"], expected["params"]["bias"])
    np.testing.assert_array_equal(got_dx, expected_dx)


@pytest.mark.parametrize(
    "features, conv_args, dtype",
    [
        (8, {}, jnp.float32),  # Output channels not a multiple of 16.
        (16, {"strides": (2, 2)}, jnp.float32),
        (16, {"kernel_dilation": (2, 2)}, jnp.float32),
        (16, {"feature_group_count": 4}, jnp.float32),
        (16, {}, jnp.bfloat16),
    ],
    ids=str,
)
def test_other_convs_keep_xla_gradients(features, conv_args, dtype):
    x = jax.random.normal(jax.random.key(0), (2, 12, 10, 16), dtype)
    conv_args = {**conv_args, "dtype": dtype}
    (expected, _), _ = _grads(features, (3, 3), "SAME", x, None, **conv_args)
    (got, _), lowered = _grads(
        features, (3, 3), "SAME", x, conv_gradient.conv_general_dilated, **conv_args
    )
    assert _KERNEL_CALL not in lowered
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 3, 40, 33), (2, 2, 64, 16)])
def test_flipped_transposed_kernel_equals_flip_and_swap(shape):
    kernel = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(
        jax.jit(cpu_kernels.flipped_transposed_kernel)(kernel),
        jnp.flip(jnp.swapaxes(kernel, 2, 3), (0, 1)),
    )


def test_wide_convs_on_small_images_keep_xla_filter_gradient():
    """512 -> 512 channels on 8x8 pixels: XLA's filter gradient (faster
    there), the input gradient through the flipped kernel; both exact."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 512))
    (expected, expected_dx), _ = _grads(512, (3, 3), "SAME", x, None)
    (got, got_dx), lowered = _grads(
        512, (3, 3), "SAME", x, conv_gradient.conv_general_dilated
    )
    assert _KERNEL_CALL not in lowered
    assert "fcn_jax_flipped_transposed_kernel" in lowered
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got_dx, expected_dx)


def test_unet_gradients_on_an_em_image_equal_xla():
    """Every conv block and up-conv of a U-Net on a real ISBI-2012 crop, loss and all."""
    image = em_image(64, 96)
    images = jnp.asarray(np.stack([image, image[::-1]])[..., None] - 0.5)
    labels = (images[..., 0] > 0).astype(jnp.int32)

    def loss_and_grads(choice):
        model = UNet(2, depth=3, base_width=16, conv_filter_gradient=choice)
        result = train_loss_and_grads(model, images, labels)
        return result.loss, result.grads

    loss, grads = loss_and_grads("xla")
    direct_loss, direct_grads = loss_and_grads("direct")
    np.testing.assert_array_equal(direct_loss, loss)
    assert_unet_gradients_match(direct_grads, grads)


def test_auto_uses_the_kernel_on_one_cpu_and_xla_when_it_cannot_build(
    monkeypatch, caplog
):
    config = {"name": "unet", "num_classes": 2, "conv_filter_gradient": "auto"}
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert create_model(config).conv_filter_gradient == (
        "direct" if single_cpu else "xla"
    )

    def fail():
        raise cpu_kernels.KernelUnavailableError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "load", fail)
    with caplog.at_level(logging.WARNING):
        assert create_model(config).conv_filter_gradient == "xla"
    if single_cpu:
        assert "no C++ compiler found" in caplog.text
    with pytest.raises(cpu_kernels.KernelUnavailableError, match="compiler"):
        create_model({**config, "conv_filter_gradient": "direct"})


def test_library_is_built_once_per_source_and_fails_clearly_without_compiler(
    monkeypatch, tmp_path
):
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    built = cpu_kernels.library_path()
    assert built.parent == tmp_path and built.exists()
    mtime = os.stat(built).st_mtime_ns
    assert cpu_kernels.library_path() == built
    assert os.stat(built).st_mtime_ns == mtime  # Not rebuilt.
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # No leftovers.

    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(cpu_kernels.KernelUnavailableError, match="no C\\+\\+ compiler"):
        cpu_kernels.library_path()


_AVX2_CHECK = """
from fcn_jax import cpu_flags
cpu_flags.configure()
import jax, jax.numpy as jnp
import flax.linen as nn
from fcn_jax.models import conv_gradient
errors = []
for shape, features in [((2, 20, 24, 20), 16), ((2, 12, 10, 10), 32), ((2, 9, 11, 6), 64)]:
    x = jax.random.normal(jax.random.key(0), shape)
    kernels = []
    for fn in (None, conv_gradient.conv_general_dilated):
        conv = nn.Conv(features, (3, 3), conv_general_dilated=fn)
        variables = conv.init(jax.random.key(1), x)
        grad = jax.grad(lambda v: jnp.sum(jnp.sin(conv.apply(v, x))))(variables)
        kernels.append(grad["params"]["kernel"])
    errors.append(float(jnp.max(jnp.abs(kernels[1] - kernels[0]) / jnp.max(jnp.abs(kernels[0])))))
import numpy as np
from fcn_jax import cpu_kernels
x = jax.random.normal(jax.random.key(2), (3, 17, 19, 48)) + 0.5
dy = jax.random.normal(jax.random.key(3), x.shape)
ones = jnp.ones((48,))
got = (*cpu_kernels.channel_moments(x),
       *cpu_kernels.relu_batch_norm_gradient_sums(x, dy, 0.5 * ones, 2.0 * ones, ones, 0 * ones))
x64, dy64 = (np.asarray(a, np.float64).reshape(-1, 48) for a in (x, dy))
g = np.where(x64 > 0.5, dy64, 0.0)
for sums, terms in zip(got, (x64, x64 * x64, g, g * (x64 - 0.5) * 2.0)):
    errors.append(float(np.max(np.abs(np.asarray(sums) - terms.sum(0))) / np.abs(terms).sum(0).max()))
from jax import lax
for shape, features in [((2, 20, 24, 16), 16), ((2, 12, 10, 32), 32), ((1, 9, 11, 16), 64)]:
    x = jax.random.normal(jax.random.key(4), shape)
    k = jax.random.normal(jax.random.key(5), (3, 3, shape[-1], features))
    y = cpu_kernels.conv(x, k, (1, 1), shape[1:3])
    ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    errors.append(float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))))
print(max(errors))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86-64 target")
def test_avx2_build_equals_autodiff(tmp_path):
    """The 8-lane (AVX2) build, which AVX-512 machines do not run by default:
    filter gradients, BatchNorm sums and the conv kernel (1, 2 and 4
    registers of output channels)."""
    env = {
        **os.environ,
        cpu_kernels.CACHE_ENV: str(tmp_path),
        cpu_kernels.MARCH_ENV: "haswell",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", _AVX2_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 2e-6
    (built,) = tmp_path.iterdir()
    assert built.suffix == ".so"
