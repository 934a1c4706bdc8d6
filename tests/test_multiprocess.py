"""A real multi-process run: 2 processes on localhost (jax.distributed with a
local coordinator, CPU collectives), 2 devices each, train on ISBI-2012, are
SIGKILLed between checkpoints, resume, and agree with a single-process run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from conftest import REPO_ROOT, load_config_module

from fcn_jax import checkpointing, evaluate, reporting

pytestmark = pytest.mark.long

NUM_STEPS = 24
OVERRIDES = {
    "data.batch_size": 8,
    # SGD: Adam's normalised steps blow float32 rounding in near-zero
    # gradients up to ~1e-4 over 24 steps, which would hide small real errors.
    "optim.name": "sgd",
    "optim.learning_rate": 0.05,
    "train.num_steps": NUM_STEPS,
    "train.log_every_steps": 2,
    "eval.every_steps": 12,
    "ckpt.every_steps": 4,
    "ckpt.max_to_keep": 3,
}
# Same batches and math as one device; only float32 sums run in another order.
# Each step's loss moves by ~1e-6 relative from that alone, and SGD amplifies
# the parameter differences step by step: after 24 steps, one process with 1
# device and one with 4 devices differ by up to 7e-3 in the relative norm of a
# small leaf on an AVX-512 CPU (the 2-process run: 2e-2; an element-wise 1e-5
# tolerance held only on another CPU). So the per-step losses are compared
# (measured within 1.9e-5 relative; a batch skipped or repeated on resume moves
# a loss by ~1e-2), and the whole tree of parameters and statistics by its
# relative norm (measured 1.3e-4).
LOSS_RTOL = 1e-4
PARAMS_RELATIVE_NORM = 2e-3


def _config(data_dir):
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(
        "runlocal"
    )
    config.unlock()
    config.data.data_dir = data_dir
    for key, value in OVERRIDES.items():
        group, name = key.split(".")
        config[group][name] = value
    config.lock()
    return config


def _start(workdir, data_dir, *, devices: int, distributed: list[str]):
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        f"--config={REPO_ROOT / 'configs' / 'unet.py'}:runlocal",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *[f"--config.{key}={value}" for key, value in OVERRIDES.items()],
        *distributed,
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _start_pair(workdir, data_dir) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    return [
        _start(
            workdir,
            data_dir,
            devices=2,
            distributed=[
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={process_id}",
            ],
        )
        for process_id in range(2)
    ]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
    errors = []
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-4000:]
        errors.append(err)
    return errors


def _steps(workdir) -> list[int]:
    directory = pathlib.Path(checkpointing.checkpoint_dir(str(workdir)))
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _saved_metrics(workdir) -> dict:
    """The evaluation summary saved with the final checkpoint."""
    directory = pathlib.Path(checkpointing.checkpoint_dir(str(workdir)))
    return json.loads((directory / str(NUM_STEPS) / "metrics" / "metrics").read_text())


def _restore(config, workdir):
    restored, step = evaluate.restore_experiment(config, str(workdir), step=NUM_STEPS)
    assert step == NUM_STEPS
    state = jax.device_get(restored.state)
    return jax.tree.leaves((state.params, state.batch_stats))


def test_two_processes_killed_and_resumed_agree_with_one(data_dir, tmp_path):
    single = tmp_path / "single"
    _finish([_start(single, data_dir, devices=1, distributed=[])])

    workdir = tmp_path / "two_processes"
    processes = _start_pair(workdir, data_dir)
    deadline = time.monotonic() + 300
    while 8 not in _steps(workdir):
        for process in processes:
            assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    for process in processes:
        process.communicate()
        assert process.returncode == -signal.SIGKILL
    killed_at = _steps(workdir)
    assert NUM_STEPS not in killed_at

    errors = _finish(_start_pair(workdir, data_dir))
    assert NUM_STEPS in _steps(workdir)
    # Only process 0 reports (progress bar, TensorBoard).
    progress = f"{NUM_STEPS}/{NUM_STEPS}"
    assert progress in errors[0] and progress not in errors[1]

    losses = reporting.read_scalars(str(workdir), "train/loss")
    reference = reporting.read_scalars(str(single), "train/loss")
    resumed_at = max(killed_at)
    logged = sorted(reference)
    assert [s for s in logged if s > resumed_at] == [
        s for s in sorted(losses) if s > resumed_at
    ]
    steps = [s for s in logged if s in losses]
    np.testing.assert_allclose(
        [losses[s] for s in steps], [reference[s] for s in steps], rtol=LOSS_RTOL
    )

    config = _config(data_dir)
    got = np.concatenate([leaf.ravel() for leaf in _restore(config, workdir)])
    want = np.concatenate([leaf.ravel() for leaf in _restore(config, single)])
    relative = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"2 processes vs 1: parameters' relative difference {relative:.2g}")
    assert relative < PARAMS_RELATIVE_NORM
    # The evaluation during training counts every validation pixel once
    # across both processes (5 slices of 512x512, split 3 + 2 plus padding).
    eval_single, eval_pair = _saved_metrics(single), _saved_metrics(workdir)
    assert eval_single["num_pixels"] == eval_pair["num_pixels"] == 5 * 512**2
    print(
        f"mean IoU: 1 process {eval_single['mean_iou']:.6f}, 2 processes "
        f"{eval_pair['mean_iou']:.6f}; killed with checkpoints {killed_at}"
    )
    assert abs(eval_single["mean_iou"] - eval_pair["mean_iou"]) < 1e-4
