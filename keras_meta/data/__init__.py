"""Episodic `tf.data` pipelines: sources of labelled examples and episode samplers."""

from keras_meta.data.episodes import EPISODE_KEYS, episodes
from keras_meta.data.omniglot import omniglot
from keras_meta.data.sinusoid import sinusoid
from keras_meta.data.sources import (
    Source,
    from_arrays,
    from_directory,
    from_files,
    from_tfds,
)

__all__ = [
    "EPISODE_KEYS",
    "Source",
    "episodes",
    "from_arrays",
    "from_directory",
    "from_files",
    "from_tfds",
    "omniglot",
    "sinusoid",
]
