"""The episode sampler: task structure, randomness, determinism, pools, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km

N, K, Q, B = 4, 2, 3, 6


def _take(dataset, n):
    return [{k: np.array(v) for k, v in batch.items()} for batch in dataset.take(n)]


def _coded_source(num_classes=7, per_class=9, unbalanced=False):
    """x[i] = (class label, example id): every example says where it came from."""
    counts = (
        [K + Q + 2 * c for c in range(num_classes)] if unbalanced else [per_class] * num_classes
    )
    labels = np.repeat(np.arange(num_classes) * 10 + 3, counts)  # labels 3, 13, 23, ...
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))  # examples of a class are not contiguous
    labels = labels[order]
    x = np.stack([labels, np.arange(len(labels))], axis=1).astype("float32")
    return km.data.from_arrays(x, labels, name="coded")


def _check_task_structure(source, batch, n_way, k_shot, q_query):
    label_of_class = {name: int(name) for name in source.class_names}
    for t in range(len(batch["support_y"])):
        classes = batch["classes"][t]
        assert len(set(classes.tolist())) == n_way  # without replacement
        seen = set()
        for prefix, per_class in (("support", k_shot), ("query", q_query)):
            x, y = batch[f"{prefix}_x"][t], batch[f"{prefix}_y"][t]
            assert x.shape == (n_way * per_class, 2)
            np.testing.assert_array_equal(np.bincount(y, minlength=n_way), [per_class] * n_way)
            for (label_value, example), label in zip(x, y):
                # every example of label j comes from the class behind label j
                expected = label_of_class[source.class_names[classes[label]]]
                assert label_value == expected
                seen.add(int(example))
        # support and query are disjoint, and no example repeats
        assert len(seen) == n_way * (k_shot + q_query)


def test_shapes_dtypes_and_static_spec():
    x = np.random.default_rng(0).random((70, 5, 5, 3)).astype("float32")
    source = km.data.from_arrays(x, np.arange(70) % 7)
    dataset = km.data.episodes(source, N, K, Q, B, seed=0)
    spec = dataset.element_spec
    assert sorted(spec) == sorted(km.data.EPISODE_KEYS)
    assert spec["support_x"].shape == (B, N * K, 5, 5, 3)
    assert spec["query_x"].shape == (B, N * Q, 5, 5, 3)
    assert spec["support_y"].shape == (B, N * K) and spec["support_y"].dtype == tf.int32
    assert spec["query_y"].shape == (B, N * Q) and spec["query_y"].dtype == tf.int32
    batch = _take(dataset, 1)[0]
    assert batch["support_x"].dtype == np.float32
    # every image comes from the source
    flat = x.reshape(70, -1)
    for image in batch["query_x"].reshape(-1, 75):
        assert np.any(np.all(flat == image, axis=1))


@pytest.mark.parametrize("unbalanced", [False, True])
def test_task_structure(unbalanced):
    source = _coded_source(unbalanced=unbalanced)
    batches = _take(km.data.episodes(source, N, K, Q, B, seed=1, return_classes=True), 5)
    for batch in batches:
        _check_task_structure(source, batch, N, K, Q)


def test_labels_in_random_order_and_sets_shuffled():
    source = _coded_source(num_classes=N)  # every task holds all the classes
    batches = _take(km.data.episodes(source, N, K, Q, 16, seed=2, return_classes=True), 4)
    classes = np.concatenate([b["classes"] for b in batches])
    # the class behind label 0 varies: label order is random per task ...
    assert len({tuple(c) for c in classes}) > 10
    assert all(sorted(c) == list(range(N)) for c in classes)
    # ... and label j is equally likely to be any class (64 tasks, 4 classes)
    counts = np.bincount(classes[:, 0], minlength=N)
    assert counts.min() >= 5
    # the sets are shuffled, not grouped by label
    support_y = np.concatenate([b["support_y"] for b in batches])
    grouped = np.repeat(np.arange(N), K)
    assert np.mean([np.array_equal(y, grouped) for y in support_y]) < 0.1
    assert len({tuple(y) for y in support_y}) > 30


def test_every_class_and_example_gets_drawn():
    source = _coded_source(num_classes=7, per_class=9)
    batches = _take(km.data.episodes(source, N, K, Q, 32, seed=3, return_classes=True), 5)
    classes = np.concatenate([b["classes"].ravel() for b in batches])
    counts = np.bincount(classes, minlength=7)
    expected = len(classes) / 7
    assert np.all(np.abs(counts - expected) < 0.25 * expected)
    examples = np.concatenate(
        [b[k][..., 1].ravel() for b in batches for k in ("support_x", "query_x")]
    )
    assert len(np.unique(examples)) == len(source)


def test_same_seed_same_stream_different_seed_different_stream():
    source = _coded_source()
    a = _take(km.data.episodes(source, N, K, Q, B, seed=5), 3)
    b = _take(km.data.episodes(source, N, K, Q, B, seed=5), 3)
    c = _take(km.data.episodes(source, N, K, Q, B, seed=6), 3)
    for x, y in zip(a, b):
        for key in km.data.EPISODE_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["support_x"], c[0]["support_x"])
    assert not np.array_equal(a[0]["support_x"], a[1]["support_x"])  # fresh tasks
    # a second iterator of the same dataset restarts the same stream
    dataset = km.data.episodes(source, N, K, Q, B, seed=5)
    np.testing.assert_array_equal(_take(dataset, 1)[0]["query_x"], a[0]["query_x"])
    # start_step skips ahead in the same stream
    late = _take(km.data.episodes(source, N, K, Q, B, seed=5, start_step=2), 1)[0]
    np.testing.assert_array_equal(late["query_x"], a[2]["query_x"])


def test_fixed_pool_of_tasks():
    source = _coded_source()
    batches = _take(
        km.data.episodes(source, N, K, Q, 8, seed=4, num_tasks=5, return_classes=True), 10
    )
    tasks = {}
    for batch in batches:
        _check_task_structure(source, batch, N, K, Q)
        for t in range(8):
            key = tuple(batch["support_x"][t, :, 1])
            query = batch["query_x"][t]
            np.testing.assert_array_equal(tasks.setdefault(key, query), query)
    assert len(tasks) == 5
    # the pool is a function of the seed
    again = _take(km.data.episodes(source, N, K, Q, 8, seed=4, num_tasks=5), 10)
    np.testing.assert_array_equal(again[-1]["support_x"], batches[-1]["support_x"])


def test_pool_larger_than_one_chunk():
    source = _coded_source()
    batch = _take(km.data.episodes(source, N, K, Q, 64, seed=0, num_tasks=3000,
                                   return_classes=True), 1)[0]
    _check_task_structure(source, batch, N, K, Q)
    assert len({tuple(s[:, 1]) for s in batch["support_x"]}) > 60


def test_rotations_are_classes_of_their_own():
    rng = np.random.default_rng(0)
    x = rng.random((30, 6, 6, 1)).astype("float32")
    source = km.data.from_arrays(x, np.arange(30) % 3).with_rotations((0, 90, 180, 270))
    assert source.num_classes == 12 and source.num_base_classes == 3
    assert source.class_names[:4] == ("0@0", "1@0", "2@0", "0@90")
    batches = _take(km.data.episodes(source, 12, 1, 1, 8, seed=0, return_classes=True), 2)
    for batch in batches:
        for t in range(8):
            for prefix in ("support", "query"):
                for image, label in zip(batch[f"{prefix}_x"][t], batch[f"{prefix}_y"][t]):
                    virtual = batch["classes"][t, label]
                    base, turns = virtual % 3, virtual // 3
                    originals = x[np.arange(30) % 3 == base]
                    rotated = np.rot90(originals, turns, axes=(1, 2))
                    assert np.any(np.all(rotated == image, axis=(1, 2, 3)))


def test_episode_tuple_source_and_fit_with_steps_per_epoch_and_repeat():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype("float32")
    y = np.arange(60) % 6
    x[:, 0] += y  # learnable
    dataset = km.data.episodes((x, y), 3, 2, 2, 4, seed=0)
    assert len(_take(dataset.repeat().take(3), 5)) == 3
    learner = km.MAML(km.models.mlp((8,), output_units=3, input_shape=(4,), seed=0),
                      inner_learning_rate=0.1)
    learner.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = learner.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))
    assert learner.optimizer.iterations.numpy() == 6


def test_n_way_larger_than_classes():
    source = _coded_source(num_classes=3)
    with pytest.raises(ValueError, match=r"`n_way` must be at most .* source 'coded', "
                                         r"which has 3\. Received: n_way=4"):
        km.data.episodes(source, 4, 1, 1, 2)
    images = km.data.from_arrays(np.zeros((27, 4, 4)), np.arange(27) % 3, name="coded")
    rotated = images.with_rotations((0, 180))
    with pytest.raises(ValueError, match=r"which has 6 \(3 classes x 2 rotations\)\. "
                                         r"Received: n_way=7"):
        km.data.episodes(rotated, 7, 1, 1, 2)
    km.data.episodes(rotated, 6, 1, 1, 2)  # fits with rotations


def test_class_with_too_few_examples_is_named():
    x = np.zeros((23, 2), "float32")
    y = np.array([0] * 10 + [1] * 4 + [2] * 9)
    source = km.data.from_arrays(x, y, class_names=["a", "b", "c"], name="toy")
    with pytest.raises(ValueError, match=r"at least k_shot \+ q_query = 5 examples "
                                         r"\(k_shot=1, q_query=4\).*class 'b' has 4"):
        km.data.episodes(source, 2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"'b' has 4, 'c' has 9"):
        km.data.episodes(source, 2, 5, 5, 2)
    km.data.episodes(source.subset(["a", "c"]), 2, 5, 4, 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 0}, "`n_way` must be a positive integer. Received: n_way=0"),
    ({"k_shot": 1.5}, "`k_shot` must be a positive integer. Received: k_shot=1.5"),
    ({"q_query": 0}, "`q_query` must be a positive integer"),
    ({"meta_batch_size": None}, "`meta_batch_size` must be a positive integer"),
    ({"num_tasks": 0}, "`num_tasks` must be a positive integer"),
    ({"seed": -1}, "`seed` must be a non-negative integer or None"),
    ({"start_step": -2}, "`start_step` must be a non-negative int"),
])
def test_argument_errors(kwargs, match):
    arguments = dict(source=_coded_source(), n_way=2, k_shot=1, q_query=1, meta_batch_size=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        km.data.episodes(**arguments)


def test_source_type_error():
    with pytest.raises(TypeError, match=r"`source` must be a keras_meta.data.Source .* "
                                        r"Received: ndarray"):
        km.data.episodes(np.zeros((4, 2)), 2, 1, 1, 2)
