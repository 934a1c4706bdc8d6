"""Tests of the ISBI 2012 builder, the joint augmentations and the loaders."""

import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fcn_jax.data import isbi2012, pipeline, transforms

IGNORE = 255


@pytest.fixture(scope="module")
def isbi(data_dir):
    return {
        split: pipeline.load_data_source("isbi2012_membrane", split, data_dir)
        for split in ("train", "validation")
    }


def _coordinate_example(height: int, width: int) -> dict:
    """Image channels hold each pixel's row and column; the label encodes both,
    so any misalignment of image and label shows."""
    rows, cols = np.indices((height, width))
    image = np.stack([rows, cols], axis=-1).astype(np.uint8)
    return {"image": image, "label": (rows * width + cols).astype(np.int32), "id": 0}


def _label_from_image(image: np.ndarray, width: int) -> np.ndarray:
    return image[..., 0].astype(np.int32) * width + image[..., 1]


def _loader_kwargs(**overrides) -> dict:
    kwargs = {
        "batch_size": 2,
        "crop_size": 64,
        "seed": 7,
        "num_classes": isbi2012.NUM_CLASSES,
        "ignore_label": IGNORE,
        "mean": isbi2012.MEAN,
        "std": isbi2012.STD,
        "augment": {"elastic_probability": 0.5},
        "process_index": 0,
        "process_count": 1,
    }
    return {**kwargs, **overrides}


def test_builder_splits(isbi):
    ids = {
        split: sorted(int(ex["id"]) for ex in source) for split, source in isbi.items()
    }
    assert ids == {"train": list(range(25)), "validation": list(range(25, 30))}
    example = isbi["validation"][0]
    assert example["image"].shape == example["label"].shape == (512, 512, 1)
    assert example["image"].dtype == example["label"].dtype == np.uint8
    stored = np.asarray(Image.open(isbi2012.SOURCE_DIR / f"label/{example['id']}.png"))
    np.testing.assert_array_equal(example["label"][..., 0], stored == 255)
    assert set(np.unique(example["label"])) == {0, 1}


def test_class_names_in_metadata(data_dir, isbi):
    builder = isbi2012.Isbi2012Membrane(data_dir=data_dir)
    assert builder.info.metadata["class_names"] == list(isbi2012.CLASS_NAMES)
    assert builder.info.features["label"].names == ["membrane", "cell"]


def test_mean_std_constants_match_train_split(isbi):
    mean, std = pipeline.compute_mean_std(isbi["train"])
    np.testing.assert_allclose(mean, isbi2012.MEAN, atol=1e-4)
    np.testing.assert_allclose(std, isbi2012.STD, atol=1e-4)


@pytest.fixture
def source_copy(tmp_path):
    copy = tmp_path / "isbi"
    shutil.copytree(isbi2012.SOURCE_DIR, copy)
    return copy


def test_corrupt_png_is_named(source_copy, tmp_path):
    path = source_copy / "image" / "3.png"
    path.write_bytes(path.read_bytes()[:1000])
    builder = isbi2012.Isbi2012Membrane(
        source_dir=source_copy, data_dir=tmp_path / "tfds", file_format="array_record"
    )
    with pytest.raises(ValueError, match=r"image/3\.png"):
        builder.download_and_prepare(file_format="array_record")


def test_bad_label_value_is_named(source_copy):
    label = np.asarray(Image.open(source_copy / "label" / "5.png")).copy()
    label[0, 0] = 7
    Image.fromarray(label).save(source_copy / "label" / "5.png")
    with pytest.raises(ValueError, match=r"label/5\.png has values \[7\]"):
        isbi2012.read_slice(source_copy, 5)


def test_size_mismatch_names_both_files(source_copy):
    Image.new("L", (256, 512)).save(source_copy / "label" / "2.png")
    with pytest.raises(ValueError, match=r"image/2\.png.*label/2\.png"):
        isbi2012.read_slice(source_copy, 2)


def test_unusable_data_dir_is_named(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(OSError, match="not_a_dir"):
        isbi2012.load_data_source("isbi2012_membrane", "train", blocker / "tfds")
    with pytest.raises(FileNotFoundError, match="missing"):
        isbi2012.load_data_source("mnist", "train", tmp_path / "missing")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FCN_JAX_DATA_DIR", str(tmp_path))
    assert isbi2012.default_data_dir() == tmp_path
    monkeypatch.delenv("FCN_JAX_DATA_DIR")
    assert isbi2012.default_data_dir().parts[-3:] == (
        ".cache",
        "fcn_jax",
        "tensorflow_datasets",
    )


def test_validate_labels_names_id():
    example = {"image": np.zeros((4, 4, 1), np.uint8), "id": 17}
    check = transforms.ValidateLabels(num_classes=2, ignore_label=IGNORE)
    check.map({**example, "label": np.full((4, 4, 1), IGNORE, np.uint8)})
    label = np.zeros((4, 4, 1), np.uint8)
    label[1, 2] = 7
    with pytest.raises(ValueError, match=r"Example 17 .*\[7\]"):
        check.map({**example, "label": label})


def test_crop_pads_and_stays_aligned():
    example = _coordinate_example(20, 30)
    crop = transforms.RandomCrop((24, 16), ignore_label=-1)
    out = crop.random_map(example, np.random.default_rng(0))
    assert out["image"].shape == (24, 16, 2) and out["label"].shape == (24, 16)
    padded = out["label"] == -1
    assert padded.sum() == 4 * 16  # 20 rows padded to 24.
    np.testing.assert_array_equal(
        out["label"][~padded], _label_from_image(out["image"], 30)[~padded]
    )


def test_flips_and_rotations_cover_dihedral_group_aligned():
    example = _coordinate_example(8, 8)
    transform = transforms.RandomFlipsAndRotations()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(64):
        out = transform.random_map(example, rng)
        np.testing.assert_array_equal(out["label"], _label_from_image(out["image"], 8))
        seen.add(out["label"].tobytes())
    assert len(seen) == 8


def test_elastic_deformation_aligned_and_keeps_label_values():
    example = _coordinate_example(48, 48)
    warp = transforms.ElasticDeformation(sigma=4.0)
    out = warp.random_map(example, np.random.default_rng(1))
    assert not np.array_equal(out["image"], example["image"])
    # Linear image and nearest label sample the same points: within a pixel.
    source_rows, source_cols = np.divmod(out["label"], 48)
    assert np.abs(out["image"][..., 0].astype(int) - source_rows).max() <= 1
    assert np.abs(out["image"][..., 1].astype(int) - source_cols).max() <= 1

    membrane = {**example, "label": (example["label"] % 3 == 0).astype(np.uint8)}
    warped = warp.random_map(membrane, np.random.default_rng(2))["label"]
    assert warped.dtype == np.uint8 and set(np.unique(warped)) <= {0, 1}


def test_normalize_shapes_and_scale():
    example = {"image": np.full((4, 5, 1), 255, np.uint8)}
    example["label"] = np.ones((4, 5, 1), np.uint8)
    out = transforms.Normalize(mean=(0.5,), std=(0.25,)).map(example)
    assert out["image"].dtype == np.float32 and out["image"].shape == (4, 5, 1)
    np.testing.assert_allclose(out["image"], 2.0)
    assert out["label"].dtype == np.int32 and out["label"].shape == (4, 5)


def test_train_loader_batches_and_determinism(isbi):
    first = next(iter(pipeline.create_train_loader(isbi["train"], **_loader_kwargs())))
    assert set(first) == {"image", "label"}
    assert first["image"].shape == (2, 64, 64, 1) and first["image"].dtype == np.float32
    assert first["label"].shape == (2, 64, 64) and first["label"].dtype == np.int32
    assert set(np.unique(first["label"])) <= {0, 1}
    again = next(iter(pipeline.create_train_loader(isbi["train"], **_loader_kwargs())))
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])
    other = pipeline.create_train_loader(isbi["train"], **_loader_kwargs(seed=8))
    assert not np.array_equal(first["image"], next(iter(other))["image"])


def test_train_loader_state_restores(isbi):
    iterator = iter(pipeline.create_train_loader(isbi["train"], **_loader_kwargs()))
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    restored = iter(pipeline.create_train_loader(isbi["train"], **_loader_kwargs()))
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(2)]):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_train_loader_shards_are_disjoint():
    # Each example's image is filled with its index, so batches reveal it.
    source = [
        {"image": np.full((4, 4, 1), i, np.uint8), "label": np.zeros((4, 4), np.uint8)}
        for i in range(25)
    ]
    seen = []
    for process in range(2):
        loader = pipeline.create_train_loader(
            source,
            **_loader_kwargs(
                batch_size=3,
                crop_size=4,
                mean=(0.0,),
                std=(1 / 255,),
                process_index=process,
                process_count=2,
            ),
        )
        iterator = iter(loader)
        epoch = np.concatenate([next(iterator)["image"] for _ in range(4)])
        seen.append(set(np.rint(epoch[:, 0, 0, 0]).astype(int)))
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]


def test_augment_accepts_config_dict_and_rejects_unknown_keys():
    common = {
        "crop_size": 8,
        "num_classes": 2,
        "ignore_label": IGNORE,
        "mean": (0.0,),
        "std": (1.0,),
    }
    augment = ml_collections.ConfigDict({"rotations": False, "elastic_probability": 1})
    steps = pipeline.create_train_transforms(**common, augment=augment)
    assert any(isinstance(s, transforms.ElasticDeformation) for s in steps)
    with pytest.raises(ValueError, match="elastic_alpha"):
        pipeline.create_train_transforms(**common, augment={"elastic_alpha": 10.0})


def test_eval_batches_cover_each_example_once(isbi):
    per_process = [
        list(
            pipeline.eval_batches(
                isbi["validation"],
                batch_size=2,
                num_classes=2,
                ignore_label=IGNORE,
                mean=isbi2012.MEAN,
                std=isbi2012.STD,
                process_index=process,
                process_count=2,
            )
        )
        for process in range(2)
    ]
    assert [len(batches) for batches in per_process] == [2, 2]
    ids = np.concatenate([b["id"] for batches in per_process for b in batches])
    assert sorted(ids[ids >= 0]) == list(range(25, 30))
    by_id = {int(example["id"]): example for example in isbi["validation"]}
    for batch in (b for batches in per_process for b in batches):
        assert batch["image"].shape == (2, 512, 512, 1)
        for i in np.flatnonzero(batch["id"] >= 0):
            stored = by_id[int(batch["id"][i])]["label"][..., 0]
            np.testing.assert_array_equal(batch["label"][i], stored)
        assert batch["label"].shape == batch["mask"].shape == (2, 512, 512)
        real = batch["id"] >= 0
        assert (batch["mask"][real] == 1).all() and (batch["mask"][~real] == 0).all()
        assert (batch["image"][~real] == 0).all()
        assert (batch["label"][~real] == IGNORE).all()


def test_horizontal_only_flips_never_turn_the_image_upside_down():
    flip = transforms.RandomFlipsAndRotations(
        flips=True, rotations=False, vertical_flips=False
    )
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    seen = set()
    for seed in range(20):
        out = flip.random_map(
            {"image": image, "label": image[..., 0]}, np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(out["image"][..., 0], out["label"])
        assert out["image"][0, :, 0].tolist() in ([0, 1, 2, 3], [3, 2, 1, 0])
        seen.add(tuple(out["image"][0, :, 0]))
    assert len(seen) == 2
