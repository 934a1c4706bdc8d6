"""Device mesh, shardings, and assembly of host-local batches into global arrays.

The mesh has two axes: `data` splits the batch, `spatial` splits the first
spatial axis (height, or depth of a volume) of every activation, for inputs too
large for one device. Parameters and optimizer state are replicated. Each
spatial group of devices must belong to one process, which loads whole images
and hands each device its slab.
"""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
SPATIAL_AXIS = "spatial"


def create_mesh(spatial: int = 1) -> Mesh:
    """A (data, spatial) mesh over every device of every process.

    `spatial` devices split each image's first spatial axis; the other
    `device_count // spatial` form the data-parallel axis.
    """
    devices = jax.devices()
    if spatial < 1 or len(devices) % spatial:
        raise ValueError(
            f"config.mesh.spatial={spatial} must be a positive divisor of the "
            f"{len(devices)} devices."
        )
    if jax.local_device_count() % spatial:
        raise ValueError(
            f"config.mesh.spatial={spatial} must divide the "
            f"{jax.local_device_count()} devices of each process: a process "
            "feeds whole images to its spatial groups."
        )
    grid = np.asarray(devices).reshape(len(devices) // spatial, spatial)
    return Mesh(grid, (DATA_AXIS, SPATIAL_AXIS))


def data_axis_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, S1, ...] arrays: batch over `data`, first spatial axis over `spatial`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, SPATIAL_AXIS))


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The batch each process loads; raises if it cannot be split evenly."""
    rows = data_axis_size(mesh)
    if global_batch_size % rows:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the "
            f"{rows} data-parallel rows of the mesh; choose a multiple of {rows}."
        )
    return global_batch_size // jax.process_count()


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
    """Assembles each process's rows of the batch into one sharded jax.Array."""
    sharding = batch_sharding(mesh)
    spatial = mesh.shape[SPATIAL_AXIS]
    global_batch = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim < 2 or value.shape[1] % spatial:
            raise ValueError(
                f"Batch entry '{key}' has shape {value.shape}: its axis 1 must "
                f"split evenly over config.mesh.spatial={spatial} devices."
            )
        global_batch[key] = jax.make_array_from_process_local_data(sharding, value)
    return global_batch


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, whole (all spatial slabs)."""
    shards = array.addressable_shards
    row_start = min(shard.index[0].start or 0 for shard in shards)
    row_stop = max(shard.index[0].stop or array.shape[0] for shard in shards)
    rows = np.empty((row_stop - row_start, *array.shape[1:]), array.dtype)
    for shard in shards:
        index = list(shard.index)
        start = index[0].start or 0
        stop = index[0].stop or array.shape[0]
        index[0] = slice(start - row_start, stop - row_start)
        rows[tuple(index)] = np.asarray(shard.data)
    return rows
