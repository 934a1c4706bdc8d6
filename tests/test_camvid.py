"""Tests of the CamVid builder and median-frequency class weights on real files."""

import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT, load_config_module
from PIL import Image

from fcn_jax import train
from fcn_jax.data import camvid, class_weights, pipeline, sources

CAMVID_DIR = REPO_ROOT.parent / "shared" / "data" / "camvid"
# A few real pairs from different sequences keep the builds fast.
TRAIN_PICKS = (0, 100, 200, 300)
VAL_PICKS = (0, 50)
REAL_VALUES = {*range(camvid.NUM_CLASSES), camvid.IGNORE_LABEL}

needs_camvid = pytest.mark.skipif(
    not (CAMVID_DIR / "trainannot").is_dir(),
    reason=f"CamVid files not found at {CAMVID_DIR} (see shared/data/README.md)",
)


def _copy_pairs(target, picks: dict[str, tuple[int, ...]]) -> list[str]:
    """Copies the picked image/label pairs of each folder; returns the stems."""
    stems = []
    for folder, indices in picks.items():
        images = sorted((CAMVID_DIR / folder).glob("*.png"))
        for sub in (folder, f"{folder}annot"):
            (target / sub).mkdir(parents=True)
        for i in indices:
            for sub in (folder, f"{folder}annot"):
                shutil.copy(CAMVID_DIR / sub / images[i].name, target / sub)
            stems.append(images[i].stem)
    return stems


def _name(example) -> str:
    name = example["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _prepare(manual_dir, data_dir) -> None:
    builder = camvid.Camvid(
        manual_dir=manual_dir, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare(file_format="array_record")


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    if not (CAMVID_DIR / "trainannot").is_dir():
        pytest.skip(f"CamVid files not found at {CAMVID_DIR}")
    target = tmp_path_factory.mktemp("camvid_manual")
    _copy_pairs(target, {"train": TRAIN_PICKS, "val": VAL_PICKS})
    return target


@pytest.fixture(scope="module")
def camvid_data_dir(tmp_path_factory):
    # Its own data dir: prepared data is found by data_dir alone, and this
    # partial CamVid must not stand in for the full one elsewhere.
    return tmp_path_factory.mktemp("camvid_tfds")


@pytest.fixture(scope="module")
def sources_by_split(manual_dir, camvid_data_dir):
    return {
        split: pipeline.load_data_source(
            "camvid", split, camvid_data_dir, manual_dir=manual_dir
        )
        for split in ("train", "validation")
    }


@pytest.fixture
def tiny_manual_dir(tmp_path):
    """One train and one validation pair, to break."""
    if not (CAMVID_DIR / "trainannot").is_dir():
        pytest.skip(f"CamVid files not found at {CAMVID_DIR}")
    target = tmp_path / "manual"
    _copy_pairs(target, {"train": (0,), "val": (0,)})
    return target


def test_splits_shapes_and_void(manual_dir, sources_by_split):
    assert {split: len(s) for split, s in sources_by_split.items()} == {
        "train": len(TRAIN_PICKS),
        "validation": len(VAL_PICKS),
    }
    train = sorted(sources_by_split["train"], key=lambda ex: int(ex["id"]))
    stems = sorted(path.stem for path in (manual_dir / "train").glob("*.png"))
    assert [_name(ex) for ex in train] == stems
    assert [int(ex["id"]) for ex in train] == list(range(len(TRAIN_PICKS)))
    saw_void = False
    for example in [*train, *sources_by_split["validation"]]:
        assert example["image"].shape == (360, 480, 3)
        assert example["label"].shape == (360, 480, 1)
        assert example["image"].dtype == example["label"].dtype == np.uint8
        assert set(np.unique(example["label"])) <= REAL_VALUES
    for example in train:
        stored = np.asarray(
            Image.open(manual_dir / "trainannot" / f"{_name(example)}.png")
        )
        expected = np.where(stored == camvid.VOID_ID, camvid.IGNORE_LABEL, stored)
        np.testing.assert_array_equal(example["label"][..., 0], expected)
        saw_void |= bool((stored == camvid.VOID_ID).any())
    assert saw_void


def test_metadata(sources_by_split, camvid_data_dir):
    del sources_by_split  # Prepares the data whose info is read back here.
    builder = camvid.Camvid(data_dir=camvid_data_dir)
    assert builder.info.metadata["class_names"] == list(camvid.CLASS_NAMES)
    assert builder.info.metadata["palette"] == [list(c) for c in camvid.PALETTE]
    assert builder.info.metadata["ignore_label"] == camvid.IGNORE_LABEL
    assert builder.info.features["label"].names == list(camvid.CLASS_NAMES)
    assert dict(zip(camvid.CLASS_NAMES, camvid.PALETTE))["road"] == (128, 64, 128)
    assert len(camvid.PALETTE) == camvid.NUM_CLASSES == 11


def test_registered_under_its_name():
    assert sources.builders()["camvid"] is camvid.Camvid
    with pytest.raises(ValueError, match="takes no manual_dir"):
        sources.load_data_source("isbi2012_membrane", manual_dir="/nowhere")


def test_manual_dir_from_environment(tiny_manual_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(camvid.MANUAL_DIR_ENV, str(tiny_manual_dir))
    source = sources.load_data_source("camvid", "validation", tmp_path / "tfds")
    assert len(source) == 1


def test_missing_manual_dir_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv(camvid.MANUAL_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="manual_dir.*FCN_JAX_CAMVID_DIR"):
        sources.load_data_source("camvid", "train", tmp_path / "tfds")
    (tmp_path / "partial" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks trainannot"):
        camvid.resolve_manual_dir(tmp_path / "partial")


@needs_camvid
def test_bad_label_value_is_named(tiny_manual_dir, tmp_path):
    (label_path,) = (tiny_manual_dir / "valannot").glob("*.png")
    label = np.asarray(Image.open(label_path)).copy()
    label[0, 0] = 13
    Image.fromarray(label).save(label_path)
    with pytest.raises(ValueError, match=rf"{label_path.name} has values \[13\]"):
        _prepare(tiny_manual_dir, tmp_path / "tfds")


@needs_camvid
def test_missing_label_names_the_image(tiny_manual_dir, tmp_path):
    (label_path,) = (tiny_manual_dir / "trainannot").glob("*.png")
    label_path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"train/{label_path.name} has no"):
        _prepare(tiny_manual_dir, tmp_path / "tfds")


@needs_camvid
def test_size_mismatch_names_both_files(tiny_manual_dir):
    (image_path,) = (tiny_manual_dir / "val").glob("*.png")
    label_path = tiny_manual_dir / "valannot" / image_path.name
    Image.new("L", (240, 180)).save(label_path)
    with pytest.raises(ValueError, match=rf"val/{image_path.name}.*valannot/"):
        camvid.read_example(image_path, label_path)


def test_median_frequency_weights_by_hand():
    labels = [
        np.array([[0, 0], [0, 1]], np.uint8),
        np.array([[0, 2], [255, 2]], np.uint8),
    ]
    source = [{"label": label[..., None], "id": i} for i, label in enumerate(labels)]
    counts = class_weights.class_frequencies(source, num_classes=4, ignore_label=255)
    # Void is neither a class's pixel nor part of its image's total.
    assert counts == ((4, 1, 2, 0), (7, 4, 3, 0))
    # freq = (4/7, 1/4, 2/3), median 4/7; class 3 never occurs.
    np.testing.assert_allclose(
        class_weights.median_frequency_weights(counts), (1.0, 16 / 7, 6 / 7, 0.0)
    )
    with pytest.raises(ValueError, match=r"Example 1 .*\[9\]"):
        class_weights.class_frequencies(
            [source[0], {"label": np.full((2, 2, 1), 9, np.uint8), "id": 1}], 4, 255
        )


def test_rare_classes_weigh_more_on_real_images(sources_by_split):
    counts = class_weights.class_frequencies(
        sources_by_split["train"], camvid.NUM_CLASSES, camvid.IGNORE_LABEL
    )
    weights = dict(
        zip(camvid.CLASS_NAMES, class_weights.median_frequency_weights(counts))
    )
    rare = [c for c in ("pole", "pedestrian", "bicyclist") if weights[c] > 0]
    assert rare and all(weights[c] > 1 for c in rare)
    assert weights["road"] < 1 and weights["sky"] < 1


@pytest.mark.long
@pytest.mark.parametrize(
    "config_file",
    ["unet.py:camvid,runlocal", "fcn8s.py:runlocal", "deeplabv3.py:runlocal"],
)
def test_every_architecture_trains_and_evaluates_on_real_camvid(
    config_file, manual_dir, tmp_path
):
    path, presets = config_file.split(":")
    config = load_config_module(REPO_ROOT / "configs" / path).get_config(presets)
    config.unlock()
    config.data.manual_dir = str(manual_dir)
    config.data.data_dir = str(tmp_path / "tensorflow_datasets")
    config.train.num_steps = 2
    config.eval.every_steps = 2
    config.lock()
    summary = train.train_and_evaluate(config, str(tmp_path / "workdir"))
    # Both validation images, whole (360x480), minus their void pixels.
    assert 0 < summary["num_pixels"] <= 2 * 360 * 480
    assert {f"iou/{name}" for name in camvid.CLASS_NAMES} <= set(summary)
    assert 0.0 <= summary["pixel_accuracy"] <= 1.0
