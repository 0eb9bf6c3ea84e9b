"""Few-shot adaptation exported to TensorFlow Lite (`km.export_tflite`).

The converted files are shared by the tests of this module (conversion
costs seconds): `files` builds each learner once, exports it once (on first use) and keeps
the learner next to its file.
"""

import os
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import testing
from keras_meta.tflite import builtin_gradients

SHOT_SHAPE = (28, 28, 1)
N_WAY = 5


def _interpreter(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return tf.lite.Interpreter(model_path=path, num_threads=1)


def _ops(path):
    return {detail["op_name"] for detail in _interpreter(path)._get_ops_details()}


def _conv4(filters=4, downsampling="strided"):
    model = km.models.conv4(N_WAY, filters=filters, input_shape=SHOT_SHAPE,
                            downsampling=downsampling, seed=0)
    # Non-trivial BatchNorm affine parameters (init is 1 and 0).
    for layer in km.inner_loop.batch_norm_layers(model):
        layer.gamma.assign(np.linspace(0.5, 1.5, layer.gamma.shape[0]))
        layer.beta.assign(np.linspace(-0.2, 0.2, layer.beta.shape[0]))
    return model


def _mlp():
    return km.models.mlp(hidden_units=(40, 40), seed=0)


def _spread_rates(learner, seed=0, low=0.005, high=0.05):
    """Learned rates set to distinct values (as after meta-training), so that a
    file that used the initial rate, or one rate for all, would differ."""
    rng = np.random.default_rng(seed)
    for variable in learner.learned_step_size_rule.variables:
        variable.assign(rng.uniform(low, high, variable.shape).astype("float32"))
    return learner


def _learner(name):
    ce = testing.sparse_ce()
    if name == "maml_conv4":
        learner = km.MAML(_conv4(), inner_learning_rate=0.4, eval_inner_steps=3)
    elif name == "maml_conv4_max_pool_support_statistics":
        learner = km.MAML(_conv4(downsampling="max_pool"), inner_learning_rate=0.4,
                          eval_inner_steps=2, transductive_batch_norm=False)
    elif name == "anil_conv4":
        learner = km.ANIL(_conv4(), head="head", inner_learning_rate=0.5, eval_inner_steps=5)
    elif name == "anil_conv4_16":
        # Weights of at least 1024 values: the ones dynamic-range quantization quantizes.
        learner = km.ANIL(_conv4(filters=16), head="head", inner_learning_rate=0.5,
                          eval_inner_steps=5)
    elif name == "maml_mlp":
        learner = km.MAML(_mlp(), inner_learning_rate=0.02, eval_inner_steps=4)
    elif name == "anil_mlp":  # with head L2 and the Adam inner optimiser
        learner = km.ANIL(_mlp(), inner_learning_rate=0.05, eval_inner_steps=5,
                          head_l2_regularization=0.1, inner_optimizer="adam")
    elif name == "imaml_mlp_momentum":
        learner = km.IMAML(_mlp(), inner_learning_rate=0.02, inner_steps=3,
                           inner_optimizer={"name": "momentum", "momentum": 0.5})
    elif name == "meta_sgd_mlp":  # one learned rate per weight element
        learner = _spread_rates(km.MetaSGD(_mlp(), inner_learning_rate=0.02, eval_inner_steps=2))
    elif name == "lslr_mlp":  # one per weight and step; 3 test-time steps reuse the last rate
        learner = _spread_rates(km.MAML(_mlp(), inner_learning_rate=0.02, inner_steps=2,
                                        eval_inner_steps=3,
                                        learned_inner_learning_rates="per_layer_per_step"))
    elif name == "maml_pp_conv4":  # LSLR, per-step BatchNorm, multi-step loss; 3 test steps
        learner = _spread_rates(km.MAML(_conv4(), inner_learning_rate=0.1, inner_steps=2,
                                        eval_inner_steps=3, multi_step_loss=True,
                                        learned_inner_learning_rates="per_layer_per_step",
                                        per_step_batch_norm=True), low=0.1, high=0.5)
        rates = len(learner.learned_step_size_rule.variables)
        for i, variable in enumerate(learner.learned_variables[rates:]):
            # Step 1's BatchNorm scales and offsets unlike step 0's (the model's).
            variable.assign(variable + np.linspace(-0.3, 0.3, variable.shape[0]) * (-1) ** i)
    elif name == "reptile_mlp":
        learner = km.Reptile(_mlp(), inner_learning_rate=0.02, inner_steps=2, eval_inner_steps=3)
    elif name == "boil_mlp":  # the body adapts, the head stays
        learner = km.BOIL(_mlp(), inner_learning_rate=0.02, eval_inner_steps=2)
    elif name == "proto_anil_conv4":  # Proto-MAML's head from the support prototypes
        learner = km.ANIL(_conv4(), head="head", inner_learning_rate=0.5, eval_inner_steps=2,
                          head_initialization="prototypes")
    elif name == "protonet_conv4":  # nothing adapts: the file embeds support and queries
        conv4 = _conv4()
        learner = km.ProtoNet(keras.Model(conv4.inputs, conv4.get_layer("flatten").output),
                              transductive_batch_norm=False)
    else:
        raise KeyError(name)
    learner.compile(optimizer="adam", loss=ce if "conv4" in name else "mse")
    return learner


def _episode(name, seed):
    if "conv4" in name:
        return testing.classification_episode(
            meta_batch=1, n_way=N_WAY, k=1, q=2, shape=SHOT_SHAPE, seed=seed, dtype="float32"
        )
    return {k: np.array(v)[:1] for k, v in next(iter(km.data.sinusoid(meta_batch_size=1, seed=seed))).items()}


def _shapes(name):
    episode = _episode(name, 0)
    return episode["support_x"].shape[1:], episode["query_x"].shape[1:]


FLOAT = ["maml_conv4", "maml_conv4_max_pool_support_statistics", "anil_conv4", "maml_mlp", "anil_mlp",
         "imaml_mlp_momentum", "meta_sgd_mlp", "lslr_mlp", "maml_pp_conv4", "reptile_mlp", "boil_mlp",
         "proto_anil_conv4", "protonet_conv4"]
QUANTIZED = {"anil_conv4_16_dynamic_range": ("anil_conv4_16", "dynamic_range"),
             "anil_conv4_16_float16": ("anil_conv4_16", "float16")}


class _Lazy(dict):
    """A dict whose missing entries are made on first use (`make(key)`)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        value = self[key] = self._make(key)
        return value


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """`(learners, paths)`, built and exported on first use: under pytest-xdist
    each worker converts only the files its tests read."""
    root = tmp_path_factory.mktemp("tflite")
    learners = _Lazy(_learner)

    def export(name):
        base, quantize = QUANTIZED.get(name, (name, None))
        support, query = _shapes(base)
        path = km.export_tflite(learners[base], str(root / f"{name}.tflite"), support, query,
                                quantize=quantize)
        _assert_builtin_ops_only(name, path)  # every file any test reads
        return path

    return learners, _Lazy(export)


def _adapt(path, episode):
    runner = _interpreter(path).get_signature_runner("adapt_and_predict")
    return runner(support_x=episode["support_x"][0], support_y=episode["support_y"][0],
                  query_x=episode["query_x"][0])["predictions"]


@pytest.mark.parametrize("name", FLOAT)
def test_adapt_and_predict_equals_learner_predict(files, name):
    learners, paths = files
    for seed in (1, 2):
        episode = _episode(name, seed)
        want = learners[name].predict(episode, verbose=0)
        got = _adapt(paths[name], episode)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        if name.startswith("protonet"):
            # Logits over the task's classes (the model alone gives embeddings).
            assert got.shape == (episode["query_x"].shape[1], N_WAY)
            continue
        # Adaptation moved the predictions: the file does adapt.
        before = learners[name].model(episode["query_x"][0], training=False)
        assert np.abs(want - before).max() > 1e-3
    present, absent = EXPECTED_OPS.get(name, (set(), set()))
    ops = _ops(paths[name])
    assert present <= ops and not absent & ops, (name, ops)


def test_predict_signature_equals_the_model(files):
    learners, paths = files
    assert _interpreter(paths["maml_conv4"]).get_signature_list() == {
        "adapt_and_predict": {"inputs": ["query_x", "support_x", "support_y"],
                              "outputs": ["predictions"]},
        "predict": {"inputs": ["x"], "outputs": ["predictions"]},
    }
    for name in ("maml_conv4", "anil_mlp"):
        query_x = _episode(name, 3)["query_x"][0]
        runner = _interpreter(paths[name]).get_signature_runner("predict")
        np.testing.assert_allclose(runner(x=query_x)["predictions"],
                                   learners[name].model(query_x, training=False),
                                   rtol=1e-5, atol=1e-5)


def _assert_builtin_ops_only(name, path):
    ops = _ops(path)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], (name, ops)
    assert "VAR_HANDLE" not in ops and "READ_VARIABLE" not in ops, (name, ops)


# How each kind of network differentiates, in the ops of its file: MAML's
# convolution gradients are TRANSPOSE_CONV (input) and patches (filter); ANIL
# never differentiates the body. {name: (ops it must have, ops it must not)}.
EXPECTED_OPS = {
    "maml_conv4": ({"TRANSPOSE_CONV", "PAD", "STRIDED_SLICE", "BATCH_MATMUL"}, set()),
    "maml_conv4_max_pool_support_statistics": ({"MAX_POOL_2D", "EQUAL", "LOGICAL_NOT"}, set()),
    "anil_conv4": (set(), {"TRANSPOSE_CONV"}),
}


def test_the_builtin_ops_check_refuses_flex_custom_and_variable_ops(monkeypatch):
    """The check `files` runs on every file it exports."""
    module = sys.modules[__name__]
    for ops in ({"FlexAddV2", "ADD"}, {"CUSTOM"}, {"VAR_HANDLE"}, {"READ_VARIABLE"}):
        monkeypatch.setattr(module, "_ops", lambda path, ops=ops: ops)
        with pytest.raises(AssertionError, match=sorted(ops)[0]):
            _assert_builtin_ops_only("x", "x.tflite")
    monkeypatch.setattr(module, "_ops", lambda path: {"ADD", "CONV_2D", "TRANSPOSE_CONV"})
    _assert_builtin_ops_only("x", "x.tflite")


def test_runs_in_a_process_without_keras_meta(files, tmp_path):
    learners, paths = files
    names = ("maml_conv4", "anil_mlp")
    for name in names:
        episode = _episode(name, 4)
        np.savez(tmp_path / f"{name}.npz", **{k: v[0] for k, v in episode.items()})
        np.save(tmp_path / f"{name}.want.npy", learners[name].predict(episode, verbose=0))
    testing.run_without_keras_meta(
        "import warnings\nimport numpy as np, tensorflow as tf\n"
        "warnings.simplefilter('ignore')\n"
        "for path, task in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    data = np.load(task + '.npz')\n"
        "    runner = tf.lite.Interpreter(model_path=path).get_signature_runner('adapt_and_predict')\n"
        "    got = runner(support_x=data['support_x'], support_y=data['support_y'],\n"
        "                 query_x=data['query_x'])['predictions']\n"
        "    np.testing.assert_allclose(got, np.load(task + '.want.npy'), rtol=1e-4, atol=1e-4)\n",
        *[arg for name in names for arg in (paths[name], str(tmp_path / name))],
        timeout=300,
    )


def test_quantized_files_run_and_stay_close(files):
    learners, paths = files
    float_size = os.path.getsize(paths["anil_conv4_16"])
    # float16 halves the weights, dynamic range quarters the conv kernels (int8).
    assert os.path.getsize(paths["anil_conv4_16_float16"]) < 0.8 * float_size
    assert os.path.getsize(paths["anil_conv4_16_dynamic_range"]) < 0.5 * float_size
    for seed in (1, 2):
        episode = _episode("anil_conv4_16", seed)
        want = _adapt(paths["anil_conv4_16"], episode)
        np.testing.assert_allclose(want, learners["anil_conv4_16"].predict(episode, verbose=0),
                                   rtol=1e-4, atol=1e-4)
        scale = np.abs(want).max()
        half = _adapt(paths["anil_conv4_16_float16"], episode)
        np.testing.assert_allclose(half, want, atol=1e-2 * scale)
        quantized = _adapt(paths["anil_conv4_16_dynamic_range"], episode)
        np.testing.assert_allclose(quantized, want, atol=0.1 * scale)
        assert np.abs(quantized - want).max() > 1e-6  # the weights were quantized


def test_other_support_sizes_are_refused(files, tmp_path):
    learners, paths = files
    # The file has the exported sizes, which its signature states ...
    runner = _interpreter(paths["maml_conv4"]).get_signature_runner("adapt_and_predict")
    assert tuple(runner.get_input_details()["support_x"]["shape"]) == (N_WAY,) + SHOT_SHAPE
    # ... and a support set of another size is refused by the runtime.
    episode = testing.classification_episode(meta_batch=1, n_way=N_WAY, k=2, q=2,
                                             shape=SHOT_SHAPE, seed=5, dtype="float32")
    with pytest.raises((RuntimeError, ValueError)):
        _adapt(paths["maml_conv4"], episode)
    # A free number of examples needs BroadcastGradientArgs: refused by default.
    with pytest.raises(ValueError, match=r"`support_shape` must give the number of examples.*"
                                         r"BroadcastGradientArgs"):
        km.export_tflite(learners["maml_mlp"], str(tmp_path / "x.tflite"), (None, 1), (10, 1))


def test_free_sizes_with_select_tf_ops(files, tmp_path):
    learners, _ = files
    path = km.export_tflite(learners["maml_mlp"], str(tmp_path / "free.tflite"), (None, 1),
                            (None, 1), select_tf_ops=True)
    assert "FlexBroadcastGradientArgs" in _ops(path)
    runner = _interpreter(path).get_signature_runner("adapt_and_predict")
    try:
        episode = _episode("maml_mlp", 1)
        got = _adapt(path, episode)
    except RuntimeError as error:
        # This TensorFlow's Interpreter is not linked with the Flex delegate.
        assert "Select TensorFlow op" in str(error)
    else:
        np.testing.assert_allclose(got, learners["maml_mlp"].predict(episode, verbose=0),
                                   rtol=1e-4, atol=1e-4)
    del runner


def test_export_errors(files, tmp_path):
    learners, _ = files
    path = str(tmp_path / "x.tflite")
    with pytest.raises(TypeError, match="exports a keras_meta meta-learner"):
        km.export_tflite(_mlp(), path, (10, 1), (10, 1))
    with pytest.raises(ValueError, match="needs a loss"):
        km.export_tflite(km.MAML(_mlp()), path, (10, 1), (10, 1))
    maml = learners["maml_mlp"]
    with pytest.raises(ValueError, match=r"`support_shape` must be \(examples,\) \+ \(1,\)"):
        km.export_tflite(maml, path, (10, 2), (10, 1))
    with pytest.raises(ValueError, match=r"`query_shape` must be"):
        km.export_tflite(maml, path, (10, 1), (0, 1))
    with pytest.raises(ValueError, match="`support_shape` must be a tuple"):
        km.export_tflite(maml, path, 10, (10, 1))
    with pytest.raises(ValueError, match="quantize"):
        km.export_tflite(maml, path, (10, 1), (10, 1), quantize="int4")
    with pytest.raises(ValueError, match="steps"):
        km.export_tflite(maml, path, (10, 1), (10, 1), steps=0)
    with pytest.raises(ValueError, match="`select_tf_ops` must be a bool"):
        km.export_tflite(maml, path, (10, 1), (10, 1), select_tf_ops="yes")

    double = km.MAML(km.models.mlp(dtype="float64"))
    double.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="TensorFlow Lite exports float32 models.*float64"):
        km.export_tflite(double, path, (10, 1), (10, 1))
    broken = km.MAML(_mlp())
    broken.compile(optimizer="adam", loss="mse")
    broken.model.trainable_variables[0].assign(
        np.full(broken.model.trainable_variables[0].shape, np.nan, "float32"))
    with pytest.raises(ValueError, match="Refusing to export MAML.*NaN or infinite"):
        km.export_tflite(broken, path, (10, 1), (10, 1))

    class OwnPrediction(km.MAML):
        def task_predict(self, params, non_trainable, task, steps):
            return super().task_predict(params, non_trainable, task, steps)

    own = OwnPrediction(_mlp())
    own.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="OwnPrediction predicts with its own `task_predict`"):
        km.export_tflite(own, path, (10, 1), (10, 1))
    assert not os.path.exists(path)


def test_ops_without_builtin_gradients_are_named(tmp_path):
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2, strides=1)(h)  # overlapping windows
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    maml = km.MAML(keras.Model(inputs, outputs))
    maml.compile(optimizer="adam", loss=testing.sparse_ce())
    with pytest.raises(ValueError, match=r"no builtin for: \['MaxPoolGrad'\]\. Pass "
                                         r"`select_tf_ops=True`"):
        km.export_tflite(maml, str(tmp_path / "x.tflite"), (3, 6, 6, 1), (3, 6, 6, 1))


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh", "sigmoid"])
def test_builtin_activation_gradients_equal_tensorflow(activation):
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 7)))
    x = tf.tensor_scatter_nd_update(x, [[0, 0]], [0.0])  # ReLU's kink
    upstream = tf.constant(np.random.default_rng(1).normal(size=(4, 7)))
    fn = getattr(tf.nn, activation)

    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x, output_gradients=upstream)

    want = gradient()
    with builtin_gradients():
        got = gradient()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert fn is getattr(tf.nn, activation)


@pytest.mark.parametrize("strides, padding, size", [
    (1, "SAME", 6), (2, "SAME", 7), (2, "VALID", 8), (3, "SAME", 8), (3, "VALID", 7),
])
def test_builtin_conv2d_gradients_equal_tensorflow(strides, padding, size):
    rng = np.random.default_rng(size)
    x = tf.constant(rng.normal(size=(2, size, size + 1, 3)))
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 4)))

    traced = []

    def gradients():
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, strides, padding)
            loss = tf.reduce_sum(tf.sin(y))
        grads = tape.gradient(loss, [x, kernel])
        traced.append({op.type for op in tf.compat.v1.get_default_graph().get_operations()})
        return grads

    want_x, want_k = tf.function(gradients)()
    with builtin_gradients():
        got_x, got_k = tf.function(gradients)()
    assert "Conv2DBackpropFilter" in traced[0] and "Conv2DBackpropFilter" not in traced[1]
    np.testing.assert_allclose(got_x, want_x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("shape, size", [((2, 7, 9, 3), 2), ((2, 6, 6, 2), 3), ((1, 8, 8, 1), 2)])
def test_builtin_pooling_gradients_equal_tensorflow(pool, shape, size):
    # Integer inputs: windows with tied maxima (TensorFlow picks the first).
    x = tf.constant(np.random.default_rng(size).integers(0, 3, size=shape).astype("float64"))
    traced = []

    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = getattr(tf.nn, pool)(x, size, size, "VALID")
            weights = tf.reshape(tf.range(tf.size(y), dtype=y.dtype), tf.shape(y))
            loss = tf.reduce_sum(tf.sin(y + 1) * weights)
        gradient = tape.gradient(loss, x)
        traced.append({op.type for op in tf.compat.v1.get_default_graph().get_operations()})
        return gradient

    want = tf.function(gradient)()
    with builtin_gradients():
        got = tf.function(gradient)()
    kernel = {"max_pool2d": "MaxPoolGrad", "avg_pool2d": "AvgPoolGrad"}[pool]
    assert kernel in traced[0] and kernel not in traced[1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(want).max() > 0


@pytest.mark.large
def test_on_device_omniglot_example(tmp_path):
    import json
    import subprocess
    import sys

    data = testing.omniglot_folder(tmp_path / "omniglot")
    output = tmp_path / "results.json"
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "on_device_omniglot.py")
    subprocess.run(
        [sys.executable, script, f"--data_dir={data}", "--budget_s=5", "--clock=cpu",
         "--filters=16", "--eval_tasks=20", "--latency_tasks=5", "--eval_inner_steps=2",
         f"--output_dir={tmp_path / 'files'}", f"--output={output}"],
        check=True, timeout=1200, capture_output=True,
    )
    results = json.loads(output.read_text())["results"]
    files = results["files"]
    assert set(files) == {"anil float32", "anil dynamic_range", "anil float16", "maml float32",
                          "maml dynamic_range"}
    # The float file predicts what the Keras learner predicts on the same tasks.
    assert abs(files["anil float32"]["accuracy"] - results["keras_anil_accuracy"][0]) <= 1.0
    assert files["anil dynamic_range"]["bytes"] < files["anil float32"]["bytes"]
    assert files["anil float16"]["bytes"] < files["anil float32"]["bytes"]
    for name, row in files.items():
        assert row["median_latency_ms"] > 0 and 0 <= row["accuracy"] <= 100, name
