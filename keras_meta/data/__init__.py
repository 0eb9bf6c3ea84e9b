"""Episodic `tf.data` pipelines: sources of labelled examples, benchmark loaders, episode samplers."""

from keras_meta.data import safe_pickle
from keras_meta.data.benchmarks import (
    Augmentation,
    cifar_fs,
    cub,
    fc100,
    mini_imagenet,
    published_split,
    tiered_imagenet,
)
from keras_meta.data.episodes import EPISODE_KEYS, episodes
from keras_meta.data.omniglot import omniglot
from keras_meta.data.sinusoid import sinusoid
from keras_meta.data.sources import (
    DiskImages,
    EncodedImages,
    RawImages,
    Source,
    from_arrays,
    from_directory,
    from_files,
    from_tfds,
)

__all__ = [
    "Augmentation",
    "DiskImages",
    "EPISODE_KEYS",
    "EncodedImages",
    "RawImages",
    "Source",
    "cifar_fs",
    "cub",
    "episodes",
    "fc100",
    "from_arrays",
    "from_directory",
    "from_files",
    "from_tfds",
    "mini_imagenet",
    "omniglot",
    "published_split",
    "safe_pickle",
    "sinusoid",
    "tiered_imagenet",
]
