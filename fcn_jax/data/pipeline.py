"""Training loader and evaluation batches over a random-access source."""

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from fcn_jax.data import transforms
from fcn_jax.data.sources import default_data_dir, load_data_source

__all__ = [
    "DEFAULT_AUGMENT",
    "compute_mean_std",
    "create_train_loader",
    "create_train_transforms",
    "default_data_dir",
    "eval_batches",
    "load_data_source",
]

# Keys `augment` may set; elastic deformation is off unless given a probability.
DEFAULT_AUGMENT = {
    "flips": True,
    "rotations": True,
    "vertical_flips": True,
    "elastic_sigma": 10.0,
    "elastic_grid_size": 3,
    "elastic_probability": 0.0,
}


class DictLike(Protocol):
    """A dict or an `ml_collections.ConfigDict`."""

    def __iter__(self) -> Iterator[str]: ...

    def __getitem__(self, key: str) -> Any: ...


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count}).")
    return index, count


def create_train_transforms(
    *,
    crop_size: int | tuple[int, int],
    num_classes: int,
    ignore_label: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: DictLike | None = None,
) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
    """Per-example steps: check labels, crop, flip/rotate, warp, normalise."""
    given = {} if augment is None else {key: augment[key] for key in augment}
    if unknown := set(given) - set(DEFAULT_AUGMENT):
        raise ValueError(
            f"Unknown augment keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}."
        )
    options = {**DEFAULT_AUGMENT, **given}
    steps = [
        transforms.ValidateLabels(num_classes, ignore_label),
        transforms.RandomCrop(crop_size, ignore_label),
    ]
    if options["flips"] or options["rotations"]:
        steps.append(
            transforms.RandomFlipsAndRotations(
                bool(options["flips"]),
                bool(options["rotations"]),
                bool(options["vertical_flips"]),
            )
        )
    if options["elastic_probability"] > 0:
        steps.append(
            transforms.ElasticDeformation(
                sigma=float(options["elastic_sigma"]),
                probability=float(options["elastic_probability"]),
                grid_size=int(options["elastic_grid_size"]),
            )
        )
    steps += [transforms.Normalize(tuple(mean), tuple(std)), transforms.SelectKeys()]
    return steps


def create_train_loader(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    crop_size: int | tuple[int, int],
    seed: int,
    num_classes: int,
    ignore_label: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: DictLike | None = None,
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DataLoader:
    """Endless, shuffled, augmented batches of this process's shard.

    Yields `{'image': float32 [B, H, W, C], 'label': int32 [B, H, W]}` with
    `B = batch_size` PER PROCESS (the global batch is `batch_size *
    process_count`) and `H, W = crop_size`. One shuffled sequence of the whole
    split, with each position's augmentation seeded by the position, is dealt
    out: process p of P reads positions p, p + P, p + 2P, ... So global batch k
    holds positions [kBP, (k+1)BP) whatever P is: with `worker_count=0` a run
    on P processes sees the same examples, identically augmented, as a run on
    one (in another row order, which a mean loss does not see). Its iterator
    has `get_state()` / `set_state()` for checkpointing. `augment` overrides
    `DEFAULT_AUGMENT`; `seed` must fit in 32 bits.
    """
    index, count = _process(process_index, process_count)
    shard = grain.sharding.ShardOptions(
        shard_index=index, shard_count=count, drop_remainder=True
    )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    steps = create_train_transforms(
        crop_size=crop_size,
        num_classes=num_classes,
        ignore_label=ignore_label,
        mean=mean,
        std=std,
        augment=augment,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*steps, grain.transforms.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
        shard_options=shard,
        # Grain's default reads ahead 500 examples on 16 threads: ~250 MB of
        # decoded 512^2 slices per process for no gain at these batch sizes.
        read_options=grain.ReadOptions(
            num_threads=4, prefetch_buffer_size=4 * batch_size
        ),
    )


def eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    num_classes: int,
    ignore_label: int,
    mean: Sequence[float],
    std: Sequence[float],
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Whole images of the split, each exactly once across processes.

    Process p takes examples p, p + P, ... in batches of `{'image': float32
    [B, H, W, C], 'label': int32 [B, H, W], 'mask': float32 [B, H, W], 'id':
    int32 [B]}`. Padding examples have zero images, `ignore_label` labels,
    mask 0 and id -1. Every process yields the same number of batches, so
    collective eval steps stay in lockstep. With one process, images of
    different sizes go in different batches (each shape compiles once); with
    several, all images must share one size so every process's batch matches.
    """
    index, count = _process(process_index, process_count)
    validate = transforms.ValidateLabels(num_classes, ignore_label)
    normalize = transforms.Normalize(tuple(mean), tuple(std))
    mine = range(index, len(source), count)
    per_process = -(-len(source) // count)
    num_batches = -(-per_process // batch_size)
    reference = None
    for start in range(0, num_batches * batch_size, batch_size):
        examples = [
            normalize.map(validate.map(source[i])) for i in mine[start:][:batch_size]
        ]
        if reference is None or (count == 1 and examples):
            reference = examples[0] if examples else normalize.map(source[0])
        yield _pad_batch(examples, reference, batch_size, ignore_label)


def _pad_batch(
    examples: list[dict[str, Any]],
    reference: dict[str, Any],
    batch_size: int,
    ignore_label: int,
) -> dict[str, np.ndarray]:
    """Stacks `examples` and pads to `batch_size` with masked-out entries."""
    image_shape = reference["image"].shape
    for example in examples:
        if example["image"].shape != image_shape:
            raise ValueError(
                f"Example {example['id']} has image shape {example['image'].shape},"
                f" expected {image_shape}: a batch holds whole images of one size, "
                "so use eval_batch_size 1 per process and a single process, or "
                "a split whose images share one size."
            )
    images = np.zeros((batch_size, *image_shape), np.float32)
    labels = np.full((batch_size, *image_shape[:2]), ignore_label, np.int32)
    mask = np.zeros((batch_size, *image_shape[:2]), np.float32)
    ids = np.full((batch_size,), -1, np.int32)
    for i, example in enumerate(examples):
        images[i] = example["image"]
        labels[i] = example["label"]
        mask[i] = 1.0
        ids[i] = example["id"]
    return {"image": images, "label": labels, "mask": mask, "id": ids}


def compute_mean_std(
    source: Sequence[dict[str, Any]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation over all pixels of `source`,
    on the [0, 1] scale `Normalize` uses."""
    total = total_sq = 0.0
    count = 0
    for i in range(len(source)):
        image = transforms.to_unit_range(source[i]["image"]).astype(np.float64)
        pixels = image.reshape(-1, image.shape[-1])
        total = total + pixels.sum(axis=0)
        total_sq = total_sq + (pixels**2).sum(axis=0)
        count += pixels.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
