"""What a workdir records about its run, and the check that a resume fits it."""

import json
import os
import subprocess

import jax
import ml_collections

import fcn_jax

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


def _git_commit() -> str:
    package_dir = os.path.dirname(os.path.abspath(fcn_jax.__file__))
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    found = []
    for key in keys:
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, prefix=f"{name}.")
        elif old != new:
            found.append(f"{name}: {old!r} -> {new!r}")
    return found


def load_config_json(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def record_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config and the run's environment into `workdir`.

    If the workdir already holds a run whose model config differs, raises a
    ValueError listing the differing keys: its checkpoints would not fit.
    """
    current = json.loads(config.to_json())
    saved = load_config_json(workdir)
    if saved is not None:
        changed = _differences(saved.get("model", {}), current["model"], "model.")
        if changed:
            raise ValueError(
                f"{workdir} holds a run of a different model ({'; '.join(changed)}). "
                "Use a fresh --workdir, or restore the saved config in "
                f"{os.path.join(workdir, CONFIG_FILE)}."
            )
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=2))
    if not os.path.exists(os.path.join(workdir, RUN_FILE)):
        run = {
            "fcn_jax_version": fcn_jax.__version__,
            "git_commit": _git_commit(),
            "jax_version": jax.__version__,
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
        }
        with open(os.path.join(workdir, RUN_FILE), "w") as f:
            json.dump(run, f, indent=2)
