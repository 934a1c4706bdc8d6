"""What a workdir records about its run, and the check that a resume fits it."""

import json
import os
import subprocess
import time

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


# Where the data and caches live, not what the run computes: may change freely.
ENVIRONMENT_KEYS = (
    "data.data_dir",
    "data.manual_dir",
    "data.worker_count",
    "mesh.spatial",
    # How gradients are computed, not what: checkpoints fit either way.
    "model.batch_norm_relu",
    "model.conv_filter_gradient",
    "model.conv_forward",
    "model.max_pool_gradient",
    "model.skip_conv",
    "model.remat",
    "train.compilation_cache",
    "train.cache_min_compile_seconds",
)
_ENVIRONMENT_PREFIXES = tuple(f"{key}:" for key in ENVIRONMENT_KEYS)
CHANGES_FILE = "config_changes.txt"


def record_run(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    allow_config_change: bool = False,
) -> None:
    """Writes the resolved config and the run's environment into `workdir`.

    A workdir that already holds a run is checked first. A different model is
    refused (its checkpoints would not fit); any other difference, apart from
    `ENVIRONMENT_KEYS`, is refused unless `allow_config_change`, in which case
    the changes are appended to config_changes.txt. Raises ValueError listing
    the keys.
    """
    current = json.loads(config.to_json())
    saved = load_config_json(workdir)
    changed = []
    if saved is not None:
        model = [
            line
            for line in _differences(saved.get("model", {}), current["model"], "model.")
            if not line.startswith(_ENVIRONMENT_PREFIXES)
        ]
        if model:
            raise ValueError(
                f"{workdir} holds a run of a different model ({'; '.join(model)}). "
                "Use a fresh --workdir, or restore the saved config in "
                f"{os.path.join(workdir, CONFIG_FILE)}."
            )
        changed = [
            line
            for line in _differences(saved, current)
            if not line.startswith(_ENVIRONMENT_PREFIXES)
        ]
        if changed and not allow_config_change:
            raise ValueError(
                f"{workdir} holds a run with another config ({'; '.join(changed)}). "
                "Resume with the saved config, use a fresh --workdir, or pass "
                "--allow_config_change to continue with the new values."
            )
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    if changed:
        with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'; '.join(changed)}\n")
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
