"""The fused BatchNorm+ReLU agrees with nn.BatchNorm + nn.relu and their autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    @nn.compact
    def __call__(self, x, *, train):
        return BatchNormReLU(use_running_average=not train, name="norm")(x)


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


@pytest.mark.parametrize("shape", [(3, 40, 5), (2, 12, 10, 6), (2, 4, 6, 5, 3)])
def test_training_outputs_statistics_and_gradients_match_flax(shape):
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
    got = jax.jit(lambda: forward_and_grads(_FusedBatchNormReLU()))()

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
        for choice in ("xla", "fused")
    ]
    assert shapes[0] == shapes[1]


def test_auto_is_fused_on_cpu_and_xla_on_accelerators():
    model = create_model({"name": "unet", "num_classes": 2, "batch_norm_relu": "auto"})
    cpu = jax.default_backend() == "cpu"
    assert model.batch_norm_relu == ("fused" if cpu else "xla")


def test_unknown_choice_is_named():
    with pytest.raises(ValueError, match="batch_norm_relu='fast'"):
        ConvBlock(4, batch_norm_relu="fast").init(
            jax.random.key(0), jnp.ones((1, 4, 4, 1)), train=False
        )
