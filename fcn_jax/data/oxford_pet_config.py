"""Oxford-IIIT Pet from the TFDS catalogue: foreground/background segmentation.

Its 'segmentation_mask' is a trimap (1 pet, 2 background, 3 the uncertain
outline); we train two classes and ignore the outline, as is usual. The data
set is read from `config.data.data_dir` (a local folder or a GCS bucket that
already holds the prepared `oxford_iiit_pet`); nothing is downloaded.
"""

import ml_collections

from fcn_jax.data import upright_photos

CLASS_NAMES = ("background", "pet")
IGNORE_LABEL = 255
LABEL_MAPPING = f"1:1,2:0,3:{IGNORE_LABEL}"
# ImageNet statistics on the [0, 1] scale: pets are ImageNet-like photographs.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def use_oxford_pet(config: ml_collections.ConfigDict) -> None:
    """Points `config.data` at `oxford_iiit_pet` (train / test splits) in place."""
    config.data.name = "oxford_iiit_pet"
    config.data.image_key = "image"
    config.data.label_key = "segmentation_mask"
    config.data.label_mapping = LABEL_MAPPING
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.class_names = CLASS_NAMES
    config.data.ignore_label = IGNORE_LABEL
    config.data.mean = MEAN
    config.data.std = STD
    upright_photos.use_upright_photo_augment(config)
    config.model.num_classes = len(CLASS_NAMES)
    config.loss.class_weights = ()
