"""FCN and the classifier: shared tester, bilinear upscoring, variants, backbones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_tester import check_model

from fcn_jax.models import MODELS, Classifier, create_model
from fcn_jax.models.backbones import VGGEncoder
from fcn_jax.models.fcn import FCN, BilinearTransposedConv

TINY_BACKBONE = {"base_width": 4, "max_width": 16, "num_groups": 2}
TINY_FCN = {**TINY_BACKBONE, "fc_width": 16, "fc6_kernel_size": 3}


def _param_tree(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), x
    )
    return variables["params"]


@pytest.mark.parametrize(
    "config,shapes",
    [
        (
            {"variant": "8s", "backbone": "vgg", "norm": "batch"},
            [(2, 64, 32, 1), (1, 45, 50, 1)],
        ),
        ({"variant": "16s", "norm": "group"}, [(2, 64, 1), (1, 37, 1)]),
    ],
)
def test_fcn_sizes_params_and_grads(config, shapes):
    model = FCN(3, **TINY_FCN, **config)
    # A multiple of 32 and sizes that are not: the input is padded inside.
    check_model(model, shapes, num_classes=3)


def test_fcn_size_planning():
    model = FCN(2, **TINY_FCN)
    assert [model.output_size(n) for n in (1, 31, 32, 33, 500)] == [1, 31, 32, 33, 500]
    assert model.is_valid_input_size(1) and not model.is_valid_input_size(0)
    assert model.check_input_shape((45, 50)) == (45, 50)
    with pytest.raises(ValueError, match="at least 1"):
        model.check_input_shape((32, 0))
    resnet = FCN(2, backbone="resnet", **TINY_FCN)
    x = jax.ShapeDtypeStruct((1, 45, 50, 1), jnp.float32)
    variables = jax.eval_shape(
        lambda x: resnet.init(jax.random.key(0), x, train=False), x
    )
    logits = jax.eval_shape(lambda v, x: resnet.apply(v, x, train=False), variables, x)
    assert logits.shape == (1, 45, 50, 2)


@pytest.mark.parametrize(
    "variant,present,absent",
    [
        ("32s", {"upscore32"}, {"score_pool4", "score_pool3", "upscore2"}),
        ("16s", {"upscore2", "score_pool4", "upscore16"}, {"score_pool3"}),
        (
            "8s",
            {"upscore2", "score_pool4", "upscore_pool4", "score_pool3", "upscore8"},
            {"upscore16", "upscore32"},
        ),
    ],
)
def test_fcn_variant_uses_its_skips(variant, present, absent):
    params = _param_tree(FCN(3, variant=variant, **TINY_FCN), (1, 32, 32, 1))
    assert {"backbone", "fc6", "fc7", "score_fr"} <= set(params)
    assert present <= set(params) and not absent & set(params)
    assert params["score_fr"]["kernel"].shape == (1, 1, 16, 3)


def test_fcn_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant='4s' is not one of"):
        _param_tree(FCN(3, variant="4s", **TINY_FCN), (1, 32, 32, 1))


@pytest.mark.parametrize("factor,spatial", [(2, (9, 7)), (8, (5, 6)), (4, (11,))])
def test_bilinear_upscore_matches_linear_resize_in_interior(factor, spatial):
    rank = len(spatial)
    x = jax.random.normal(jax.random.key(1), (2, *spatial, 3))
    conv = BilinearTransposedConv(
        3, kernel_size=2 * factor, stride=factor, padding=factor // 2
    )
    variables = conv.init(jax.random.key(0), x)
    y = conv.apply(variables, x)
    out_spatial = tuple(factor * n for n in spatial)
    assert y.shape == (2, *out_spatial, 3)
    # jax.image.resize is half-pixel aligned and clamps at the border, where the
    # transposed conv sees zeros instead; the two agree `factor` px inside.
    expected = jax.image.resize(x, y.shape, method="linear")
    interior = (slice(None), *(slice(factor, n - factor) for n in out_spatial))
    np.testing.assert_allclose(y[interior], expected[interior], atol=1e-5)
    assert not np.allclose(y, expected, atol=1e-3)  # The borders do differ.
    kernel = variables["params"]["kernel"]
    assert kernel.shape == (*(2 * factor,) * rank, 3, 3)
    off_diagonal = kernel * (1 - jnp.eye(3))
    assert not jnp.any(off_diagonal)


def test_vgg_encoder_features_by_stride():
    encoder = VGGEncoder(**TINY_BACKBONE, num_convs=(1, 1, 2, 2, 2))
    x = jax.ShapeDtypeStruct((1, 64, 96, 2), jnp.float32)
    variables = jax.eval_shape(
        lambda x: encoder.init(jax.random.key(0), x, train=False), x
    )
    features = jax.eval_shape(
        lambda v, x: encoder.apply(v, x, train=False), variables, x
    )
    widths = {2: 4, 4: 8, 8: 16, 16: 16, 32: 16}
    assert {s: f.shape for s, f in features.items()} == {
        s: (1, 64 // s, 96 // s, w) for s, w in widths.items()
    }
    assert list(variables["params"]) == [f"conv{i}" for i in range(1, 6)]


def test_classifier():
    model = Classifier(4, backbone="resnet", **TINY_BACKBONE, norm="group")
    check_model(model, [(2, 24, 1), (1, 37, 1)], num_classes=4, per_pixel=False)


def test_vgg_classifier_shapes_and_minimum_size():
    model = Classifier(4, backbone="vgg", **TINY_BACKBONE)
    for shape in [(2, 32, 32, 1), (1, 48, 40, 1)]:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        variables = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False), x
        )
        logits = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False), variables, x
        )
        assert logits.shape == (shape[0], 4) and logits.dtype == jnp.float32
    assert model.is_valid_input_size(32) and not model.is_valid_input_size(31)
    with pytest.raises(ValueError, match="minimum 32; pad the input"):
        _param_tree(model, (1, 31, 40, 1))


@pytest.mark.parametrize("name", ["fcn", "classifier"])
def test_create_model_accepts_every_field(name):
    model_cls = MODELS[name]
    fields = {
        f.name: f.default
        for f in dataclasses.fields(model_cls)
        if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING
    }
    model = create_model(
        {"name": name, "num_classes": 5, **fields, "dtype": "bfloat16"}
    )
    assert isinstance(model, model_cls) and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rates"):
        create_model({"name": name, "num_classes": 5, "rates": (1,)})
