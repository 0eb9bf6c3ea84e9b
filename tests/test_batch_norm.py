"""BatchNorm conventions: transductive by default, support statistics on request."""

import numpy as np
import tensorflow as tf

import keras_meta as km
from keras_meta import inner_loop
from tests import helpers


def _learner(transductive, steps=3):
    learner = km.MAML(helpers.small_convnet(seed=3), inner_learning_rate=0.5, inner_steps=1,
                      eval_inner_steps=steps, transductive_batch_norm=transductive)
    learner.compile(optimizer="adam", loss=helpers.sparse_ce())
    return learner


def test_support_statistics_mode_adapted_model_equals_learner_predictions(float64):
    episode = helpers.classification_episode(meta_batch=3, seed=9)
    learner = _learner(transductive=False)
    learner.train_on_batch(episode)
    predictions = learner.predict(episode, verbose=0).reshape(3, -1, 3)
    for t in range(3):
        adapted = learner.adapt(episode["support_x"][t], episode["support_y"][t])
        np.testing.assert_allclose(adapted.predict(episode["query_x"][t], verbose=0),
                                   predictions[t], rtol=1e-10, atol=1e-12)


def test_transductive_mode_normalises_query_with_its_own_statistics(float64):
    episode = helpers.classification_episode(meta_batch=1, seed=10)
    learner = _learner(transductive=True)
    sx, sy, qx = (episode[k][0] for k in ("support_x", "support_y", "query_x"))
    params = [tf.convert_to_tensor(v) for v in learner.model.trainable_variables]
    moving = [tf.convert_to_tensor(v) for v in learner.model.non_trainable_variables]
    fast = learner.adapt_parameters(params, moving, sx, sy, 3, training=True, create_graph=False)
    query_batch_stats = learner.model.stateless_call(fast, moving, qx, training=True)[0]
    np.testing.assert_allclose(learner.predict(episode, verbose=0), query_batch_stats, rtol=1e-10)
    # The adapted model carries the support moments: in inference mode it
    # reproduces the training-mode network on the support set exactly ...
    adapted = learner.adapt(sx, sy)
    support_batch_stats = learner.model.stateless_call(fast, moving, sx, training=True)[0]
    np.testing.assert_allclose(adapted.predict(sx, verbose=0), support_batch_stats, rtol=1e-10, atol=1e-12)
    # ... and normalises the query set with those support moments.
    support_moments = inner_loop.batch_moments(learner.model, fast, moving, sx)
    expected = learner.model.stateless_call(fast, support_moments, qx, training=False)[0]
    np.testing.assert_allclose(adapted.predict(qx, verbose=0), expected, rtol=1e-10, atol=1e-12)


def test_batch_moments_are_the_moments_of_the_batch(float64):
    model = helpers.small_convnet(seed=1)
    x = np.random.default_rng(0).normal(size=(7, 6, 6, 1))
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    moving = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    stats = inner_loop.batch_moments(model, params, moving, x)
    conv = model.layers[1]
    h = np.array(conv(x))
    np.testing.assert_allclose(stats[0], h.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats[1], h.var(axis=(0, 1, 2)), rtol=1e-12)
    # and momentum is restored afterwards
    assert model.layers[2].momentum == 0.99


def test_second_derivatives_through_batch_norm_are_exact(float64):
    """Keras' own moments (tf.nn.moments) give wrong Hessians; ours are exact."""
    model = helpers.small_convnet(seed=2)
    x = np.random.default_rng(1).normal(size=(6, 6, 6, 1))
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    moving = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    direction = [tf.constant(np.random.default_rng(2).normal(size=p.shape)) for p in params]

    def grad(p, exact):
        with tf.GradientTape() as tape:
            tape.watch(p)
            if exact:
                y = inner_loop.forward(model, p, moving, x, True)[0]
            else:
                y = model.stateless_call(p, moving, x, training=True)[0]
            loss = tf.reduce_sum(tf.sin(y))
        return tape.gradient(loss, p)

    def hvp(exact):
        with tf.GradientTape() as tape:
            tape.watch(params)
            g = grad(params, exact)
            dot = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, direction)])
        return tape.gradient(dot, params)

    eps = 1e-6
    plus = grad([p + eps * d for p, d in zip(params, direction)], True)
    minus = grad([p - eps * d for p, d in zip(params, direction)], True)
    numeric = np.concatenate([np.ravel((a - b) / (2 * eps)) for a, b in zip(plus, minus)])
    exact = np.concatenate([np.ravel(h) for h in hvp(True)])
    keras_own = np.concatenate([np.ravel(h) for h in hvp(False)])
    scale = np.linalg.norm(numeric)
    assert np.linalg.norm(exact - numeric) / scale < 1e-6
    assert np.linalg.norm(keras_own - numeric) / scale > 1e-3  # documents the TF behaviour
