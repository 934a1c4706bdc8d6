"""Config files load with every preset; bad keys, presets and values fail clearly."""

import pytest
from conftest import CONFIG_FILES, load_config_module

from fcn_jax import config_lib


def _all_preset_combinations(module):
    yield None
    yield from module.PRESETS


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_with_every_preset(path):
    module = load_config_module(path)
    for arg in _all_preset_combinations(module):
        config = module.get_config(arg)
        config_lib.validate_config(config)


def test_unknown_preset_is_an_error_naming_it():
    module = load_config_module(CONFIG_FILES[0])
    with pytest.raises(ValueError, match="nonexistent"):
        module.get_config("runlocal,nonexistent")


def test_config_is_locked_against_typos():
    module = load_config_module(CONFIG_FILES[0])
    config = module.get_config()
    with pytest.raises(AttributeError):
        config.optim.lr = 0.1
    with pytest.raises(TypeError):
        config.optim.learning_rate = "fast"


@pytest.mark.parametrize(
    "key, value, culprit",
    [
        (("model", "padding"), "same", "model.padding"),
        (("model", "norm"), "layer", "model.norm"),
        (("eval", "mode"), "tiles", "eval.mode"),
        (("model", "depth"), 0, "model.depth"),
        (("data", "ignore_label"), 1, "data.ignore_label"),
        (("loss", "class_weights"), (1.0, 2.0, 3.0), "loss.class_weights"),
    ],
)
def test_validation_names_the_key_at_fault(key, value, culprit):
    config = config_lib.default_config()
    group, name = key
    config[group][name] = value
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        config_lib.validate_config(config)
