"""Shared test setup: CPU only, absl flags parsed, configs importable by path."""

import importlib.util
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from fcn_jax import cpu_flags

# Tests run with the same XLA flags as the scripts.
cpu_flags.configure()

import numpy as np
import pytest
from absl import flags
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*.py"))

# Grain's worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()


def em_image(height: int, width: int) -> np.ndarray:
    """The top-left [height, width] of ISBI-2012 training slice 3, float32 in [0, 1]."""
    path = REPO_ROOT / "fcn_jax" / "data" / "isbi2012_membrane" / "image" / "3.png"
    return np.asarray(Image.open(path), np.float32)[:height, :width] / 255.0


def load_config_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS data dir per test session, so the ISBI builder prepares once."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))
