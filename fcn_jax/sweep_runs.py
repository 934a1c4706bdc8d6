"""Sweep runs: launched here one after another, and summarised from workdirs.

Each run's workdir holds sweep_overrides.json (its overrides), sweep_status.json
(running / done / failed, with wall time) and train.log, beside what training
writes (config.json, checkpoints, eval JSON files).
"""

import datetime
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from fcn_jax import checkpointing, run_record
from fcn_jax.sweeps import (
    TRAIN_SCRIPT,
    Run,
    command,
    expand,
    format_flag_value,
)

OVERRIDES_FILE = "sweep_overrides.json"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _checkpoint_steps(workdir: str) -> list[int]:
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def run_local(
    config_arg: str,
    workdir_root: str,
    *,
    members: Sequence[Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
    python: str = sys.executable,
) -> list[dict[str, Any]]:
    """Trains each run in turn, each in a fresh process; returns their statuses.

    A run whose workdir already holds its last step is skipped. Output goes to
    `<workdir>/train.log`; status, return code and wall time (seconds) to
    `<workdir>/sweep_status.json`. A failed run does not stop the others; a
    Ctrl-C stops the sweep once the current run has saved and exited.
    """
    results = []
    for run in expand(config_arg, members=members, common=common):
        workdir = os.path.join(workdir_root, run.name)
        steps = _checkpoint_steps(workdir)
        if steps and steps[-1] >= run.config.train.num_steps:
            logging.info("Skipping %s: already at step %d.", workdir, steps[-1])
            results.append({"name": run.name, "status": "done", "skipped": True})
            continue
        argv = command(
            config_arg, workdir, run.flags, python=python, train_script=TRAIN_SCRIPT
        )
        results.append({"name": run.name, **_run_one(run, workdir, argv)})
    return results


def _run_one(run: Run, workdir: str, argv: list[str]) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, OVERRIDES_FILE), run.overrides)
    status_path = os.path.join(workdir, STATUS_FILE)
    started = time.time()
    status = {
        "status": "running",
        "start_time": datetime.datetime.fromtimestamp(started).isoformat(),
        "command": shlex.join(argv),
    }
    _write_json(status_path, status)
    interrupted = False
    with open(os.path.join(workdir, LOG_FILE), "a") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            # The child got the same SIGINT: let it save its checkpoint first.
            returncode, interrupted = process.wait(), True
    status.update(
        status="done" if returncode == 0 else "failed",
        returncode=returncode,
        wall_time_s=round(time.time() - started, 1),
    )
    _write_json(status_path, status)
    if interrupted:
        raise KeyboardInterrupt
    return status


def _eval_scores(workdir: str, config: Mapping[str, Any]) -> dict[int, float]:
    """Validation mean IoU by step: from eval_<split>_<step>.json files if any,
    else from the metrics saved with each checkpoint ({} between evaluations)."""
    split = config.get("data", {}).get("eval_split", "validation")
    scores = {}
    for path in glob.glob(os.path.join(workdir, f"eval_{glob.escape(split)}_*.json")):
        data = _read_json(path)
        if "mean_iou" in data and "step" in data:
            scores[int(data["step"])] = float(data["mean_iou"])
    if scores:
        return scores
    for step in _checkpoint_steps(workdir):
        directory = os.path.join(checkpointing.checkpoint_dir(workdir), str(step))
        metrics = _read_json(os.path.join(directory, "metrics", "metrics")) or {}
        if "mean_iou" in metrics:
            scores[step] = float(metrics["mean_iou"])
    return scores


def summarize(workdir_root: str) -> list[dict[str, Any]]:
    """One row per run directory under `workdir_root`, best mean IoU first.

    Row keys: name, overrides, best_mean_iou and best_step (None before any
    evaluation), wall_time_s, status (done / running / failed / incomplete),
    returncode.
    """
    rows = []
    markers = (OVERRIDES_FILE, STATUS_FILE, run_record.CONFIG_FILE)
    for name in sorted(os.listdir(workdir_root)):
        workdir = os.path.join(workdir_root, name)
        if not any(os.path.exists(os.path.join(workdir, m)) for m in markers):
            continue
        config = run_record.load_config_json(workdir) or {}
        scores = _eval_scores(workdir, config)
        finite = {s: v for s, v in scores.items() if math.isfinite(v)}
        best_step = max(finite, key=lambda s: (finite[s], -s)) if finite else None
        info = _read_json(os.path.join(workdir, STATUS_FILE)) or {}
        steps = _checkpoint_steps(workdir)
        num_steps = config.get("train", {}).get("num_steps")
        status = info.get("status", "incomplete")
        if steps and steps[-1] == num_steps:
            status = "done"
        wall_time = info.get("wall_time_s")
        if wall_time is None and status == "running" and "start_time" in info:
            started = datetime.datetime.fromisoformat(info["start_time"])
            wall_time = (datetime.datetime.now() - started).total_seconds()
        rows.append(
            {
                "name": name,
                "overrides": _read_json(os.path.join(workdir, OVERRIDES_FILE)) or {},
                "best_mean_iou": finite.get(best_step),
                "best_step": best_step,
                "wall_time_s": wall_time,
                "status": status,
                "returncode": info.get("returncode"),
            }
        )
    return sorted(rows, key=_rank)


def _rank(row: Mapping[str, Any]) -> tuple:
    best = row["best_mean_iou"]
    return (best is None, -(best or 0.0), row["name"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """An aligned text table of `summarize` rows, best mean IoU first."""
    header = ("overrides", "best mIoU", "step", "wall time", "status")
    table = [header]
    for row in sorted(rows, key=_rank):
        overrides = " ".join(
            f"{k}={format_flag_value(v)}" for k, v in row["overrides"].items()
        )
        best = row["best_mean_iou"]
        status = row["status"]
        if status == "failed" and row.get("returncode") is not None:
            status = f"failed ({row['returncode']})"
        table.append(
            (
                overrides or row["name"],
                "-" if best is None else f"{best:.4f}",
                "-" if row["best_step"] is None else str(row["best_step"]),
                _duration(row["wall_time_s"]),
                status,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = (False, True, True, True, False)
    lines = [
        "  ".join(
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(line, widths, right)
        ).rstrip()
        for line in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
