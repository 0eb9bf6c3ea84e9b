"""MAML's contract: state untouched by adaptation, execution modes agree, errors, learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers


_sce = helpers.sparse_ce


def test_inner_loop_never_assigns_variables():
    episode = helpers.classification_episode(meta_batch=2, dtype="float32")
    model = helpers.small_convnet()
    maml = km.MAML(model, inner_learning_rate=0.3, inner_steps=2)
    maml.compile(optimizer=keras.optimizers.SGD(0.0), loss=_sce(), metrics=["accuracy"])
    before = helpers.weights_of(model)
    maml.evaluate(episode, verbose=0)
    maml.predict(episode, verbose=0)
    maml.adapt(episode["support_x"][0], episode["support_y"][0])
    # A train step with a zero outer learning rate: whatever the inner loop
    # did, nothing may have been written (BatchNorm moving statistics included).
    maml.train_on_batch(episode)
    maml.fit(tf.data.Dataset.from_tensors(episode).repeat(), steps_per_epoch=2, verbose=0)
    for b, a in zip(before, helpers.weights_of(model)):
        np.testing.assert_array_equal(b, a)


def test_train_step_changes_only_trainable_weights():
    episode = helpers.classification_episode(meta_batch=2, dtype="float32")
    model = helpers.small_convnet()
    maml = km.MAML(model, inner_learning_rate=0.3)
    maml.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_sce())
    trainable = [np.array(v) for v in model.trainable_variables]
    moving = [np.array(v) for v in model.non_trainable_variables]
    maml.train_on_batch(episode)
    assert all(not np.allclose(b, np.array(a)) for b, a in zip(trainable, model.trainable_variables)
               if b.ndim > 1)
    for b, a in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(b, np.array(a))


@pytest.mark.parametrize("first_order, task_execution", [
    (False, "sequential"),
    pytest.param(True, "vectorized", marks=pytest.mark.large),   # the conformance suite
    pytest.param(False, "vectorized", marks=pytest.mark.large),  # covers these too
    pytest.param(True, "sequential", marks=pytest.mark.large),
])
def test_eager_function_and_xla_train_steps_agree(first_order, task_execution):
    episode = helpers.classification_episode(meta_batch=3, dtype="float32", seed=3)
    results = {}
    for mode in ("eager", "function", "xla"):
        maml = km.MAML(helpers.small_convnet(seed=5), inner_learning_rate=0.3, inner_steps=2,
                       first_order=first_order, task_execution=task_execution)
        maml.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sce(), metrics=["accuracy"],
                     run_eagerly=mode == "eager", jit_compile=mode == "xla")
        logs = [maml.train_on_batch(episode, return_dict=True) for _ in range(2)]
        results[mode] = (helpers.weights_of(maml.model), logs)
    for mode in ("function", "xla"):
        for a, b in zip(results["eager"][0], results[mode][0]):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        for la, lb in zip(results["eager"][1], results[mode][1]):
            assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
            assert la["accuracy"] == pytest.approx(lb["accuracy"])


def test_vectorized_and_sequential_agree(float64):
    episode = helpers.classification_episode(meta_batch=3, seed=8)
    grads = []
    for task_execution in ("vectorized", "sequential"):
        maml = km.MAML(helpers.small_convnet(seed=2), inner_learning_rate=0.3, inner_steps=2,
                       task_execution=task_execution)
        maml.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sce())
        grads.append(helpers.meta_gradient_by_update(maml, episode))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_no_retracing_after_the_first_step():
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    traces = []
    train_step = maml.train_step

    def counting_train_step(data):
        traces.append(1)  # Python side effect: runs once per trace
        return train_step(data)

    maml.train_step = counting_train_step
    episodes = km.data.sinusoid(meta_batch_size=4, seed=0)
    maml.fit(episodes, steps_per_epoch=5, epochs=2, verbose=0,
             validation_data=km.data.sinusoid(meta_batch_size=4, seed=1), validation_steps=2)
    maml.fit(episodes, steps_per_epoch=5, epochs=1, verbose=0)
    assert len(traces) == 1


def test_a_batch_norm_network_traces_its_first_step_once(monkeypatch):
    """The check that BatchNorm's moments go through keras_meta's exact moments
    builds a layer (variables): run inside the first trace, it made
    TensorFlow trace every BatchNorm learner's first step twice."""
    from keras_meta import _internals

    monkeypatch.setattr(_internals, "_MOMENTS_VERIFIED", [])  # as in a fresh process
    maml = km.MAML(helpers.small_convnet(seed=0), inner_learning_rate=0.1)
    maml.compile(optimizer="adam", loss=_sce())
    traces = []
    train_step = maml.train_step

    def counting_train_step(data):
        traces.append(1)
        return train_step(data)

    maml.train_step = counting_train_step
    maml.train_on_batch(helpers.classification_episode(meta_batch=2, dtype="float32", seed=0))
    assert len(traces) == 1 and _internals._MOMENTS_VERIFIED


def _graph_nodes(concrete):
    graph_def = concrete.graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


@pytest.mark.parametrize("task_execution,grows", [("sequential", False), ("vectorized", True)])
def test_inner_loop_graph_size_and_steps(task_execution, grows):
    """Task by task the inner steps are one `tf.while_loop`: the traced meta-step
    has as many ops for 2 inner steps as for 12 (and gives the same gradient as
    the unrolled steps: the BatchNorm finite-difference tests run this path)."""
    sizes = []
    for steps in (2, 12):
        maml = km.MAML(helpers.small_convnet(), inner_learning_rate=0.1, inner_steps=steps,
                       task_execution=task_execution)
        maml.compile(optimizer="sgd", loss=_sce())
        params, non_trainable = maml._meta_state()
        task = {k: tf.constant(v[0]) for k, v in helpers.classification_episode(dtype="float32").items()}
        concrete = tf.function(lambda: maml.task_train(params, non_trainable, task)["gradients"])
        sizes.append(_graph_nodes(concrete.get_concrete_function()))
    assert (sizes[1] > 2 * sizes[0]) == grows, sizes


@pytest.mark.auto_xla
def test_auto_jit_compile_uses_xla_for_dense_networks_only():
    """`jit_compile="auto"`: XLA for dense networks (faster on CPU, see
    docs/performance.md), Keras' rule for conv nets; an explicit value wins."""
    dense = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    dense.compile(optimizer="adam", loss="mse")
    assert dense.jit_compile is True
    conv = km.MAML(helpers.small_convnet(), inner_learning_rate=0.1)
    conv.compile(optimizer="sgd", loss=_sce())
    assert conv.jit_compile is False
    plain = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    plain.compile(optimizer="adam", loss="mse", jit_compile=False)
    assert plain.jit_compile is False
    # The XLA step is the same step.
    episode = next(iter(km.data.sinusoid(meta_batch_size=4, seed=0)))
    for learner in (dense, plain):
        learner.train_on_batch(episode)
    for a, b in zip(helpers.weights_of(dense.model), helpers.weights_of(plain.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_predict_returns_one_row_per_query_example():
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    episodes = km.data.sinusoid(k_shot=5, q_query=7, meta_batch_size=3, seed=0).take(2)
    predictions = maml.predict(episodes, verbose=0)
    assert predictions.shape == (2 * 3 * 7, 1)
    # ... in the order of the query examples, task by task.
    first = next(iter(episodes))
    direct = maml(first)
    np.testing.assert_allclose(predictions[:21], np.reshape(direct, (21, 1)), rtol=1e-6)


def test_sinusoid_meta_training_lowers_post_adaptation_mse():
    """A real threshold: trained MAML adapts far better than before training."""
    keras.utils.set_random_seed(0)
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01, inner_steps=1,
                   eval_inner_steps=5)
    # 25 meta-steps per call of the train function: the 1,500 steps without
    # 1,500 calls' overhead (Keras' own loop over steps).
    maml.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=25)
    held_out = km.data.sinusoid(k_shot=10, q_query=10, meta_batch_size=100, seed=99).take(2)
    untrained = maml.evaluate(held_out, verbose=0, return_dict=True)
    maml.fit(km.data.sinusoid(k_shot=10, q_query=10, meta_batch_size=25, seed=0),
             steps_per_epoch=1500, epochs=1, verbose=0)
    trained = maml.evaluate(held_out, verbose=0, return_dict=True)
    # Before training: post-adaptation MSE of an untrained net is ~ the
    # variance of the targets (~4); after 1500 meta-steps it must be far lower,
    # and adaptation itself must help.
    assert untrained["loss"] > 2.5, untrained
    assert trained["loss"] < 0.5 * untrained["loss"], (untrained, trained)
    assert trained["loss"] < 0.8 * trained["pre_adaptation_loss"], trained


# ----------------------------------------------------------------------
# Bad input: clear errors that name the problem.


def _learner(**kwargs):
    maml = km.MAML(km.models.mlp(seed=0), **kwargs)
    maml.compile(optimizer="sgd", loss="mse")
    return maml


def _episode(**overrides):
    episode = next(iter(km.data.sinusoid(k_shot=4, q_query=3, meta_batch_size=2, seed=0)))
    episode = {k: np.array(v) for k, v in episode.items()}
    episode.update(overrides)
    return {k: v for k, v in episode.items() if v is not None}


def test_missing_episode_key_is_named():
    with pytest.raises(ValueError, match=r"missing key\(s\) \['query_y'\]"):
        _learner().train_on_batch(_episode(query_y=None))


def test_non_dict_episode_is_rejected():
    with pytest.raises(ValueError, match="expects episodes as dicts"):
        _learner().train_on_batch(np.zeros((2, 4, 1)))


def test_support_query_meta_batch_mismatch():
    bad = _episode(query_x=np.zeros((3, 3, 1), "float32"), query_y=np.zeros((3, 3, 1), "float32"))
    with pytest.raises(ValueError, match="share the meta-batch size"):
        _learner().train_on_batch(bad)


def test_support_examples_mismatch():
    bad = _episode(support_y=np.zeros((2, 5, 1), "float32"))
    with pytest.raises(ValueError, match="`support_x` and `support_y` must hold the same number"):
        _learner().evaluate(bad, verbose=0)


def test_episode_without_meta_batch_axis():
    bad = _episode(support_y=np.zeros((4,), "float32"))
    with pytest.raises(ValueError, match=r"`support_y` must have shape \[meta_batch, examples"):
        _learner().train_on_batch(bad)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, None])
def test_inner_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match="`inner_steps` must be a positive integer. Received: inner_steps="):
        km.MAML(km.models.mlp(), inner_steps=steps)


@pytest.mark.parametrize("rate", [0, -0.1, float("nan"), "0.1"])
def test_inner_learning_rate_must_be_positive(rate):
    with pytest.raises(ValueError, match="`inner_learning_rate` must be a positive number"):
        km.MAML(km.models.mlp(), inner_learning_rate=rate)


def test_eval_inner_steps_and_scaling_are_checked():
    with pytest.raises(ValueError, match="`eval_inner_steps` must be a positive integer"):
        km.MAML(km.models.mlp(), eval_inner_steps=0)
    with pytest.raises(ValueError, match="`inner_learning_rate_scaling` must be one of"):
        km.MAML(km.models.mlp(), inner_learning_rate_scaling="sqrt")
    with pytest.raises(ValueError, match="`task_execution` must be one of"):
        km.MAML(km.models.mlp(), task_execution="parallel")


def test_unbuilt_model_is_rejected():
    model = keras.Sequential([keras.layers.Dense(3)], name="not_built_yet")
    with pytest.raises(ValueError, match="needs a built model.*'not_built_yet'"):
        km.MAML(model)


def test_non_model_is_rejected():
    with pytest.raises(TypeError, match="wraps a `keras.Model`"):
        km.MAML(keras.layers.Dense(3))


def test_fit_without_loss_says_compile():
    maml = km.MAML(km.models.mlp())
    maml.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="needs a loss"):
        maml.train_on_batch(_episode())


def test_adapt_checks_support_shapes():
    with pytest.raises(ValueError, match="same number of examples"):
        _learner().adapt(np.zeros((4, 1), "float32"), np.zeros((5, 1), "float32"))
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        _learner().adapt(np.zeros((4, 1), "float32"), np.zeros((4, 1), "float32"), steps=0)


@keras.saving.register_keras_serializable(package="keras_meta_tests")
class TwoLayer(keras.Model):
    """A subclassed model whose `call` takes no `training` argument."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_model_trains_adapts_and_saves(tmp_path):
    model = TwoLayer()
    model(np.zeros((1, 1), "float32"))
    maml = km.MAML(model, inner_learning_rate=0.05, inner_steps=2)
    maml.compile(optimizer="adam", loss="mse")
    episodes = km.data.sinusoid(meta_batch_size=4, seed=0)
    maml.fit(episodes, steps_per_epoch=3, verbose=0)
    episode = {k: np.array(v) for k, v in next(iter(episodes)).items()}
    adapted = maml.adapt(episode["support_x"][0], episode["support_y"][0])
    assert isinstance(adapted, TwoLayer) and adapted is not model
    np.testing.assert_allclose(adapted.predict(episode["query_x"][0], verbose=0),
                               maml.predict({k: v[:1] for k, v in episode.items()}, verbose=0),
                               rtol=1e-5, atol=1e-6)
    maml.save(tmp_path / "subclassed.keras")
    loaded = keras.saving.load_model(tmp_path / "subclassed.keras")
    np.testing.assert_allclose(loaded.predict(episode, verbose=0), maml.predict(episode, verbose=0),
                               rtol=1e-6)
