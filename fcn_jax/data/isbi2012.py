"""TFDS builder for the ISBI 2012 EM membrane slices shipped with the package."""

import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fcn_jax.data import validation

# Re-exported: this module was their first home.
from fcn_jax.data.sources import default_data_dir, load_data_source  # noqa: F401

CLASS_NAMES = ("membrane", "cell")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (512, 512, 1)
SOURCE_DIR = pathlib.Path(__file__).parent / "isbi2012_membrane"
SPLIT_IDS = {"train": range(25), "validation": range(25, 30)}
# Stored label values: 0 marks membrane (boundary), 255 cell interior.
LABEL_VALUES = {0: 0, 255: 1}

# Grey-level mean and standard deviation on the [0, 1] scale (uint8 / 255)
# over every pixel of the 25 training slices, validation left unseen:
# `pipeline.compute_mean_std(load_data_source("isbi2012_membrane", "train"))`
# gives (0.49119,), (0.17124,).
MEAN = (0.4912,)
STD = (0.1712,)

_CITATION = """@article{cardona2010,
  author = {Cardona, Albert and others},
  title = {An Integrated Micro- and Macroarchitectural Analysis of the
    Drosophila Brain by Computer-Assisted Serial Section Electron Microscopy},
  journal = {PLoS Biology},
  volume = {8},
  number = {10},
  pages = {e1000502},
  year = {2010},
}"""


def read_slice(source_dir: str | os.PathLike, index: int) -> dict[str, np.ndarray]:
    """Reads and checks slice `index`: image `[H, W, 1]` and label `[H, W, 1]`,
    both uint8, the label as class ids (0 membrane, 1 cell)."""
    image_path = pathlib.Path(source_dir) / "image" / f"{index}.png"
    label_path = pathlib.Path(source_dir) / "label" / f"{index}.png"
    image = validation.read_png(image_path)
    label = validation.read_png(label_path)
    validation.check_same_size(image, label, image_path, label_path)
    label = validation.remap_label(label, LABEL_VALUES, label_path)
    return {"image": image[..., None], "label": label[..., None]}


class Isbi2012Membrane(tfds.core.GeneratorBasedBuilder):
    """The 30 annotated ISBI 2012 training slices; the last 5 held out."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Slices 0-24 train, 25-29 validation."
    }
    # TFDS finds a builder's file through `importlib_resources`, which the
    # pinned environment lacks; naming it here skips that look-up.
    code_path = epath.Path(__file__)

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
        """`source_dir` holds `image/{i}.png` and `label/{i}.png`; defaults to
        the copy shipped in this package. Prepared data is found by `data_dir`
        alone, so give another source its own `data_dir`."""
        self._source_dir = pathlib.Path(source_dir or SOURCE_DIR)
        super().__init__(**kwargs)
        # TFDS pickles a builder by re-running __init__ on these arguments.
        self._original_state["source_dir"] = os.fspath(self._source_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` would look for README
        # and citation files beside the package, again via resource look-ups.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Serial-section TEM of the Drosophila first instar larva ventral "
                "nerve cord (ISBI 2012 challenge): 30 annotated 512x512 grayscale "
                "slices. Label 0 = membrane, 1 = cell interior."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.LabeledImage(
                        labels=list(CLASS_NAMES),
                        shape=IMAGE_SHAPE,
                        dtype=np.uint8,
                        encoding_format="png",
                    ),
                    "id": np.int32,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://imagej.net/events/isbi-2012-segmentation-challenge",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is read from `source_dir`.
        return {split: self._generate_examples(ids) for split, ids in SPLIT_IDS.items()}

    def _generate_examples(self, ids: Sequence[int]) -> Iterator[tuple[int, dict]]:
        for index in ids:
            example = read_slice(self._source_dir, index)
            # PIL images, not arrays: encoding an array would need TensorFlow.
            yield (
                index,
                {
                    "image": Image.fromarray(example["image"][..., 0]),
                    "label": Image.fromarray(example["label"][..., 0]),
                    "id": index,
                },
            )
