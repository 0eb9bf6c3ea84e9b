import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--run-large",
        action="store_true",
        default=False,
        help="also run tests marked `large` (real-data training, slow round trips)",
    )


# The slowest default tests (seconds of CPU each, several subprocesses), run
# first: pytest-xdist hands tests out in collection order, and one of these
# started last would leave the other workers idle at the end of `make test`.
SLOW_FIRST = (
    "tests/test_device_check.py::test_quick_check_writes_every_section_with_cpu_figures",
    "tests/test_distributed.py::",
    "tests/test_resume.py::test_interrupted_run_resumes_exactly",
    "tests/test_conformance.py::TestConformance::test_adaptive_savedmodel_matches_learner_predict",
    "tests/test_device_check.py::test_import_",
)


def _slow_rank(item):
    for rank, prefix in enumerate(SLOW_FIRST):
        if item.nodeid.startswith(prefix):
            return rank
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slow_rank)  # stable: the rest keep their order
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large test: run with --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """Runs a test with Keras' default float type set to float64."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    # The global dtype policy is cached from floatx on first use: set both.
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


@pytest.fixture(autouse=True, scope="session")
def _no_tensor_float_32():
    """Full float32 matrix products and convolutions on GPUs (no TF32), so that
    the float32 tolerances of the numerics tests hold there too. A no-op on CPUs."""
    import tensorflow as tf

    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(previous)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(autouse=True)
def _auto_xla(request, monkeypatch):
    """XLA compile time for every dense-network learner would cost minutes of
    suite time: `jit_compile="auto"` keeps Keras' rule (no XLA on CPU) except
    in tests marked `auto_xla`, which test keras_meta's rule itself."""
    if "auto_xla" not in request.keywords:
        from keras_meta.algorithms import base

        monkeypatch.setattr(base, "AUTO_XLA_ON_CPU", False)
