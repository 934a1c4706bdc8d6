"""Any TFDS segmentation data set by name: image and mask keys and label mapping
from config, tested on a data set built here in a foreign layout from real
CamVid files (nothing is downloaded)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO_ROOT, load_config_module
from PIL import Image
from test_camvid import CAMVID_DIR, needs_camvid

from fcn_jax import config_lib, experiment, sharding, train
from fcn_jax.data import camvid, keyed_source, validation
from fcn_jax.data.keyed_source import KeyedSource, parse_label_mapping

# Stored value v + 1 for class v and 0 for void: the layout of many catalogue
# data sets (ADE20K, Pascal Context), unlike CamVid's own (void = 11).
FOREIGN_MAPPING = ",".join(
    ["0:255", *(f"{c + 1}:{c}" for c in range(camvid.NUM_CLASSES))]
)
PICKS = {"train": (0, 120), "val": (0,)}


def _stored(label: np.ndarray) -> np.ndarray:
    """CamVid class ids to the foreign layout (void 11 -> 0, class c -> c+1)."""
    return np.where(label == camvid.VOID_ID, 0, label + 1).astype(np.uint8)


class StreetScenesByOtherNames(tfds.core.GeneratorBasedBuilder):
    """A few real CamVid pairs under other feature names, with a string id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "photo": tfds.features.Image(shape=(None, None, 3)),
                    "annotation": tfds.features.Image(shape=(None, None, 1)),
                    "file_name": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples("train"),
            "test": self._generate_examples("val"),
        }

    def _generate_examples(self, folder):
        images = sorted((CAMVID_DIR / folder).glob("*.png"))
        for i in PICKS[folder]:
            label = validation.read_png(CAMVID_DIR / f"{folder}annot" / images[i].name)
            yield (
                images[i].name,
                {
                    "photo": str(images[i]),
                    # A PIL image: encoding a numpy array would need TensorFlow.
                    "annotation": Image.fromarray(_stored(label)),
                    "file_name": images[i].name,
                },
            )


@pytest.fixture(scope="module")
def foreign_data_dir(tmp_path_factory):
    if not (CAMVID_DIR / "trainannot").is_dir():
        pytest.skip(f"CamVid files not found at {CAMVID_DIR}")
    data_dir = tmp_path_factory.mktemp("foreign_tfds")
    builder = StreetScenesByOtherNames(
        data_dir=str(data_dir), file_format="array_record"
    )
    builder.download_and_prepare(file_format="array_record")
    return str(data_dir)


def _config(data_dir: str):
    config = load_config_module(REPO_ROOT / "configs" / "unet.py").get_config(
        "camvid,runlocal"
    )
    config.unlock()
    config.data.name = StreetScenesByOtherNames.name
    config.data.data_dir = data_dir
    config.data.image_key = "photo"
    config.data.label_key = "annotation"
    config.data.label_mapping = FOREIGN_MAPPING
    config.data.eval_split = "test"
    return config


def test_parse_label_mapping():
    assert parse_label_mapping("") == {}
    assert parse_label_mapping("1:1, 2:0,3:255") == {1: 1, 2: 0, 3: 255}
    for bad, message in [
        ("1-0", "not 'stored:class'"),
        ("a:1", "not 'stored:class'"),
        ("300:1", "outside"),
        ("1:0,1:2", "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_label_mapping(bad)


def test_bad_mapping_is_a_config_error(foreign_data_dir):
    config = _config(foreign_data_dir)
    config.data.label_mapping = "0=255"
    with pytest.raises(ValueError, match="label_mapping entry '0=255'"):
        config_lib.validate_config(config)


@needs_camvid
def test_keys_and_mapping_give_the_camvid_labels(foreign_data_dir):
    source = experiment.data_source(_config(foreign_data_dir), "train")
    examples = [source[i] for i in range(len(source))]
    assert len(examples) == len(PICKS["train"])
    for index, example in enumerate(examples):
        assert example["image"].shape == (360, 480, 3)
        assert example["image"].dtype == np.uint8
        assert example["label"].shape == (360, 480, 1)
        # The string file_name is not an integer id: the record index stands in.
        assert example["id"] == index
    # Records come back in TFDS's own order, so match each pick by content.
    names = sorted((CAMVID_DIR / "train").glob("*.png"))
    for pick in PICKS["train"]:
        raw = validation.read_png(CAMVID_DIR / "trainannot" / names[pick].name)
        expected = np.where(raw == camvid.VOID_ID, 255, raw)
        matches = [e for e in examples if np.array_equal(e["label"][..., 0], expected)]
        assert len(matches) == 1
        assert (matches[0]["label"] == 255).any()


@needs_camvid
def test_unknown_key_names_the_features(foreign_data_dir):
    config = _config(foreign_data_dir)
    config.data.label_key = "segmentation_mask"
    with pytest.raises(KeyError, match=r"label_key='segmentation_mask'.*annotation"):
        experiment.data_source(config, "train")


@needs_camvid
def test_a_mapping_to_no_class_is_named(foreign_data_dir):
    # Stored 1 (sky, in every street scene) sent to 20: not a class of 11.
    config = _config(foreign_data_dir)
    config.data.label_mapping = "0:255,1:20"
    mesh = sharding.create_mesh()
    with pytest.raises(ValueError, match="values \\[20\\] outside \\[0, 11\\)"):
        next(experiment.create_train_iterator(config, mesh))


@pytest.mark.long
@needs_camvid
def test_trains_and_evaluates_by_name(foreign_data_dir, tmp_path):
    config = _config(foreign_data_dir)
    config.train.num_steps = 2
    config.eval.every_steps = 2
    config.lock()
    summary = train.train_and_evaluate(config, str(tmp_path / "workdir"))
    source = experiment.data_source(config, "test")
    non_void = int((source[0]["label"] != 255).sum())
    assert summary["num_pixels"] == non_void
    assert {f"iou/{name}" for name in camvid.CLASS_NAMES} <= set(summary)


def test_empty_split_is_named():
    with pytest.raises(ValueError, match="my_set\\[test\\] has no examples"):
        keyed_source.KeyedSource([], name="my_set[test]")


def test_images_of_two_sizes_evaluate_one_per_batch():
    from fcn_jax.data import pipeline

    examples = [
        {"image": np.zeros((8, 12, 3), np.uint8), "label": np.zeros((8, 12, 1))},
        {"image": np.zeros((6, 10, 3), np.uint8), "label": np.ones((6, 10, 1))},
    ]
    source = KeyedSource(examples)
    kwargs = {"num_classes": 2, "ignore_label": 255, "mean": (0.5,) * 3}
    kwargs["std"] = (0.2,) * 3
    shapes = [
        b["image"].shape for b in pipeline.eval_batches(source, batch_size=1, **kwargs)
    ]
    assert shapes == [(1, 8, 12, 3), (1, 6, 10, 3)]
    with pytest.raises(ValueError, match="one size"):
        list(pipeline.eval_batches(source, batch_size=2, **kwargs))
