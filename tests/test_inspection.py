"""scripts/inspect_model.py's report, at initialisation and from a checkpoint."""

import os

import pytest
from conftest import REPO_ROOT, load_config_module

from fcn_jax import inspection, models, train
from fcn_jax.analysis import table_text


def _config(config_file: str, presets: str, data_dir: str | None = None):
    config = load_config_module(REPO_ROOT / "configs" / config_file).get_config(presets)
    if data_dir:
        config.unlock()
        config.data.data_dir = data_dir
        config.lock()
    return config


@pytest.mark.long
@pytest.mark.parametrize(
    "config_file, spatial",
    [("deeplabv3.py", (64, 64)), ("fcn8s.py", (64, 96))],
)
def test_table_and_checkerboard_at_init(config_file, spatial, tmp_path):
    text = inspection.inspect_model(
        _config(config_file, "runlocal"),
        spatial=spatial,
        sections=("table", "checkerboard"),
        output_dir=str(tmp_path),
    )
    assert "matches the parameter tree" in text
    assert "without the conv taps that fall on zero padding" in text
    assert "initialisation" in text
    if config_file == "deeplabv3.py":
        assert "module (largest local branch)" in text
        assert "no transposed convs" in text
    else:
        assert "variance=0 even" in text
        assert any(name.startswith("checkerboard_") for name in os.listdir(tmp_path))


def test_valid_unet_lists_valid_sizes():
    model = models.create_model(_config("unet.py", "runlocal,valid").model)
    text = table_text.format_valid_sizes(model, 100)
    assert "input size 100 is valid" in text
    assert "100->60" in text
    assert "input size 99 is NOT valid" in table_text.format_valid_sizes(model, 99)
    with pytest.raises(ValueError):
        inspection.inspect_model(
            _config("unet.py", "runlocal,valid"), spatial=(99, 99), sections=("table",)
        )


@pytest.mark.long
def test_erf_from_a_trained_checkpoint_on_real_images(data_dir, tmp_path):
    config = _config("unet.py", "runlocal", data_dir)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    text = inspection.inspect_model(
        config,
        workdir=workdir,
        spatial=(64, 64),
        sections=("erf",),
        erf_inputs="data",
        erf_samples=2,
        output_dir=str(tmp_path),
    )
    assert f"checkpoint step {config.train.num_steps}" in text
    assert "over 2 data inputs" in text
    assert "theoretical field 44 px" in text
    assert os.path.exists(
        tmp_path / f"erf_checkpoint_step_{config.train.num_steps}_data.png"
    )
