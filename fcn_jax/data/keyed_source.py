"""A view of any TFDS segmentation data set in the keys our pipeline reads.

Catalogue data sets name their features their own way (`oxford_iiit_pet` has
'image' and 'segmentation_mask' holding trimap values 1, 2, 3). `KeyedSource`
renames them to `{'image', 'label', 'id'}` and maps stored label values to
class ids, so transforms, losses and metrics never see the original layout.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def parse_label_mapping(spec: str) -> dict[int, int]:
    """Parses `'1:0,2:1,3:255'` (stored value : class id) into a dict.

    An empty string means no mapping. Stored values must lie in [0, 256): label
    maps are uint8 images.

    Raises:
      ValueError: quoting the entry that is not `int:int` or is out of range.
    """
    mapping: dict[int, int] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        stored, sep, class_id = entry.partition(":")
        try:
            if not sep:
                raise ValueError
            key, value = int(stored), int(class_id)
        except ValueError:
            raise ValueError(
                f"config.data.label_mapping entry {entry!r} is not 'stored:class',"
                f" e.g. '1:0,2:1,3:255'."
            ) from None
        if not 0 <= key < 256:
            raise ValueError(
                f"config.data.label_mapping maps stored value {key}, outside the"
                " uint8 range [0, 256) of a label map."
            )
        if key in mapping:
            raise ValueError(f"config.data.label_mapping maps {key} twice.")
        mapping[key] = value
    return mapping


class KeyedSource(Sequence):
    """Random access to `source` as `{'image': uint8 [H, W, C], 'label': int32
    [H, W, 1], 'id': int32}`.

    `label_mapping` sends stored label values to class ids; values it does not
    list pass through unchanged (and are checked against the class range by the
    pipeline). `id` is the source's 'id' feature when it has an integer one,
    else the record index.
    """

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        *,
        image_key: str = "image",
        label_key: str = "label",
        label_mapping: Mapping[int, int] | None = None,
        name: str = "data set",
        channels: int | None = None,
        convert_grayscale: bool = False,
    ):
        if len(source) == 0:
            raise ValueError(f"{name} has no examples in this split.")
        first = source[0]
        for role, key in (("image_key", image_key), ("label_key", label_key)):
            if key not in first:
                raise KeyError(
                    f"config.data.{role}={key!r} is not a feature of {name}; its "
                    f"features are {sorted(first)}."
                )
        self._source = source
        self._name = name
        self._channels = channels
        self._convert_grayscale = convert_grayscale
        self._image_key = image_key
        self._label_key = label_key
        self._lookup = None
        if label_mapping:
            self._lookup = np.arange(256, dtype=np.int32)
            for stored, class_id in label_mapping.items():
                self._lookup[stored] = class_id

    def _check_channels(self, image: np.ndarray, example_id: Any) -> np.ndarray:
        expected = self._channels
        if expected is None or image.shape[-1] == expected:
            return image
        if image.shape[-1] == 1 and expected == 3 and self._convert_grayscale:
            return np.repeat(image, 3, axis=-1)
        hint = (
            " Set config.data.convert_grayscale=True to repeat a grayscale image"
            " into three channels."
            if image.shape[-1] == 1 and expected == 3
            else ""
        )
        raise ValueError(
            f"Example {example_id} of {self._name} has {image.shape[-1]} image "
            f"channel(s); the config expects {expected} (len(config.data.mean))." + hint
        )

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        # Grain compares this text when it restores an iterator's position, so
        # it must name the data and the view, never an object's address.
        mapping = None if self._lookup is None else self._lookup.tolist()
        return (
            f"KeyedSource({self._source!r}, image_key={self._image_key!r}, "
            f"label_key={self._label_key!r}, label_lookup={mapping}, "
            f"channels={self._channels}, convert_grayscale={self._convert_grayscale})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        image = np.asarray(record[self._image_key])
        if image.ndim == 2:
            image = image[..., None]
        image = self._check_channels(image, record.get("id", index))
        label = np.asarray(record[self._label_key])
        if label.ndim == 2:
            label = label[..., None]
        if self._lookup is not None:
            label = self._lookup[label]
        example_id = record.get("id", index)
        if not np.issubdtype(np.asarray(example_id).dtype, np.integer):
            example_id = index
        return {
            "image": image,
            "label": label.astype(np.int32),
            "id": np.int32(example_id),
        }
