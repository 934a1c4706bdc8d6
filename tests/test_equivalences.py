"""Layer equivalences checked against the Flax layers they replace."""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from fcn_jax.analysis import equivalences
from fcn_jax.models.layers import TransposedConv
from fcn_jax.models.sizes import conv_output_size, transposed_conv_output_size

SPATIAL = {1: (6,), 2: (5, 4), 3: (4, 3, 2)}
_transpose_by_autodiff = jax.jit(
    equivalences.conv_transpose_by_autodiff, static_argnums=(2, 3, 4)
)


def _normal(seed: int, shape) -> np.ndarray:
    # NumPy inputs: every eager jax op would compile once per shape, which adds up.
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_folded_pointwise_convs_match_the_stack(rank):
    widths = (3, 5, 4, 2)
    ones = (1,) * rank
    layers = [
        (_normal(2 * i, (*ones, c_in, c_out)), _normal(2 * i + 1, (c_out,)))
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths))
    ]
    x = _normal(99, (2, *SPATIAL[rank], widths[0]))

    @jax.jit
    def stack(y):
        for kernel, bias in layers:
            conv = nn.Conv(kernel.shape[-1], ones)
            y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, y)
        return y

    kernel, bias = equivalences.fold_pointwise_convs(layers)
    assert kernel.shape == (*ones, widths[0], widths[-1])
    folded = jax.jit(nn.Conv(widths[-1], ones).apply)(
        {"params": {"kernel": kernel, "bias": bias}}, x
    )
    y = stack(x)
    np.testing.assert_allclose(folded, y, rtol=1e-5, atol=1e-5)


def test_folding_rejects_a_spatial_kernel():
    with pytest.raises(ValueError, match="1x1"):
        equivalences.fold_pointwise_convs([(np.ones((3, 3, 2, 2)), np.ones(2))])


@pytest.mark.parametrize("c_in,c_out", [(1, 1), (3, 8), (16, 5)])
def test_pointwise_param_count_and_dense_equivalence(c_in, c_out):
    conv = nn.Conv(c_out, (1, 1))
    x = _normal(0, (2, 4, 3, c_in))
    shapes = jax.eval_shape(conv.init, jax.random.key(1), x)["params"]
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert count == equivalences.pointwise_conv_param_count(c_in, c_out)
    # Random weights, bias included (Flax would initialise it to zero).
    params = {"kernel": _normal(1, (1, 1, c_in, c_out)), "bias": _normal(2, (c_out,))}
    dense = equivalences.dense_params_from_pointwise_conv(params)
    per_pixel = jax.jit(nn.Dense(c_out).apply)({"params": dense}, x)
    np.testing.assert_allclose(
        per_pixel, jax.jit(conv.apply)({"params": params}, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("rank,window", [(1, 2), (1, 3), (2, 2), (3, 2)])
def test_avg_pool_as_depthwise_conv(rank, window):
    x = _normal(0, (2, *(7,) * rank, 3))
    pool = jax.jit(nn.avg_pool, static_argnames=("window_shape", "strides"))
    expected = pool(x, window_shape=(window,) * rank, strides=(window,) * rank)
    pooled = jax.jit(equivalences.avg_pool_as_depthwise_conv, static_argnums=1)(
        x, window
    )
    assert pooled.shape == expected.shape
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(
    "k,s,p,size",
    [(2, 2, 0, 8), (3, 2, 1, 9), (4, 2, 1, 8), (3, 1, 1, 6), (5, 3, 2, 10)],
)
def test_transposed_conv_is_the_transpose_of_a_conv(rank, k, s, p, size):
    c_t_in, c_t_out = 3, 2  # TransposedConv's channels: the conv's C and F.
    conv_kernel = _normal(0, (*(k,) * rank, c_t_out, c_t_in))
    small = conv_output_size(size, k, s, p)
    y = _normal(1, (2, *(small,) * rank, c_t_in))
    expected = _transpose_by_autodiff(y, conv_kernel, s, p, (size,) * rank)
    o = equivalences.matching_output_padding(size, k, s, p)
    assert transposed_conv_output_size(small, k, s, p, o) == size
    layer = TransposedConv(
        c_t_out, kernel_size=k, stride=s, padding=p, output_padding=o
    )
    params = {
        "kernel": equivalences.transposed_kernel(conv_kernel),
        "bias": np.zeros((c_t_out,), np.float32),
    }
    result = jax.jit(layer.apply)({"params": params}, y)
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_transpose_satisfies_the_adjoint_identity():
    """<conv(z), y> = <z, conv^T(y)>, the definition the check above relies on."""
    kernel = _normal(0, (3, 3, 2, 3))
    z, y = _normal(1, (1, 9, 9, 2)), _normal(2, (1, 5, 5, 3))
    forward = equivalences.strided_conv(z, kernel, 2, 1)
    backward = _transpose_by_autodiff(y, kernel, 2, 1, (9, 9))
    np.testing.assert_allclose(
        np.vdot(forward, y), np.vdot(z, backward), rtol=1e-5, atol=1e-4
    )
