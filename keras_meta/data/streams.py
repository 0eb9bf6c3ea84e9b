"""Resumable meta-batch index streams shared by the episode sources."""

import keras
import tensorflow as tf


def step_counter(start_step=0):
    """`tf.data.Dataset` of int64 meta-batch indices `start, start + 1, ...`.

    Episode sources draw meta-batch `i` as a pure function of `(seed, i)`, so
    the stream can start anywhere. `start_step` is an int or a scalar integer
    `tf.Variable`; a variable is read when an iterator is created, not when
    the dataset is built. With `start_step=learner.optimizer.iterations` a
    training run restored by `keras.callbacks.BackupAndRestore` continues the
    stream at the first meta-batch it has not trained on.
    """
    if isinstance(start_step, keras.Variable):  # e.g. optimizer.iterations
        start_step = start_step.value
    if isinstance(start_step, tf.Variable):
        variable = start_step
        start = tf.data.Dataset.from_tensors(0).map(
            lambda _: tf.cast(variable.read_value(), tf.int64)
        )
        return start.flat_map(
            lambda first: tf.data.Dataset.counter(dtype=tf.int64).map(
                lambda i: i + first
            )
        )
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(
            "`start_step` must be a non-negative int or a scalar integer "
            f"tf.Variable. Received: start_step={start_step!r}"
        )
    return tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
