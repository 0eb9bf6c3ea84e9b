"""Adapt-at-serving SavedModels: the inner loop runs inside the exported graph."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import testing

# Every learner's SavedModel against its `predict`: the conformance harness
# (`LearnerConformance.test_adaptive_savedmodel_matches_learner_predict`, run
# by tests/test_conformance.py for its ALGORITHMS).


def _serve(paths):
    return testing.serve_adaptive(paths)


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
