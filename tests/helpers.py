"""Small models, episodes and references shared by the tests (most live in `keras_meta.testing`)."""

import tensorflow as tf

from keras_meta.testing import (  # noqa: F401  (re-exported for the tests)
    assert_matches_finite_differences,
    classification_episode,
    meta_gradient_by_update,
    regression_episode,
    small_convnet,
    sparse_ce,
    tanh_mlp,
    weights_of,
)


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
