"""keras_meta.testing: the conformance harness every meta-learner passes, and test helpers.

A new learner joins the conformance suite with one line in a pytest module:

```
from keras_meta.testing import LearnerConformance

class TestMyLearner(LearnerConformance):
    learners = {"mine": lambda model: MyLearner(model, inner_learning_rate=0.3)}
```

Each `learners` entry is a factory taking a built model (a small conv net
with BatchNorm) and returning an uncompiled learner. The harness checks, per
learner: config round trip, `.keras` save and load (outputs, optimizer state,
resumed training), the inner loop leaving every variable untouched, finite
and non-zero meta-gradients, eager == `tf.function` == XLA, a standalone
adapted model (`.keras` and SavedModel; one process without keras_meta
serves the SavedModels of the `thorough` learners), the adapt-at-serving
SavedModel (`export_adaptive`) against `predict`, and meta-training on the
reference conv4 backbone.

The helpers are the ones keras_meta's own tests share: small models and
episodes, central finite differences, the sparse cross-entropy loss, the
Omniglot fixture and the import blocker for processes that must not see
keras_meta. Requires pytest (the `test` extra).
"""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km

# ----------------------------------------------------------------------
# Losses, models and episodes.


def sparse_ce():
    """`SparseCategoricalCrossentropy(from_logits=True)`, the few-shot loss."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def regression_episode(meta_batch=3, k=6, q=5, features=2, outputs=1, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    return {
        "support_x": rng.normal(size=(meta_batch, k, features)).astype(dtype),
        "support_y": rng.normal(size=(meta_batch, k, outputs)).astype(dtype),
        "query_x": rng.normal(size=(meta_batch, q, features)).astype(dtype),
        "query_y": rng.normal(size=(meta_batch, q, outputs)).astype(dtype),
    }


def classification_episode(meta_batch=2, n_way=3, k=2, q=3, shape=(6, 6, 1), seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    return {
        "support_x": rng.normal(size=(meta_batch, n_way * k) + shape).astype(dtype),
        "support_y": np.tile(np.repeat(np.arange(n_way), k), (meta_batch, 1)).astype("int32"),
        "query_x": rng.normal(size=(meta_batch, n_way * q) + shape).astype(dtype),
        "query_y": np.tile(np.repeat(np.arange(n_way), q), (meta_batch, 1)).astype("int32"),
    }


def tanh_mlp(features=2, outputs=1, hidden=5, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(outputs),
        ]
    )


def small_convnet(n_way=3, shape=(6, 6, 1), seed=0):
    """conv -> BatchNorm -> tanh -> flatten -> dense: a functional model."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(n_way)(h)
    model = keras.Model(inputs, outputs)
    # Non-trivial BatchNorm statistics and affine parameters.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.3))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 2.0))
            layer.gamma.assign(np.linspace(0.5, 1.5, layer.gamma.shape[0]))
            layer.beta.assign(np.linspace(-0.2, 0.2, layer.beta.shape[0]))
    return model


def weights_of(model):
    return [np.array(v) for v in model.weights]


def meta_gradient_by_update(learner, episode):
    """The meta-gradient a train step applies: SGD(lr=1) weight change."""
    before = [np.array(v) for v in learner.model.trainable_variables]
    learner.train_on_batch(episode)
    after = [np.array(v) for v in learner.model.trainable_variables]
    return [b - a for b, a in zip(before, after)]


# ----------------------------------------------------------------------
# Derivatives.


def assert_matches_finite_differences(loss_fn, params, gradient, directions=3, eps=1e-5, seed=0,
                                      rtol=1e-5):
    """Central differences of `loss_fn` along random directions equal `gradient`.

    `loss_fn` takes a list like `params`; `gradient` is aligned with `params`.
    """
    rng = np.random.default_rng(seed)
    for _ in range(directions):
        direction = [rng.normal(size=p.shape) for p in params]
        plus = loss_fn([p + eps * d for p, d in zip(params, direction)])
        minus = loss_fn([p - eps * d for p, d in zip(params, direction)])
        numeric = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(gradient, direction))
        rel = abs(numeric - analytic) / max(abs(numeric), 1e-12)
        assert rel <= rtol, (numeric, analytic, rel)


# ----------------------------------------------------------------------
# Processes without keras_meta, and data.

# Python source that makes `import keras_meta` fail in the process running it.
NO_KERAS_META = """\
import sys

class NoKerasMeta:  # keras_meta is not installed, as far as this process can tell
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_meta":
            raise ImportError("keras_meta is not available here")

sys.meta_path.insert(0, NoKerasMeta())
"""


def run_without_keras_meta(code, *args, timeout=600):
    """Runs `code` in a fresh Python process that cannot import keras_meta.

    Fails (AssertionError with the process's stderr) unless it exits with 0
    and never imported keras_meta.
    """
    script = NO_KERAS_META + code + "\nassert 'keras_meta' not in sys.modules\n"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, timeout=timeout,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


SERVE_ADAPTIVE = """
import numpy as np
import tensorflow as tf
for path in sys.argv[1:]:
    data = np.load(path + ".npz")
    served = tf.saved_model.load(path)
    out = served.adapt_and_predict(data["support_x"], data["support_y"], data["query_x"])
    signature = served.signatures["serving_default"](
        support_x=tf.constant(data["support_x"]), support_y=tf.constant(data["support_y"]),
        query_x=tf.constant(data["query_x"]))
    np.savez(path + ".out.npz", method=out.numpy(), signature=list(signature.values())[0].numpy())
"""


def serve_adaptive(paths):
    """Serves `export_adaptive` SavedModels in one process without keras_meta.

    Each `path` has a `path + ".npz"` task (`support_x`, `support_y`,
    `query_x`); returns, per path, the `npz` of the `adapt_and_predict`
    endpoint's (`"method"`) and the serving signature's (`"signature"`)
    predictions.
    """
    run_without_keras_meta(SERVE_ADAPTIVE, *paths)
    return [np.load(path + ".out.npz") for path in paths]


OMNIGLOT_ZIPS = pathlib.Path(
    os.environ.get(
        "KERAS_META_OMNIGLOT_ZIPS",
        pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot",
    )
)


def omniglot_folder(root):
    """The shared Omniglot zips (`$KERAS_META_OMNIGLOT_ZIPS`) unzipped into `root`, once.

    Skips the calling test when the zips are not there.
    """
    zips = sorted(OMNIGLOT_ZIPS.glob("images_background_small*.zip"))
    if not zips:
        pytest.skip(f"Omniglot zips not found in {OMNIGLOT_ZIPS}")
    root = pathlib.Path(root)
    if not root.exists():
        for path in zips:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(root)
    return root


# ----------------------------------------------------------------------
# Meta-training on the reference backbone.


def conv4_episodes(shape, k_shot, seed, n_way=5):
    """Few random-image episodes for `km.models.conv4` (meta-batch 2, 1 query)."""
    rng = np.random.default_rng(seed)
    per_class = k_shot + 1
    images = rng.random((n_way * per_class,) + shape, dtype=np.float32)
    labels = np.repeat(np.arange(n_way), per_class)
    source = km.data.from_arrays(images, labels)
    return km.data.episodes(
        source, n_way=n_way, k_shot=k_shot, q_query=1, meta_batch_size=2, seed=seed
    )


def check_meta_training(learner, shape, k_shot, head_moves=False):
    """`fit` 2 steps and `evaluate` 1 on conv4-sized episodes: finite, nothing skipped.

    `learner` wraps a 5-way model for inputs of `shape`, compiled with a
    sparse loss and `metrics=["accuracy"]`. `head_moves`: also require the
    last trainable weight (ANIL's head) to move.
    """
    model = learner.model
    before = [np.array(v) for v in model.trainable_variables]
    history = learner.fit(conv4_episodes(shape, k_shot, 0), steps_per_epoch=2, epochs=1, verbose=0)
    logs = learner.evaluate(conv4_episodes(shape, k_shot, 1), steps=1, verbose=0, return_dict=True)
    after = [np.array(v) for v in model.trainable_variables]
    train = {key: values[-1] for key, values in history.history.items()}
    assert all(np.isfinite(value) for value in train.values()), train
    assert train["non_finite_tasks"] == 0, train
    assert all(np.isfinite(value) for value in logs.values()), logs
    assert 0.0 <= logs["accuracy"] <= 1.0
    moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
    if head_moves:
        assert moved[-1], "ANIL's head did not move"
    assert any(moved), "meta-training changed no weight"


# ----------------------------------------------------------------------
# The conformance harness.


def _as_json(config):
    return json.loads(json.dumps(config))


class LearnerConformance:
    """The conformance suite (optax's common test), as a pytest base class.

    Subclass it in a test module (the class name must start with `Test`)
    and set:

    - `learners`: name -> factory(model) -> an uncompiled learner;
    - `serving`: the names checked by the adapt-at-serving export (one
      process serves them all); default every learner;
    - `backbone`: the names meta-trained on conv4; default every learner;
    - `thorough`: the names that run the expensive checks (`.keras` round
      trip, eager == function == XLA, the standalone adapted model) in every
      run, and whose adapted SavedModels one process without keras_meta
      serves; the others' expensive checks carry the `large` mark (a
      conftest can skip them unless asked). Default every learner.
    """

    learners = {}
    serving = None
    backbone = None
    thorough = None
    expensive_checks = (
        "test_keras_file_round_trip_keeps_outputs_and_optimizer",
        "test_eager_function_and_xla_agree",
        "test_adapted_model_is_standalone",
    )

    def pytest_generate_tests(self, metafunc):
        names = {
            "learner_name": sorted(self.learners),
            "backbone_name": sorted(self.learners) if self.backbone is None else list(self.backbone),
        }
        expensive = metafunc.function.__name__ in self.expensive_checks
        for argument, values in names.items():
            if argument not in metafunc.fixturenames:
                continue
            if argument == "learner_name" and expensive and self.thorough is not None:
                values = [name if name in self.thorough else
                          pytest.param(name, marks=pytest.mark.large) for name in values]
            metafunc.parametrize(argument, values)

    def make(self, name, model=None):
        learner = self.learners[name](small_convnet(seed=11) if model is None else model)
        learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce(), metrics=["accuracy"])
        return learner

    @staticmethod
    def episode():
        return classification_episode(meta_batch=2, dtype="float32", seed=4)

    def test_config_round_trip(self, learner_name):
        learner = self.make(learner_name)
        config = learner.get_config()
        clone = type(learner).from_config(config)
        assert clone.get_config() == config
        assert type(clone.model) is type(learner.model)
        assert len(clone.model.weights) == len(learner.model.weights)

    def test_keras_file_round_trip_keeps_outputs_and_optimizer(self, learner_name, tmp_path):
        learner, episode = self.make(learner_name), self.episode()
        learner.train_on_batch(episode)  # non-trivial weights and optimizer slots
        path = str(tmp_path / "learner.keras")
        learner.save(path)
        loaded = keras.saving.load_model(path)
        assert type(loaded) is type(learner)
        # (JSON turns the tuples of the wrapped model's shapes into lists.)
        assert _as_json(loaded.get_config()) == _as_json(learner.get_config())
        np.testing.assert_allclose(loaded.predict(episode, verbose=0),
                                   learner.predict(episode, verbose=0), rtol=1e-6, atol=1e-6)
        for a, b in zip(loaded.optimizer.variables, learner.optimizer.variables):
            np.testing.assert_array_equal(np.array(a), np.array(b))
        # Training resumes identically.
        la = learner.train_on_batch(episode, return_dict=True)
        lb = loaded.train_on_batch(episode, return_dict=True)
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6)
        for a, b in zip(learner.model.weights, loaded.model.weights):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)

    def test_inner_loop_leaves_variables_untouched(self, learner_name):
        learner, episode = self.make(learner_name), self.episode()
        before = weights_of(learner.model)
        learner.evaluate(episode, verbose=0)
        learner.predict(episode, verbose=0)
        learner.adapt(episode["support_x"][0], episode["support_y"][0])
        for b, a in zip(before, weights_of(learner.model)):
            np.testing.assert_array_equal(b, a)

    def test_meta_gradients_are_finite_and_nonzero(self, learner_name):
        learner, episode = self.make(learner_name), self.episode()
        before = [np.array(v) for v in learner.model.trainable_variables]
        logs = learner.train_on_batch(episode, return_dict=True)
        assert np.isfinite(logs["loss"])
        after = [np.array(v) for v in learner.model.trainable_variables]
        assert all(np.all(np.isfinite(a)) for a in after)
        assert sum(np.abs(a - b).sum() for a, b in zip(after, before)) > 0

    def test_eager_function_and_xla_agree(self, learner_name):
        learner, episode = self.make(learner_name), self.episode()
        config = learner.get_config()
        results = []
        for kwargs in ({"run_eagerly": True}, {}, {"jit_compile": True}):
            fresh = type(learner).from_config(config)
            fresh.model.set_weights(learner.model.get_weights())
            fresh.compile(optimizer=keras.optimizers.SGD(0.1), loss=sparse_ce(), **kwargs)
            fresh.train_on_batch(episode)
            results.append(fresh.model.get_weights())
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

    def test_adapted_model_is_standalone(self, learner_name, tmp_path):
        learner, episode = self.make(learner_name), self.episode()
        learner.train_on_batch(episode)
        adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0])
        assert isinstance(adapted, keras.Model) and not isinstance(adapted, km.MetaLearner)
        query_x = episode["query_x"][0]
        expected = adapted.predict(query_x, verbose=0)
        # .keras round trip without any keras_meta object inside.
        path = str(tmp_path / "adapted.keras")
        adapted.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_allclose(reloaded.predict(query_x, verbose=0), expected, rtol=1e-6, atol=1e-6)
        # A SavedModel (served without keras_meta by the next test).
        export_dir = str(tmp_path / "exported")
        adapted.export(export_dir, verbose=False)
        loaded = tf.saved_model.load(export_dir)  # (held: its functions need its variables)
        np.testing.assert_allclose(loaded.serve(tf.constant(query_x)), expected,
                                   rtol=1e-6, atol=1e-6)

    def test_adapted_models_serve_without_keras_meta(self, tmp_path):
        """`adapt()`'s SavedModels, served in one fresh process that never
        imports keras_meta: the `thorough` names (default every learner)."""
        names = sorted(self.learners) if self.thorough is None else [
            name for name in sorted(self.learners) if name in self.thorough]
        episode, args = self.episode(), []
        for name in names:
            adapted = self.make(name).adapt(episode["support_x"][0], episode["support_y"][0])
            path = str(tmp_path / name)
            adapted.export(path, verbose=False)
            np.save(path + ".want.npy", adapted.predict(episode["query_x"][0], verbose=0))
            args.append(path)
        np.save(tmp_path / "x.npy", episode["query_x"][0])
        run_without_keras_meta(
            "import numpy as np, tensorflow as tf\n"
            f"x = tf.constant(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "for path in sys.argv[1:]:\n"
            "    served = tf.saved_model.load(path)\n"
            "    got = served.serve(x).numpy()\n"
            "    np.testing.assert_allclose(got, np.load(path + '.want.npy'), rtol=1e-6, atol=1e-6)\n",
            *args, timeout=300,
        )

    def test_adaptive_savedmodel_matches_learner_predict(self, tmp_path):
        names = sorted(self.learners) if self.serving is None else list(self.serving)
        if not names:
            pytest.skip("no learner is checked for adapt-at-serving export")
        paths, expected = [], []
        for i, name in enumerate(names):
            learner = self.learners[name](small_convnet(seed=i))
            learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
            learner.train_on_batch(classification_episode(meta_batch=2, dtype="float32", seed=i))
            # A task with other sizes than the training episodes: 4 support, 7 query.
            episode = classification_episode(meta_batch=1, n_way=3, k=2, q=3, dtype="float32",
                                             seed=50 + i)
            episode["query_x"] = episode["query_x"][:, :7]
            episode["query_y"] = episode["query_y"][:, :7]
            path = str(tmp_path / name)
            km.export_adaptive(learner, path)
            np.savez(path + ".npz", **{k: v[0] for k, v in episode.items()})
            paths.append(path)
            expected.append(learner.predict(episode, verbose=0))
        for got, want in zip(serve_adaptive(paths), expected):
            np.testing.assert_allclose(got["method"], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["signature"], want, rtol=1e-5, atol=1e-6)

    def test_meta_trains_on_conv4(self, backbone_name):
        model = km.models.conv4(5, filters=32, input_shape=(28, 28, 1), seed=0)
        learner = self.learners[backbone_name](model)
        learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss=sparse_ce(),
                        metrics=["accuracy"])
        check_meta_training(learner, (28, 28, 1), k_shot=1)
