"""Sweeps: a config file's `sweep()` expanded into named runs and commands.

A sweep member is a dict of dotted config keys to values, e.g.
`{"optim.learning_rate": 1e-3, "loss.dice_weight": 1.0}`. Each member trains
in `<workdir_root>/<workdir_name(member)>` through scripts/train.py.
"""

import copy
import dataclasses
import hashlib
import importlib.util
import os
import re
import shlex
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections.config_flags import tuple_parser

from fcn_jax import config_lib

Overrides = dict[str, Any]

TRAIN_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py"
)
_NAME_LIMIT = 120


class SweepError(ValueError):
    """A sweep that cannot run: unknown key, wrong type, colliding workdirs."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One sweep member: its workdir name, its own overrides, and the flags and
    config it trains with (the sweep's common overrides included)."""

    name: str
    overrides: Overrides
    flags: Overrides
    config: ml_collections.ConfigDict


def load_config_module(path: str) -> types.ModuleType:
    """Imports a config file by path, as `--config=path` does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config file {path!r}.")
    name = f"{os.path.splitext(os.path.basename(path))[0]}_config"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(config_arg: str) -> tuple[str, types.ModuleType, ml_collections.ConfigDict]:
    """(path, module, config) of `file.py[:presets]`, called as the flag would."""
    path, colon, presets = config_arg.partition(":")
    module = load_config_module(path)
    return path, module, module.get_config(*([presets] if colon else []))


def _parent(config: ml_collections.ConfigDict, key: str, where: str):
    """(group, field name) of a dotted leaf key; SweepError if there is none."""
    *groups, name = key.split(".")
    group = config
    for part in groups:
        group = group.get(part)
        if not isinstance(group, ml_collections.ConfigDict):
            break
    if (
        not isinstance(group, ml_collections.ConfigDict)
        or name not in group
        or isinstance(group[name], ml_collections.ConfigDict)
    ):
        raise SweepError(f"{where}: unknown config key {key!r}.")
    return group, name


def _apply(config: ml_collections.ConfigDict, overrides: Overrides, where: str):
    for key, value in overrides.items():
        group, name = _parent(config, key, where)
        current = group[name]
        problem = f"{where}: {key}={value!r} does not fit the config's field"
        # ConfigDict takes True for an int field; the flag parser would not.
        if current is not None and isinstance(value, bool) != isinstance(current, bool):
            raise SweepError(f"{problem} of type {type(current).__name__}.")
        try:
            group[name] = value
        except TypeError as error:
            raise SweepError(f"{problem} ({error}).") from error


def expand(
    config_arg: str,
    *,
    members: Sequence[Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
) -> list[Run]:
    """The runs of a sweep, each validated against `get_config(presets)`.

    Args:
      config_arg: `path/to/config.py[:presets]`, as given to `--config`.
      members: override dicts; by default the config file's `sweep()`.
      common: overrides shared by every run (e.g. `data.data_dir`); they name
        no workdir and may not repeat a member's key.
    """
    path, module, base = _load(config_arg)
    if members is None:
        if not callable(getattr(module, "sweep", None)):
            raise SweepError(
                f"{path} has no sweep(); define one returning override dicts such "
                'as [{"optim.learning_rate": 1e-3}].'
            )
        members = module.sweep()
    members = [dict(member) for member in members]
    if not members:
        raise SweepError(f"The sweep of {path} has no runs.")
    common = dict(common or {})
    runs = []
    for index, (member, name) in enumerate(zip(members, workdir_names(members))):
        where = f"run {index} {member} of the sweep in {path}"
        repeated = sorted(set(member) & set(common))
        if repeated:
            raise SweepError(f"{where}: {repeated} also set as common overrides.")
        config = copy.deepcopy(base)
        _apply(config, {**common, **member}, where)
        try:
            config_lib.validate_config(config)
        except (TypeError, ValueError) as error:
            raise SweepError(f"{where}: {error}") from error
        runs.append(Run(name, member, {**common, **member}, config))
    return runs


def load_sweep(
    config_arg: str, *, common: Mapping[str, Any] | None = None
) -> list[Overrides]:
    """The override dicts of the config file's `sweep()`, validated."""
    return [run.overrides for run in expand(config_arg, common=common)]


def parse_assignments(config_arg: str, assignments: Iterable[str]) -> Overrides:
    """`["optim.learning_rate=3e-4", ...]` as overrides, each value parsed by
    the type of its config field, as `--config.k=v` would be."""
    _, _, config = _load(config_arg)
    parsed = {}
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        where = f"--set={assignment}"
        if not equals:
            raise SweepError(f"{where} is not of the form key=value.")
        group, name = _parent(config, key, where)
        parsed[key] = _parse_text(text, group[name], where)
    return parsed


def _parse_text(text: str, current: Any, where: str) -> Any:
    parsers = [
        (bool, flags.BooleanParser()),
        (int, flags.IntegerParser()),
        (float, flags.FloatParser()),
        (tuple, tuple_parser.TupleParser()),
    ]
    for kind, parser in parsers:
        if isinstance(current, kind):
            try:
                return parser.parse(text)
            except ValueError as error:
                raise SweepError(f"{where}: {error}") from error
    return text


def _name_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "_".join(_name_value(v) for v in value) or "none"
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    return str(value)


def _labels(keys: Iterable[str]) -> dict[str, str]:
    """Each key's last component, or the whole key where that is ambiguous."""
    keys = list(dict.fromkeys(keys))
    counts = Counter(key.rsplit(".", 1)[-1] for key in keys)
    return {
        key: key.rsplit(".", 1)[-1] if counts[key.rsplit(".", 1)[-1]] == 1 else key
        for key in keys
    }


def workdir_name(overrides: Mapping[str, Any], *, keys: Iterable[str] = ()) -> str:
    """A filesystem-safe name, e.g. `learning_rate=0.001-dice_weight=1`.

    `keys`: every key of the sweep, so that fields of the same name in two
    groups (`model.name`, `optim.name`) keep their full keys in every run.
    """
    labels = _labels([*keys, *overrides])
    text = "-".join(f"{labels[k]}={_name_value(v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "_", text) or "base"
    if len(name) > _NAME_LIMIT:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: _NAME_LIMIT - 9]}-{digest}"
    return name


def workdir_names(members: Sequence[Mapping[str, Any]]) -> list[str]:
    """`workdir_name` of each member; SweepError if two would share a workdir."""
    keys = [key for member in members for key in member]
    names = [workdir_name(member, keys=keys) for member in members]
    first = {}
    for index, name in enumerate(names):
        if name in first:
            raise SweepError(
                f"Sweep runs {first[name]} {dict(members[first[name]])} and {index} "
                f"{dict(members[index])} would share the workdir {name!r}."
            )
        first[name] = index
    return names


def join_workdir(root: str, name: str) -> str:
    # os.path.join would also do for gs:// roots; this keeps them readable.
    return f"{root.rstrip('/')}/{name}"


def format_flag_value(value: Any) -> str:
    """`value` as ml_collections' flag parsers read it back: tuples as
    comma-separated literals, bools as True/False."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return f"{value[0]!r},"
        return ",".join(repr(v) for v in value) or "()"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def command(
    config_arg: str,
    workdir: str,
    overrides: Mapping[str, Any],
    *,
    python: str = "python",
    train_script: str = "scripts/train.py",
) -> list[str]:
    """The scripts/train.py argv of one run."""
    return [
        python,
        train_script,
        f"--config={config_arg}",
        f"--workdir={workdir}",
        *(f"--config.{k}={format_flag_value(v)}" for k, v in overrides.items()),
    ]


def local_commands(
    config_arg: str,
    workdir_root: str,
    *,
    members: Sequence[Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
) -> list[str]:
    """Per run, the shell line training it here."""
    return [
        shlex.join(command(config_arg, join_workdir(workdir_root, run.name), run.flags))
        for run in expand(config_arg, members=members, common=common)
    ]


def tpu_commands(
    config_arg: str,
    workdir_root: str,
    *,
    tpu_name: str,
    zone: str,
    members: Sequence[Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
    repo_dir: str = "~/fcn-jax",
) -> list[str]:
    """Per run, a shell line launching it on every worker of a TPU VM through
    scripts/tpu_vm.sh (runs queue on the VM, one at a time)."""
    lines = []
    for run in expand(config_arg, members=members, common=common):
        argv = command(config_arg, join_workdir(workdir_root, run.name), run.flags)
        launcher = [
            "scripts/tpu_vm.sh",
            f"--tpu_name={tpu_name}",
            f"--zone={zone}",
            f"--repo_dir={repo_dir}",
            f"--log=logs/{run.name}.log",
            "--",
        ]
        lines.append(shlex.join(launcher + argv))
    return lines
