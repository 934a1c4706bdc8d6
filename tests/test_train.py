"""End to end on the real ISBI slices: overfitting, checkpoints, resume, bad workdirs."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module
from PIL import Image

from fcn_jax import (
    checkpointing,
    evaluate,
    experiment,
    predict_files,
    reporting,
    steps,
    train,
)

UNET_CONFIG = REPO_ROOT / "configs" / "unet.py"


def _runlocal_config(data_dir, **overrides):
    config = load_config_module(UNET_CONFIG).get_config("runlocal")
    config.unlock()
    config.data.data_dir = data_dir
    for dotted, value in overrides.items():
        group, name = dotted.split(".")
        config[group][name] = value
    config.lock()
    return config


@pytest.mark.long
def test_unet_overfits_one_real_batch(data_dir):
    config = _runlocal_config(
        data_dir,
        **{"model.base_width": 8, "optim.learning_rate": 1e-2, "train.num_steps": 60},
    )
    exp = experiment.create_experiment(config)
    batch = next(experiment.create_train_iterator(config, exp.mesh))
    train_step = steps.jit_train_step(config, exp.mesh)
    state, history = exp.state, []
    for _ in range(60):
        state, step_metrics = train_step(state, batch)
        history.append(jax.device_get(step_metrics))
    assert history[-1]["loss"] < 0.35 * history[0]["loss"]
    assert history[-1]["pixel_accuracy"] > 0.9


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("unet_runlocal"))
    config = _runlocal_config(data_dir)
    summary = train.train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_training_writes_checkpoints_events_and_run_record(trained_workdir):
    workdir, config, summary = trained_workdir
    manager = checkpointing.create_checkpoint_manager(workdir, config, read_only=True)
    assert manager.latest_step() == config.train.num_steps
    assert manager.best_step() in manager.all_steps()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    assert os.listdir(os.path.join(workdir, "xla_cache"))  # persistent compile cache
    for name in ("config.json", "run.json"):
        assert os.path.exists(os.path.join(workdir, name))
    assert 0.0 <= summary["pixel_accuracy"] <= 1.0


def test_logged_scalars_read_back_from_the_event_files(trained_workdir, tmp_path):
    workdir, config, summary = trained_workdir
    losses = reporting.read_scalars(workdir, "train/loss")
    every = config.train.log_every_steps
    expected_steps = set(range(every, config.train.num_steps + 1, every))
    assert expected_steps | {config.train.num_steps} == set(losses)
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    eval_iou = reporting.read_scalars(workdir, "eval/mean_iou")
    assert eval_iou[config.train.num_steps] == pytest.approx(summary["mean_iou"])
    # A later file (a resumed run) replaces earlier values of the same step.
    writer = reporting.MetricWriter(str(tmp_path))
    writer.write_scalars(2, {"train/loss": 1.5})
    writer.close()
    time.sleep(1.1)  # Event file names carry the second they were opened.
    later = reporting.MetricWriter(str(tmp_path))
    later.write_scalars(2, {"train/loss": 0.5})
    later.write_scalars(4, {"train/loss": 0.25})
    later.close()
    assert len(os.listdir(tmp_path)) == 2
    assert reporting.read_scalars(str(tmp_path), "train/loss") == {2: 0.5, 4: 0.25}


def test_restore_in_a_new_process_gives_identical_metrics(trained_workdir, data_dir):
    workdir, config, _ = trained_workdir
    step = config.train.num_steps
    manager = checkpointing.create_checkpoint_manager(workdir, config, read_only=True)
    saved_at_training = manager.metrics(step)
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "evaluate.py"),
        f"--config={UNET_CONFIG}:runlocal",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        f"--step={step}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, f"eval_validation_{step}.json")) as f:
        restored = json.load(f)
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "num_pixels"):
        assert restored[key] == saved_at_training[key], key
    panels = os.listdir(os.path.join(workdir, f"eval_validation_{step}"))
    assert len(panels) == config.eval.num_images_to_save


def test_rerun_resumes_from_the_latest_checkpoint(trained_workdir, tmp_path, data_dir):
    workdir, _, _ = trained_workdir
    resumed_dir = tmp_path / "resumed"
    subprocess.run(["cp", "-r", workdir, str(resumed_dir)], check=True)
    longer = _runlocal_config(data_dir, **{"train.num_steps": 9})
    with pytest.raises(ValueError, match=r"another config \(train.num_steps: 6 -> 9\)"):
        train.train_and_evaluate(longer, str(resumed_dir))
    train.train_and_evaluate(longer, str(resumed_dir), allow_config_change=True)
    with open(resumed_dir / "config_changes.txt") as f:
        assert "train.num_steps: 6 -> 9" in f.read()
    manager = checkpointing.create_checkpoint_manager(
        str(resumed_dir), longer, read_only=True
    )
    assert manager.latest_step() == 9
    # Steps 1..6 were not redone: the resumed run saved only at 9 beyond the copy.
    assert set(manager.all_steps()) - {3, 6} == {9}


def test_a_workdir_of_another_model_is_refused(trained_workdir, data_dir):
    workdir, _, _ = trained_workdir
    wider = _runlocal_config(data_dir, **{"model.base_width": 8})
    with pytest.raises(ValueError, match="model.base_width"):
        train.train_and_evaluate(wider, workdir)
    with pytest.raises(ValueError, match="does not fit"):
        evaluate.evaluate_checkpoint(wider, workdir)


@pytest.mark.long
def test_valid_unet_trains_and_evaluates_by_overlap_tile(tmp_path, data_dir):
    config = _runlocal_config(data_dir, **{"train.num_steps": 2})
    config.unlock()
    config.model.padding = "VALID"
    config.eval.mode = "overlap_tile"
    config.eval.tile_output_size = 64
    config.lock()
    summary = train.train_and_evaluate(config, str(tmp_path))
    # Overlap-tile predicts every pixel of the 5 whole 512x512 slices.
    assert summary["num_pixels"] == 5 * 512 * 512
    assert np.isfinite(summary["pixel_accuracy"])


def test_a_crop_a_valid_unet_cannot_take_names_the_nearest_sizes(data_dir):
    config = _runlocal_config(data_dir, **{"data.crop_size": 62})
    config.unlock()
    config.model.padding = "VALID"
    config.lock()
    with pytest.raises(ValueError, match=r"nearest valid sizes: .*64 \(-> 24\)"):
        experiment.create_experiment(config)


def test_predict_files_writes_masks_of_each_input_size(trained_workdir, tmp_path):
    workdir, config, _ = trained_workdir
    source = REPO_ROOT / "fcn_jax" / "data" / "isbi2012_membrane" / "image" / "27.png"
    odd_size = tmp_path / "odd.png"
    Image.open(source).crop((0, 0, 130, 97)).save(odd_size)
    written = predict_files.predict_files(
        config, workdir, [str(source), str(odd_size)], str(tmp_path / "out")
    )
    assert [os.path.basename(p) for p in written] == ["27_mask.png", "odd_mask.png"]
    labels = np.asarray(Image.open(tmp_path / "out" / "odd_labels.png"))
    assert labels.shape == (97, 130)
    assert set(np.unique(labels)) <= {0, 1}
