"""Mixed precision: `keras.mixed_precision` policies through the inner loop and the meta-gradient.

On CPU: `mixed_bfloat16` (the policy for CPUs with bfloat16 units) for every
learner, and `mixed_float16` on the sinusoid MLP for the loss-scaling path
(`compile` wraps the optimizer in a `LossScaleOptimizer`; the learner must
differentiate the scaled meta-loss, or every update is divided by the scale).

Tolerance: bfloat16 keeps 8 significant bits (unit roundoff 2**-8 = 0.39%).
On the sinusoid MLP the meta-gradients of MAML, FOMAML, ANIL and iMAML under
`mixed_bfloat16` differ from float32's by 0.3-1.3% (relative L2 norm, measured);
the tests allow 5% (13 unit roundoffs: a meta-gradient composes several
backward passes). Conv nets with BatchNorm lose more (docs/performance.md):
their closeness is not asserted, their training and export are.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers

BF16_META_GRADIENT_RTOL = 0.05

LEARNERS = {
    "maml": lambda m: km.MAML(m, inner_learning_rate=0.01, inner_steps=2),
    "fomaml": lambda m: km.MAML(m, inner_learning_rate=0.01, first_order=True),
    "anil": lambda m: km.ANIL(m, inner_learning_rate=0.01, inner_steps=3),
    "imaml": lambda m: km.IMAML(m, inner_learning_rate=0.01, inner_steps=4, cg_iterations=3,
                                task_execution="sequential"),  # (traces faster)
}


@pytest.fixture
def policy():
    """Sets a global dtype policy for the test; restores float32 after."""
    previous = keras.config.dtype_policy()

    def set_policy(name):
        keras.config.set_dtype_policy(name)

    yield set_policy
    keras.config.set_dtype_policy(previous)


def _sinusoid_episode(seed=0):
    episode = helpers.regression_episode(meta_batch=4, k=10, q=10, features=1, seed=seed,
                                         dtype="float32")
    return {k: tf.constant(v) for k, v in episode.items()}


def _flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).ravel() for t in tensors])


def _meta_gradient(name, policy_name, policy, episode):
    policy(policy_name)
    learner = LEARNERS[name](km.models.mlp(seed=0))
    learner.compile(optimizer="sgd", loss="mse")
    params, non_trainable = learner._meta_state()
    gradients, results, non_finite = tf.function(learner.meta_gradients)(
        params, non_trainable, episode)
    assert all(g.dtype == tf.float32 for g in gradients)  # float32 weights, float32 gradients
    assert int(non_finite) == 0
    return _flat(gradients), learner


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_bfloat16_meta_gradients_are_close_to_float32(name, policy):
    episode = _sinusoid_episode()
    reference, _ = _meta_gradient(name, "float32", policy, episode)
    mixed, learner = _meta_gradient(name, "mixed_bfloat16", policy, episode)
    assert learner.model.layers[-1].compute_dtype == "bfloat16"  # the network ran in bfloat16
    assert all(v.dtype == "float32" for v in learner.model.trainable_variables)
    error = np.linalg.norm(mixed - reference) / np.linalg.norm(reference)
    assert 0 < error < BF16_META_GRADIENT_RTOL, error


def test_task_losses_are_computed_in_float32(policy):
    policy("mixed_bfloat16")
    learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    learner.compile(optimizer="sgd", loss="mse")
    y_pred = tf.constant([[0.1234567], [0.7654321]], tf.bfloat16)
    loss = learner.compute_task_loss(tf.constant([[0.0], [1.0]]), y_pred)
    assert loss.dtype == tf.float32
    expected = np.mean((np.array([0.1234567, 0.7654321 - 1.0], np.float32)
                        .astype(tf.bfloat16.as_numpy_dtype).astype(np.float32)) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["maml", pytest.param("anil", marks=pytest.mark.large),
                                  pytest.param("fomaml", marks=pytest.mark.large),
                                  pytest.param("imaml", marks=pytest.mark.large)])
def test_bfloat16_conv4_trains_saves_and_exports(name, policy, tmp_path):
    """28x28 inputs: on 8x8 ones (1x1 maps after three strided convolutions)
    TensorFlow's bfloat16 filter gradient on this CPU returned NaN in about 2%
    of calls, with plain Keras training too."""
    policy("mixed_bfloat16")
    model = km.models.conv4(3, filters=8, input_shape=(28, 28, 1), seed=0)
    learner = {"maml": lambda m: km.MAML(m, inner_learning_rate=0.4, inner_steps=1),
               "fomaml": lambda m: km.MAML(m, inner_learning_rate=0.4, first_order=True),
               "anil": lambda m: km.ANIL(m, inner_learning_rate=0.4, inner_steps=2),
               "imaml": lambda m: km.IMAML(m, inner_learning_rate=0.1, inner_steps=2,
                                           cg_iterations=2)}[name](model)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3), loss=helpers.sparse_ce(),
                    metrics=["accuracy"])
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, shape=(28, 28, 1),
                                             dtype="float32", seed=1)
    losses = [learner.train_on_batch(episode, return_dict=True) for _ in range(12)]
    assert all(logs["non_finite_tasks"] == 0 for logs in losses)
    assert losses[-1]["loss"] < losses[0]["loss"]  # the same episode: meta-training fits it
    assert all(v.dtype == "float32" for v in learner.model.trainable_variables)

    predictions = learner.predict(episode, verbose=0)
    assert predictions.dtype == np.float32 and np.all(np.isfinite(predictions))
    path = str(tmp_path / "learner.keras")
    learner.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.model.layers[-1].dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_allclose(loaded.predict(episode, verbose=0), predictions, rtol=1e-6,
                               atol=1e-6)

    adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0])
    assert adapted.layers[-1].dtype_policy.name == "mixed_bfloat16"
    export_dir = str(tmp_path / "adapted")
    adapted.export(export_dir, verbose=False)
    reloaded = tf.saved_model.load(export_dir)  # (kept: its functions reference its variables)
    served = reloaded.serve(tf.constant(episode["query_x"][0]))
    np.testing.assert_allclose(np.asarray(served, np.float32),
                               np.asarray(adapted.predict(episode["query_x"][0], verbose=0),
                                          np.float32), rtol=1e-2, atol=1e-2)
    km.export_adaptive(learner, str(tmp_path / "adaptive"))


def test_mixed_float16_meta_gradient_is_loss_scaled_and_applied_unscaled(policy):
    """`compile` wraps the optimizer in a LossScaleOptimizer: the learner
    differentiates the scaled meta-loss, and the update equals float32's."""
    episode = _sinusoid_episode(seed=3)
    updates = {}
    for name in ("float32", "mixed_float16"):
        policy(name)
        learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01, inner_steps=1)
        learner.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = _flat(learner.model.trainable_variables)
        logs = learner.train_on_batch({k: v.numpy() for k, v in episode.items()}, return_dict=True)
        assert logs["non_finite_tasks"] == 0
        updates[name] = _flat(learner.model.trainable_variables) - before
        if name == "mixed_float16":
            assert isinstance(learner.optimizer, keras.optimizers.LossScaleOptimizer)
            assert float(learner.optimizer.dynamic_scale) > 1  # the loss was scaled
    error = np.linalg.norm(updates["mixed_float16"] - updates["float32"]) / np.linalg.norm(
        updates["float32"])
    assert error < 0.02, error  # float16: 11 significant bits


def test_loss_scale_factor_of_a_plain_optimizer_is_honoured():
    """Keras optimizers divide gradients by `loss_scale_factor`: the learner scales the loss."""
    episode = {k: v.numpy() for k, v in _sinusoid_episode(seed=4).items()}
    updates = []
    for factor in (None, 128.0):
        learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
        learner.compile(optimizer=keras.optimizers.SGD(0.1, loss_scale_factor=factor), loss="mse")
        before = _flat(learner.model.trainable_variables)
        learner.train_on_batch(episode)
        updates.append(_flat(learner.model.trainable_variables) - before)
    np.testing.assert_allclose(updates[1], updates[0], rtol=1e-4, atol=1e-9)


def test_loss_scale_optimizer_skips_an_overflowing_step_and_lowers_its_scale(policy):
    policy("mixed_float16")
    learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    learner.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0 ** 60), loss="mse")
    before = _flat(learner.model.trainable_variables)
    episode = {k: v.numpy() for k, v in _sinusoid_episode(seed=5).items()}
    learner.train_on_batch(episode)
    np.testing.assert_array_equal(_flat(learner.model.trainable_variables), before)  # skipped
    assert float(learner.optimizer.dynamic_scale) < 2.0 ** 60  # and the scale came down
