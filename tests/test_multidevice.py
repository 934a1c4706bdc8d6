"""Data- and spatially-parallel training on 8 CPU devices equals 1 device.

The devices are XLA host devices (`--xla_force_host_platform_device_count`),
which must be set before jax starts, so each device count runs in its own
subprocess (tests/multidevice_worker.py) on real ISBI-2012 crops.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

# Two subprocesses, ~100 s on 2 cores: run by `make test-long`.
pytestmark = pytest.mark.long

NUM_STEPS = 4
# The same global batches and the same math; only float32 sums run in another
# order (the gradient is reduced across devices, spatially split convolutions
# add their halo rows separately, and one device takes the CPU kernels where
# several take XLA's ops). Measured after 4 SGD steps on an AVX-512 CPU: losses
# within 6.5e-6 relative, parameters within 1.2e-7. The optimizer is plain SGD
# because Adam turns sum order into parameter differences: an entry whose
# gradient is near Adam's epsilon (1e-8) moves by lr * dg / epsilon, so a
# rounding change of 1e-10 in its gradient moves it by ~1e-5 (after 4 Adam
# steps: 3.4e-5 in a few entries when only the order of the BatchNorm sums or
# of the skip join changed). The tolerances are far below any real bug (a batch
# counted twice or a halo missing moves losses by >1e-2).
LOSS_RTOL = 5e-5
PARAM_ATOL = 1e-6


def _run_worker(tmp_path, data_dir, devices: int, spatial: str) -> dict:
    out = tmp_path / f"devices{devices}.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [
        sys.executable,
        str(REPO_ROOT / "tests" / "multidevice_worker.py"),
        str(out),
        data_dir,
        str(NUM_STEPS),
        spatial,
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(out) as saved:
        return dict(saved)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp_path = tmp_path_factory.mktemp("multidevice")
    one = _run_worker(tmp_path, data_dir, devices=1, spatial="1")
    eight = _run_worker(tmp_path, data_dir, devices=8, spatial="1,2")
    assert one["device_count"] == 1 and eight["device_count"] == 8
    return one, eight


def _params(run: dict, spatial: int) -> list[np.ndarray]:
    names = sorted(
        (k for k in run if k.startswith("param") and k.endswith(f"_spatial{spatial}")),
        key=lambda k: int(k[len("param") :].split("_")[0]),
    )
    return [run[name] for name in names]


@pytest.mark.parametrize("spatial", [1, 2], ids=["data8", "data4_spatial2"])
def test_eight_devices_train_like_one(runs, spatial):
    one, eight = runs
    reference = one["losses_spatial1"]
    losses = eight[f"losses_spatial{spatial}"]
    np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL)
    params, reference_params = _params(eight, spatial), _params(one, 1)
    assert len(params) == len(reference_params) > 0
    for got, want in zip(params, reference_params):
        np.testing.assert_allclose(got, want, rtol=0, atol=PARAM_ATOL)


def test_spatially_sharded_forward_equals_unsharded(runs):
    _, eight = runs
    # A 512x512 slice split into 8 slabs of 64 rows, through 3x3 convolutions
    # and pooling: only halo rounding may differ.
    assert eight["forward_difference"] <= 1e-5 * max(1.0, eight["forward_scale"])
