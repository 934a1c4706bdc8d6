"""The bad-input catalogue of the README: each input gets an error that names
the culprit, and a run that fails on it writes nothing to its workdir."""

import os

import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module
from test_camvid import tiny_manual_dir  # noqa: F401 - a fixture
from test_tfds_by_name import _config as foreign_config
from test_tfds_by_name import foreign_data_dir  # noqa: F401 - a fixture

from fcn_jax import config_lib, experiment, sharding, train
from fcn_jax.data import keyed_source


def _unet(data_dir: str, presets: str = "runlocal", **overrides):
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(presets)
    config.unlock()
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    config.lock()
    return config


def _fails_writing_nothing(config, workdir, match: str) -> str:
    with pytest.raises((ValueError, KeyError, TypeError)) as raised:
        train.train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir), os.listdir(workdir)
    message = str(raised.value)
    assert match in message, message
    return message


def test_corrupt_image_is_named(tiny_manual_dir, tmp_path):  # noqa: F811
    image = next((tiny_manual_dir / "train").glob("*.png"))
    image.write_bytes(image.read_bytes()[:300])  # truncated
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(
        "camvid,runlocal"
    )
    config.unlock()
    config.data.manual_dir = str(tiny_manual_dir)
    config.data.data_dir = str(tmp_path / "tfds")
    _fails_writing_nothing(config, tmp_path / "run", f"Cannot read image file {image}")


def test_label_outside_the_classes_is_named(foreign_data_dir, tmp_path):  # noqa: F811
    config = foreign_config(foreign_data_dir)
    config.data.label_mapping = "0:255,1:20"
    message = _fails_writing_nothing(config, tmp_path / "run", "label values [20]")
    assert "outside [0, 11)" in message and "ignore label 255" in message


def test_grayscale_where_rgb_is_expected(data_dir, tmp_path):
    # The ISBI slices are grayscale; this config asks for RGB.
    rgb = {"data.mean": (0.5,) * 3, "data.std": (0.2,) * 3}
    message = _fails_writing_nothing(
        _unet(data_dir, **rgb), tmp_path / "run", "has 1 image channel(s)"
    )
    assert "expects 3" in message and "convert_grayscale=True" in message
    config = _unet(data_dir, **rgb, **{"data.convert_grayscale": True})
    batch = next(experiment.create_train_iterator(config, sharding.create_mesh()))
    assert batch["image"].shape[-1] == 3
    assert np.array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_unknown_split_is_named(data_dir, tmp_path):
    config = _unet(data_dir, **{"data.eval_split": "test"})
    _fails_writing_nothing(config, tmp_path / "run", "test")


def test_empty_split_is_named():
    with pytest.raises(ValueError, match=r"isbi\[test\] has no examples"):
        keyed_source.KeyedSource([], name="isbi[test]")


def test_unknown_key_and_wrong_types_are_named(data_dir):
    config = _unet(data_dir)
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optim.learning_rat = 1e-3
    with pytest.raises(TypeError, match="learning_rate"):
        config.optim.learning_rate = "fast"
    # A list where a tuple is needed is turned into one on assignment.
    config.unlock()
    config.data.mean = [0.5]
    assert config.data.mean == (0.5,)
    # A config built without type checks still fails validation, by name.
    untyped = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    untyped.data.mean = 0.5
    with pytest.raises(TypeError, match=r"config.data.mean=0.5 must be a tuple"):
        config_lib.validate_config(untyped)


def test_input_smaller_than_the_total_stride(data_dir, tmp_path):
    # Depth 2 halves twice: a 2-pixel crop cannot be pooled to stride 4.
    config = _unet(data_dir, **{"data.crop_size": 2})
    message = _fails_writing_nothing(config, tmp_path / "run", "input size 2")
    assert "nearest valid sizes: 4" in message


def test_valid_unet_size_with_no_output(data_dir, tmp_path):
    config = _unet(data_dir, "runlocal,valid", **{"data.crop_size": 62})
    _fails_writing_nothing(config, tmp_path / "run", "nearest valid sizes")
