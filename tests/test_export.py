"""Adapt-at-serving SavedModels: the inner loop runs inside the exported graph."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers
from tests.test_conformance import ALGORITHMS, LEARNERS

SERVE = """
import sys, numpy as np

class NoKerasMeta:  # keras_meta is not installed, as far as this process can tell
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_meta":
            raise ImportError("keras_meta is not available here")

sys.meta_path.insert(0, NoKerasMeta())
import tensorflow as tf
for path in sys.argv[1:]:
    data = np.load(path + ".npz")
    served = tf.saved_model.load(path)
    out = served.adapt_and_predict(data["support_x"], data["support_y"], data["query_x"])
    signature = served.signatures["serving_default"](
        support_x=tf.constant(data["support_x"]), support_y=tf.constant(data["support_y"]),
        query_x=tf.constant(data["query_x"]))
    np.savez(path + ".out.npz", method=out.numpy(), signature=list(signature.values())[0].numpy())
assert "keras_meta" not in sys.modules
"""


def _serve(paths):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SERVE, *paths], env=env, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.load(path + ".out.npz") for path in paths]


def test_adaptive_savedmodel_matches_learner_predict_for_every_learner(tmp_path):
    paths, expected = [], []
    for i, name in enumerate(ALGORITHMS):
        learner = LEARNERS[name](helpers.small_convnet(seed=i))
        learner.compile(optimizer=keras.optimizers.Adam(1e-2),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        learner.train_on_batch(helpers.classification_episode(meta_batch=2, dtype="float32", seed=i))
        # A task with other sizes than the training episodes: 4 support, 7 query.
        episode = helpers.classification_episode(meta_batch=1, n_way=3, k=2, q=3, dtype="float32",
                                                 seed=50 + i)
        episode["query_x"] = episode["query_x"][:, :7]
        episode["query_y"] = episode["query_y"][:, :7]
        path = str(tmp_path / name)
        km.export_adaptive(learner, path)
        np.savez(path + ".npz", **{k: v[0] for k, v in episode.items()})
        paths.append(path)
        expected.append(learner.predict(episode, verbose=0))
    for got, want in zip(_serve(paths), expected):
        np.testing.assert_allclose(got["method"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["signature"], want, rtol=1e-5, atol=1e-6)


def test_adaptive_savedmodel_regression_and_step_count(tmp_path):
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.02, eval_inner_steps=2)
    maml.compile(optimizer="adam", loss="mse")
    maml.fit(km.data.sinusoid(meta_batch_size=8, seed=0), steps_per_epoch=20, verbose=0)
    episode = {k: np.array(v) for k, v in next(iter(km.data.sinusoid(meta_batch_size=1, seed=3))).items()}
    path = str(tmp_path / "sinusoid")
    km.export_adaptive(maml, path, steps=7)
    np.savez(path + ".npz", **{k: v[0] for k, v in episode.items()})
    got = _serve([path])[0]["method"]
    adapted = maml.adapt(episode["support_x"][0], episode["support_y"][0], steps=7)
    np.testing.assert_allclose(got, adapted.predict(episode["query_x"][0], verbose=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, maml.predict(episode, verbose=0), atol=1e-4)  # 7 steps, not 2


def test_export_adaptive_errors(tmp_path):
    with pytest.raises(TypeError, match="exports a keras_meta meta-learner"):
        km.export_adaptive(km.models.mlp(), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="needs a loss"):
        km.export_adaptive(km.MAML(km.models.mlp()), str(tmp_path / "x"))

    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((2, 3), "float32"))
    maml = km.MAML(model)
    maml.compile(optimizer="sgd", loss="mse")
    spec = tf.TensorSpec((None, 3), tf.float32)
    path = km.export_adaptive(maml, str(tmp_path / "sub"), support_x_spec=spec, query_x_spec=spec,
                              support_y_spec=tf.TensorSpec((None, 1), tf.float32))
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
