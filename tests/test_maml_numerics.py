"""The numerical ladder for MAML, in float64: closed form, then finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers


def linear_model(features):
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.linspace(-0.5, 0.7, features)[:, None])
    return model


def closed_form_one_step(w, episode, alpha):
    """One-step MAML meta-gradient for least squares, task-averaged.

    L(w) = ||X w - y||^2 / n, grad = 2/n X^T (X w - y), H = 2/n X^T X,
    w' = w - alpha grad_s(w), meta-gradient = (I - alpha H_s) grad_q(w').
    """
    grads = []
    for xs, ys, xq, yq in zip(episode["support_x"], episode["support_y"],
                              episode["query_x"], episode["query_y"]):
        n, m = len(xs), len(xq)
        grad_s = 2.0 / n * xs.T @ (xs @ w - ys)
        hess_s = 2.0 / n * xs.T @ xs
        w_adapted = w - alpha * grad_s
        grad_q = 2.0 / m * xq.T @ (xq @ w_adapted - yq)
        grads.append((np.eye(len(w)) - alpha * hess_s) @ grad_q)
    return np.mean(grads, axis=0)


@pytest.mark.parametrize("task_execution", ["vectorized", "sequential"])
def test_one_step_maml_least_squares_closed_form(float64, task_execution):
    episode = helpers.regression_episode(meta_batch=4, k=7, q=5, features=3, seed=3)
    model = linear_model(3)
    w = np.array(model.layers[0].kernel)
    alpha = 0.3
    maml = km.MAML(model, inner_learning_rate=alpha, inner_steps=1, task_execution=task_execution)
    maml.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    got = helpers.meta_gradient_by_update(maml, episode)[0]
    expected = closed_form_one_step(w, episode, alpha)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1e-6, rel
    # evaluate() reports the query loss after and before one inner step.
    w_new = w - got  # the update moved the weights; evaluate at the new ones
    adapted = [w_new - alpha * 2.0 / 7 * xs.T @ (xs @ w_new - ys)
               for xs, ys in zip(episode["support_x"], episode["support_y"])]
    expected_after = np.mean([np.mean((xq @ wa - yq) ** 2) for wa, xq, yq in
                              zip(adapted, episode["query_x"], episode["query_y"])])
    expected_before = np.mean([np.mean((xq @ w_new - yq) ** 2) for xq, yq in
                               zip(episode["query_x"], episode["query_y"])])
    logs = maml.evaluate(episode, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected_after, rel=1e-6)
    assert logs["pre_adaptation_loss"] == pytest.approx(expected_before, rel=1e-6)


def finite_difference_check(maml, episode, directions=3, eps=1e-5, seed=0):
    params = [tf.convert_to_tensor(v) for v in maml.model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = helpers.meta_loss(maml, params, episode)
    autodiff = tape.gradient(loss, params)
    # The train step applies the same gradient (SGD, learning rate 1).
    applied = helpers.meta_gradient_by_update(maml, episode)
    for a, b in zip(applied, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    helpers.assert_matches_finite_differences(
        lambda p: helpers.meta_loss(maml, p, episode), params, autodiff, directions, eps, seed)


def test_three_step_second_order_maml_matches_finite_differences(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=2, seed=1)
    maml = km.MAML(helpers.tanh_mlp(), inner_learning_rate=0.1, inner_steps=3)
    maml.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    finite_difference_check(maml, episode)


@pytest.mark.parametrize("transductive", [True, False])
def test_three_step_maml_with_batch_norm_matches_finite_differences(float64, transductive):
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=2)
    maml = km.MAML(helpers.small_convnet(), inner_learning_rate=0.2, inner_steps=3,
                   transductive_batch_norm=transductive)
    maml.compile(optimizer=keras.optimizers.SGD(1.0),
                 loss=helpers.sparse_ce())
    finite_difference_check(maml, episode)


def test_first_order_equals_query_gradient_at_adapted_weights(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, seed=4)
    maml = km.MAML(helpers.tanh_mlp(), inner_learning_rate=0.1, inner_steps=2, first_order=True)
    maml.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    params = [tf.convert_to_tensor(v) for v in maml.model.trainable_variables]
    non_trainable = []
    expected = [np.zeros(p.shape) for p in params]
    for t in range(3):
        xs, ys = episode["support_x"][t], episode["support_y"][t]
        fast = [tf.Variable(p) for p in params]
        for _ in range(2):  # plain gradient descent on the support loss
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((maml.model.stateless_call(fast, non_trainable, xs)[0] - ys) ** 2)
            for f, g in zip(fast, tape.gradient(loss, fast)):
                f.assign_sub(0.1 * g)
        with tf.GradientTape() as tape:
            pred = maml.model.stateless_call(fast, non_trainable, episode["query_x"][t])[0]
            loss = tf.reduce_mean((pred - episode["query_y"][t]) ** 2)
        for e, g in zip(expected, tape.gradient(loss, fast)):
            e += np.array(g) / 3
    got = helpers.meta_gradient_by_update(maml, episode)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_first_order_differs_from_second_order(float64):
    episode = helpers.regression_episode(meta_batch=2, seed=5)
    grads = {}
    for first_order in (False, True):
        maml = km.MAML(helpers.tanh_mlp(seed=7), inner_learning_rate=0.5, first_order=first_order)
        maml.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        grads[first_order] = helpers.meta_gradient_by_update(maml, episode)
    difference = max(np.max(np.abs(a - b)) for a, b in zip(grads[False], grads[True]))
    assert difference > 1e-4


def test_inverse_steps_scaling_divides_the_step_size(float64):
    episode = helpers.regression_episode(meta_batch=2, seed=6)
    scaled = km.MAML(helpers.tanh_mlp(seed=3), inner_learning_rate=0.6, inner_steps=3,
                     inner_learning_rate_scaling="inverse_steps")
    plain = km.MAML(helpers.tanh_mlp(seed=3), inner_learning_rate=0.2, inner_steps=3)
    assert scaled.step_size == pytest.approx(0.2)
    for learner in (scaled, plain):
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    for a, b in zip(helpers.meta_gradient_by_update(scaled, episode),
                    helpers.meta_gradient_by_update(plain, episode)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_second_order_through_a_momentum_inner_loop_matches_finite_differences(float64):
    """MAML differentiates through any inner optimiser: heavy-ball momentum here."""
    episode = helpers.regression_episode(meta_batch=2, k=6, q=5, features=2, seed=3)

    def maml(inner_optimizer):
        learner = km.MAML(helpers.tanh_mlp(seed=2), inner_learning_rate=0.1, inner_steps=3,
                          inner_optimizer=inner_optimizer)
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        return learner

    momentum = {"name": "momentum", "momentum": 0.7}
    finite_difference_check(maml(momentum), episode)
    # (and momentum is not plain gradient descent)
    grads = [helpers.meta_gradient_by_update(maml(o), episode) for o in (momentum, "sgd")]
    assert max(np.max(np.abs(a - b)) for a, b in zip(*grads)) > 1e-4
