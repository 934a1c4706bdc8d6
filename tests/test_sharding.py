"""The mesh, global batches and multi-process start-up, on this process's device.

The 8-device and 2-process equivalences are in test_multidevice.py and
test_multiprocess.py (`make test-long`).
"""

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import REPO_ROOT, load_config_module

from fcn_jax import config_lib, distributed, sharding
from fcn_jax.data import isbi2012, pipeline
from fcn_jax.experiment import eval_batches


def test_default_mesh_is_data_parallel_over_every_device():
    mesh = sharding.create_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS, sharding.SPATIAL_AXIS)
    assert mesh.shape[sharding.DATA_AXIS] == jax.device_count()
    assert mesh.shape[sharding.SPATIAL_AXIS] == 1


def test_spatial_axis_that_does_not_divide_the_devices_is_named():
    with pytest.raises(ValueError, match="config.mesh.spatial=3"):
        sharding.create_mesh(spatial=jax.device_count() * 3)


def test_crop_size_must_split_over_the_spatial_axis():
    config = config_lib.default_config()
    config.mesh.spatial = 3
    with pytest.raises(ValueError, match="crop_size=256 must be divisible"):
        config_lib.validate_config(config)


def test_global_batch_round_trips_through_local_rows():
    mesh = sharding.create_mesh()
    local = {"image": np.arange(2 * 4 * 6 * 1, dtype=np.float32).reshape(2, 4, 6, 1)}
    global_batch = sharding.to_global_batch(local, mesh)
    assert global_batch["image"].shape == (2 * jax.process_count(), 4, 6, 1)
    np.testing.assert_array_equal(
        sharding.local_rows(global_batch["image"]), local["image"]
    )


def test_eval_batch_is_rounded_up_to_the_data_axis(data_dir):
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config()
    config.unlock()
    config.data.data_dir = data_dir
    config.data.eval_batch_size = 3
    batches = list(eval_batches(config, sharding.create_mesh(), "validation"))
    rows = jax.device_count()
    size = -(-3 // rows) * rows
    assert all(len(batch["id"]) == size for batch in batches)
    ids = np.concatenate([batch["id"] for batch in batches])
    assert sorted(ids[ids >= 0]) == list(range(25, 30))


def test_global_batches_do_not_depend_on_the_process_count(data_dir):
    """Two processes' rows of global batch k are exactly one process's batch
    k, each example cropped, flipped and warped the same way."""
    source = pipeline.load_data_source("isbi2012_membrane", "train", data_dir)
    kwargs = {
        "crop_size": 64,
        "seed": 3,
        "num_classes": isbi2012.NUM_CLASSES,
        "ignore_label": 255,
        "mean": isbi2012.MEAN,
        "std": isbi2012.STD,
        "augment": {"elastic_probability": 0.5},
    }
    one = iter(pipeline.create_train_loader(source, batch_size=4, **kwargs))
    two = [
        iter(
            pipeline.create_train_loader(
                source, batch_size=2, process_index=p, process_count=2, **kwargs
            )
        )
        for p in range(2)
    ]
    for _ in range(8):  # 32 examples: past the end of the 25-slice first epoch
        reference = next(one)
        parts = [next(iterator) for iterator in two]
        for key in ("image", "label"):
            # Process p's row j is position p + 2j of the global batch.
            dealt = np.empty_like(reference[key])
            dealt[0::2], dealt[1::2] = parts[0][key], parts[1][key]
            np.testing.assert_array_equal(dealt, reference[key])


def test_coordinator_without_process_count_is_refused():
    with (
        flagsaver.flagsaver(coordinator_address="localhost:1234"),
        pytest.raises(flags.ValidationError, match="--num_processes"),
    ):
        distributed.initialize_from_flags()


def test_single_process_environments_start_nothing(monkeypatch):
    for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    assert not distributed.is_multiprocess_environment()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")
    assert not distributed.is_multiprocess_environment()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1")
    assert distributed.is_multiprocess_environment()
    # 'auto' with nothing detected: no jax.distributed, one process as before.
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    distributed.initialize_from_flags()
    assert jax.process_count() == 1
