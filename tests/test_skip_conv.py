"""The decoder's skip join as one conv per input equals concatenating first.

conv(concat(a, b), W) = conv(a, W_a) + conv(b, W_b), W_a and W_b the input-
channel halves of W: `ConcatConv` must have nn.Conv's parameters (shapes and
initial values) and give its outputs and gradients, and a U-Net with
`skip_conv='split'` must train exactly like one with 'concat'.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import em_image
from model_tester import train_loss_and_grads

from fcn_jax.analysis.layer_table import trace_layers
from fcn_jax.models import UNet, conv_gradient, create_model
from fcn_jax.models.layers import ConcatConv


def _conv_pair(widths, rank, **conv_args):
    keys = jax.random.split(jax.random.key(0), len(widths) + 1)
    spatial = (9, 10, 7)[:rank]
    inputs = tuple(
        jax.random.normal(key, (2, *spatial, width)) for key, width in zip(keys, widths)
    )
    args = {"features": 16, "kernel_size": (3,) * rank, **conv_args}
    return inputs, nn.Conv(**args), ConcatConv(**args)


@pytest.mark.parametrize(
    "widths, rank, conv_args",
    [
        ((3, 5), 1, {}),
        ((8, 8), 2, {}),
        ((4, 6, 2), 2, {"padding": "VALID", "use_bias": False}),
        ((2, 3), 3, {}),
        ((16, 16), 2, {"conv_general_dilated": conv_gradient.conv_general_dilated}),
    ],
)
def test_concat_conv_equals_nn_conv_of_the_concatenation(widths, rank, conv_args):
    inputs, conv, concat_conv = _conv_pair(widths, rank, **conv_args)
    joined = jnp.concatenate(inputs, axis=-1)
    variables = conv.init(jax.random.key(1), joined)
    # Same parameter shapes and the same initial values from the same key.
    jax.tree.map(
        np.testing.assert_array_equal,
        concat_conv.init(jax.random.key(1), inputs),
        variables,
    )
    cotangent = jax.random.normal(
        jax.random.key(2), conv.apply(variables, joined).shape
    )

    def grads(apply, x):
        y, vjp = jax.vjp(apply, variables, x)
        return y, vjp(cotangent)

    y, (d_vars, d_joined) = jax.jit(grads, static_argnums=0)(conv.apply, joined)
    got_y, (got_vars, d_inputs) = jax.jit(grads, static_argnums=0)(
        concat_conv.apply, inputs
    )
    np.testing.assert_allclose(got_y, y, rtol=1e-5, atol=1e-5)
    for got, expected in zip(jax.tree.leaves(got_vars), jax.tree.leaves(d_vars)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jnp.concatenate(d_inputs, axis=-1), d_joined, rtol=1e-5, atol=1e-5
    )


def test_concat_conv_computes_in_its_dtype():
    inputs, conv, concat_conv = _conv_pair((4, 4), 2, dtype=jnp.bfloat16)
    variables = concat_conv.init(jax.random.key(1), inputs)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    y = concat_conv.apply(variables, inputs)
    assert y.dtype == jnp.bfloat16
    expected = conv.apply(variables, jnp.concatenate(inputs, axis=-1))
    np.testing.assert_allclose(np.float32(y), np.float32(expected), atol=0.1)


def _em_batch():
    image = em_image(64, 96)
    images = jnp.asarray(np.stack([image, image[::-1]])[..., None] - 0.5)
    return images, (images[..., 0] > 0).astype(jnp.int32)


def test_unet_with_split_skip_convs_trains_like_the_concatenating_one():
    """One SGD step of a U-Net on a real ISBI-2012 crop: same initial
    parameters, loss, gradients and updated batch statistics."""
    images, labels = _em_batch()

    def step(skip_conv):
        model = UNet(
            2, depth=3, base_width=16, skip_conv=skip_conv, batch_norm_relu="fused"
        )
        return train_loss_and_grads(model, images, labels)

    concat, split = step("concat"), step("split")
    jax.tree.map(np.testing.assert_array_equal, split.variables, concat.variables)
    np.testing.assert_allclose(split.loss, concat.loss, rtol=1e-6)
    for got, expected in zip(
        jax.tree.leaves((split.batch_stats, split.grads)),
        jax.tree.leaves((concat.batch_stats, concat.grads)),
    ):
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


def test_split_makes_no_concatenation():
    """One concatenation fewer per decoder level (the up-convs stack their
    offsets with concatenations of their own)."""
    images, _ = _em_batch()
    counts = []
    for choice in ("concat", "split"):
        model = UNet(2, depth=2, base_width=8, skip_conv=choice)
        variables = model.init(jax.random.key(0), images, train=False)
        lowered = jax.jit(lambda v: model.apply(v, images, train=False)).lower(  # noqa: B023
            variables
        )
        counts.append(lowered.as_text().count("stablehlo.concatenate"))
    assert counts[1] == counts[0] - 2


def test_layer_table_is_the_same_for_both():
    rows = [
        trace_layers(UNet(2, depth=2, base_width=8, skip_conv=choice), (1, 32, 32, 1))
        for choice in ("concat", "split")
    ]
    assert rows[0] == rows[1]


def test_auto_splits_on_cpu_and_bad_choices_are_named():
    model = create_model({"name": "unet", "num_classes": 2, "skip_conv": "auto"})
    cpu = jax.default_backend() == "cpu"
    assert model.skip_conv == ("split" if cpu else "concat")
    with pytest.raises(ValueError, match="skip_conv='sum'"):
        UNet(2, depth=1, base_width=4, skip_conv="sum").init(
            jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False
        )
