"""The TensorFlow internals keras_meta relies on (keras_meta/_internals.py).

These tests fail when TensorFlow changes what they use, instead of the
library silently losing what they provide.
"""

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

from keras_meta import _internals


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
