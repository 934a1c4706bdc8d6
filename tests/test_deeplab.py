"""DeepLabv3: atrous ResNet strides, dilation extent, ASPP parts, the whole model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_tester import check_model

from fcn_jax.models import MODELS, DeepLabV3, create_model
from fcn_jax.models.aspp import ASPP
from fcn_jax.models.backbones import ConvNormReLU, ResNetEncoder

TINY_RESNET = {"stage_sizes": (1, 1, 1, 1), "base_width": 4, "num_groups": 2}
TINY_DEEPLAB = {
    **TINY_RESNET,
    "aspp_features": 8,
    "low_level_features": 4,
    "decoder_features": 8,
    "norm": "group",
}


def _init_shapes(module, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, train=False), x
    )
    out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return variables, out


@pytest.mark.parametrize(
    "config,shapes",
    [
        ({"output_stride": 16}, [(2, 64, 1), (1, 37, 1)]),
        (
            {"output_stride": 8, "decoder": True, "norm": "batch"},
            [(2, 32, 48, 1), (1, 37, 30, 1)],
        ),
    ],
)
def test_deeplab_sizes_params_and_grads(config, shapes):
    model = DeepLabV3(3, **{**TINY_DEEPLAB, **config})
    # Multiples of the output stride and sizes that are not (padded inside).
    check_model(model, shapes, num_classes=3)


@pytest.mark.parametrize("shape", [(1, 16, 16, 16, 1), (2, 13, 16, 20, 1)])
def test_deeplab_3d_forward_shape(shape):
    model = DeepLabV3(2, **TINY_DEEPLAB, decoder=True)
    _, logits = _init_shapes(model, shape)
    assert logits.shape == (*shape[:-1], 2) and logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "output_stride,keys", [(8, [2, 4, 8]), (16, [2, 4, 8, 16]), (32, [2, 4, 8, 16, 32])]
)
def test_output_stride_sets_the_bottleneck_stride(output_stride, keys):
    encoder = ResNetEncoder(**TINY_RESNET, output_stride=output_stride)
    variables, features = _init_shapes(encoder, (1, 64, 64, 1))
    assert sorted(features) == keys
    for stride, feature in features.items():
        assert feature.shape[1:3] == (64 // stride, 64 // stride)
    assert features[output_stride].shape[-1] == 4 * 2**3
    # Dilation trades stride for context without adding parameters.
    reference, _ = _init_shapes(ResNetEncoder(**TINY_RESNET), (1, 64, 64, 1))
    shapes = jax.tree.map(lambda leaf: leaf.shape, variables)
    assert shapes == jax.tree.map(lambda leaf: leaf.shape, reference)


def _spatial_conv_dilations(jaxpr) -> list[int]:
    """Dilations of the convs with a kernel wider than 1, in program order (1D)."""
    found = []
    for eqn in jaxpr.eqns:
        conv = eqn.primitive.name == "conv_general_dilated"
        if conv and eqn.invars[1].aval.shape[0] > 1:
            found.append(eqn.params["rhs_dilation"][0])
        for value in eqn.params.values():
            if hasattr(value, "jaxpr"):
                found += _spatial_conv_dilations(value.jaxpr)
    return found


@pytest.mark.parametrize(
    "output_stride,multi_grid,stage_dilations",
    [
        (32, (), [1, 1, 1, 1]),
        (16, (), [1, 1, 1, 2]),
        (8, (), [1, 1, 2, 4]),
        (16, (1, 3), [1, 1, 1, 2, 6]),
    ],
)
def test_dilation_replaces_the_dropped_strides(
    output_stride, multi_grid, stage_dilations
):
    stage_sizes = (1, 1, 1, 1 + bool(multi_grid))
    encoder = ResNetEncoder(
        **{**TINY_RESNET, "stage_sizes": stage_sizes},
        output_stride=output_stride,
        multi_grid=multi_grid,
        norm="none",
    )
    x = jax.ShapeDtypeStruct((1, 64, 1), jnp.float32)
    variables = jax.eval_shape(
        lambda x: encoder.init(jax.random.key(0), x, train=False), x
    )
    jaxpr = jax.make_jaxpr(lambda v, x: encoder.apply(v, x, train=False))(variables, x)
    # conv1, then both 3x3 convs of every block.
    expected = [1] + [d for d in stage_dilations for _ in range(2)]
    assert _spatial_conv_dilations(jaxpr.jaxpr) == expected


def test_resnet_rejects_bad_output_stride_and_multi_grid():
    with pytest.raises(ValueError, match="output_stride=12 must be one of"):
        _init_shapes(ResNetEncoder(**TINY_RESNET, output_stride=12), (1, 32, 32, 1))
    with pytest.raises(ValueError, match="one rate per block"):
        _init_shapes(ResNetEncoder(**TINY_RESNET, multi_grid=(1, 2)), (1, 32, 32, 1))


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (3, 2), (3, 4), (5, 3)])
def test_dilated_conv_extent_is_the_effective_kernel(kernel_size, dilation):
    conv = ConvNormReLU(
        1, kernel_size=kernel_size, dilation=dilation, norm="none", relu=False
    )
    x = jnp.zeros((1, 31, 31, 1))
    params = conv.init(jax.random.key(0), x, train=False)
    # All-ones weights, so no tap can vanish by chance.
    params = jax.tree.map(jnp.ones_like, params)
    grad = jax.grad(lambda x: conv.apply(params, x, train=False)[0, 15, 15, 0])(x)
    rows, cols = np.nonzero(np.asarray(grad[0, :, :, 0]))
    effective = 1 + (kernel_size - 1) * dilation
    assert rows.max() - rows.min() + 1 == effective
    assert cols.max() - cols.min() + 1 == effective
    assert len(set(rows)) == kernel_size  # Holes between the taps.


def test_aspp_branches_and_width():
    aspp = ASPP(8, rates=(1, 2, 3), norm="group", num_groups=2)
    x = jax.random.normal(jax.random.key(0), (2, 6, 10, 5))
    variables = jax.jit(lambda x: aspp.init(jax.random.key(1), x, train=False))(x)
    y, state = jax.jit(
        lambda v, x: aspp.apply(
            v, x, train=False, capture_intermediates=True, mutable=True
        )
    )(variables, x)
    branches = ["conv_1x1", "atrous_0", "atrous_1", "atrous_2", "image_pool"]
    assert set(variables["params"]) == {*branches, "project"}
    for name in branches:
        (out,) = state["intermediates"][name]["__call__"]
        assert out.shape == (2, 6, 10, 8), name
    pooled = state["intermediates"]["image_pool"]["__call__"][0]
    np.testing.assert_allclose(
        pooled, jnp.broadcast_to(pooled[:, :1, :1], pooled.shape)
    )
    assert variables["params"]["project"]["conv"]["kernel"].shape == (1, 1, 40, 8)
    assert y.shape == (2, 6, 10, 8)


def test_aspp_rates_double_at_output_stride_8():
    assert DeepLabV3(2, output_stride=16).scaled_rates() == (6, 12, 18)
    assert DeepLabV3(2, output_stride=8).scaled_rates() == (12, 24, 36)


def test_decoder_adds_the_low_level_skip():
    plain, _ = _init_shapes(DeepLabV3(2, **TINY_DEEPLAB), (1, 32, 32, 1))
    plus, _ = _init_shapes(DeepLabV3(2, **TINY_DEEPLAB, decoder=True), (1, 32, 32, 1))
    assert set(plain["params"]) == {"backbone", "aspp", "classifier"}
    assert set(plus["params"]) - set(plain["params"]) == {
        "low_level_proj",
        "decoder_block",
    }


def test_create_model_accepts_every_field():
    fields = {
        f.name: f.default
        for f in dataclasses.fields(DeepLabV3)
        if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING
    }
    model = create_model({"name": "deeplabv3", "num_classes": 3, **fields})
    assert isinstance(model, MODELS["deeplabv3"]) and model.output_stride == 16
