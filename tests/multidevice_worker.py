"""Run in a subprocess by tests/test_multidevice.py, with the device count the
parent put in XLA_FLAGS (it must be set before jax starts).

  python tests/multidevice_worker.py OUT.npz DATA_DIR STEPS SPATIAL[,SPATIAL...]

For each mesh.spatial value, trains configs/unet.py:runlocal (global batch 8,
plain SGD; see tests/test_multidevice.py) for STEPS steps on real ISBI-2012 crops and stores the losses and the final
parameters; with several devices it also compares the forward pass of a whole
512x512 slice sharded over (data 1, spatial all devices) with the unsharded one.
"""

import sys

# Before jax: conftest sets the CPU platform and the XLA flags.
import conftest
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fcn_jax import sharding, steps
from fcn_jax.data import transforms
from fcn_jax.experiment import create_experiment, create_train_iterator, data_source


def runlocal_config(data_dir: str, spatial: int):
    config = conftest.load_config_module(
        conftest.REPO_ROOT / "configs" / "unet.py"
    ).get_config("runlocal")
    with config.unlocked():
        config.data.data_dir = data_dir
        config.data.batch_size = 8
        config.mesh.spatial = spatial
        config.optim.name = "sgd"
    return config


def train(config, num_steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    experiment = create_experiment(config)
    iterator = create_train_iterator(config, experiment.mesh)
    train_step = steps.jit_train_step(config, experiment.mesh)
    state, losses = experiment.state, []
    for _ in range(num_steps):
        batch = sharding.to_global_batch(next(iterator), experiment.mesh)
        state, step_metrics = train_step(state, batch)
        losses.append(float(step_metrics["loss"]))
    return np.asarray(losses), [np.asarray(x) for x in jax.tree.leaves(state.params)]


def spatially_sharded_forward_difference(config) -> tuple[float, float]:
    """Max |sharded - unsharded| logits on a real slice, and the logits' scale."""
    experiment = create_experiment(config)
    normalize = transforms.Normalize(tuple(config.data.mean), tuple(config.data.std))
    example = normalize.map(data_source(config, "validation")[0])
    images = example["image"][None]  # [1, 512, 512, 1]
    variables = {
        "params": experiment.state.params,
        "batch_stats": experiment.state.batch_stats,
    }

    def forward(variables, x):
        return experiment.model.apply(variables, x, train=False)

    unsharded = jax.jit(forward)(
        jax.device_put(variables, jax.devices()[0]),
        jax.device_put(images, jax.devices()[0]),
    )
    mesh = sharding.create_mesh(spatial=jax.device_count())
    sharded_images = jax.device_put(images, sharding.batch_sharding(mesh))
    sharded = jax.jit(forward, out_shardings=sharding.batch_sharding(mesh))(
        jax.device_put(variables, NamedSharding(mesh, PartitionSpec())),
        sharded_images,
    )
    assert len(sharded.sharding.device_set) == jax.device_count()
    difference = float(np.max(np.abs(np.asarray(sharded) - np.asarray(unsharded))))
    return difference, float(np.max(np.abs(np.asarray(unsharded))))


def main(out: str, data_dir: str, num_steps: str, spatial_values: str) -> None:
    results = {"device_count": jax.device_count()}
    for spatial in (int(s) for s in spatial_values.split(",")):
        losses, params = train(runlocal_config(data_dir, spatial), int(num_steps))
        results[f"losses_spatial{spatial}"] = losses
        for i, leaf in enumerate(params):
            results[f"param{i}_spatial{spatial}"] = leaf
    if jax.device_count() > 1:
        difference, scale = spatially_sharded_forward_difference(
            runlocal_config(data_dir, 1)
        )
        results["forward_difference"] = difference
        results["forward_scale"] = scale
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
