import math

import numpy as np
import pytest

import keras_meta as km


def _take(dataset, n):
    return [{k: np.array(v) for k, v in batch.items()} for batch in dataset.take(n)]


def test_shapes_ranges_and_function():
    batch = _take(km.data.sinusoid(k_shot=5, q_query=7, meta_batch_size=3, seed=0,
                                   return_parameters=True), 1)[0]
    assert batch["support_x"].shape == (3, 5, 1) and batch["query_y"].shape == (3, 7, 1)
    assert batch["support_x"].dtype == np.float32
    x = np.concatenate([batch["support_x"], batch["query_x"]], axis=1)
    y = np.concatenate([batch["support_y"], batch["query_y"]], axis=1)
    a, p = batch["amplitude"][:, None, None], batch["phase"][:, None, None]
    np.testing.assert_allclose(y, a * np.sin(x - p), rtol=1e-5, atol=1e-5)
    assert np.all((x >= -5) & (x <= 5))
    assert np.all((a >= 0.1) & (a <= 5)) and np.all((p >= 0) & (p <= math.pi))


def test_same_seed_same_stream_different_seed_different_stream():
    a = _take(km.data.sinusoid(meta_batch_size=4, seed=7), 3)
    b = _take(km.data.sinusoid(meta_batch_size=4, seed=7), 3)
    c = _take(km.data.sinusoid(meta_batch_size=4, seed=8), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["support_x"], y["support_x"])
    assert not np.allclose(a[0]["support_x"], c[0]["support_x"])
    # consecutive meta-batches hold fresh tasks
    assert not np.allclose(a[0]["support_x"], a[1]["support_x"])


def test_fixed_pool_of_tasks():
    batches = _take(km.data.sinusoid(meta_batch_size=8, num_tasks=5, seed=3,
                                     return_parameters=True), 20)
    amplitudes = np.unique(np.concatenate([b["amplitude"] for b in batches]))
    assert len(amplitudes) == 5  # every task comes from the pool of 5 ...
    # ... with its own fixed support points
    first = {}
    for b in batches:
        for amp, sx in zip(b["amplitude"], b["support_x"]):
            first.setdefault(float(amp), sx)
            np.testing.assert_array_equal(first[float(amp)], sx)


def test_float64_and_custom_ranges():
    batch = _take(km.data.sinusoid(meta_batch_size=2, seed=0, dtype="float64",
                                   input_range=(0.0, 1.0)), 1)[0]
    assert batch["query_x"].dtype == np.float64
    assert np.all((batch["query_x"] >= 0) & (batch["query_x"] <= 1))


@pytest.mark.parametrize("kwargs, match", [
    ({"k_shot": 0}, "`k_shot` must be a positive integer"),
    ({"meta_batch_size": 2.5}, "`meta_batch_size` must be a positive integer"),
    ({"num_tasks": 0}, "`num_tasks` must be a positive integer"),
    ({"seed": -1}, "`seed` must be a non-negative integer"),
    ({"amplitude_range": (5, 1)}, "`amplitude_range` must be a pair"),
    ({"dtype": "int32"}, "`dtype` must be a floating dtype"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.data.sinusoid(**kwargs)
