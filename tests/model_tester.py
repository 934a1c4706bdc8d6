"""One tester every model goes through: shapes, FCN parameter invariance, grads."""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _expected_spatial(
    model: nn.Module, spatial: Sequence[int], per_pixel: bool
) -> tuple[int, ...]:
    if not per_pixel:
        return ()
    if hasattr(model, "output_size"):
        return tuple(model.output_size(n) for n in spatial)
    return tuple(spatial)


def _param_shapes(variables) -> dict:
    return jax.tree.map(lambda leaf: leaf.shape, variables["params"])


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def check_model(
    model: nn.Module,
    input_shapes: Sequence[Sequence[int]],
    num_classes: int,
    *,
    per_pixel: bool = True,
) -> int:
    """Checks a dense-prediction model called as `model(x, *, train)`.

    For every input shape [B, *S, C]: logits are float32 [B, *S', K], with S'
    from `model.output_size` when the model has one (else S' = S), in train and
    eval mode; with `per_pixel=False` (an image classifier) they are [B, K].
    The parameter tree is the same for every input size (a fully convolutional
    net's invariant). For the first shape the model really runs and the
    gradients of a cross-entropy loss are finite and not all zero.

    Returns:
      The number of parameters.
    """
    # 'rbg' keys: XLA:CPU compiles a threefry-based init several times slower.
    key = jax.random.key(0, impl="rbg")
    trees = []
    for shape in input_shapes:
        x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
        variables = jax.eval_shape(lambda x: model.init(key, x, train=False), x)
        trees.append(_param_shapes(variables))
        expected = (
            shape[0],
            *_expected_spatial(model, shape[1:-1], per_pixel),
            num_classes,
        )
        for train in (True, False):
            logits, _ = jax.eval_shape(
                lambda v, x, t=train: model.apply(v, x, train=t, mutable=True),
                variables,
                x,
            )
            assert logits.shape == expected, (shape, train, logits.shape, expected)
            assert logits.dtype == jnp.float32, logits.dtype
    for tree in trees[1:]:
        assert tree == trees[0], "parameters depend on the input size"

    shape = tuple(input_shapes[0])
    x = jax.random.normal(jax.random.fold_in(key, 1), shape)
    variables = jax.jit(lambda x: model.init(key, x, train=False))(x)
    params = variables["params"]
    state = {name: value for name, value in variables.items() if name != "params"}
    out_shape = (shape[0], *_expected_spatial(model, shape[1:-1], per_pixel))
    labels = jax.random.randint(jax.random.fold_in(key, 2), out_shape, 0, num_classes)

    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params, **state}, x, train=True, mutable=True
        )
        return _cross_entropy(logits, labels)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(loss), loss
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), "non-finite grads"
    assert any(bool(jnp.any(g != 0)) for g in leaves), "all gradients are zero"
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


@dataclasses.dataclass
class TrainPass:
    """One training forward and backward pass of a freshly initialised model."""

    variables: dict
    loss: jax.Array
    logits: jax.Array
    batch_stats: dict  # updated by the pass
    grads: dict


def train_loss_and_grads(
    model: nn.Module, images: jax.Array, labels: jax.Array
) -> TrainPass:
    """Initialises `model` (key 0, so models with the same parameter tree start
    alike) and differentiates the cross-entropy of one training forward pass."""
    variables = model.init(jax.random.key(0), images, train=False)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return _cross_entropy(logits, labels), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True)
    )(variables["params"])
    return TrainPass(variables, loss, logits, batch_stats, grads)


def assert_unet_gradients_match(got: dict, expected: dict) -> None:
    """Every gradient leaf within 1e-5 of its largest entry, the up-convs'
    bias gradients within 1e-4: each sums the cotangent over every output
    pixel with heavy cancellation, so two float32 summation orders both sit
    ~1e-5 of the scale from a float64 reference (measured 1.1e-5 with the
    filter-gradient kernel, 1.3e-5 with XLA's)."""
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree.leaves(got),
        jax.tree.leaves(expected),
    ):
        scale = float(jnp.max(jnp.abs(b)))
        up_bias = "up_" in str(path[0]) and "bias" in str(path[0])
        np.testing.assert_allclose(
            a, b, rtol=0, atol=(1e-4 if up_bias else 1e-5) * scale, err_msg=str(path[0])
        )
