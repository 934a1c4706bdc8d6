"""U-Net: the paper's sizes, size planning against traced shapes, every variant."""

import jax
import jax.numpy as jnp
import pytest
from model_tester import check_model

from fcn_jax import config_lib
from fcn_jax.models import MODELS, UNet, create_model
from fcn_jax.models.decoder import Decoder

TINY = {"depth": 2, "base_width": 4, "num_groups": 2}


def _traced_output_shape(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), x
    )
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def test_paper_size_572_gives_388():
    model = UNet(2, depth=4, base_width=64, padding="VALID")
    assert model.output_size(572) == 388
    assert _traced_output_shape(model, (1, 572, 572, 1)).shape == (1, 388, 388, 2)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_valid_input_sizes_agree_with_traced_shapes(padding):
    model = UNet(2, padding=padding, **TINY)
    valid = model.valid_input_sizes(30, 70)
    assert valid and valid == [n for n in range(30, 71) if model.is_valid_input_size(n)]
    if padding == "SAME":
        assert valid == list(range(32, 71, 4))
    for n in range(38, 54):
        if n in valid:
            got = _traced_output_shape(model, (1, n, 1)).shape
            assert got == (1, model.output_size(n), 2)
        else:
            with pytest.raises(ValueError, match="nearest valid sizes"):
                _traced_output_shape(model, (1, n, 1))
    for n in valid:
        assert (model.output_size(n) == n) == (padding == "SAME")


def test_invalid_size_names_nearest_valid_sizes():
    model = UNet(2, depth=4, base_width=64, padding="VALID")
    assert model.nearest_valid_input_sizes(570) == (556, 572)
    assert not model.is_valid_input_size(570)
    message = (
        "input size 570 along axis 1 is not valid for a VALID U-Net of depth 4; "
        r"nearest valid sizes: 556 \(-> 372\), 572 \(-> 388\)"
    )
    with pytest.raises(ValueError, match=message):
        model.check_input_shape((572, 570))
    with pytest.raises(ValueError, match=message):
        _traced_output_shape(model, (1, 572, 570, 1))
    assert model.check_input_shape((572, 556)) == (388, 372)


@pytest.mark.parametrize(
    "config,sizes",
    [
        ({"padding": "SAME"}, (16, 24)),
        (
            {"downsample": "avg_pool", "upsample": "resize_conv", "norm": "group"},
            (16, 24),
        ),
        (
            {
                "downsample": "strided_conv",
                "norm": "none",
                "up_kernel_size": 3,
                "up_padding": 1,
                "up_output_padding": 1,
            },
            (16, 20),
        ),
        ({"padding": "VALID"}, (44, 52)),
        (
            {
                "padding": "VALID",
                "downsample": "strided_conv",
                "upsample": "resize_conv",
                "norm": "group",
            },
            (44, 48),
        ),
        (
            {
                "padding": "VALID",
                "downsample": "avg_pool",
                "norm": "none",
                "up_kernel_size": 4,
                "up_padding": 1,
            },
            (44, 48),
        ),
    ],
)
def test_unet_variants(config, sizes):
    model = UNet(3, **{**TINY, **config})
    small, large = sizes
    check_model(model, [(2, small, large, 1), (1, large, small, 1)], num_classes=3)


def test_unet_1d_and_3d():
    check_model(UNet(2, **TINY), [(2, 32, 1), (1, 48, 1)], num_classes=2)
    check_model(UNet(2, **TINY), [(2, 8, 12, 8, 1), (1, 12, 8, 8, 1)], num_classes=2)


def test_bfloat16_compute_keeps_float32_logits_and_params():
    model = UNet(2, dtype=jnp.bfloat16, **TINY)
    x = jnp.ones((1, 16, 16, 1))

    def init_and_apply(x):
        variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
        return variables, model.apply(variables, x, train=False)

    variables, logits = jax.jit(init_and_apply)(x)
    assert logits.dtype == jnp.float32 and logits.shape == (1, 16, 16, 2)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    # The convolutions themselves run in bfloat16.
    assert "bf16" in str(jax.make_jaxpr(init_and_apply)(x))


def test_submodule_names_follow_the_data_flow():
    model = UNet(2, downsample="strided_conv", **TINY)
    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = params["params"]
    assert set(params) == {"encoder", "decoder", "head"}
    encoder = {"enc_block_0", "down_1", "enc_block_1", "down_2", "bottleneck"}
    assert set(params["encoder"]) == encoder
    assert set(params["decoder"]) == {"up_1", "dec_block_1", "up_0", "dec_block_0"}


def test_create_model_from_config():
    config = config_lib.default_config().model
    config.dtype = "bfloat16"
    model = create_model(config)
    assert isinstance(model, MODELS["unet"])
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert (model.depth, model.base_width, model.padding) == (4, 64, "SAME")
    config.name = "segnet"
    with pytest.raises(ValueError, match="known models: unet"):
        create_model(config)
    with pytest.raises(ValueError, match="not one of"):
        create_model({"name": "unet", "num_classes": 2, "dtype": "float64"})
    with pytest.raises(ValueError, match="widht"):
        create_model({"name": "unet", "num_classes": 2, "widht": 3})


@pytest.mark.parametrize(
    "padding,skip,match",
    [("SAME", 5, "multiple of 2\\*\\*depth"), ("VALID", 3, "cannot be cropped")],
)
def test_decoder_rejects_skips_it_cannot_join(padding, skip, match):
    features = {
        1: jax.ShapeDtypeStruct((1, skip, 4), jnp.float32),
        2: jax.ShapeDtypeStruct((1, 2, 8), jnp.float32),
    }
    decoder = Decoder(depth=1, base_width=4, padding=padding)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            lambda f: decoder.init(jax.random.key(0), f, train=False), features
        )


def test_config_errors_are_not_reported_as_size_errors():
    model = UNet(2, downsample="bilinear", **TINY)
    with pytest.raises(ValueError, match="downsample='bilinear' is not one of"):
        model.check_input_shape((16,))
    with pytest.raises(ValueError, match="downsample='bilinear' is not one of"):
        model.is_valid_input_size(16)
