"""Sweeps: configs/unet.py's sweep() expanded, bad sweeps refused, and a real
sweep trained in subprocesses and summarised from its workdirs."""

import json
import math
import os
import re

import pytest
from absl import flags
from conftest import REPO_ROOT
from ml_collections import config_flags

from fcn_jax import checkpointing, sweep_runs, sweeps, xla_cache

UNET = str(REPO_ROOT / "configs" / "unet.py")

CONFIG_WITH_SWEEP = """
from fcn_jax import config_lib


def get_config(arg=None):
    config = config_lib.default_config()
    config.lock()
    return config


def sweep():
    return [{{"optim.learning_rate": 1e-3}}, {bad}]
"""


def _parse_back(argv: list[str]):
    """The config scripts/train.py would build from `argv`."""
    flag_values = flags.FlagValues()
    # The --config.* override flags are defined from the argv given here.
    config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, sys_argv=argv[1:]
    )
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(argv[1:])
    return flag_values.config


def test_unet_sweep_expands_to_six_distinct_runs():
    members = sweeps.load_sweep(UNET)
    names = sweeps.workdir_names(members)
    assert len(members) == 6 and len(set(names)) == 6
    assert all(re.fullmatch(r"[A-Za-z0-9._=+-]+", name) for name in names)
    assert "learning_rate=0.001-dice_weight=1" in names
    commands = [
        sweeps.command(UNET, f"/tmp/sweep/{name}", member)
        for name, member in zip(names, members)
    ]
    assert len({tuple(argv) for argv in commands}) == 6
    for argv, member in zip(commands, members):
        config = _parse_back(argv)
        for key, value in member.items():
            group, name = key.split(".")
            assert config[group][name] == value, (argv, key)
    tpu = sweeps.tpu_commands(UNET, "gs://bucket/sweep", tpu_name="t", zone="z")
    assert len(tpu) == 6 and all(" -- python scripts/train.py " in line for line in tpu)


def test_flag_values_read_back_as_the_same_types():
    overrides = {
        "data.class_names": ("a b", "c,d"),
        "data.mean": (0.5,),
        "loss.class_weights": (),
        "data.augment.flips": False,
        "optim.learning_rate": 1e-5,
        "optim.name": "sgd",
    }
    config = _parse_back(sweeps.command(UNET, "/tmp/w", overrides))
    for key, value in overrides.items():
        *groups, name = key.split(".")
        group = config
        for part in groups:
            group = group[part]
        assert group[name] == value and type(group[name]) is type(value), key


@pytest.mark.parametrize(
    "bad, named",
    [
        ('{"optim.learning_rat": 1e-3}', "'optim.learning_rat'"),
        ('{"optim": 1e-3}', "'optim'"),
        ('{"train.num_steps": 0.5}', "train.num_steps=0.5"),
        ('{"data.augment.flips": 1}', "data.augment.flips=1"),
        ('{"train.num_steps": 0}', "train.num_steps=0"),
    ],
)
def test_a_bad_sweep_fails_naming_key_run_and_file(tmp_path, bad, named):
    path = tmp_path / "bad_config.py"
    path.write_text(CONFIG_WITH_SWEEP.format(bad=bad))
    with pytest.raises(sweeps.SweepError) as raised:
        sweeps.load_sweep(str(path))
    message = str(raised.value)
    assert named in message and "run 1" in message and str(path) in message


def test_a_config_without_sweep_and_colliding_names_are_refused(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text(CONFIG_WITH_SWEEP.split("def sweep")[0])
    with pytest.raises(sweeps.SweepError, match=f"{re.escape(str(path))} has no sweep"):
        sweeps.load_sweep(str(path))
    with pytest.raises(sweeps.SweepError, match="share the workdir 'data_dir=a_b'"):
        sweeps.workdir_names([{"data.data_dir": "a/b"}, {"data.data_dir": "a_b"}])
    names = sweeps.workdir_names([{"model.name": "unet", "optim.name": "sgd"}])
    assert names == ["model.name=unet-optim.name=sgd"]


def _write(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_summary_reads_checkpoint_metrics_then_eval_files(tmp_path):
    run = tmp_path / "learning_rate=0.1"
    _write(run / "config.json", {"train": {"num_steps": 6}, "data": {}})
    _write(run / "checkpoints" / "3" / "metrics" / "metrics", {"mean_iou": 0.3})
    _write(run / "checkpoints" / "4" / "metrics" / "metrics", {})
    _write(run / "checkpoints" / "6" / "metrics" / "metrics", {"mean_iou": 0.2})
    _write(tmp_path / "other" / sweep_runs.STATUS_FILE, {"status": "running"})
    rows = sweep_runs.summarize(str(tmp_path))
    assert [row["name"] for row in rows] == ["learning_rate=0.1", "other"]
    assert (rows[0]["best_mean_iou"], rows[0]["best_step"]) == (0.3, 3)
    assert rows[0]["status"] == "done" and rows[1]["status"] == "running"
    _write(run / "eval_validation_6.json", {"step": 6, "mean_iou": 0.5})
    _write(run / "eval_test_6.json", {"step": 6, "mean_iou": 0.9})
    row = sweep_runs.summarize(str(tmp_path))[0]
    assert (row["best_mean_iou"], row["best_step"]) == (0.5, 6)


@pytest.mark.long
def test_a_real_sweep_runs_locally_and_is_summarised(tmp_path, data_dir, monkeypatch):
    # One compilation cache for the runs (init and eval steps are shared).
    monkeypatch.setenv(xla_cache.CACHE_DIR_ENV, str(tmp_path / "xla_cache"))
    root = str(tmp_path / "sweep")
    config_arg = f"{UNET}:runlocal"
    common = {"data.data_dir": data_dir}
    good = [{"optim.learning_rate": 1e-3}]
    # The diverging run goes first: its failure must not stop the others.
    members = [{"optim.learning_rate": 1e9}, *good]
    results = sweep_runs.run_local(config_arg, root, members=members, common=common)
    assert [r["status"] for r in results] == ["failed", "done"]

    rows = sweep_runs.summarize(root)
    print(sweep_runs.format_summary(rows))
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {"learning_rate=1000000000", *sweeps.workdir_names(good)}
    failed = by_name.pop("learning_rate=1000000000")
    assert (failed["status"], failed["returncode"], failed["best_step"]) == (
        "failed",
        1,
        None,
    )
    with open(os.path.join(root, failed["name"], sweep_runs.LOG_FILE)) as f:
        assert "Lower optim.learning_rate" in f.read()
    run = sweeps.expand(config_arg, members=good, common=common)[0]
    for row in by_name.values():
        assert row["status"] == "done" and row["wall_time_s"] > 0
        assert math.isfinite(row["best_mean_iou"])
        workdir = os.path.join(root, row["name"])
        manager = checkpointing.create_checkpoint_manager(
            workdir, run.config, read_only=True
        )
        scores = {s: manager.metrics(s)["mean_iou"] for s in manager.all_steps()}
        manager.close()
        assert row["best_mean_iou"] == max(scores.values())
        assert scores[row["best_step"]] == row["best_mean_iou"]
        with open(os.path.join(workdir, sweep_runs.OVERRIDES_FILE)) as f:
            assert json.load(f) in good

    again = sweep_runs.run_local(config_arg, root, members=good, common=common)
    assert all(r.get("skipped") for r in again)
