"""Device mesh, shardings, and assembly of host-local batches into global arrays."""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A 1D data-parallel mesh over every device of every process."""
    devices = np.asarray(jax.devices())
    return Mesh(devices, (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The batch each process loads; raises if it cannot be split evenly."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the "
            f"{num_devices} devices of the mesh; choose a multiple of {num_devices}."
        )
    return global_batch_size // jax.process_count()


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one sharded jax.Array."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
