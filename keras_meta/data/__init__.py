"""Episodic `tf.data` pipelines."""

from keras_meta.data.episodes import EPISODE_KEYS
from keras_meta.data.sinusoid import sinusoid

__all__ = ["EPISODE_KEYS", "sinusoid"]
