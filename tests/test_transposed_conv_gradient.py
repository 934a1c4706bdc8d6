"""The hand-written backward pass of the kernel == stride transposed conv
equals XLA's autodiff of the same forward computation.

y[n, s h + a, s w + b, f] = sum_c x[n, h, w, c] K[a, b, c, f] + bias[f], so
dx is the stride-s conv of the cotangent g with K, dK[a, b] = sum x^T g[a, b]
over input pixels, dbias = sum g; each gradient is checked against autodiff
(up to the order of float32 sums) on random and on real EM data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import em_image

from fcn_jax.models import transposed_conv_gradient as tcg
from fcn_jax.models.layers import TransposedConv

_KERNEL_CALL = "fcn_jax_conv_filter_gradient"


def _grads(fn, x, kernel, bias):
    def loss(x, kernel, bias):
        return jnp.sum(jnp.sin(fn(x, kernel, bias)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad(x, kernel, bias), grad.lower(x, kernel, bias).as_text()


def _plain(x, kernel, bias):
    return tcg.disjoint_transposed_conv(x, kernel) + bias


def _assert_close(got, expected, tolerance):
    for name, a, b in zip(("dx", "dkernel", "dbias"), got, expected):
        assert a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * scale, err_msg=name)


@pytest.mark.parametrize(
    "x_shape, stride, features",
    [
        ((2, 5, 7, 3), 2, 8),
        ((3, 8, 6, 32), 2, 16),
        ((1, 4, 5, 24), 2, 48),
        ((2, 3, 5, 10), 4, 4),
        ((2, 6, 4, 7), 4, 16),
        ((2, 11, 5), 2, 8),
        ((3, 9, 20), 4, 12),
    ],
    ids=str,
)
def test_direct_gradients_equal_autodiff(x_shape, stride, features):
    keys = jax.random.split(jax.random.key(0), 3)
    rank = len(x_shape) - 2
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], (stride,) * rank + (x_shape[-1], features))
    bias = jax.random.normal(keys[2], (features,))
    assert tcg.direct_gradient_applies(x, kernel)
    np.testing.assert_array_equal(
        tcg.disjoint_transposed_conv_direct(x, kernel, bias), _plain(x, kernel, bias)
    )
    expected, _ = _grads(_plain, x, kernel, bias)
    got, lowered = _grads(tcg.disjoint_transposed_conv_direct, x, kernel, bias)
    assert _KERNEL_CALL in lowered
    _assert_close(got, expected, 2e-6)


@pytest.mark.parametrize(
    "x_shape, stride, features, dtype",
    [
        ((2, 5, 7, 3), 2, 4, jnp.float32),  # stride * features not a multiple of 16
        ((2, 4, 4, 2, 3), 2, 8, jnp.float32),  # 3D
        ((2, 5, 7, 3), 2, 8, jnp.bfloat16),
    ],
    ids=str,
)
def test_other_shapes_keep_autodiff(x_shape, stride, features, dtype):
    rank = len(x_shape) - 2
    x = jax.random.normal(jax.random.key(0), x_shape, dtype)
    kernel = jnp.ones((stride,) * rank + (x_shape[-1], features), dtype) / 3
    bias = jnp.arange(features, dtype=dtype)
    assert not tcg.direct_gradient_applies(x, kernel)
    expected, _ = _grads(_plain, x, kernel, bias)
    got, lowered = _grads(tcg.disjoint_transposed_conv_direct, x, kernel, bias)
    assert _KERNEL_CALL not in lowered
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_up_conv_on_em_features_equals_autodiff():
    """A U-Net up-conv on features of a real ISBI-2012 crop: same outputs and
    parameters whichever gradient runs, gradients within 1e-6 of their scale."""
    image = em_image(48, 64) - 0.5
    # 32 channels of 2x2-pooled shifted copies stand in for encoder features.
    pooled = image.reshape(24, 2, 32, 2).mean((1, 3))
    x = jnp.asarray(
        np.stack([np.roll(pooled, k, axis=k % 2) * (k + 1) for k in range(32)], -1)
    )[None]

    def grads(choice):
        module = TransposedConv(16, conv_filter_gradient=choice)
        variables = module.init(jax.random.key(0), x)

        def loss(params, x):
            y = module.apply({"params": params}, x)
            return jnp.mean(jnp.square(y - jnp.asarray(image)[None, :, :, None]))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)

    loss, (dparams, dx) = grads("xla")
    direct_loss, (direct_dparams, direct_dx) = grads("direct")
    np.testing.assert_array_equal(direct_loss, loss)
    _assert_close(
        (direct_dx, direct_dparams["kernel"], direct_dparams["bias"]),
        (dx, dparams["kernel"], dparams["bias"]),
        1e-6,
    )


def test_unknown_choice_names_the_key():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="conv_filter_gradient='fast'"):
        TransposedConv(16, conv_filter_gradient="fast").init(jax.random.key(0), x)
