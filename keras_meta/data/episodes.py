"""Episode vocabulary and the N-way K-shot episode sampler."""

import numpy as np
import tensorflow as tf

from keras_meta.data.sources import Source, from_arrays
from keras_meta.data.streams import step_counter
from keras_meta.validation import check_bool, check_positive_int, resolve_seed

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")

# Tasks drawn per call when a fixed pool is built (bounds its memory).
_POOL_CHUNK = 1024


def episodes(
    source,
    n_way,
    k_shot,
    q_query,
    meta_batch_size,
    seed=None,
    num_tasks=None,
    return_classes=False,
    start_step=0,
):
    """Meta-batches of N-way K-shot classification tasks from a `Source`.

    Per task: `n_way` classes drawn without replacement, labelled `0 ..
    n_way - 1` in a random order; per class `k_shot` support and `q_query`
    query examples drawn without replacement (the two sets are disjoint);
    the support and the query set are each shuffled. Elements are dicts
    with `support_x` `[meta_batch_size, n_way * k_shot, ...]`, `support_y`
    `[meta_batch_size, n_way * k_shot]` (int32), `query_x` and `query_y`
    (`n_way * q_query` examples), ready for `MetaLearner.fit`.

    The examples stay in memory as one tensor; each meta-batch is a few
    vectorised gathers driven by stateless random ops inside a parallel
    `tf.data` map, so the pipeline outpaces any meta-learner's step (see
    `benchmarks/episode_throughput.py`). If the source has `rotations`, each
    rotation of each class is a class of its own (the rotated images are
    computed once and kept in memory too).

    With `num_tasks=None` every meta-batch holds fresh tasks, forever. With
    `num_tasks=M` a pool of M tasks (classes, examples, label order) is drawn
    once and every meta-batch draws `meta_batch_size` of them uniformly with
    replacement (the "finite-sum" setting; imaml_dev's `--num_tasks`).
    The stream is a pure function of `seed` and the source: two datasets with
    the same seed yield the same meta-batches, in order. The dataset is
    infinite: use `take(n)`, or `model.fit(..., steps_per_epoch=n)`.

    Args:
        source: a `Source` (see `from_arrays`, `from_directory`,
            `from_tfds`, `omniglot`), or a tuple `(x, y)` of arrays.
        n_way: classes per task.
        k_shot: support examples per class.
        q_query: query examples per class.
        meta_batch_size: tasks per meta-batch.
        seed: int; `None` draws one at random.
        num_tasks: `None` (fresh tasks) or the size of a fixed task pool.
        return_classes: also yield `classes`, `[meta_batch_size, n_way]`
            int32: the source class (an index into `source.class_names`)
            behind each label of each task.
        start_step: index of the first meta-batch: an int, or a scalar
            integer variable read when an iterator is created (pass
            `learner.optimizer.iterations` to resume a stream after
            `keras.callbacks.BackupAndRestore`; see `sinusoid`).

    Returns:
        An infinite `tf.data.Dataset` of episode dicts.

    Example:

    >>> import numpy as np
    >>> source = from_arrays(np.random.rand(200, 8, 8, 1), np.arange(200) % 10)
    >>> batches = episodes(source, n_way=5, k_shot=1, q_query=3,
    ...                    meta_batch_size=4, seed=0)
    >>> batch = next(iter(batches))
    >>> tuple(batch["support_x"].shape), tuple(batch["query_y"].shape)
    ((4, 5, 8, 8, 1), (4, 15))

    Reference:
        - [Vinyals et al., 2016](https://arxiv.org/abs/1606.04080)
          (episodes; rotations as classes)
        - [Finn, Abbeel, Levine, 2017](https://arxiv.org/abs/1703.03400)
    """
    if isinstance(source, tuple) and len(source) == 2:
        source = from_arrays(*source)
    if not isinstance(source, Source):
        raise TypeError(
            "`source` must be a keras_meta.data.Source (from from_arrays, "
            "from_directory, from_tfds or omniglot) or a tuple (x, y). "
            f"Received: {type(source).__name__}"
        )
    n_way = check_positive_int("n_way", n_way)
    k_shot = check_positive_int("k_shot", k_shot)
    q_query = check_positive_int("q_query", q_query)
    meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
    num_tasks = check_positive_int("num_tasks", num_tasks, allow_none=True)
    return_classes = check_bool("return_classes", return_classes)
    seed = resolve_seed(seed)
    _check_source(source, n_way, k_shot, q_query)

    sample = _task_sampler(source, n_way, k_shot, q_query)
    if num_tasks is None:

        def draw(step):
            return sample(tf.stack([tf.cast(seed, tf.int64), step]), meta_batch_size)

    else:
        chunks = [
            sample(tf.constant([seed, -1 - i], tf.int64), min(_POOL_CHUNK, num_tasks - start))
            for i, start in enumerate(range(0, num_tasks, _POOL_CHUNK))
        ]
        pool = {key: tf.concat([c[key] for c in chunks], axis=0) for key in chunks[0]}

        def draw(step):
            index = tf.random.stateless_uniform(
                [meta_batch_size],
                tf.stack([tf.cast(seed, tf.int64), step]),
                minval=0,
                maxval=num_tasks,
                dtype=tf.int32,
            )
            return {key: tf.gather(value, index) for key, value in pool.items()}

    num_examples = len(source)
    if source.converts_per_episode:
        # Compact (uint8, on disk) or augmented sources read, convert and
        # augment an episode's examples alone.
        def gather_examples(index, rotation):
            return source._read_rows(rotation * num_examples + index)

    else:
        images = _images_tensor(source)

        def gather_examples(index, rotation):
            # Rotated copies are stacked after the originals: one gather.
            return tf.gather(images, rotation * num_examples + index)

    def episode(step):
        task = draw(step)
        element = {
            "support_x": gather_examples(task["support_index"], task["support_rotation"]),
            "support_y": task["support_y"],
            "query_x": gather_examples(task["query_index"], task["query_rotation"]),
            "query_y": task["query_y"],
        }
        if return_classes:
            element["classes"] = task["classes"]
        return element

    return (
        step_counter(start_step)
        .map(episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def _check_source(source, n_way, k_shot, q_query):
    if n_way > source.num_classes:
        rotations = (
            f" ({source.num_base_classes} classes x {len(source.rotations)} rotations)"
            if source.rotations != (0,)
            else ""
        )
        raise ValueError(
            f"`n_way` must be at most the number of classes of source "
            f"{source.name!r}, which has {source.num_classes}{rotations}. "
            f"Received: n_way={n_way}"
        )
    needed = k_shot + q_query
    short = np.flatnonzero(source.examples_per_class < needed)
    if len(short):
        listed = ", ".join(
            f"{source.base_class_names[c]!r} has {source.examples_per_class[c]}"
            for c in short[:5]
        )
        more = f" (and {len(short) - 5} more classes)" if len(short) > 5 else ""
        raise ValueError(
            f"Every class needs at least k_shot + q_query = {needed} examples "
            f"(k_shot={k_shot}, q_query={q_query}) to draw disjoint support and "
            f"query sets. In source {source.name!r}, class {listed}{more}. "
            "Lower k_shot or q_query, or drop those classes with "
            "`source.subset(...)`."
        )


def _images_tensor(source):
    """The source's examples as one tensor, made once per source.

    With rotations, the rotated copies follow the originals (angle `i` at
    rows `i * len(source) ...`): sampling is then one gather, at the price of
    `len(rotations)` copies of the examples in memory.
    """
    tensor = getattr(source, "_tensor", None)
    if tensor is None:
        x = source.x
        if source.rotations != (0,):
            x = np.concatenate(
                [np.rot90(x, angle // 90, axes=(1, 2)) for angle in source.rotations]
            )
        with tf.device("CPU:0"):
            tensor = tf.constant(x)
        source._tensor = tensor
    return tensor


def _task_sampler(source, n_way, k_shot, q_query):
    """`sample(seed_pair, batch)`: example indices of `batch` tasks.

    Returns a dict of int32 tensors with a leading task axis: `classes`
    `[batch, n_way]`, and for `support` (`n_way * k_shot` examples) and
    `query` (`n_way * q_query`): `_index` (rows of `source.x`), `_rotation`
    (index into `source.rotations`) and `_y` (labels).
    """
    num_base = source.num_base_classes
    num_classes = source.num_classes
    counts = source.examples_per_class
    max_count = int(counts.max())
    # Row c lists the examples of class c, padded with 0 (never drawn).
    order = np.argsort(source.y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(max_count)
    table = np.where(
        slot < counts[:, None], order[np.minimum(starts[:, None] + slot, len(order) - 1)], 0
    ).astype(np.int32)
    table = tf.constant(table)
    counts = tf.constant(counts, tf.int32)
    balanced = bool(np.all(source.examples_per_class == max_count))
    per_class = k_shot + q_query

    def sample(seed_pair, batch):
        seeds = tf.random.experimental.stateless_split(seed_pair, 4)

        # Classes without replacement, in a random order: label i <- classes[:, i].
        noise = tf.random.stateless_uniform([batch, num_classes], seeds[0])
        classes = tf.math.top_k(noise, n_way).indices
        base = classes % num_base
        rotation = classes // num_base

        # k_shot + q_query distinct examples per class: the top of random keys.
        noise = tf.random.stateless_uniform([batch, n_way, max_count], seeds[1])
        if not balanced:
            valid = tf.range(max_count) < tf.gather(counts, base)[..., None]
            noise = tf.where(valid, noise, -1.0)
        slots = tf.math.top_k(noise, per_class).indices
        examples = tf.gather(tf.gather(table, base), slots, batch_dims=2)

        shape = [batch, n_way, per_class]
        labels = tf.broadcast_to(tf.range(n_way)[None, :, None], shape)
        rotations = tf.broadcast_to(rotation[..., None], shape)
        task = {"classes": classes}
        for prefix, part, size, shuffle_seed in (
            ("support", slice(0, k_shot), k_shot, seeds[2]),
            ("query", slice(k_shot, per_class), q_query, seeds[3]),
        ):
            # Shuffle the set: one random permutation per task.
            permutation = tf.argsort(
                tf.random.stateless_uniform([batch, n_way * size], shuffle_seed), axis=1
            )
            for name, value in (
                ("index", examples), ("rotation", rotations), ("y", labels)
            ):
                flat = tf.reshape(value[:, :, part], [batch, n_way * size])
                task[f"{prefix}_{name}"] = tf.gather(flat, permutation, batch_dims=1)
        return task

    return sample
