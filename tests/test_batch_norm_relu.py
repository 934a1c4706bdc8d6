"""The fused BatchNorm+ReLU agrees with nn.BatchNorm + nn.relu and their autodiff,
with its per-channel sums from XLA or from the CPU kernels."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import em_image

from fcn_jax import cpu_kernels
from fcn_jax.models import create_model
from fcn_jax.models.batch_norm_relu import (
    BatchNormReLU,
    batch_norm_relu,
    per_channel_sum,
)
from fcn_jax.models.layers import ConvBlock


class _FlaxBatchNormReLU(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        norm = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")
        return nn.relu(norm(x))


class _FusedBatchNormReLU(nn.Module):
    kernel_sums: bool = False

    @nn.compact
    def __call__(self, x, *, train):
        return BatchNormReLU(
            use_running_average=not train, kernel_sums=self.kernel_sums, name="norm"
        )(x)


def _inputs(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    # An offset and a spread per channel, so the statistics matter.
    x = jax.random.normal(keys[0], shape) * 2.0 + 0.5
    channels = shape[-1:]
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], channels)
    bias = 0.2 * jax.random.normal(keys[2], channels)
    cotangent = jax.random.normal(keys[3], shape)
    return x, scale, bias, cotangent


def _variables(scale, bias, mean, var):
    return {
        "params": {"norm": {"scale": scale, "bias": bias}},
        "batch_stats": {"norm": {"mean": mean, "var": var}},
    }


@pytest.mark.parametrize(
    "shape, kernel_sums",
    [
        ((3, 40, 5), False),
        ((2, 12, 10, 6), False),
        ((2, 4, 6, 5, 3), False),
        ((3, 40, 16), True),
        ((2, 12, 10, 48), True),
        ((2, 4, 6, 5, 32), True),
    ],
)
def test_training_outputs_statistics_and_gradients_match_flax(shape, kernel_sums):
    x, scale, bias, cotangent = _inputs(shape)
    channels = shape[-1:]
    stats = (0.1 * jnp.ones(channels), 2.0 * jnp.ones(channels))

    def forward_and_grads(module):
        def run(x, scale, bias):
            return module.apply(
                _variables(scale, bias, *stats), x, train=True, mutable=["batch_stats"]
            )

        y, grad_fn, new_stats = jax.vjp(run, x, scale, bias, has_aux=True)
        return y, new_stats["batch_stats"]["norm"], grad_fn(cotangent)

    expected = jax.jit(lambda: forward_and_grads(_FlaxBatchNormReLU()))()
    got = jax.jit(lambda: forward_and_grads(_FusedBatchNormReLU(kernel_sums)))()

    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(got[1][key], expected[1][key], rtol=1e-6)
    for g, e, name in zip(got[2], expected[2], ("x", "scale", "bias")):
        np.testing.assert_allclose(
            g, e, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name
        )


@pytest.mark.parametrize(
    "shape", [(4, 256, 256, 16), (2, 64, 2048, 8), (2, 32, 64, 64, 4)]
)
def test_per_channel_sums_of_millions_of_values_are_as_accurate_as_pairwise(shape):
    # One long float32 dot over 1e6 values is ~1e-5 off; a pairwise sum ~1e-7.
    x = np.random.default_rng(0).normal(0.7, 2.0, size=shape).astype(np.float32)
    exact = x.astype(np.float64).reshape(-1, shape[-1]).sum(axis=0)
    exact_sq = (x.astype(np.float64) ** 2).reshape(-1, shape[-1]).sum(axis=0)
    got = jax.jit(per_channel_sum)(x)
    got_sq = jax.jit(lambda x: per_channel_sum(x * x))(x)
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    np.testing.assert_allclose(got_sq, exact_sq, rtol=1e-6)


def test_gradient_through_the_returned_statistics_matches_autodiff():
    """Cotangents of mean and var (zero in training) follow d mean/dx = 1/m,
    d var/dx = 2 (x - mean) / m."""
    x, scale, bias, cotangent = _inputs((2, 8, 8, 4), seed=1)

    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.maximum(jnp.mean(x * x, axis=(0, 1, 2)) - mean**2, 0.0)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return jnp.maximum(y, 0.0), mean, var

    keys = jax.random.split(jax.random.key(7), 2)
    cotangents = (
        cotangent,
        jax.random.normal(keys[0], (4,)),
        jax.random.normal(keys[1], (4,)),
    )
    expected = jax.jit(lambda: jax.vjp(plain, x, scale, bias)[1](cotangents))()
    got = jax.jit(
        lambda: jax.vjp(lambda *a: batch_norm_relu(*a, 1e-5), x, scale, bias)[1](
            cotangents
        )
    )()
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5 * float(jnp.max(jnp.abs(e))))


def test_inference_uses_running_statistics_like_flax():
    x, scale, bias, _ = _inputs((2, 6, 6, 3), seed=2)
    variables = _variables(scale, bias, jnp.array([0.5, -1.0, 2.0]), jnp.ones(3) * 3)
    np.testing.assert_allclose(
        _FusedBatchNormReLU().apply(variables, x, train=False),
        _FlaxBatchNormReLU().apply(variables, x, train=False),
        rtol=1e-6,
        atol=1e-6,
    )


def test_bfloat16_output_with_float32_statistics():
    x = _inputs((2, 8, 8, 4), seed=3)[0]
    module = BatchNormReLU(dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    reference, _ = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(
        variables, x, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(nn.relu(reference), np.float32),
        atol=2e-2,
    )
    assert updates["batch_stats"]["mean"].dtype == jnp.float32


def test_fused_conv_block_has_the_same_variables_as_the_plain_one():
    x = jnp.ones((1, 8, 8, 3))
    shapes = [
        jax.eval_shape(
            lambda: ConvBlock(4, batch_norm_relu=choice).init(  # noqa: B023
                jax.random.key(0), x, train=True
            )
        )
        for choice in ("xla", "fused", "kernel")
    ]
    assert shapes[0] == shapes[1] == shapes[2]


def test_auto_takes_the_kernel_sums_on_one_cpu_and_fused_without_them(
    monkeypatch, caplog
):
    config = {"name": "unet", "num_classes": 2, "batch_norm_relu": "auto"}
    cpu = jax.default_backend() == "cpu"
    single_cpu = cpu and jax.device_count() == 1
    expected = "kernel" if single_cpu else ("fused" if cpu else "xla")
    assert create_model(config).batch_norm_relu == expected

    def fail():
        raise cpu_kernels.KernelUnavailableError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "load", fail)
    with caplog.at_level(logging.WARNING):
        assert create_model(config).batch_norm_relu == ("fused" if cpu else "xla")
    if single_cpu:
        assert "model.batch_norm_relu" in caplog.text
    with pytest.raises(cpu_kernels.KernelUnavailableError, match="compiler"):
        create_model({**config, "batch_norm_relu": "kernel"})


def _float64_terms(x, dy, mean, inv, gain, bias):
    """The summed terms x, x^2, g, g x_hat in float64, [pixels, C] each; the
    ReLU mask as the forward pass rounds it, in float32."""
    passed = (x - mean) * gain + bias > 0
    x, dy, passed = (np.asarray(a).reshape(-1, a.shape[-1]) for a in (x, dy, passed))
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    g = np.where(passed, dy, 0.0)
    x_hat = (x - np.asarray(mean, np.float64)) * np.asarray(inv, np.float64)
    return x, x * x, g, g * x_hat


def _em_activations():
    """A conv of a 256x256 ISBI-2012 crop ([2, 256, 256, 16]), its batch
    statistics, a BatchNorm gain and bias, and a cotangent: real-image
    statistics for the sums."""
    image = em_image(256, 256)
    images = jnp.asarray(np.stack([image, image[::-1]])[..., None])
    conv = nn.Conv(16, (3, 3))
    x = conv.apply(conv.init(jax.random.key(0), images), images)
    mean = jnp.mean(x, axis=(0, 1, 2))
    inv = jax.lax.rsqrt(jnp.var(x, axis=(0, 1, 2)) + 1e-5)
    dy = jax.random.normal(jax.random.key(1), x.shape)
    return x, dy, mean, inv, inv * 1.1, jnp.full((16,), 0.05)


@pytest.mark.parametrize("data", ["em_image", "random"])
def test_kernel_sums_equal_float64_sums(data):
    """Float32 register sums of 256 pixels added in float64: as accurate as a
    pairwise sum (within 1e-6 of the sum of magnitudes)."""
    if data == "em_image":
        args = _em_activations()
    else:
        x, scale, bias, dy = _inputs((4, 96, 128, 64), seed=4)
        args = (x, dy, jnp.full((64,), 0.5), jnp.full((64,), 0.5), scale, bias)
    got = jax.jit(cpu_kernels.channel_moments)(args[0])
    got += jax.jit(cpu_kernels.relu_batch_norm_gradient_sums)(*args)
    names = ("sum x", "sum x^2", "sum g", "sum g x_hat")
    for g, terms, name in zip(got, _float64_terms(*args), names):
        atol = 1e-6 * float(np.max(np.abs(terms).sum(0)))
        np.testing.assert_allclose(g, terms.sum(0), rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "shape, dtype, kernel_call",
    [
        ((2, 8, 8, 16), jnp.float32, True),
        ((2, 8, 8, 24), jnp.float32, False),  # Not a multiple of 16 channels.
        ((2, 8, 8, 16), jnp.bfloat16, False),
    ],
)
def test_kernel_sums_only_where_they_apply(shape, dtype, kernel_call):
    x, scale, bias, cotangent = _inputs(shape)
    x, cotangent = x.astype(dtype), cotangent.astype(dtype)

    def grads(x):
        y, vjp = jax.vjp(lambda x: batch_norm_relu(x, scale, bias, 1e-5, True)[0], x)
        return y, vjp(cotangent)

    text = jax.jit(grads).lower(x).as_text()
    for target in ("fcn_jax_channel_moments", "fcn_jax_relu_batch_norm_gradient_sums"):
        assert (target in text) == kernel_call
    expected = jax.jit(
        lambda x: jax.vjp(lambda x: batch_norm_relu(x, scale, bias, 1e-5)[0], x)
    )
    y, (dx,) = jax.jit(grads)(x)
    y_xla, vjp = expected(x)
    np.testing.assert_allclose(np.float32(y), np.float32(y_xla), atol=1e-5)
    np.testing.assert_allclose(np.float32(dx), np.float32(vjp(cotangent)[0]), atol=1e-5)


def test_unknown_choice_is_named():
    with pytest.raises(ValueError, match="batch_norm_relu='fast'"):
        ConvBlock(4, batch_norm_relu="fast").init(
            jax.random.key(0), jnp.ones((1, 4, 4, 1)), train=False
        )
