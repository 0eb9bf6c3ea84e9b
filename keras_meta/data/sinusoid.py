"""The sinusoid regression task family of the MAML paper."""

import math

import numpy as np
import tensorflow as tf

from keras_meta.data.streams import step_counter
from keras_meta.validation import check_positive_int, resolve_seed


def sinusoid(
    k_shot=10,
    q_query=10,
    meta_batch_size=25,
    num_tasks=None,
    seed=None,
    amplitude_range=(0.1, 5.0),
    phase_range=(0.0, math.pi),
    input_range=(-5.0, 5.0),
    dtype="float32",
    return_parameters=False,
    start_step=0,
):
    """Episodes of sinusoid regression tasks, `y = A sin(x - phase)`.

    Each task draws an amplitude `A ~ U[amplitude_range]` and a phase
    `phase ~ U[phase_range]`, then `k_shot` support and `q_query` query
    inputs `x ~ U[input_range]` (Finn et al. 2017). Elements are meta-batches:
    dicts with `support_x`, `support_y` of shape `[meta_batch_size, k_shot, 1]`
    and `query_x`, `query_y` of shape `[meta_batch_size, q_query, 1]`.

    With `num_tasks=None` every meta-batch holds fresh tasks, forever (the
    "resampling" case of Ji et al. 2020). With `num_tasks=M` a pool of M tasks
    is drawn once, each with its own fixed support and query points, and
    every meta-batch draws `meta_batch_size` of them uniformly with
    replacement (their "finite-sum" case; the pool of imaml_dev).

    The stream is a pure function of `seed`: two datasets with the same seed
    yield the same meta-batches, from any iterator, in order.

    Args:
        k_shot: support points per task.
        q_query: query points per task.
        meta_batch_size: tasks per meta-batch.
        num_tasks: `None` (fresh tasks) or the size of a fixed task pool.
        seed: int; `None` draws one at random.
        amplitude_range: `(low, high)` of the amplitude.
        phase_range: `(low, high)` of the phase.
        input_range: `(low, high)` of the inputs.
        dtype: floating dtype of the tensors.
        return_parameters: also yield `amplitude` and `phase`,
            `[meta_batch_size]` each (for plots and oracles).
        start_step: index of the first meta-batch: an int, or a scalar
            integer variable read each time an iterator is created. Pass
            `learner.optimizer.iterations` to make the stream resume where
            a run interrupted and restored by `keras.callbacks.BackupAndRestore`
            left off (see docs/callbacks.md).

    Returns:
        An infinite `tf.data.Dataset` of episode dicts.

    Example:

    >>> episodes = sinusoid(k_shot=5, q_query=5, meta_batch_size=4, seed=0)
    >>> batch = next(iter(episodes))
    >>> tuple(batch["support_x"].shape), tuple(batch["query_y"].shape)
    ((4, 5, 1), (4, 5, 1))

    Reference:
        - [Finn, Abbeel, Levine, 2017](https://arxiv.org/abs/1703.03400)
    """
    k_shot = check_positive_int("k_shot", k_shot)
    q_query = check_positive_int("q_query", q_query)
    meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
    num_tasks = check_positive_int("num_tasks", num_tasks, allow_none=True)
    for name, value in (
        ("amplitude_range", amplitude_range),
        ("phase_range", phase_range),
        ("input_range", input_range),
    ):
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or not all(
                isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, bool)
                and np.isfinite(v)
                for v in value
            )
            or not value[0] <= value[1]
        ):
            raise ValueError(
                f"`{name}` must be a pair (low, high) of finite numbers with "
                "low <= high. "
                f"Received: {name}={value!r}"
            )
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(f"`dtype` must be a floating dtype. Received: dtype={dtype.name}")
    seed = resolve_seed(seed)
    n = k_shot + q_query

    def uniform(shape, bounds, seed_pair):
        return tf.random.stateless_uniform(
            shape, seed_pair, minval=bounds[0], maxval=bounds[1], dtype=tf.float64
        )

    if num_tasks is None:

        def draw(step):
            seeds = tf.random.experimental.stateless_split(
                tf.stack([tf.cast(seed, tf.int64), step]), 3
            )
            amplitude = uniform([meta_batch_size], amplitude_range, seeds[0])
            phase = uniform([meta_batch_size], phase_range, seeds[1])
            x = uniform([meta_batch_size, n, 1], input_range, seeds[2])
            return amplitude, phase, x

    else:
        rng = np.random.default_rng(seed)
        pool_amplitude = tf.constant(rng.uniform(*amplitude_range, size=num_tasks))
        pool_phase = tf.constant(rng.uniform(*phase_range, size=num_tasks))
        pool_x = tf.constant(rng.uniform(*input_range, size=(num_tasks, n, 1)))

        def draw(step):
            index = tf.random.stateless_uniform(
                [meta_batch_size],
                tf.stack([tf.cast(seed, tf.int64), step]),
                minval=0,
                maxval=num_tasks,
                dtype=tf.int64,
            )
            return (
                tf.gather(pool_amplitude, index),
                tf.gather(pool_phase, index),
                tf.gather(pool_x, index),
            )

    def episode(step):
        amplitude, phase, x = draw(step)
        y = amplitude[:, None, None] * tf.sin(x - phase[:, None, None])
        x, y = tf.cast(x, dtype), tf.cast(y, dtype)
        element = {
            "support_x": x[:, :k_shot],
            "support_y": y[:, :k_shot],
            "query_x": x[:, k_shot:],
            "query_y": y[:, k_shot:],
        }
        if return_parameters:
            element["amplitude"] = tf.cast(amplitude, dtype)
            element["phase"] = tf.cast(phase, dtype)
        return element

    return (
        step_counter(start_step)
        .map(episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
