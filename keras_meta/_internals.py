"""The TensorFlow internals keras_meta relies on, in one place.

Each use here reaches past TensorFlow's public API because no public route
exists; `tests/test_internals.py` fails when one of them breaks.

- `memory_optimizer_off()`: the configuration of the `tf.function` calls made
  inside it (`context.context().function_call_options` and its
  `_config_proto_serialized`), with Grappler's memory optimizer off.
"""

import contextlib

from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as _context


def _function_call_options():
    try:
        return _context.context().function_call_options
    except AttributeError as error:  # pragma: no cover - TensorFlow moved it
        raise ImportError(
            "keras_meta needs `tensorflow.python.eager.context.context()."
            "function_call_options` (TensorFlow 2.16-2.21 have it) to configure "
            f"its step functions; this TensorFlow lacks it: {error}"
        ) from error


@contextlib.contextmanager
def memory_optimizer_off():
    """Runs (and traces) `tf.function` calls with Grappler's memory optimizer off.

    Under memory pressure as Grappler estimates it statically (peak above
    80% of the device's memory, an estimate that grows with the inner steps,
    the shots and the image size), its memory optimizer rewrites `AddN` ops of
    more than two inputs into `TemporaryVariable` accumulators. Inside the
    gradient of a `tf.while_loop` whose body holds a gradient (second-order
    MAML with the inner loop as a while loop) the rewritten graph fails with
    `AlreadyExistsError: Resource .../AddN_27/tmp_var/frame:.../iter:2` (conv4
    with 84x84x3 inputs and max-pooling, 5-way 5-shot, 2 inner steps). The
    other passes of the memory optimizer only act on GPUs under the same
    pressure, or on nodes annotated for recomputation, which keras_meta does
    not make. The setting is thread-local and restored on exit.
    """
    options = _function_call_options()
    saved = options.config_proto_serialized
    if saved not in _NO_MEMORY_OPTIMIZER:
        config = config_pb2.ConfigProto()
        config.ParseFromString(saved or b"")
        config.graph_options.rewrite_options.memory_optimization = (
            rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
        )
        _NO_MEMORY_OPTIMIZER[saved] = config.SerializeToString(deterministic=True)
    # The public setter re-serializes a ConfigProto on every call; the
    # attribute behind it takes the serialized bytes as they are.
    options._config_proto_serialized = _NO_MEMORY_OPTIMIZER[saved]
    try:
        yield
    finally:
        options._config_proto_serialized = saved


# Serialized function-call configurations -> the same with the memory
# optimizer off.
_NO_MEMORY_OPTIMIZER = {}
