"""TFDS builder for CamVid road scenes in the 11-class SegNet labelling.

Class ids 0-10 are `CLASS_NAMES`; the stored void id 11 becomes `IGNORE_LABEL`
(255), which the loss and metrics skip. The files are read from a manual
directory (downloads are not supported offline):

    <manual_dir>/train/*.png      RGB      <manual_dir>/trainannot/*.png  ids
    <manual_dir>/val/*.png                 <manual_dir>/valannot/*.png
    <manual_dir>/test/*.png  (optional)    <manual_dir>/testannot/*.png

Each image's label has the same file name.
"""

import os
import pathlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fcn_jax.data import validation

CLASS_NAMES = (
    "sky",
    "building",
    "pole",
    "road",
    "sidewalk",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
NUM_CLASSES = len(CLASS_NAMES)
# RGB colour of each class, in `CLASS_NAMES` order (the usual CamVid colours).
PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
VOID_ID = 11
IGNORE_LABEL = 255
LABEL_VALUES = {**{i: i for i in range(NUM_CLASSES)}, VOID_ID: IGNORE_LABEL}
MANUAL_DIR_ENV = "FCN_JAX_CAMVID_DIR"
# Split name -> (image folder, label folder) under the manual directory.
SPLIT_DIRS = {
    "train": ("train", "trainannot"),
    "validation": ("val", "valannot"),
    "test": ("test", "testannot"),
}
OPTIONAL_SPLITS = ("test",)

_LAYOUT = (
    "train/, trainannot/, val/, valannot/ (and optionally test/, testannot/), "
    "each label PNG named as its image"
)

_CITATION = """@article{brostow2009,
  author = {Brostow, Gabriel J. and Fauqueur, Julien and Cipolla, Roberto},
  title = {Semantic Object Classes in Video: A High-Definition Ground Truth
    Database},
  journal = {Pattern Recognition Letters},
  volume = {30},
  number = {2},
  pages = {88--97},
  year = {2009},
}"""


def resolve_manual_dir(manual_dir: str | os.PathLike | None) -> pathlib.Path:
    """`manual_dir`, else `$FCN_JAX_CAMVID_DIR`; raises if neither is set, if
    the train or validation folders are missing, or if test has only one."""
    manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV)
    if not manual_dir:
        raise FileNotFoundError(
            "CamVid is read from a local folder (downloads are not supported "
            "offline): pass manual_dir (e.g. load_data_source('camvid', split, "
            f"data_dir, manual_dir=...)) or set {MANUAL_DIR_ENV}. The folder "
            f"holds {_LAYOUT}."
        )
    path = pathlib.Path(manual_dir).expanduser()
    for split, folders in SPLIT_DIRS.items():
        missing = [f for f in folders if not (path / f).is_dir()]
        optional = split in OPTIONAL_SPLITS and len(missing) == len(folders)
        if missing and not optional:
            raise FileNotFoundError(
                f"CamVid folder {path} lacks {', '.join(missing)}; expected {_LAYOUT}."
            )
    return path


def split_files(
    manual_dir: str | os.PathLike, split: str
) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(image, label) paths of `split` in sorted file-name order; raises
    naming any image whose label is missing."""
    image_dir, label_dir = (pathlib.Path(manual_dir) / f for f in SPLIT_DIRS[split])
    images = sorted(image_dir.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"No PNG images in {image_dir}.")
    pairs = [(image, label_dir / image.name) for image in images]
    for image, label in pairs:
        if not label.is_file():
            raise FileNotFoundError(f"Image {image} has no label file {label}.")
    return pairs


def read_example(
    image_path: str | os.PathLike, label_path: str | os.PathLike
) -> dict[str, np.ndarray]:
    """Reads and checks one pair: image uint8 `[H, W, 3]`, label uint8
    `[H, W, 1]` with void mapped to `IGNORE_LABEL`."""
    image = validation.read_png(image_path, mode="RGB")
    label = validation.read_png(label_path)
    validation.check_same_size(image, label, image_path, label_path)
    label = validation.remap_label(label, LABEL_VALUES, label_path)
    return {"image": image, "label": label[..., None]}


class Camvid(tfds.core.GeneratorBasedBuilder):
    """CamVid at 360x480 in the SegNet split: 367 train, 101 validation.

    Examples: `{'image': uint8 [H, W, 3], 'label': uint8 [H, W, 1], 'id':
    int32 (index in the split's sorted file names), 'name': the file stem}`;
    a data source returns `name` as bytes.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "11 classes, void as 255; train, validation, optional test."
    }
    # See `Isbi2012Membrane`: no resource look-ups in the pinned environment.
    code_path = epath.Path(__file__)

    def __init__(self, *, manual_dir: str | os.PathLike | None = None, **kwargs: Any):
        """`manual_dir` (default `$FCN_JAX_CAMVID_DIR`) is only needed to
        prepare; prepared data is found by `data_dir` alone."""
        manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV)
        self._manual_dir = os.fspath(manual_dir) if manual_dir else None
        super().__init__(**kwargs)
        # TFDS pickles a builder by re-running __init__ on these arguments.
        self._original_state["manual_dir"] = self._manual_dir

    def _info(self) -> tfds.core.DatasetInfo:
        # Images of any size: the SegNet copy is 360x480, the original 720x960.
        shape = (None, None)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "CamVid road scenes (Cambridge-driving Labeled Video Database) "
                f"in the 11-class SegNet labelling: {', '.join(CLASS_NAMES)}. "
                f"Void pixels (stored id {VOID_ID}) are {IGNORE_LABEL}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(*shape, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.LabeledImage(
                        labels=list(CLASS_NAMES),
                        shape=(*shape, 1),
                        dtype=np.uint8,
                        encoding_format="png",
                    ),
                    "id": np.int32,
                    "name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(
                class_names=list(CLASS_NAMES),
                palette=[list(color) for color in PALETTE],
                ignore_label=IGNORE_LABEL,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is read from the manual directory.
        root = resolve_manual_dir(self._manual_dir)
        return {
            split: self._generate_examples(split_files(root, split))
            for split, folders in SPLIT_DIRS.items()
            if all((root / f).is_dir() for f in folders)
        }

    def _generate_examples(
        self, pairs: list[tuple[pathlib.Path, pathlib.Path]]
    ) -> Iterator[tuple[str, dict]]:
        for index, (image_path, label_path) in enumerate(pairs):
            example = read_example(image_path, label_path)
            # PIL images, not arrays: encoding an array would need TensorFlow.
            yield (
                image_path.stem,
                {
                    "image": Image.fromarray(example["image"]),
                    "label": Image.fromarray(example["label"][..., 0]),
                    "id": index,
                    "name": image_path.stem,
                },
            )
