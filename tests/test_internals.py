"""The TensorFlow internals keras_meta relies on (keras_meta/_internals.py).

These tests fail when Keras or TensorFlow changes what they use, instead of
the library silently losing what they provide.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

import keras_meta as km
from keras_meta import _internals
from tests import helpers


def _current_config():
    config = config_pb2.ConfigProto()
    config.ParseFromString(_internals._function_call_options().config_proto_serialized)
    return config


def test_memory_optimizer_off_sets_and_restores_the_function_call_config():
    before = _current_config()
    with _internals.memory_optimizer_off():
        inside = _current_config()
        # Nested use is a no-op and keeps the setting.
        with _internals.memory_optimizer_off():
            assert _current_config() == inside
    assert (
        inside.graph_options.rewrite_options.memory_optimization
        == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    )
    assert _current_config() == before
    # Everything else of the configuration is kept.
    inside.graph_options.rewrite_options.ClearField("memory_optimization")
    assert inside.graph_options.rewrite_options == before.graph_options.rewrite_options
    assert inside.graph_options.ListFields()[1:] == before.graph_options.ListFields()[1:]
    inside.ClearField("graph_options")
    before.ClearField("graph_options")
    assert inside == before


def test_functions_called_inside_receive_the_config():
    # The config travels as the `config_proto` attribute of the call op that
    # a traced outer function makes to an inner one.
    @tf.function
    def inner(x):
        return x + 1.0

    @tf.function
    def outer(x):
        return inner(x)

    with _internals.memory_optimizer_off():
        graph = outer.get_concrete_function(tf.TensorSpec([], tf.float32)).graph
    calls = [op for op in graph.get_operations() if "PartitionedCall" in op.type]
    assert calls
    config = config_pb2.ConfigProto()
    config.ParseFromString(calls[0].get_attr("config_proto"))
    assert (
        config.graph_options.rewrite_options.memory_optimization
        == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    )


# ----------------------------------------------------------------------
# The exact BatchNorm moments.


def test_exact_moments_replace_keras_moments_inside_the_context_only():
    from keras.src.backend.tensorflow import nn as backend_nn

    original = backend_nn._compute_moments
    with _internals.exact_moments():
        assert backend_nn._compute_moments is _internals._moments
    assert backend_nn._compute_moments is original
    # Same values as Keras' own moments.
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 3)))
    for a, b in zip(_internals._moments(x, [0]), original(x, [0], False)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_exact_moments_fail_loudly_when_keras_moves_them(monkeypatch):
    from keras.src.backend.tensorflow import nn as backend_nn

    monkeypatch.setattr(_internals, "_MOMENTS_VERIFIED", [])
    # BatchNorm computing its moments some other way: the patch would do nothing.
    monkeypatch.setattr(backend_nn, "moments", lambda x, axes, keepdims=False, synchronized=False:
                        tf.nn.moments(x, axes, keepdims=keepdims))
    with pytest.raises(RuntimeError, match="no longer computes its moments with"):
        with _internals.exact_moments():
            pass
    # The function renamed away.
    monkeypatch.delattr(backend_nn, "_compute_moments")
    with pytest.raises(RuntimeError, match="has no `_compute_moments`"):
        with _internals.exact_moments():
            pass
    # And a learner with BatchNorm refuses to be built rather than train wrongly
    # (it checks when it is built: inside the first trace the check made the
    # step trace twice); one without BatchNorm does not need the patch.
    with pytest.raises(RuntimeError, match="cannot make Keras' BatchNormalization twice differentiable"):
        km.MAML(helpers.small_convnet(), inner_learning_rate=0.1)
    km.MAML(km.models.mlp(), inner_learning_rate=0.1)


def test_exact_moments_are_verified_once_per_process():
    with _internals.exact_moments():
        pass
    assert _internals._MOMENTS_VERIFIED


# ----------------------------------------------------------------------
# Keras' trainer, layers and losses.


def test_the_trainer_hooks_exist_and_run(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    calls = []
    for name in _internals.TRAINER_HOOKS:
        assert callable(getattr(trainer.TensorFlowTrainer, name))
        original = getattr(km.MetaLearner, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(km.MetaLearner, name, counting)
    learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    learner.compile(optimizer="sgd", loss="mse")
    learner.fit(km.data.sinusoid(meta_batch_size=2, seed=0), steps_per_epoch=1, verbose=0)
    assert set(calls) == set(_internals.TRAINER_HOOKS)


def test_first_batch_reads_keras_epoch_iterator():
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    dataset = tf.data.Dataset.range(5).batch(2)
    iterator = TFEpochIterator(x=dataset, distribute_strategy=tf.distribute.get_strategy())
    np.testing.assert_array_equal(_internals.first_batch(iterator), [0, 1])


def test_layer_and_trainer_internals():
    model = helpers.small_convnet()
    layers = _internals.sublayers(model)
    assert [type(layer).__name__ for layer in layers] == [
        "InputLayer", "Conv2D", "BatchNormalization", "Activation", "Flatten", "Dense"]
    assert _internals.model_supports_jit(model) is True
    assert _internals.call_has_training_arg(model) is True
    # The layer graph ANIL cuts.
    operation, node_index, _ = _internals.keras_history(model.outputs[0])
    assert operation is model.layers[-1]
    (features,) = _internals.inbound_tensors(operation, node_index)
    assert _internals.keras_history(features)[0] is model.layers[-2]
    # The compiled trainer's loss metric and metrics container.
    learner = km.MAML(model)
    learner.compile(optimizer="sgd", loss=helpers.sparse_ce(), metrics=["accuracy"])
    assert isinstance(_internals.loss_tracker(learner), keras.metrics.Mean)
    assert _internals.loss_tracker(learner).name == "loss"
    assert _internals.compile_metrics(learner) in learner.metrics
    assert _internals.loss_ignore_class(keras.losses.SparseCategoricalCrossentropy()) is None
    assert _internals.loss_ignore_class(keras.losses.SparseCategoricalCrossentropy(ignore_class=0)) == 0


def test_distribute_internals():
    assert _internals.in_multi_worker_mode(tf.distribute.get_strategy()) is False
    # The default strategy applies gradients without `merge_call`
    # (MirroredStrategy's merge path runs in tests/test_distributed.py).
    assert _internals.strategy_supports_no_merge_call() is True


def test_no_other_module_touches_private_keras_or_tensorflow_names():
    """Every private use is here: the other modules call `_internals`."""
    import pathlib
    import re

    package = pathlib.Path(km.__file__).parent
    pattern = re.compile(
        r"keras\.src|tf\.__internal__|tensorflow\.python|\._(flatten_layers|keras_history|"
        r"inbound_nodes|call_has_training_arg|compute_moments|loss_tracker|compile_metrics|"
        r"fn_kwargs|in_multi_worker_mode|distribute_strategy|resolve_auto_jit_compile)\b"
    )
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py") if path.name != "_internals.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line.split("#")[0])
    ]
    assert not offenders, offenders


def test_runtime_started_reads_tensorflows_context():
    tf.constant(1.0)  # starts the runtime if nothing had
    assert _internals.runtime_started()


def test_replaced_gradients_apply_inside_the_context_only():
    x = tf.constant(3.0)

    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.square(x)
        return float(tape.gradient(y, x))

    def doubled(op, grad, original):
        return 2 * original(op, grad)

    assert gradient() == 6.0
    with _internals.replaced_gradients({"Square": doubled}):
        assert gradient() == 12.0
        assert float(tf.function(_traced_square_gradient)(x)) == 12.0  # traced too
    assert gradient() == 6.0
    with pytest.raises(ValueError, match="no gradient for op types"):
        with _internals.replaced_gradients({"NoSuchOp": doubled}):
            pass


def _traced_square_gradient(x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.square(x)
    return tape.gradient(y, x)
