"""The private Keras and TensorFlow APIs keras_meta relies on, in one place.

Each use here reaches past the public API because no public route exists.
Nothing else in keras_meta touches a private name of Keras or TensorFlow:
`tests/test_internals.py` checks every entry below and fails when one breaks,
and the ones that carry correctness fail loudly at first use instead of
degrading silently.

- `memory_optimizer_off()`: the configuration of the `tf.function` calls made
  inside it (`context.context().function_call_options` and its
  `_config_proto_serialized`), with Grappler's memory optimizer off.
- `exact_moments()`: Keras' batch moments (`keras.src.backend.tensorflow.nn.
  _compute_moments`) replaced by twice-differentiable ones; verified on first
  use, an error if Keras no longer routes BatchNorm through them.
- `first_batch(iterator)`: the first batch of Keras' TensorFlow epoch iterator
  (`(begin, end, iterator)` triples), for the learners' override of the
  trainer hook `_maybe_symbolic_build` (`TRAINER_HOOKS`).
- `sublayers(model)`: `Layer._flatten_layers`, every layer of a model.
- `model_supports_jit(model)`: `keras.src.trainers.trainer.model_supports_jit`.
- `call_has_training_arg(model)`: `Layer._call_has_training_arg`.
- `loss_tracker(model)`, `compile_metrics(model)`: the trainer's `_loss_tracker`
  and `_compile_metrics`.
- `keras_history(tensor)`, `inbound_tensors(operation, node_index)`: the layer
  graph of a functional model (`_keras_history`, `_inbound_nodes`), which ANIL
  cuts into body and head.
- `loss_ignore_class(loss)`: `SparseCategoricalCrossentropy._fn_kwargs`.
- `in_multi_worker_mode(strategy)`: `strategy.extended._in_multi_worker_mode()`.
- `strategy_supports_no_merge_call()`: `tf.__internal__.distribute`.
- `replaced_gradients(gradients)`: TensorFlow's gradient registry
  (`tensorflow.python.framework.ops.gradient_registry._registry`), whose
  entries `tf.GradientTape` looks up by op type; `keras_meta.tflite` writes
  some gradients in TensorFlow Lite builtin ops while it traces.
"""

import contextlib

import keras
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as _context

# Keras trainer hooks (private methods) that `MetaLearner` overrides: if Keras
# renamed one, the override would silently stop running. The test suite checks
# that Keras still defines and calls each.
TRAINER_HOOKS = ("_maybe_symbolic_build",)

# ----------------------------------------------------------------------
# Grappler's memory optimizer.


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

# ----------------------------------------------------------------------
# Twice-differentiable BatchNorm moments.


def _moments(x, axes, keepdims=False):
    # tf.nn.moments computes the variance around `stop_gradient(mean)`: exact
    # first derivatives, wrong second derivatives (the mean's dependence on
    # the inputs drops out of the Hessian). Same values, exact derivatives.
    _MOMENTS_CALLS[0] += 1
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


_MOMENTS_CALLS = [0]
_MOMENTS_VERIFIED = []


def _backend_nn():
    """Keras' TensorFlow `nn` module, checked to hold `_compute_moments`."""
    try:
        from keras.src.backend.tensorflow import nn as backend_nn
    except ImportError as error:  # pragma: no cover - Keras moved its internals
        raise _moments_error(f"cannot import keras.src.backend.tensorflow.nn ({error})") from error
    if not callable(getattr(backend_nn, "_compute_moments", None)):
        raise _moments_error("keras.src.backend.tensorflow.nn has no `_compute_moments`")
    return backend_nn


def _moments_error(cause):
    return RuntimeError(
        "keras_meta cannot make Keras' BatchNormalization twice differentiable "
        f"with this Keras ({keras.__version__}): {cause}. Second-order "
        "meta-gradients through BatchNorm (MAML, ANIL, iMAML's Hessian-vector "
        "products) would be wrong, so keras_meta refuses to run them. Install "
        "a Keras version in the range setup.cfg pins, or remove BatchNorm."
    )


@contextlib.contextmanager
def _patched_moments(backend_nn):
    original = backend_nn._compute_moments
    backend_nn._compute_moments = _moments
    try:
        yield
    finally:
        backend_nn._compute_moments = original


def _verify_moments(backend_nn):
    """Checks once that a BatchNorm layer computes its moments through the patch."""
    with tf.init_scope(), _patched_moments(backend_nn):
        before = _MOMENTS_CALLS[0]
        layer = keras.layers.BatchNormalization()
        layer(tf.constant([[0.0, 1.0], [2.0, 5.0]]), training=True)
        if _MOMENTS_CALLS[0] == before:
            raise _moments_error(
                "BatchNormalization no longer computes its moments with "
                "`keras.src.backend.tensorflow.nn._compute_moments`"
            )
    _MOMENTS_VERIFIED.append(True)


def verify_exact_moments():
    """Runs the check of `exact_moments` now, once per process.

    The check builds a BatchNormalization layer (variables): run inside the
    first trace of a `tf.function`, that would make TensorFlow trace the
    function twice. The learners call this eagerly when they are built.
    """
    if not _MOMENTS_VERIFIED:
        _verify_moments(_backend_nn())


@contextlib.contextmanager
def exact_moments():
    """Makes Keras BatchNorm twice differentiable while the context is open.

    Keras' TensorFlow backend computes batch moments with `tf.nn.moments`,
    whose variance treats the mean as a constant (`stop_gradient`). Its
    forward values and first derivatives are exact, but second derivatives
    through BatchNorm (which second-order MAML and iMAML's Hessian-vector
    products need) are wrong. Inside this context Keras' moments are computed
    without the `stop_gradient`: the same values, exact derivatives of every
    order. On first use it checks that a BatchNormalization layer really
    computes its moments through the replacement, and raises a RuntimeError
    if not (the replacement would otherwise do nothing, silently).
    """
    backend_nn = _backend_nn()
    if not _MOMENTS_VERIFIED:
        _verify_moments(backend_nn)
    with _patched_moments(backend_nn):
        yield


# ----------------------------------------------------------------------
# Keras trainer, layers and losses.


def first_batch(iterator):
    """The first batch of the epoch iterator Keras' TF trainer passes to
    `_maybe_symbolic_build` (it yields `(begin_step, end_step, iterator)`)."""
    for _, _, batches in iterator:
        return next(batches)
    return None


def sublayers(model):
    """Every layer inside `model`, recursively (not `model` itself)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def model_supports_jit(model):
    """Keras' own test of whether XLA can compile `model`'s layers."""
    from keras.src.trainers import trainer

    return trainer.model_supports_jit(model)


def call_has_training_arg(model):
    """Whether `model.call` takes `training` (None when Keras does not say)."""
    return getattr(model, "_call_has_training_arg", None)


def loss_tracker(model):
    """The compiled model's `loss` metric (a `keras.metrics.Mean`)."""
    return model._loss_tracker


def compile_metrics(model):
    """The compiled metrics container (None without `metrics=`)."""
    return model._compile_metrics


def keras_history(tensor):
    """`(operation, node_index, tensor_index)` of a functional model's tensor."""
    return tensor._keras_history


def inbound_tensors(operation, node_index):
    """The input tensors of `operation`'s call number `node_index`."""
    return operation._inbound_nodes[node_index].input_tensors


def loss_ignore_class(loss):
    """`ignore_class` of a `SparseCategoricalCrossentropy` instance."""
    return getattr(loss, "_fn_kwargs", {}).get("ignore_class")


# ----------------------------------------------------------------------
# tf.distribute.


def in_multi_worker_mode(strategy):
    """Whether a `MultiWorkerMirroredStrategy` spans several workers."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def strategy_supports_no_merge_call():
    """Whether the current strategy runs `apply_gradients` without `merge_call`."""
    return tf.__internal__.distribute.strategy_supports_no_merge_call()


def runtime_started():
    """Whether TensorFlow's eager runtime has started (its thread pools are then fixed).

    Reads TensorFlow's private context (`context_safe()._context_handle`,
    which `tf.config.threading`'s setters check themselves).
    """
    current = _context.context_safe()
    return current is not None and getattr(current, "_context_handle", None) is not None


# ----------------------------------------------------------------------
# Gradient functions of TensorFlow ops.


@contextlib.contextmanager
def replaced_gradients(gradients):
    """Differentiates some op types with other gradient functions while open.

    `gradients` maps op types to `fn(op, grad, original)`, `original` being
    TensorFlow's registered gradient of that op type. `tf.GradientTape` looks
    gradients up by op type when it differentiates (eager) or traces the
    backward pass (in a `tf.function`); no public API replaces a registered
    gradient (`tf.RegisterGradient` refuses a name already taken, and tapes
    ignore `Graph.gradient_override_map`). The registry is restored on exit.
    """
    from tensorflow.python.framework import ops as tf_ops

    try:
        registry = tf_ops.gradient_registry._registry
        entries = {name: registry[name] for name in gradients if name in registry}
        originals = {name: entry["type"] for name, entry in entries.items()}
    except (AttributeError, KeyError, TypeError) as error:  # pragma: no cover - TF moved it
        raise ImportError(
            "keras_meta needs TensorFlow's gradient registry "
            "(`tensorflow.python.framework.ops.gradient_registry._registry`, a "
            "dict of {'type': function} entries by op type; TensorFlow 2.16-2.21 "
            f"have it) to replace gradients; this TensorFlow lacks it: {error!r}"
        ) from error
    missing = sorted(set(gradients) - set(entries))
    if missing:
        raise ValueError(f"TensorFlow registers no gradient for op types {missing}")
    try:
        for name, gradient in gradients.items():
            registry[name] = dict(
                entries[name],
                type=lambda op, *grads, g=gradient, o=originals[name]: g(op, *grads, o),
            )
        yield
    finally:
        registry.update(entries)
