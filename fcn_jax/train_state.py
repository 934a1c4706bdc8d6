"""The training state and its initialisation, replicated over the mesh."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from fcn_jax import sharding


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus BatchNorm running statistics."""

    batch_stats: Any


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    mesh: Mesh,
) -> TrainState:
    """Initialises a replicated TrainState for inputs of `input_shape` [B, *spatial, C]."""

    def init(rng: jax.Array) -> TrainState:
        variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            tx=optimizer,
        )

    return jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))(rng)


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    mesh: Mesh,
) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it."""
    state = jax.eval_shape(
        lambda rng: create_train_state(model, optimizer, rng, input_shape, mesh),
        jax.random.key(0),
    )
    replicated = sharding.replicated_sharding(mesh)
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        state,
    )
