"""Size formulas checked against XLA's shapes, the layers, and brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from fcn_jax.models import sizes
from fcn_jax.models.layers import Upsample

# (size, kernel, stride, padding, output_padding), including sizes that fail.
TRANSPOSED_GRID = [
    (h, k, s, p, o)
    for h, k, s in itertools.product((1, 2, 5), (1, 2, 3, 4), (1, 2, 3))
    for p in range(k + 1)
    for o in range(s + 1)
]


def _scatter_extent(size, kernel, stride, padding, output_padding):
    """Output size by brute force: scatter each input pixel's k-window into a
    canvas, drop `padding` from both ends, and let output_padding extend the
    high end; returns None if nothing is left."""
    canvas = np.zeros(stride * size + kernel + output_padding, bool)
    for i in range(size):
        canvas[stride * i : stride * i + kernel] = True
    last_written = int(np.nonzero(canvas)[0].max())
    high = last_written + 1 + output_padding  # exclusive end, before cropping
    length = high - padding - padding
    return length if length >= 1 else None


def _adjoint_sizes(size, kernel, stride, padding):
    """Input sizes n that a stride-s conv maps to `size`, by enumeration."""
    out = []
    for n in range(1, stride * size + kernel + 1):
        if n + 2 * padding < kernel:
            continue
        if sizes.conv_output_size(n, kernel, stride, padding) == size:
            out.append(n)
    return out


@pytest.mark.parametrize("size,kernel,stride,padding,output_padding", TRANSPOSED_GRID)
def test_transposed_conv_output_size_matches_brute_force(
    size, kernel, stride, padding, output_padding
):
    expected = _scatter_extent(size, kernel, stride, padding, output_padding)
    if output_padding >= stride or expected is None:
        with pytest.raises(ValueError, match=f"{output_padding}|< 1"):
            sizes.transposed_conv_output_size(
                size, kernel, stride, padding, output_padding
            )
        return
    got = sizes.transposed_conv_output_size(
        size, kernel, stride, padding, output_padding
    )
    assert got == expected
    # The transposed conv inverts the conv's size map: output_padding picks one
    # of the (up to `stride`) sizes a conv with these settings sends to `size`.
    candidates = _adjoint_sizes(size, kernel, stride, padding)
    assert got in candidates
    if len(candidates) == stride:
        assert candidates[output_padding] == got


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("size,kernel,stride,padding,output_padding", TRANSPOSED_GRID)
def test_transposed_conv_output_size_matches_upsample_layer(
    size, kernel, stride, padding, output_padding, fast
):
    layer = Upsample(
        3,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        use_fast_path=fast,
    )
    x = jax.ShapeDtypeStruct((1, size, 2), jnp.float32)
    try:
        expected = sizes.transposed_conv_output_size(
            size, kernel, stride, padding, output_padding
        )
    except ValueError:
        with pytest.raises(ValueError):
            jax.eval_shape(layer.init, jax.random.key(0), x)
        return
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    y = jax.eval_shape(layer.apply, variables, x)
    assert y.shape == (1, expected, 3)


@pytest.mark.parametrize(
    "size,kernel,stride,padding,dilation",
    [
        (h, k, s, p, d)
        for h, k, s, p, d in itertools.product(
            (1, 4, 7, 10), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)
        )
    ],
)
def test_conv_output_size_matches_xla(size, kernel, stride, padding, dilation):
    x = jax.ShapeDtypeStruct((1, size, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, 1, 1), jnp.float32)

    def conv(x, w):
        return lax.conv_general_dilated(
            x,
            w,
            window_strides=(stride,),
            padding=[(padding, padding)],
            rhs_dilation=(dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )

    if size + 2 * padding < dilation * (kernel - 1) + 1:
        with pytest.raises(ValueError, match="does not fit"):
            sizes.conv_output_size(size, kernel, stride, padding, dilation)
        return
    assert jax.eval_shape(conv, x, w).shape[1] == sizes.conv_output_size(
        size, kernel, stride, padding, dilation
    )


@pytest.mark.parametrize("pool", [nn.max_pool, nn.avg_pool])
@pytest.mark.parametrize(
    "size,window,stride,padding",
    list(itertools.product((2, 5, 8, 11), (1, 2, 3), (None, 1, 2), (0, 1))),
)
def test_pool_output_size_matches_flax(pool, size, window, stride, padding):
    x = jax.ShapeDtypeStruct((1, size, 1), jnp.float32)
    strides = (window if stride is None else stride,)
    if size + 2 * padding < window:
        with pytest.raises(ValueError, match="does not fit"):
            sizes.pool_output_size(size, window, stride, padding)
        return
    y = jax.eval_shape(
        lambda x: pool(x, (window,), strides=strides, padding=[(padding, padding)]),
        x,
    )
    assert y.shape[1] == sizes.pool_output_size(size, window, stride, padding)


def test_sizes_reject_bad_arguments():
    with pytest.raises(ValueError, match="stride=0"):
        sizes.conv_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match="output_padding=2 must be smaller than"):
        sizes.transposed_conv_output_size(8, 2, 2, output_padding=2)
