import os
import subprocess
import sys

import pytest


def _run(code, backend):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("backend", ["numpy"])
def test_other_backend_raises_a_clear_error(backend):
    result = _run("import keras_meta", backend)
    assert result.returncode != 0
    assert "keras_meta requires the TensorFlow backend" in result.stderr
    assert f"backend={backend!r}" in result.stderr


def test_keras_already_on_another_backend_raises_a_clear_error():
    code = "import keras; keras.backend.backend = lambda: 'jax'; import keras_meta"
    result = _run(code, "tensorflow")
    assert result.returncode != 0
    assert "keras_meta requires the TensorFlow backend of Keras 3, but Keras is configured " \
           "with backend='jax'" in result.stderr


def test_unset_backend_selects_tensorflow():
    result = _run("import keras_meta, keras; print(keras.backend.backend())", None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("tensorflow")


def test_configure_cpu_threads_sets_the_pools_before_start_and_says_when_too_late():
    code = "\n".join([
        "import keras_meta as km, tensorflow as tf",
        "print(km.configure_cpu_threads(intra_op=1, inter_op=3))",
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())",
        "km.models.mlp()",  # the runtime starts
        "print(km.configure_cpu_threads(intra_op=1, inter_op=3))",  # unchanged: fine
        "km.configure_cpu_threads(intra_op=2)",
    ])
    result = _run(code, "tensorflow")
    assert result.stdout.split("\n")[:3] == ["(1, 3)", "1 3", "(1, 3)"], result.stdout + result.stderr
    assert result.returncode != 0
    assert "configure_cpu_threads() must run before TensorFlow's runtime starts" in result.stderr


def test_configure_cpu_threads_rejects_bad_counts():
    import keras_meta as km

    with pytest.raises(ValueError, match="intra_op"):
        km.configure_cpu_threads(intra_op=0)
