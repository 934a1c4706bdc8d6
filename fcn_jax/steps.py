"""The pure training and evaluation steps, and their jitted, sharded versions."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from fcn_jax import inference, losses, metrics, sharding, tta
from fcn_jax.train_state import TrainState

Batch = dict[str, jax.Array]


def center_crop_labels(labels: jax.Array, spatial_shape: tuple[int, ...]) -> jax.Array:
    """Crops labels [B, *spatial] to the centre `spatial_shape` (VALID outputs)."""
    starts = [(n - m) // 2 for n, m in zip(labels.shape[1:], spatial_shape)]
    index = (slice(None),) + tuple(
        slice(s, s + m) for s, m in zip(starts, spatial_shape)
    )
    return labels[index]


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict:
    class_weights = config.loss.class_weights
    return {
        "num_classes": config.model.num_classes,
        "ignore_label": config.data.ignore_label,
        "cross_entropy_weight": config.loss.cross_entropy_weight,
        "dice_weight": config.loss.dice_weight,
        "dice_epsilon": config.loss.dice_epsilon,
        "class_weights": (
            jnp.asarray(class_weights, jnp.float32) if class_weights else None
        ),
    }


def train_step(
    state: TrainState, batch: Batch, *, config: ml_collections.ConfigDict
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` {'image': [B, *S, C], 'label': [B, *S]}."""

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch["image"], train=True, mutable=["batch_stats"]
        )
        labels = center_crop_labels(batch["label"], logits.shape[1:-1])
        loss, components = losses.segmentation_loss(
            logits, labels, **_loss_kwargs(config)
        )
        predictions = jnp.argmax(logits, axis=-1)
        valid = labels != config.data.ignore_label
        accuracy = jnp.sum((predictions == labels) & valid) / jnp.maximum(
            valid.sum(), 1
        )
        return loss, (updates, components, accuracy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (updates, components, accuracy)), grads = grad_fn(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    if config.train.skip_nonfinite_updates:
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_state, kept
        )
    step_metrics = {
        "loss": loss,
        "pixel_accuracy": accuracy,
        "grad_norm": grad_norm,
        "nonfinite_updates": 1.0 - finite.astype(jnp.float32),
        **components,
    }
    return new_state, step_metrics


def predict_logits(
    state: TrainState,
    images: jax.Array,
    *,
    geometry: inference.Geometry,
    config: ml_collections.ConfigDict,
) -> jax.Array:
    """Logits [B, *S, K] for whole images [B, *S, C] with `config.eval.mode`."""

    def apply_fn(x):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return state.apply_fn(variables, x, train=False)

    def predict_fn(x):
        return inference.predict(
            apply_fn,
            x,
            geometry,
            mode=config.eval.mode,
            window_size=config.eval.window_size,
            overlap=config.eval.overlap,
            tile_output_size=config.eval.tile_output_size,
        )

    if not config.eval.flip and tuple(config.eval.scales) == (1.0,):
        return predict_fn(images)
    return tta.predict_with_augmentation(
        predict_fn, images, flip=config.eval.flip, scales=config.eval.scales
    )


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    geometry: inference.Geometry,
    config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """Returns the batch's confusion matrix [K, K] and predictions [B, *S].

    Padded pixels (`batch['mask'] == 0`) and ignored labels never count.
    """
    logits = predict_logits(state, batch["image"], geometry=geometry, config=config)
    predictions = jnp.argmax(logits, axis=-1)
    confusion = metrics.confusion_matrix(
        predictions,
        batch["label"],
        num_classes=config.model.num_classes,
        ignore_label=config.data.ignore_label,
        mask=batch.get("mask"),
    )
    return confusion, predictions


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`train_step` jitted with the state replicated and donated, batch sharded."""
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(train_step, config=config),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def jit_eval_step(
    config: ml_collections.ConfigDict, mesh: Mesh, geometry: inference.Geometry
) -> Callable:
    """`eval_step` jitted; the confusion matrix is summed over all devices."""
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(eval_step, geometry=geometry, config=config),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, sharding.batch_sharding(mesh)),
    )
