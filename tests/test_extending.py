"""docs/extending.md's worked example (SimpleReptile) passes the conformance harness, and its math."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_meta.testing import LearnerConformance
from tests import helpers
from tests.docs_fixtures import REPO, python_blocks

# The class as docs/extending.md shows it (its first python block).
_BLOCK = python_blocks(REPO / "docs" / "extending.md")[0]
_NAMESPACE = {"__name__": "docs_extending"}
exec(compile(_BLOCK.code, _BLOCK.where, "exec"), _NAMESPACE)  # noqa: S102 - the docs' own code


def SimpleReptile(*args, **kwargs):  # noqa: N802 - the class, as registered now
    # tests/test_docs.py runs the same block again, which registers its own
    # class under the same name: use whichever `.keras` loading resolves to.
    return keras.saving.get_registered_object("my_algorithms>SimpleReptile")(*args, **kwargs)


def test_the_worked_example_is_under_80_lines():
    assert "class SimpleReptile(km.MetaLearner)" in _BLOCK.code
    assert len(_BLOCK.code.splitlines()) < 80


class TestSimpleReptile(LearnerConformance):
    learners = {"reptile": lambda model: SimpleReptile(model, inner_learning_rate=0.3, inner_steps=2)}


def test_simple_reptile_moves_theta_toward_the_adapted_weights(float64):
    """SGD(1): theta <- mean over tasks of phi, phi after k plain GD steps on support."""
    episode = helpers.regression_episode(meta_batch=3, seed=2)
    learner = SimpleReptile(helpers.tanh_mlp(seed=3), inner_learning_rate=0.1, inner_steps=3)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    params = [tf.convert_to_tensor(v) for v in learner.model.trainable_variables]
    adapted = []
    for t in range(3):
        fast = [tf.Variable(p) for p in params]
        for _ in range(3):
            with tf.GradientTape() as tape:
                pred = learner.model.stateless_call(fast, [], episode["support_x"][t])[0]
                loss = tf.reduce_mean((pred - episode["support_y"][t]) ** 2)
            for f, g in zip(fast, tape.gradient(loss, fast)):
                f.assign_sub(0.1 * g)
        adapted.append([np.array(f) for f in fast])
    learner.train_on_batch(episode)
    for i, variable in enumerate(learner.model.trainable_variables):
        np.testing.assert_allclose(np.array(variable), np.mean([a[i] for a in adapted], axis=0),
                                   rtol=1e-12)


def test_simple_reptile_config_has_the_base_arguments():
    learner = SimpleReptile(helpers.tanh_mlp(), inner_learning_rate=0.2, inner_steps=4,
                      inner_optimizer={"name": "momentum", "momentum": 0.5})
    config = learner.get_config()
    assert config["inner_learning_rate"] == pytest.approx(0.2) and config["inner_steps"] == 4
    assert config["inner_optimizer"] == {"name": "momentum", "momentum": 0.5}
    assert type(learner).from_config(config).get_config() == config
