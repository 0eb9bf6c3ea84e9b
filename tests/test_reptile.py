"""Reptile: the meta-gradient against its closed form on linear least squares (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers


def _linear(features=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)])


def _closed_form_adapted(w0, x, y, rate, steps):
    """w_k of k GD steps on mean((X w - y)^2), X with a column of ones (the bias).

    w_k = A^k w_0 + (I + A + ... + A^(k-1)) c, A = I - 2 rate/n X^T X,
    c = 2 rate/n X^T y.
    """
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    a = np.eye(x.shape[1]) - 2 * rate / len(x) * x.T @ x
    c = 2 * rate / len(x) * x.T @ y
    powers = [np.linalg.matrix_power(a, j) for j in range(steps + 1)]
    return powers[steps] @ w0 + sum(powers[:steps]) @ c


@pytest.mark.parametrize("use_query, task_execution", [
    (False, "vectorized"), (True, "sequential")])
def test_meta_gradient_equals_the_closed_form_after_k_steps(float64, use_query, task_execution):
    episode = helpers.regression_episode(meta_batch=4, k=6, q=5, features=3, seed=3)
    rate, steps = 0.1, 4
    learner = km.Reptile(_linear(seed=1), inner_learning_rate=rate, inner_steps=steps,
                         use_query_in_inner_loop=use_query, task_execution=task_execution)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    kernel, bias = [np.array(v) for v in learner.model.trainable_variables]
    w0 = np.concatenate([kernel, bias[:, None]])
    expected = []
    for t in range(4):
        x, y = episode["support_x"][t], episode["support_y"][t]
        if use_query:
            x = np.concatenate([x, episode["query_x"][t]])
            y = np.concatenate([y, episode["query_y"][t]])
        expected.append(w0 - _closed_form_adapted(w0, x, y, rate, steps))  # theta - phi
    expected = np.mean(expected, axis=0)
    applied = helpers.meta_gradient_by_update(learner, episode)  # SGD(1): the gradient
    assert np.abs(applied[0] - expected[:-1]).max() <= 1e-8
    assert np.abs(applied[1] - expected[-1]).max() <= 1e-8
    assert np.abs(expected).max() > 1e-2  # not trivially zero


def test_epsilon_is_the_outer_learning_rate(float64):
    """SGD(epsilon): theta <- theta + epsilon * mean(phi - theta)."""
    episode = helpers.regression_episode(meta_batch=2, seed=4)
    grads = []
    for epsilon in (1.0, 0.25):
        learner = km.Reptile(helpers.tanh_mlp(seed=2), inner_learning_rate=0.2, inner_steps=3,
                             task_execution="sequential")
        learner.compile(optimizer=keras.optimizers.SGD(epsilon), loss="mse", run_eagerly=True)
        grads.append(helpers.meta_gradient_by_update(learner, episode))
    for a, b in zip(*grads):
        np.testing.assert_allclose(0.25 * a, b, rtol=1e-10, atol=1e-14)


def test_evaluation_adapts_on_the_support_set_as_maml_does(float64):
    """Test time is the same for every learner: k steps on support, score query."""
    episode = helpers.regression_episode(meta_batch=3, seed=5)
    logs = []
    for cls in (km.Reptile, km.MAML):
        learner = cls(helpers.tanh_mlp(seed=3), inner_learning_rate=0.2, inner_steps=3,
                      inner_optimizer={"name": "momentum", "momentum": 0.5},
                      task_execution="sequential")
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", run_eagerly=True)
        logs.append(learner.evaluate(episode, verbose=0, return_dict=True))
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-12)
    assert logs[0]["pre_adaptation_loss"] == pytest.approx(logs[1]["pre_adaptation_loss"], rel=1e-12)


def test_config_and_bad_arguments():
    learner = km.Reptile(helpers.tanh_mlp(), inner_learning_rate=0.2, inner_steps=3,
                         inner_optimizer={"name": "adam", "beta_1": 0.0}, use_query_in_inner_loop=True)
    config = learner.get_config()
    assert config["use_query_in_inner_loop"] is True and config["inner_steps"] == 3
    assert km.Reptile.from_config(config).get_config() == config
    with pytest.raises(ValueError, match=r"`use_query_in_inner_loop` must be True or False"):
        km.Reptile(helpers.tanh_mlp(), use_query_in_inner_loop="yes")
    with pytest.raises(ValueError, match=r"`inner_steps` must be a positive integer"):
        km.Reptile(helpers.tanh_mlp(), inner_steps=0)


# ----------------------------------------------------------------------
# The learners added with Reptile (BOIL, ProtoNet, Proto-MAML) under Keras'
# BackupAndRestore: a second run with the same backup folder resumes from the
# saved epoch (here: the end) with the same weights and optimizer state.

NEW_LEARNERS = {
    "reptile": lambda m: km.Reptile(m, inner_learning_rate=0.3, inner_steps=2, use_query_in_inner_loop=True,
                                    task_execution="sequential"),
    "boil": lambda m: km.BOIL(m, inner_learning_rate=0.3, task_execution="sequential"),
    "protonet": lambda m: km.ProtoNet(m, task_execution="sequential"),
    "proto_maml": lambda m: km.MAML(m, inner_learning_rate=0.3, head_initialization="prototypes",
                                    task_execution="sequential"),
}


# The mechanism is Keras' and the same for every learner (tests/test_callbacks.py runs it on one
# learner per algorithm): ProtoNet by default, the others with --run-large.
@pytest.mark.parametrize("name", [
    name if name == "protonet" else pytest.param(name, marks=pytest.mark.large)
    for name in sorted(NEW_LEARNERS)])
def test_backup_and_restore_resumes(name, tmp_path):
    episodes = tf.data.Dataset.from_tensors(
        helpers.classification_episode(meta_batch=2, shape=(4,), dtype="float32", seed=1)).repeat()
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                                  keras.layers.Dense(3)])
        learner = NEW_LEARNERS[name](model)
        learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=helpers.sparse_ce(), run_eagerly=True)
        history = learner.fit(episodes, steps_per_epoch=2, epochs=2, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)])
        runs.append((learner, len(history.history.get("loss", []))))
    (first, trained), (second, resumed) = runs
    assert trained == 2 and resumed == 0  # the second run restored the finished state
    for a, b in zip(first.model.get_weights() + [np.array(v) for v in first.optimizer.variables],
                    second.model.get_weights() + [np.array(v) for v in second.optimizer.variables]):
        np.testing.assert_array_equal(a, b)
