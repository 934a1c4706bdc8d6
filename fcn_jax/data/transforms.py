"""Grain transforms that move an image and its label map together.

Each acts on a dict `{'image': uint8 [H, W, C], 'label': int [H, W] or
[H, W, 1], ...}` and passes other keys (such as 'id') through. Random ones draw
only from the generator grain hands them, so a pipeline is fixed by its seed.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from scipy import interpolate, ndimage

from fcn_jax.data import validation

Example = dict[str, Any]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """Crops the same random `size` window from image and label.

    A side shorter than the window is first padded symmetrically: the image by
    reflection, the label with `ignore_label` so padding never counts.
    """

    size: int | tuple[int, int]
    ignore_label: int = 255

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        image, label = element["image"], element["label"]
        crop_h, crop_w = _pair(self.size)
        pad_h = max(crop_h - image.shape[0], 0)
        pad_w = max(crop_w - image.shape[1], 0)
        if pad_h or pad_w:
            spatial = [
                (pad_h // 2, pad_h - pad_h // 2),
                (pad_w // 2, pad_w - pad_w // 2),
            ]
            image = np.pad(image, spatial + [(0, 0)] * (image.ndim - 2), mode="reflect")
            # Widen first: the ignore label may not fit a uint8 label (e.g. -1).
            label = np.pad(
                label.astype(np.int32),
                spatial + [(0, 0)] * (label.ndim - 2),
                constant_values=self.ignore_label,
            )
        top = int(rng.integers(image.shape[0] - crop_h + 1))
        left = int(rng.integers(image.shape[1] - crop_w + 1))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        return {**element, "image": image[window], "label": label[window]}


@dataclasses.dataclass(frozen=True)
class RandomFlipsAndRotations(grain.transforms.RandomMap):
    """Applies one random symmetry of the square to image and label.

    With both flags, all 8 (rotation by k * 90 degrees, then maybe a mirror);
    with `flips` only, horizontal and (if `vertical_flips`) vertical flips; with
    `rotations` only, the 4 rotations. Rotating a non-square input swaps H and
    W, so crop square first. Scenes with an up (roads) want flips only and
    `vertical_flips=False`.
    """

    flips: bool = True
    rotations: bool = True
    vertical_flips: bool = True

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        turns = int(rng.integers(4)) if self.rotations else 0
        mirror = self.flips and bool(rng.integers(2))
        # A vertical flip is a mirror composed with a half turn; draw it only
        # when rotations cannot supply the half turn.
        upside_down = (
            self.flips
            and self.vertical_flips
            and not self.rotations
            and bool(rng.integers(2))
        )

        def apply(array: np.ndarray) -> np.ndarray:
            array = np.rot90(array, turns, axes=(0, 1))
            if mirror:
                array = array[:, ::-1]
            if upside_down:
                array = array[::-1]
            return np.ascontiguousarray(array)

        return {
            **element,
            "image": apply(element["image"]),
            "label": apply(element["label"]),
        }


@functools.lru_cache(maxsize=32)
def _upsampling_matrix(grid_size: int, length: int) -> np.ndarray:
    """`[length, grid_size]` weights of a natural cubic spline through
    `grid_size` nodes spread evenly over `length` pixels, ends included."""
    spline = interpolate.CubicSpline(
        np.arange(grid_size), np.eye(grid_size), bc_type="natural"
    )
    weights = spline(np.linspace(0, grid_size - 1, length))
    weights.setflags(write=False)
    return weights


@dataclasses.dataclass(frozen=True)
class ElasticDeformation(grain.transforms.RandomMap):
    """Smooth random warp of image and label (Ronneberger et al., U-Net, 2015).

    Displacements at the nodes of a coarse `grid_size` x `grid_size` grid are
    drawn from N(0, sigma^2) pixels (the paper: 3 x 3, sigma = 10) and spread to
    every pixel by cubic splines. The image is resampled with `image_order`
    (1 linear, 3 cubic) and the label with nearest neighbour, so the warped
    label holds only values of the original. Borders are mirrored. Applied
    with `probability`.
    """

    sigma: float
    probability: float = 1.0
    grid_size: int = 3
    image_order: int = 1

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= self.probability:
            return element
        image, label = element["image"], element["label"]
        height, width = image.shape[:2]
        nodes = rng.normal(0.0, self.sigma, size=(2, self.grid_size, self.grid_size))
        rows = _upsampling_matrix(self.grid_size, height)
        cols = _upsampling_matrix(self.grid_size, width)
        displacement = np.einsum("hi,dij,wj->dhw", rows, nodes, cols)
        coords = np.indices((height, width), dtype=np.float64) + displacement

        channels = [
            ndimage.map_coordinates(
                image[..., c].astype(np.float32),
                coords,
                order=self.image_order,
                mode="mirror",
            )
            for c in range(image.shape[-1])
        ]
        warped = np.stack(channels, axis=-1)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            warped = np.clip(np.rint(warped), info.min, info.max)
        warped_label = ndimage.map_coordinates(
            label.reshape(height, width), coords, order=0, mode="mirror"
        )
        return {
            **element,
            "image": warped.astype(image.dtype),
            "label": warped_label.astype(label.dtype).reshape(label.shape),
        }


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """float32 image with an integer type's full range mapped to [0, 1]."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """Image to float32 `(x - mean) / std` per channel `[H, W, C]`, with `x` in
    [0, 1] (uint8 divided by 255); label to int32 `[H, W]`."""

    mean: Sequence[float]
    std: Sequence[float]

    def map(self, element: Example) -> Example:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        image = (to_unit_range(element["image"]) - mean) / std
        label = element["label"]
        if label.ndim == 3:
            if label.shape[-1] != 1:
                raise ValueError(f"Expected a label [H, W, 1], got {label.shape}.")
            label = label[..., 0]
        return {**element, "image": image, "label": label.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class ValidateLabels(grain.transforms.Map):
    """Raises ValueError naming the example's 'id' and the bad values if a
    label lies outside `[0, num_classes)` and is not `ignore_label`."""

    num_classes: int
    ignore_label: int

    def map(self, element: Example) -> Example:
        validation.check_label_values(
            element["label"],
            self.num_classes,
            self.ignore_label,
            element.get("id", "<no id>"),
        )
        return element


@dataclasses.dataclass(frozen=True)
class SelectKeys(grain.transforms.Map):
    """Keeps only `keys` of each example."""

    keys: tuple[str, ...] = ("image", "label")

    def map(self, element: Example) -> Example:
        return {key: element[key] for key in self.keys}
