"""What the builders share: their base class, text features and the DatasetInfo they describe themselves with."""

from __future__ import annotations

import inspect

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A generator builder that downloads nothing: its sources are local files or a seed."""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup goes through importlib_resources, which is not installed on Python >= 3.9 (tfds only
        # requires it below that); the class's file is all TFDS needs (it looks for a checksums file beside it).
        return epath.Path(inspect.getfile(cls))


def text_features(*names: str, **extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({**{n: tfds.features.Text() for n in names}, **extra})


def int_list() -> tfds.features.Sequence:
    return tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64))


def info(builder: Builder, description: str, features, homepage: str = "", citation: str = "") -> tfds.core.DatasetInfo:
    # DatasetInfo directly (not dataset_info_from_configs, which looks for metadata files beside the module).
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=features,
        homepage=homepage or None,
        citation=citation or None,
        disable_shuffling=True,
    )
