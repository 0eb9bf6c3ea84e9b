"""keras_meta.inner_loop: the one loop, its transforms, and the learning-rate forms."""

import numpy as np
import pytest
import tensorflow as tf

from keras_meta import inner_loop


def quadratic(params):
    w = params[0]
    weights = tf.constant([1.0, 3.0, 0.5], w.dtype)
    return tf.reduce_sum(weights * (w - 1.0) ** 2) + tf.reduce_sum(w) ** 2


def start():
    return [tf.constant([0.3, -0.2, 0.8], tf.float64)]


@pytest.mark.parametrize("make", [
    lambda: inner_loop.sgd(0.05),
    lambda: inner_loop.momentum(0.05, momentum=0.6),
    lambda: inner_loop.adam(0.05),
])
def test_a_transform_equals_its_penalty_in_the_objective(float64, make):
    """chain(add_proximal, opt) on f == opt on f + strength/2 ||p - anchor||^2 (and decay)."""
    anchor = start()
    for transform, penalty in (
        (inner_loop.add_proximal(0.7),
         lambda p: 0.35 * tf.reduce_sum((p[0] - anchor[0]) ** 2)),
        (inner_loop.add_decayed_weights(0.4), lambda p: 0.2 * tf.reduce_sum(p[0] ** 2)),
    ):
        got, _ = inner_loop.run(quadratic, start(), 5, inner_loop.chain(transform, make()))
        expected, _ = inner_loop.run(lambda p: quadratic(p) + penalty(p), start(), 5, make())
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
        state = transform.init(start())
        np.testing.assert_allclose(transform.penalty([got[0]], state), penalty(got), rtol=1e-12)


def test_the_proximal_anchor_travels_with_the_state(float64):
    optimizer = inner_loop.chain(inner_loop.add_proximal(2.0), inner_loop.sgd(0.05))
    whole, _ = inner_loop.run(quadratic, start(), 6, optimizer)
    first, state = inner_loop.run(quadratic, start(), 2, optimizer)
    second, _ = inner_loop.run(quadratic, first, 4, optimizer, state=state, unroll=False)
    np.testing.assert_allclose(second[0], whole[0], rtol=1e-13)


def test_learning_rate_schedules_and_per_weight_rates(float64):
    rates = [0.05, 0.02, 0.01]
    schedule = lambda count: tf.gather(tf.constant(rates, tf.float64), count)  # noqa: E731
    for identifier in ("sgd", {"name": "momentum", "momentum": 0.5}):
        got, _ = inner_loop.run(
            quadratic, start(), 3, inner_loop.get_inner_optimizer(identifier, schedule))
        expected, state = start(), None
        for rate in rates:  # one step at each rate, the optimiser state carried
            expected, state = inner_loop.run(
                quadratic, expected, 1, inner_loop.get_inner_optimizer(identifier, rate), state=state)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-13)
    # One rate per weight.
    two = [tf.constant([0.3, -0.2], tf.float64), tf.constant(0.5, tf.float64)]
    loss = lambda p: tf.reduce_sum(p[0] ** 2) + p[1] ** 2  # noqa: E731
    got, _ = inner_loop.run(loss, two, 1, inner_loop.sgd([0.1, tf.constant(0.25, tf.float64)]))
    np.testing.assert_allclose(got[0], [0.3 - 0.1 * 0.6, -0.2 + 0.1 * 0.4], rtol=1e-15)
    np.testing.assert_allclose(got[1], 0.5 - 0.25 * 1.0, rtol=1e-15)


@pytest.mark.parametrize("unroll", [True, False])
def test_second_order_through_momentum_matches_finite_differences(float64, unroll):
    optimizer = inner_loop.chain(inner_loop.add_decayed_weights(0.3), inner_loop.momentum(0.05))

    @tf.function
    def end_loss(point):
        end, _ = inner_loop.run(quadratic, [point], 4, optimizer, create_graph=True, unroll=unroll)
        return tf.reduce_sum(tf.sin(end[0]))

    point = start()[0]
    with tf.GradientTape() as tape:
        tape.watch(point)
        loss = end_loss(point)
    gradient = tape.gradient(loss, point)
    direction, eps = tf.constant([1.0, -2.0, 0.5], tf.float64), 1e-6
    numeric = (float(end_loss(point + eps * direction)) - float(end_loss(point - eps * direction))) / (2 * eps)
    assert float(tf.reduce_sum(gradient * direction)) == pytest.approx(numeric, rel=1e-7)
