"""Receptive fields from the recurrence, checked against hand counts and against
the input pixels that can actually change an output unit."""

import functools
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module

from fcn_jax import models
from fcn_jax.analysis import layer_table, table_text
from fcn_jax.analysis.receptive_field import Field, stack_field
from fcn_jax.models.aspp import ASPP


class ConvStack(nn.Module):
    """Convs of (kernel, stride, dilation), 'SAME' padded, no activation."""

    specs: tuple[tuple[int, int, int], ...]

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        rank = x.ndim - 2
        for k, s, d in self.specs:
            x = nn.Conv(
                4, (k,) * rank, strides=(s,) * rank, kernel_dilation=(d,) * rank
            )(x)
            x = nn.relu(x)
        return x


class AsppOnly(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        return ASPP(features=4, rates=(1, 3, 6), name="aspp")(x, train=train)


def _field(specs, shape=(1, 32, 32, 2)) -> Field:
    return layer_table.trace_layers(ConvStack(tuple(specs)), shape).output_field


@pytest.mark.parametrize(
    "specs, size, jump",
    [
        ([(3, 1, 1)] * 3, 7, 1),  # three 3x3 convs
        ([(3, 1, 2)], 5, 1),  # k_eff = 1 + (3 - 1) * 2
        ([(5, 1, 3)], 13, 1),
        ([(7, 2, 1), (3, 2, 1), (3, 1, 1)], 7 + 2 * 2 + 2 * 4, 4),
        ([(2, 2, 1)] * 4, 16, 16),  # four 2x2 pools: the stride-16 tile
    ],
)
def test_known_stacks(specs, size, jump):
    field = _field(specs)
    assert field.size == (size, size)
    assert field.jump == (jump, jump)
    assert stack_field(specs, rank=2) == field


def test_recurrence_by_hand_for_random_stacks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        specs = [tuple(int(v) for v in rng.integers(1, 4, size=3)) for _ in range(4)]
        r, j = 1, 1
        for k, s, d in specs:
            r, j = r + (1 + (k - 1) * d - 1) * j, j * s
        assert stack_field(specs).size == (r,)
        assert stack_field(specs).jump == (j,)


def test_transposed_conv_and_resize_divide_the_jump():
    field = Field((10,), (Fraction(8),))
    assert field.transposed_conv((2,), (2,)) == Field((10,), (Fraction(4),))
    # k = 4, s = 2: two input units reach each output unit.
    assert field.transposed_conv((4,), (2,)) == Field((18,), (Fraction(4),))
    assert field.resize((5,), (10,), "linear") == Field((18,), (Fraction(4),))
    assert field.resize((5,), (10,), "nearest") == Field((10,), (Fraction(4),))


def test_aspp_field_is_its_largest_branch():
    # Rates 1, 3, 6 on one 3x3 conv each: 3, 7, 13; the 1x1 branch: 1.
    table = layer_table.trace_layers(AsppOnly(), (1, 24, 24, 3))
    sizes = {p: f.size[0] for p, f in table.module_fields.items() if p.count("/") == 1}
    assert sizes == {
        "aspp/conv_1x1": 1,
        "aspp/atrous_0": 3,
        "aspp/atrous_1": 7,
        "aspp/atrous_2": 13,
        "aspp/image_pool": 1,
        "aspp/project": 13,
    }
    assert table.module_fields["aspp/image_pool"].is_global
    assert table.module_fields["aspp"].size == (13, 13)
    text = table_text.format_aspp(table)
    assert "module (largest local branch): 13" in text


def _model(config_file: str, presets: str, **overrides):
    config = load_config_module(REPO_ROOT / "configs" / config_file).get_config(presets)
    config.unlock()
    for key, value in overrides.items():
        config.model[key] = value
    return models.create_model(config.model)


def _dependence(model, shape, axis: int) -> np.ndarray:
    """Which input pixels along `axis` through the centre change the centre
    output unit: each is set to a large value in turn, with every weight
    made positive so no change can cancel (ReLU then passes everything and a
    max pool picks the large value)."""
    x = jnp.ones(shape)
    # The rbg generator initialises far faster on the CPU than the default one.
    variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
    variables = jax.tree.map(lambda v: jnp.abs(v) + 0.01, variables)
    apply = jax.jit(functools.partial(model.apply, variables, train=False))
    base = apply(x)
    centre = tuple(n // 2 for n in base.shape[1:-1])
    n = shape[1 + axis]
    index = [0] + [s // 2 for s in shape[1:-1]] + [0]
    probes = []
    for i in range(n):
        probe = np.ones(shape, np.float32)
        index[1 + axis] = i
        probe[tuple(index[:-1])] = 1e3
        probes.append(probe[0])
    outputs = apply(jnp.asarray(np.stack(probes)))
    changed = outputs[(slice(None), *centre)].sum(-1) != base[(0, *centre)].sum(-1)
    return np.asarray(changed)


@pytest.mark.parametrize(
    "config_file, presets, overrides, shape",
    [
        ("unet.py", "runlocal", {}, (1, 64, 64, 1)),
        ("unet.py", "runlocal,valid", {}, (1, 100, 100, 1)),
        (
            "unet.py",
            "runlocal",
            {"depth": 1, "downsample": "strided_conv"},
            (1, 32, 32, 1),
        ),
    ],
)
def test_field_equals_the_pixels_that_change_the_output(
    config_file, presets, overrides, shape
):
    model = _model(config_file, presets, **overrides)
    table = layer_table.trace_layers(model, shape)
    for axis in (0, 1):
        changed = _dependence(model, shape, axis)
        support = np.flatnonzero(changed)
        assert support.size > 0
        # The field lies inside the input here, so its extent is exact.
        assert support[-1] - support[0] + 1 == table.output_field.size[axis]
        assert support.size == table.output_field.size[axis]


def test_param_totals_match_the_tree_for_every_config():
    for config_file, presets, shape in [
        ("unet.py", "runlocal", (1, 64, 64, 1)),
        ("fcn8s.py", "runlocal", (1, 64, 64, 3)),
        ("fcn8s.py", "runlocal,resnet", (1, 64, 64, 3)),
        ("deeplabv3.py", "runlocal", (1, 64, 64, 3)),
        ("deeplabv3.py", "runlocal,plus", (1, 64, 64, 3)),
    ]:
        table = layer_table.trace_layers(_model(config_file, presets), shape)
        assert table.row_params == table.total_params > 0, config_file


@pytest.mark.parametrize("shape", [(1, 96, 1), (1, 64, 64, 1), (1, 16, 16, 16, 1)])
def test_any_spatial_rank(shape):
    table = layer_table.trace_layers(_model("unet.py", "runlocal"), shape)
    rank = len(shape) - 2
    assert len(table.output_field.size) == rank
    assert table.output_field.size == (44,) * rank
    assert table.rows[0].output_shape[1:-1] == shape[1:-1]


@pytest.mark.parametrize(
    "config_file, shape",
    [("unet.py", (2, 128, 128, 1)), ("deeplabv3.py", (1, 64, 64, 3))],
)
def test_flops_agree_with_xla_cost_analysis(config_file, shape):
    model = _model(config_file, "runlocal")
    table = layer_table.trace_layers(model, shape)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    xla = layer_table.xla_forward_flops(model, variables, shape)
    # XLA leaves out taps on zero padding (most of them for DeepLab's dilated
    # convs on small maps) and adds element-wise ops of its own.
    assert 0.95 < table.row_flops_on_image / xla < 1.1
    assert table.row_flops >= table.row_flops_on_image
    conv = sum(r.flops_on_image for r in table.rows if r.kind == "Conv")
    assert conv / xla > 0.75
