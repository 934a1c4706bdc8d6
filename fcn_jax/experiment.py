"""An experiment: the mesh, model, state and data built from one config."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import ml_collections

from fcn_jax import config_lib, models, optim, sharding, steps
from fcn_jax.data import keyed_source, pipeline
from fcn_jax.train_state import TrainState, abstract_train_state, create_train_state


@dataclasses.dataclass
class Experiment:
    """Everything built from a config that training and evaluation share."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: models.UNet
    state: TrainState

    @functools.cached_property
    def eval_step(self) -> Callable:
        return steps.jit_eval_step(self.config, self.mesh, self.model)


def input_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, ...]:
    crop = config.data.crop_size
    return (batch_size, crop, crop, len(config.data.mean))


def create_experiment(
    config: ml_collections.ConfigDict, *, abstract: bool = False
) -> Experiment:
    """Validates the config and builds mesh, model and (abstract) train state."""
    config_lib.validate_config(config)
    mesh = sharding.create_mesh(config.mesh.spatial)
    model = models.create_model(config.model)
    model.check_input_shape((config.data.crop_size,) * 2)
    optimizer = optim.create_optimizer(config)
    shape = input_shape(config, sharding.data_axis_size(mesh))
    if abstract:
        state = abstract_train_state(model, optimizer, shape, mesh)
    else:
        rng = jax.random.key(config.train.seed)
        state = create_train_state(model, optimizer, rng, shape, mesh)
    return Experiment(config=config, mesh=mesh, model=model, state=state)


def data_source(config: ml_collections.ConfigDict, split: str):
    """`split` of `config.data.name` as `{'image', 'label', 'id'}` examples."""
    source = pipeline.load_data_source(
        config.data.name,
        split,
        config.data.data_dir,
        manual_dir=config.data.manual_dir or None,
    )
    return keyed_source.KeyedSource(
        source,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
        label_mapping=keyed_source.parse_label_mapping(config.data.label_mapping),
        name=f"{config.data.name}[{split}]",
        channels=len(config.data.mean),
        convert_grayscale=config.data.convert_grayscale,
    )


def eval_batches(config: ml_collections.ConfigDict, mesh, split: str):
    """Whole-image batches of `split`, every example once across processes.

    `data.eval_batch_size` is rounded up to a multiple of the mesh's data rows
    (the padding examples are masked out), so any device count can evaluate.
    """
    source = data_source(config, split)
    rows = sharding.data_axis_size(mesh)
    global_batch_size = -(-config.data.eval_batch_size // rows) * rows
    return pipeline.eval_batches(
        source,
        batch_size=sharding.per_process_batch_size(global_batch_size, mesh),
        num_classes=config.model.num_classes,
        ignore_label=config.data.ignore_label,
        mean=config.data.mean,
        std=config.data.std,
    )


def create_train_iterator(config: ml_collections.ConfigDict, mesh):
    source = data_source(config, config.data.train_split)
    loader = pipeline.create_train_loader(
        source,
        batch_size=sharding.per_process_batch_size(config.data.batch_size, mesh),
        crop_size=config.data.crop_size,
        seed=config.train.seed,
        num_classes=config.model.num_classes,
        ignore_label=config.data.ignore_label,
        mean=config.data.mean,
        std=config.data.std,
        augment=config.data.augment,
        worker_count=config.data.worker_count,
    )
    return iter(loader)


def check_data(config: ml_collections.ConfigDict, mesh) -> None:
    """Reads one training batch (from an iterator of its own, so the run's
    data order is untouched) and one evaluation batch, so that missing splits,
    wrong keys, channels or label values fail before a run writes anything."""
    next(create_train_iterator(config, mesh))
    next(eval_batches(config, mesh, config.data.eval_split))
