"""Small models, episodes and references shared by the tests."""

import keras
import numpy as np
import tensorflow as tf


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


def meta_loss(learner, params, episode, steps=None):
    """The meta-training objective at `params`: mean over tasks of the query
    loss after `steps` differentiable inner steps (training-mode network)."""
    steps = learner.inner_steps if steps is None else steps
    non_trainable = [tf.convert_to_tensor(v) for v in learner.model.non_trainable_variables]
    losses = []
    for t in range(episode["support_x"].shape[0]):
        task = {key: tf.convert_to_tensor(value[t]) for key, value in episode.items()}
        fast = learner.adapt_parameters(
            params, non_trainable, task["support_x"], task["support_y"], steps,
            training=True, create_graph=True,
        )
        loss, _ = learner.query_loss(fast, non_trainable, task, True)
        losses.append(loss)
    return tf.add_n(losses) / len(losses)


def meta_gradient_by_update(learner, episode):
    """The meta-gradient a train step applies: SGD(lr=1) weight change."""
    before = [np.array(v) for v in learner.model.trainable_variables]
    learner.train_on_batch(episode)
    after = [np.array(v) for v in learner.model.trainable_variables]
    return [b - a for b, a in zip(before, after)]
