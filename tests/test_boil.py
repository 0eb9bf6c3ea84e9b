"""BOIL: meta-gradients in float64 against finite differences and MAML with a frozen head."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers


def _mlp(seed=1, frozen_head=False):
    model = helpers.tanh_mlp(seed=seed)
    model.layers[-1].trainable = not frozen_head
    return model


def _learner(cls, model, **kwargs):
    learner = cls(model, **kwargs)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", run_eagerly=True)
    return learner


@pytest.mark.parametrize("first_order", [False, True])
def test_body_meta_gradient_equals_maml_with_a_frozen_head(float64, first_order):
    """The body's meta-gradient is MAML's on the same network with the head frozen."""
    episode = helpers.regression_episode(meta_batch=3, seed=7)
    common = dict(inner_learning_rate=0.3, inner_steps=2, first_order=first_order,
                  task_execution="sequential")
    boil = _learner(km.BOIL, _mlp(), **common)
    maml = _learner(km.MAML, _mlp(frozen_head=True), **common)
    assert len(maml.model.trainable_variables) == 4  # the body's
    # BOIL's test-time adaptation is MAML's with the head frozen.
    task = {k: v[0] for k, v in episode.items()}
    adapted = boil.adapt(task["support_x"], task["support_y"])
    expected = maml.adapt(task["support_x"], task["support_y"])
    np.testing.assert_allclose(adapted.predict(task["query_x"], verbose=0),
                               expected.predict(task["query_x"], verbose=0), rtol=1e-10)
    for a, b in zip(adapted.layers[-1].weights, boil.model.layers[-1].weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))  # the head did not adapt
    boil_gradient = helpers.meta_gradient_by_update(boil, episode)
    maml_gradient = helpers.meta_gradient_by_update(maml, episode)
    for a, b in zip(boil_gradient[:4], maml_gradient):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # The head is meta-learned (by the outer loop only).
    assert np.abs(boil_gradient[4]).max() > 1e-4


def test_second_order_meta_gradient_matches_finite_differences(float64):
    episode = helpers.regression_episode(meta_batch=2, seed=8)
    learner = _learner(km.BOIL, _mlp(seed=2), inner_learning_rate=0.3, inner_steps=2,
                       task_execution="vectorized")
    params = [tf.convert_to_tensor(v) for v in learner.model.trainable_variables]
    applied = helpers.meta_gradient_by_update(learner, episode)
    helpers.assert_matches_finite_differences(
        lambda p: helpers.meta_loss(learner, p, episode), params, applied, directions=4, rtol=1e-6)
    # Second order: the head's gradient includes its effect on the body's steps.
    first = _learner(km.BOIL, _mlp(seed=2), inner_learning_rate=0.3, inner_steps=2,
                     first_order=True, task_execution="vectorized")
    assert np.abs(helpers.meta_gradient_by_update(first, episode)[4] - applied[4]).max() > 1e-6


def test_head_designation_is_anils():
    model = km.models.mlp()
    boil, anil = km.BOIL(model, head=["dense_1", "output"]), km.ANIL(model, head=["dense_1", "output"])
    assert [v.path for v in boil.head_model.trainable_variables] == [
        v.path for v in anil.head_model.trainable_variables]
    config = boil.get_config()
    assert config["head"] == ["dense_1", "output"]
    assert km.BOIL.from_config(config).get_config() == config
    with pytest.raises(ValueError, match=r"`head` as an int counts the final layers"):
        km.BOIL(km.models.mlp(), head=3)
    with pytest.raises(ValueError, match=r"leaves no body: .* BOIL needs body layers"):
        km.BOIL(km.models.mlp(), head=["dense_0", "dense_1", "output"])
    flat = keras.Sequential([keras.Input((2, 2)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"has no trainable weights: BOIL adapts the body"):
        km.BOIL(flat)
    with pytest.raises(ValueError, match=r"`head` must be None when `model` is a \(body, head\) pair"):
        km.BOIL((keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]), keras.layers.Dense(1)),
                head=1)
