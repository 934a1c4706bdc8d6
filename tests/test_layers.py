"""Layer behaviour: 1x1 conv, transposed-conv paths, norms, cropping, resampling."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.models.heads import SegmentationHead
from fcn_jax.models.layers import (
    ConvBlock,
    Downsample,
    TransposedConv,
    Upsample,
    center_crop,
    create_norm,
)


def _init_apply(module, x, **kwargs):
    variables = module.init(jax.random.key(0), x, **kwargs)
    return variables, module.apply(variables, x, **kwargs)


def test_1x1_conv_is_a_dense_layer_at_every_pixel():
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 3))
    variables, logits = _init_apply(SegmentationHead(4), x)
    kernel = variables["params"]["conv"]["kernel"]
    assert kernel.shape == (1, 1, 3, 4)
    dense = nn.Dense(4)
    dense_params = {
        "kernel": kernel.reshape(3, 4),
        "bias": variables["params"]["conv"]["bias"],
    }
    expected = dense.apply({"params": dense_params}, x)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("factor", [2, 3])
def test_transposed_conv_fast_path_equals_general_path(rank, factor):
    # Unequal spatial sizes, so an offset interleaved on the wrong axis fails.
    x = jax.random.normal(jax.random.key(2), (2, *(3, 4, 5)[:rank], 4))
    fast = Upsample(5, kernel_size=factor, stride=factor)
    general = Upsample(5, kernel_size=factor, stride=factor, use_fast_path=False)
    variables = fast.init(jax.random.key(3), x)
    # A non-zero bias, so it is checked as well.
    variables = jax.tree.map(lambda v: v + 0.1, variables)
    np.testing.assert_allclose(
        jax.jit(fast.apply)(variables, x),
        jax.jit(general.apply)(variables, x),
        atol=1e-5,
    )

    def param_grads(module):
        def loss(v):
            return jnp.sum(jnp.sin(module.apply(v, x)))

        return jax.jit(jax.grad(loss))(variables)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        param_grads(fast),
        param_grads(general),
    )
    # The flag really selects a different computation.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fast.apply)(variables, x))
    assert "conv_general_dilated" in str(jax.make_jaxpr(general.apply)(variables, x))


def _scatter_reference(x, kernel, stride, padding, output_padding):
    """1D transposed conv by definition: input pixel i adds x[i] * kernel[a] at
    output position stride * i + a - padding. x: [H, C], kernel: [k, C, F]."""
    size, k = x.shape[0], kernel.shape[0]
    full = np.zeros((stride * (size - 1) + k + output_padding, kernel.shape[-1]))
    for i, a in itertools.product(range(size), range(k)):
        full[stride * i + a] += x[i] @ kernel[a]
    return full[padding : len(full) - padding]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "kernel,stride,padding,output_padding",
    [
        (2, 2, 0, 0),
        (3, 2, 1, 1),
        (4, 2, 1, 0),
        (3, 3, 0, 2),
        (1, 2, 0, 1),
        (2, 1, 2, 0),
    ],
)
def test_transposed_conv_matches_scatter_definition(
    kernel, stride, padding, output_padding, fast
):
    x = jax.random.normal(jax.random.key(4), (1, 6, 2))
    layer = TransposedConv(
        3,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        use_fast_path=fast,
    )
    variables, y = _init_apply(layer, x)
    expected = _scatter_reference(
        np.asarray(x[0], np.float64),
        np.asarray(variables["params"]["kernel"], np.float64),
        stride,
        padding,
        output_padding,
    )
    np.testing.assert_allclose(y[0], expected, atol=1e-5)


def test_resize_conv_upsample_shape_and_padding_error():
    x = jnp.ones((1, 4, 6, 3))
    for interpolation in ("nearest", "linear"):
        up = Upsample(
            5, method="resize_conv", kernel_size=3, interpolation=interpolation
        )
        assert _init_apply(up, x)[1].shape == (1, 8, 12, 5)
    with pytest.raises(ValueError, match="only apply to 'transposed_conv'"):
        Upsample(5, method="resize_conv", padding=1).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="output_padding=2 must be smaller"):
        Upsample(5, output_padding=2).init(jax.random.key(0), x)


def test_create_norm_errors_and_group_clipping():
    with pytest.raises(ValueError, match="batch, group, none"):
        create_norm("layer", dtype=jnp.float32, param_dtype=jnp.float32, num_groups=8)
    with pytest.raises(ValueError, match="num_groups=0"):
        create_norm("group", dtype=jnp.float32, param_dtype=jnp.float32, num_groups=0)
    assert (
        create_norm("none", dtype=jnp.float32, param_dtype=jnp.float32, num_groups=8)
        is None
    )
    make_norm = create_norm(
        "group", dtype=jnp.float32, param_dtype=jnp.float32, num_groups=8
    )
    assert make_norm(12, train=True).num_groups == 6
    assert make_norm(4, train=True).num_groups == 4
    assert make_norm(32, train=True).num_groups == 8
    make_norm = create_norm(
        "batch", dtype=jnp.float32, param_dtype=jnp.float32, num_groups=8
    )
    assert make_norm(4, train=True).use_running_average is False
    assert make_norm(4, train=False).use_running_average is True
    assert make_norm(4, train=True).momentum == 0.9


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_conv_block_bias_only_without_norm_and_valid_trim(norm):
    x = jnp.ones((2, 12, 10, 3))
    block = ConvBlock(8, padding="VALID", norm=norm, num_groups=4)
    variables = block.init(jax.random.key(0), x, train=False)
    y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.shape == (2, 8, 6, 8)
    params = variables["params"]
    expected = {"conv_0", "conv_1"} | (
        set() if norm == "none" else {"norm_0", "norm_1"}
    )
    assert set(params) == expected
    for i in range(2):
        assert ("bias" in params[f"conv_{i}"]) == (norm == "none")
    assert ("batch_stats" in variables) == (norm == "batch")


def test_center_crop():
    x = jnp.arange(2 * 7 * 6 * 3).reshape(2, 7, 6, 3)
    np.testing.assert_array_equal(center_crop(x, (4, 2)), x[:, 1:5, 2:4, :])
    np.testing.assert_array_equal(center_crop(x, (7, 6)), x)
    with pytest.raises(ValueError, match="larger"):
        center_crop(x, (8, 6))
    with pytest.raises(ValueError, match="rank-1"):
        center_crop(x, (4,))


@pytest.mark.parametrize("method", ["max_pool", "avg_pool", "strided_conv"])
def test_downsample(method):
    x = jax.random.normal(jax.random.key(5), (1, 8, 6, 3))
    variables, y = _init_apply(Downsample(method, factor=2), x)
    assert y.shape == (1, 4, 3, 3)
    if method == "max_pool":
        np.testing.assert_allclose(y[0, 0, 0], x[0, :2, :2].max(axis=(0, 1)))
    elif method == "avg_pool":
        np.testing.assert_allclose(
            y[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), atol=1e-6
        )
    else:
        assert variables["params"]["conv"]["kernel"].shape == (2, 2, 3, 3)
