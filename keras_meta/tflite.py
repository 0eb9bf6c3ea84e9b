"""TensorFlow Lite export of few-shot adaptation: adapt on the device.

`export_tflite` writes a `.tflite` file with two signatures:

- `adapt_and_predict(support_x, support_y, query_x)`: the learner's
  test-time adaptation (the same `keras_meta.adaptation.Adaptation` that
  `learner.predict` runs: its inner optimiser and step size, its BatchNorm
  policy, its `finalize`), unrolled for a fixed number of inner steps, then
  the query predictions;
- `predict(x)`: the meta-learned model without adaptation.

The inner gradients are part of the file. TensorFlow's own gradients of
ReLU (`ReluGrad`), ELU, tanh, sigmoid, max- and average-pooling
(`MaxPoolGrad`, `AvgPoolGrad`) and of a convolution's filter
(`Conv2DBackpropFilter`) have no TensorFlow Lite builtin, so while the
adaptation is traced `builtin_gradients()` replaces them by the same
derivatives written with builtin ops (`SELECT_V2`, `EQUAL`, `MUL`, `PAD`,
`STRIDED_SLICE`, `CONCATENATION`, `PACK`, `BATCH_MATMUL`); the input gradient
of a convolution already converts to `TRANSPOSE_CONV`. MAML and ANIL on conv4
(strided or max-pooled) and MLPs then convert to builtin ops only, and run in
any TensorFlow Lite runtime without the Select TF ops (Flex) delegate.
"""

import contextlib
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_meta import _internals
from keras_meta.validation import check_choice, check_positive_int

QUANTIZATIONS = (None, "dynamic_range", "float16")


# ----------------------------------------------------------------------
# Gradients written with TensorFlow Lite builtin ops.


def _relu_gradient(op, grad):
    # TensorFlow's `ReluGrad`: the gradient where the output is positive.
    return tf.where(op.outputs[0] > 0, grad, tf.zeros_like(grad))


def _tanh_gradient(op, grad):
    y = op.outputs[0]
    return grad * (1 - y * y)


def _sigmoid_gradient(op, grad):
    y = op.outputs[0]
    return grad * y * (1 - y)


def _conv2d_gradient(op, grad, original):
    """Conv2D's gradients: the input's as TensorFlow writes it (it converts to
    TRANSPOSE_CONV), the filter's as one matrix product of image patches."""
    x, kernel = op.inputs
    data_format, padding = _attr(op, "data_format"), _attr(op, "padding")
    static = x.shape[1:].is_fully_defined() and kernel.shape.is_fully_defined()
    dilated = list(op.get_attr("dilations")) != [1, 1, 1, 1]
    if data_format != "NHWC" or padding not in ("SAME", "VALID", "EXPLICIT") or not static or dilated:
        return original(op, grad)
    input_gradient = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x), filter=kernel, out_backprop=grad,
        strides=op.get_attr("strides"), padding=padding,
        explicit_paddings=op.get_attr("explicit_paddings"),
        dilations=op.get_attr("dilations"), data_format=data_format,
        use_cudnn_on_gpu=op.get_attr("use_cudnn_on_gpu"),
    )
    return [input_gradient, _conv2d_filter_gradient(op, x, kernel, grad, padding)]


def _conv2d_filter_gradient(op, x, kernel, grad, padding):
    """`Conv2DBackpropFilter` as PAD, STRIDED_SLICE, CONCATENATION, BATCH_MATMUL."""
    kh, kw, channels, filters = kernel.shape
    _, sh, sw, _ = op.get_attr("strides")
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = grad.shape[1], grad.shape[2]
    if padding == "VALID":
        pads = [(0, 0), (0, 0)]
    elif padding == "EXPLICIT":
        explicit = list(op.get_attr("explicit_paddings"))
        pads = [tuple(explicit[2:4]), tuple(explicit[4:6])]
    else:
        pads = []
        for size, out, stride, k in ((height, out_h, sh, kh), (width, out_w, sw, kw)):
            total = max((out - 1) * stride + k - size, 0)
            pads.append((total // 2, total - total // 2))
    padded = tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]])
    patches = []
    for i in range(kh):
        for j in range(kw):
            patches.append(padded[
                :,
                i: i + (out_h - 1) * sh + 1: sh,
                j: j + (out_w - 1) * sw + 1: sw,
                :,
            ])
    # [examples * out_h * out_w, kh * kw * channels], rows (i, j, channel).
    columns = tf.reshape(tf.concat(patches, axis=-1), [-1, kh * kw * channels])
    products = tf.matmul(columns, tf.reshape(grad, [-1, filters]), transpose_a=True)
    return tf.reshape(products, [kh, kw, channels, filters])


def _attr(op, name):
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _pool_windows(op):
    """(kh, kw) of a non-overlapping VALID NHWC pooling with static shapes, else None."""
    ksize, strides = list(op.get_attr("ksize")), list(op.get_attr("strides"))
    if (_attr(op, "data_format") != "NHWC" or _attr(op, "padding") != "VALID"
            or ksize != strides or ksize[0] != 1 or ksize[3] != 1
            or not op.inputs[0].shape[1:].is_fully_defined()):
        return None
    return ksize[1], ksize[2]


def _unpool(parts, x, out_h, out_w, kh, kw):
    """The input gradient from `parts[i][j]`, the gradient at window position
    (i, j) of every window: interleaving reshapes, zeros where VALID pooling
    left rows or columns out."""
    channels = x.shape[-1]
    rows = []
    for row in parts:
        # [N, out_h, out_w, kw, C] -> [N, out_h, out_w * kw, C]: columns b * kw + j.
        rows.append(tf.reshape(tf.stack(row, axis=3), [-1, out_h, out_w * kw, channels]))
    # [N, out_h, kh, out_w * kw, C] -> [N, out_h * kh, out_w * kw, C]: rows a * kh + i.
    dx = tf.reshape(tf.stack(rows, axis=2), [-1, out_h * kh, out_w * kw, channels])
    return tf.pad(dx, [[0, 0], [0, x.shape[1] - out_h * kh], [0, x.shape[2] - out_w * kw], [0, 0]])


def _max_pool_gradient(op, grad, original):
    """MaxPool's gradient (non-overlapping windows, VALID, NHWC) as EQUAL,
    SELECT_V2 and reshapes: each window's gradient goes to its first maximum in
    row-major order, where TensorFlow's `MaxPoolGrad` sends it."""
    windows = _pool_windows(op)
    if windows is None:
        return original(op, grad)
    (kh, kw), x, y = windows, op.inputs[0], op.outputs[0]
    out_h, out_w = y.shape[1], y.shape[2]
    taken, parts = None, []
    for i in range(kh):
        parts.append([])
        for j in range(kw):
            window = x[:, i: i + (out_h - 1) * kh + 1: kh, j: j + (out_w - 1) * kw + 1: kw, :]
            first = tf.equal(window, y)
            if taken is not None:
                first = tf.logical_and(first, tf.logical_not(taken))
            taken = first if taken is None else tf.logical_or(taken, first)
            parts[-1].append(tf.where(first, grad, tf.zeros_like(grad)))
    return _unpool(parts, x, out_h, out_w, kh, kw)


def _avg_pool_gradient(op, grad, original):
    """AvgPool's gradient (non-overlapping windows, VALID, NHWC): each window's
    gradient shared evenly by its inputs (TensorFlow: `AvgPoolGrad`)."""
    windows = _pool_windows(op)
    if windows is None:
        return original(op, grad)
    kh, kw = windows
    share = grad / tf.cast(kh * kw, grad.dtype)
    return _unpool([[share] * kw] * kh, op.inputs[0], grad.shape[1], grad.shape[2], kh, kw)


def _elu_gradient(op, grad):
    # TensorFlow's `EluGrad`: 1 where the output is positive, output + 1 elsewhere.
    y = op.outputs[0]
    return tf.where(y > 0, grad, grad * (y + 1))


_BUILTIN_GRADIENTS = {
    "Relu": lambda op, grad, original: _relu_gradient(op, grad),
    "Tanh": lambda op, grad, original: _tanh_gradient(op, grad),
    "Sigmoid": lambda op, grad, original: _sigmoid_gradient(op, grad),
    "Conv2D": _conv2d_gradient,
    "Elu": lambda op, grad, original: _elu_gradient(op, grad),
    "MaxPool": _max_pool_gradient,
    "AvgPool": _avg_pool_gradient,
}


@contextlib.contextmanager
def builtin_gradients():
    """Gradients of ReLU, ELU, tanh, sigmoid, pooling and Conv2D in TensorFlow Lite builtins.

    While the context is open, `tf.GradientTape` differentiates these ops
    with the same derivatives written in ops that TensorFlow Lite has as
    builtins, instead of TensorFlow's `ReluGrad`, `EluGrad`, `TanhGrad`,
    `SigmoidGrad`, `MaxPoolGrad`, `AvgPoolGrad` and `Conv2DBackpropFilter`
    kernels (Select TF ops in a `.tflite` file). The values equal
    TensorFlow's gradients (`tests/test_tflite.py` checks them in float64,
    max-pooling's ties included). A Conv2D that is not NHWC, is dilated or
    whose shapes are not static, and a pooling whose windows overlap or pad,
    keep TensorFlow's gradient. Only tracing needs the context: the
    functions traced inside it keep these gradients.
    """
    with _internals.replaced_gradients(_BUILTIN_GRADIENTS):
        yield


# ----------------------------------------------------------------------
# The export.


def export_tflite(learner, path, support_shape, query_shape, steps=None, quantize=None,
                  select_tf_ops=False):
    """Exports few-shot adaptation as a TensorFlow Lite model (`.tflite`).

    The file holds two signatures, for one task at a time (no meta-batch
    axis):

    - `adapt_and_predict(support_x, support_y, query_x) -> {"predictions"}`:
      `steps` first-order inner steps of the learner's test-time adaptation
      from the meta-learned weights (its inner optimiser, step size and
      BatchNorm policy, exactly as `learner.predict`), then the query
      predictions (logits for classifiers);
    - `predict(x) -> {"predictions"}`: the meta-learned model itself, on a
      batch shaped like the query set.

    The inner loop is unrolled (`steps` copies of the step in the graph) and
    first order: nothing differentiates through it, so no second
    derivatives are needed. Gradients are written in TensorFlow Lite builtin
    ops (`builtin_gradients`); an op without a builtin gradient (e.g.
    max-pooling's `MaxPoolGrad`) makes the export fail with the list of such
    ops, unless `select_tf_ops=True`, which keeps them as Select TF ops (the
    file then needs a runtime linked with the Flex delegate).

    Sizes are static: the runtime must be given inputs of exactly
    `support_shape` and `query_shape` (the Interpreter refuses others when
    it prepares the graph); export one file per support size. A free number
    of examples (a leading `None`) needs `select_tf_ops=True`: the gradients
    of broadcasting ops then compute their shapes at run time with
    `BroadcastGradientArgs`, which has no builtin.

    Args:
        learner: a compiled `keras_meta.MetaLearner` whose test-time
            prediction is the shared adaptation primitive (MAML, ANIL,
            iMAML and learners built on the same hooks).
        path: the `.tflite` file to write.
        support_shape: shape of `support_x`, e.g. `(5, 28, 28, 1)` for 5-way
            1-shot: the number of examples, then the model's input shape.
        query_shape: shape of `query_x` (and of `predict`'s `x`).
        steps: inner steps; default the learner's `eval_inner_steps`.
        quantize: `None` (float32), `"dynamic_range"` (int8 weights) or
            `"float16"` (float16 weights): post-training quantization of
            the stored weights.
        select_tf_ops: allow Select TF ops where no builtin exists.

    Returns:
        `path`.

    Example:

    ```python
    km.export_tflite(maml, "maml.tflite", support_shape=(10, 1), query_shape=(10, 1))
    interpreter = tf.lite.Interpreter("maml.tflite")
    adapt = interpreter.get_signature_runner("adapt_and_predict")
    predictions = adapt(support_x=sx, support_y=sy, query_x=qx)["predictions"]
    ```
    """
    saved_model = tempfile.mkdtemp(prefix="keras_meta_tflite_")
    try:
        converter = _converter(learner, support_shape, query_shape, steps, quantize,
                               select_tf_ops, saved_model)
        content = converter.convert()
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        flex = _flex_ops(str(error)) if type(error).__name__ == "ConverterError" else []
        if flex and not select_tf_ops:
            raise ValueError(
                f"{type(learner).__name__}'s adaptation needs TensorFlow ops that "
                f"TensorFlow Lite has no builtin for: {flex}. Pass "
                "`select_tf_ops=True` to keep them as Select TF ops (the file "
                "then needs a TensorFlow Lite runtime linked with the Flex "
                "delegate), or use layers whose gradients are builtins (see "
                "docs/on_device.md)."
            ) from None
        raise
    finally:
        shutil.rmtree(saved_model, ignore_errors=True)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as file:
        file.write(content)
    return path


def _converter(learner, support_shape, query_shape, steps, quantize, select_tf_ops, saved_model):
    from keras_meta.algorithms.base import MetaLearner

    if not isinstance(learner, MetaLearner):
        raise TypeError(
            "`export_tflite` exports a keras_meta meta-learner. Received: "
            f"learner of type {type(learner).__name__}"
        )
    if type(learner).task_predict is not MetaLearner.task_predict:
        raise ValueError(
            f"`export_tflite` exports learners whose test-time prediction is "
            f"keras_meta's adaptation primitive (MAML, ANIL, iMAML and learners "
            f"built on the same hooks); {type(learner).__name__} predicts with "
            "its own `task_predict`, which `export_tflite` cannot unroll."
        )
    loss = learner._inner_loss_fn()  # fails early, with its message, if not compiled
    learner.check_finite_weights("export")
    steps = check_positive_int("steps", learner.adaptation_steps if steps is None else steps)
    quantize = check_choice("quantize", quantize, QUANTIZATIONS)
    if not isinstance(select_tf_ops, bool):
        raise ValueError(
            f"`select_tf_ops` must be a bool. Received: select_tf_ops={select_tf_ops!r}"
        )
    example_shape, dtype = _example_shape(learner.model)
    support_shape = _check_shape("support_shape", support_shape, example_shape, select_tf_ops)
    query_shape = _check_shape("query_shape", query_shape, example_shape, select_tf_ops)
    if dtype != tf.float32:
        raise ValueError(
            "TensorFlow Lite exports float32 models: the wrapped model "
            f"{learner.model.name!r} computes in {dtype.name}."
        )
    support_y_spec = _label_spec(learner, loss, support_shape[0])

    signatures = _Signatures(learner, steps).concrete_functions(
        tf.TensorSpec(support_shape, dtype, name="support_x"),
        support_y_spec,
        tf.TensorSpec(query_shape, dtype, name="query_x"),
    )
    # Through a SavedModel: the converter keeps its signature keys. The
    # variables the functions read (the meta-parameters, a learned step
    # size's rates) are tracked for saving, and frozen into constants by the
    # converter (no resource variables in the file: adaptation never changes
    # the meta-learned weights).
    root = tf.Module()
    root.captured = [v for f in signatures.values() for v in f.variables]
    tf.saved_model.save(root, saved_model, signatures=signatures)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model, signature_keys=list(signatures)
    )
    converter.experimental_enable_resource_variables = False
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if select_tf_ops:
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    converter.target_spec.supported_ops = ops
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter


class _Signatures:
    """The two signatures; the converter freezes the variables they read."""

    def __init__(self, learner, steps):
        self._learner = learner
        self._steps = steps

    def adapt_and_predict(self, support_x, support_y, query_x):
        learner = self._learner
        params, non_trainable = learner._meta_state()
        task = {"support_x": support_x, "support_y": support_y, "query_x": query_x}
        # The learner's own test-time adaptation (step size, transforms,
        # BatchNorm policy, finalize), its steps unrolled: TensorFlow Lite
        # runs straight-line graphs best, and no gradient crosses the steps.
        # (Learned rates and per-step BatchNorm sets follow the model's weights.)
        params, learned = learner.split_meta_parameters(params)
        adaptation = learner.adaptation(training=False, learned=learned).replace(unroll=True)
        state = adaptation.advance(adaptation.start(params, non_trainable, task), self._steps)
        predictions = adaptation.outputs(state)[0]
        return {"predictions": tf.cast(predictions, support_x.dtype)}

    def predict(self, x):
        return {"predictions": self._learner.model(x, training=False)}

    def concrete_functions(self, support_x_spec, support_y_spec, query_x_spec):
        adapt = tf.function(self.adapt_and_predict, autograph=False)
        predict = tf.function(self.predict, autograph=False)
        with builtin_gradients():
            adapt = adapt.get_concrete_function(
                support_x=support_x_spec, support_y=support_y_spec, query_x=query_x_spec
            )
        x_spec = tf.TensorSpec(query_x_spec.shape, query_x_spec.dtype, name="x")
        return {"adapt_and_predict": adapt, "predict": predict.get_concrete_function(x_spec)}


def _example_shape(model):
    inputs = getattr(model, "inputs", None)
    if inputs and len(inputs) == 1:
        return tuple(inputs[0].shape[1:]), tf.as_dtype(inputs[0].dtype)
    build = model.get_build_config() if hasattr(model, "get_build_config") else None
    shape = (build or {}).get("input_shape")
    if shape is not None and all(isinstance(d, (int, type(None))) for d in shape):
        return tuple(shape[1:]), tf.as_dtype(model.input_dtype)
    raise ValueError(
        f"Cannot read the input shape of model {model.name!r}: build it on a "
        "single input (`model.build(input_shape)`) before `export_tflite`."
    )


def _check_shape(name, shape, example_shape, select_tf_ops):
    expected = f"(examples,) + {example_shape!r}"
    if not isinstance(shape, (tuple, list)) or not shape:
        raise ValueError(
            f"`{name}` must be a tuple {expected} with a positive number of "
            f"examples. Received: {name}={shape!r}"
        )
    shape = tuple(shape)
    examples, rest = shape[0], shape[1:]
    if examples is None and not select_tf_ops:
        raise ValueError(
            f"`{name}` must give the number of examples: with a free number "
            "(None) the inner gradients need TensorFlow's "
            "`BroadcastGradientArgs`, which TensorFlow Lite has no builtin for. "
            "Export one file per support size, or pass `select_tf_ops=True` "
            f"(a runtime with the Flex delegate). Received: {name}={shape!r}"
        )
    good_examples = examples is None or (
        isinstance(examples, (int, np.integer)) and not isinstance(examples, bool) and examples > 0
    )
    fits = len(rest) == len(example_shape) and all(
        given == expected if expected is not None
        else isinstance(given, (int, np.integer)) and given > 0
        for given, expected in zip(rest, example_shape)
    )
    if not good_examples or not fits:
        raise ValueError(
            f"`{name}` must be {expected}: a positive number of examples, then "
            f"the wrapped model's input shape. Received: {name}={shape!r}"
        )
    return (None if examples is None else int(examples),) + rest


def _label_spec(learner, loss, examples):
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "")
    if "sparse" in str(name):
        return tf.TensorSpec((examples,), tf.int32, name="support_y")
    example_shape, dtype = _example_shape(learner.model)
    output = learner.model.compute_output_spec(keras.KerasTensor((1,) + example_shape, dtype))
    return tf.TensorSpec((examples,) + tuple(output.shape[1:]), output.dtype, name="support_y")


def _flex_ops(message):
    """The TensorFlow op names a converter error says have no builtin."""
    names = set()
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("tf.") and "(" in line:
            names.add(line[3:line.index("(")])
    return sorted(names)
