"""Never lose a run: bit-exact resume after SIGKILL at several points, SIGTERM
preemption, damaged-checkpoint fallback and the non-finite guard."""

import functools
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module

from fcn_jax import checkpointing, evaluate, steps, train, xla_cache
from fcn_jax.experiment import create_experiment

NUM_STEPS = 24
# One compilation cache for every run here: only the first run compiles.
CACHE = os.path.join(tempfile.gettempdir(), f"fcn_jax_test_xla_cache_{os.getuid()}")
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "train.log_every_steps": 2,
    "eval.every_steps": 12,
    "ckpt.every_steps": 4,
    "ckpt.max_to_keep": 3,
}


def _config(data_dir: str, **extra):
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(
        "runlocal"
    )
    config.unlock()
    config.data.data_dir = data_dir
    for key, value in {**OVERRIDES, **extra}.items():
        group, name = key.split(".")
        config[group][name] = value
    config.lock()
    return config


def _command(workdir, data_dir) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    return [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        f"--config={REPO_ROOT / 'configs' / 'unet.py'}:runlocal",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *flags,
    ]


def _start(workdir, data_dir) -> subprocess.Popen:
    return subprocess.Popen(
        _command(workdir, data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", xla_cache.CACHE_DIR_ENV: CACHE},
    )


def _run(workdir, data_dir) -> None:
    process = _start(workdir, data_dir)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def _steps(workdir) -> list[int]:
    directory = pathlib.Path(checkpointing.checkpoint_dir(str(workdir)))
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _saving(workdir) -> bool:
    directory = pathlib.Path(checkpointing.checkpoint_dir(str(workdir)))
    return directory.is_dir() and any("tmp" in p.name for p in directory.iterdir())


def _final_params(config, workdir) -> list[np.ndarray]:
    restored, step = evaluate.restore_experiment(config, str(workdir), step=NUM_STEPS)
    assert step == NUM_STEPS
    state = jax.device_get(restored.state)
    return jax.tree.leaves((state.params, state.batch_stats, state.opt_state))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, data_dir)
    return workdir


@pytest.fixture(scope="module")
def reference(uninterrupted, data_dir):
    return _final_params(_config(data_dir), uninterrupted)


def _assert_identical(config, workdir, reference) -> None:
    final = _final_params(config, workdir)
    assert len(final) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(final, reference))


def _kill(process: subprocess.Popen, workdir, when: str) -> None:
    """SIGKILLs the run at `when`: between saves, during an async save, or
    right after the last save."""
    if when == "between_saves":
        _wait_for(lambda: 8 in _steps(workdir), process)
        time.sleep(0.5)  # somewhere in steps 9-11
    elif when == "during_async_save":
        _wait_for(lambda: _saving(workdir), process)
    else:
        _wait_for(lambda: NUM_STEPS in _steps(workdir), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.long
def test_killed_at_three_points_then_resumed_is_bit_exact(
    reference, data_dir, tmp_path
):
    # One run killed, restarted and killed again at each point, then finished:
    # every restart must pick up exactly where the uninterrupted run was.
    workdir = tmp_path / "run"
    for when in ("between_saves", "during_async_save", "after_last_save"):
        _kill(_start(workdir, data_dir), workdir, when)
    assert NUM_STEPS in _steps(workdir)
    _run(workdir, data_dir)
    _assert_identical(_config(data_dir), workdir, reference)


@pytest.mark.long
def test_sigterm_saves_and_says_how_to_resume(reference, data_dir, tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir, data_dir)
    _wait_for(lambda: 4 in _steps(workdir), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received: stopped after step" in err
    assert "Run the same command again to resume" in err
    stopped_at = int(err.split("stopped after step ")[1].split()[0])
    assert stopped_at in _steps(workdir)
    _run(workdir, data_dir)
    _assert_identical(_config(data_dir), workdir, reference)


@pytest.mark.long
def test_damaged_newest_checkpoint_is_skipped(
    uninterrupted, reference, data_dir, tmp_path, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    assert _steps(workdir)[-2:] == [20, NUM_STEPS]
    # Truncate every file of the newest state: a disk that filled up.
    newest = pathlib.Path(checkpointing.checkpoint_dir(str(workdir))) / str(NUM_STEPS)
    for path in newest.rglob("*"):
        if path.is_file() and "state" in path.parts:
            path.write_bytes(path.read_bytes()[:7])
    caplog.set_level("WARNING")
    train.train_and_evaluate(_config(data_dir), str(workdir))
    assert any(
        f"{NUM_STEPS} cannot be restored, skipped" in r.getMessage()
        for r in caplog.records
    )
    moved = os.listdir(checkpointing.damaged_dir(str(workdir)))
    assert len(moved) == 1 and moved[0].startswith(f"{NUM_STEPS}_")
    _assert_identical(_config(data_dir), workdir, reference)


@pytest.mark.long
def test_checkpoint_of_another_model_is_not_taken_for_damage(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(data_dir, **{"train.num_steps": 4}), workdir)
    wider = _config(data_dir)
    wider.unlock()
    wider.model.base_width = 8
    with pytest.raises(ValueError, match="different model"):
        train.train_and_evaluate(wider, workdir)
    assert not os.path.exists(checkpointing.damaged_dir(workdir))


def test_nonfinite_loss_stops_and_names_step_and_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = _config(data_dir, **{"optim.learning_rate": 1e9})
    with pytest.raises(train.NonFiniteError) as raised:
        train.train_and_evaluate(config, workdir)
    message = str(raised.value)
    assert message.startswith("Step ")
    assert "is nan" in message or "is inf" in message
    bad_step = int(message.split()[1].rstrip(":"))
    assert "train.skip_nonfinite_updates" in message
    assert all(step < bad_step for step in _steps(workdir))


@pytest.mark.long
def test_skip_nonfinite_updates_keeps_the_state(data_dir):
    config = _config(data_dir, **{"train.skip_nonfinite_updates": True})
    experiment = create_experiment(config)
    state = experiment.state
    shape = (2, 64, 64, 1)
    batch = {
        "image": jnp.full(shape, jnp.nan),
        "label": jnp.zeros(shape[:-1], jnp.int32),
    }
    before = jax.device_get(state)
    step = jax.jit(functools.partial(steps.train_step, config=config))
    new_state, metrics = step(state, batch)
    assert float(metrics["nonfinite_updates"]) == 1.0
    assert int(new_state.step) == int(before.step) + 1
    after = jax.device_get(new_state)
    for old, new in zip(
        jax.tree.leaves((before.params, before.opt_state, before.batch_stats)),
        jax.tree.leaves((after.params, after.opt_state, after.batch_stats)),
    ):
        assert np.array_equal(old, new)


def test_gradient_implementation_may_change_on_resume_but_the_model_may_not(tmp_path):
    """model.batch_norm_relu / max_pool_gradient / remat change how gradients
    are computed, not the parameters: a run may resume with others (e.g. on an
    accelerator after the CPU); a wider model is refused."""
    from fcn_jax import config_lib, run_record

    workdir = str(tmp_path)
    config = config_lib.default_config("unet")
    config.model.batch_norm_relu = "fused"
    run_record.record_run(workdir, config)
    config.model.batch_norm_relu = "xla"
    config.model.max_pool_gradient = "xla"
    config.model.remat = True
    run_record.record_run(workdir, config)
    config.model.base_width = 8
    with pytest.raises(ValueError, match="different model.*base_width"):
        run_record.record_run(workdir, config)
