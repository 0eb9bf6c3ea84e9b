"""SavedModel export of few-shot adaptation itself (adapt at serving time).

`learner.adapt(...)` returns a plain Keras model for one task, which exports
with Keras' own `model.export(path)`. `export_adaptive` goes further: it
writes a SavedModel whose serving signature runs the learner's inner loop
inside the graph, so TF Serving (or any TensorFlow runtime, no Python and no
keras_meta) adapts to a new task's support set and predicts its queries in
one call.
"""

import keras
import tensorflow as tf

from keras_meta.validation import check_positive_int


def export_adaptive(
    learner,
    path,
    steps=None,
    support_x_spec=None,
    support_y_spec=None,
    query_x_spec=None,
    verbose=False,
):
    """Exports a SavedModel that adapts to a task and predicts, in the graph.

    The SavedModel has one endpoint (also the `serving_default` signature),
    `adapt_and_predict(support_x, support_y, query_x)`, for one task at a
    time (no meta-batch axis): it runs `steps` inner steps on the support set
    from the meta-learned weights, exactly as `learner.predict` does
    (same inner loop, same BatchNorm convention), and returns the query
    predictions `[queries, ...]`. The number of support and query examples is
    free. The meta-learned weights are stored in the SavedModel; adaptation
    never changes them.

    Args:
        learner: a compiled `keras_meta.MetaLearner` (the loss is part of the
            inner loop).
        path: directory to write.
        steps: inner steps; default the learner's `eval_inner_steps`.
        support_x_spec, query_x_spec: `tf.TensorSpec` of the inputs; default
            `[None] + input_shape` of the wrapped model (required for
            subclassed models without known inputs).
        support_y_spec: `tf.TensorSpec` of the support labels; default
            `[None]` int32 for sparse categorical losses, else
            `[None] + output_shape[1:]` in the model's dtype.
        verbose: print Keras' export summary.

    Returns:
        `path`.

    Example:

    ```python
    km.export_adaptive(maml, "served_maml", steps=10)
    # in another process, without keras_meta:
    served = tf.saved_model.load("served_maml")
    query_predictions = served.adapt_and_predict(support_x, support_y, query_x)
    ```
    """
    from keras_meta.algorithms.base import MetaLearner

    if not isinstance(learner, MetaLearner):
        raise TypeError(
            "`export_adaptive` exports a keras_meta meta-learner. Received: "
            f"{type(learner).__name__}"
        )
    learner._inner_loss_fn()  # fails early, with its message, if not compiled
    learner.check_finite_weights("export")
    steps = check_positive_int(
        "steps", learner.adaptation_steps if steps is None else steps
    )
    model = learner.model
    x_spec = _input_spec(model)
    support_x_spec = support_x_spec or x_spec
    query_x_spec = query_x_spec or x_spec
    support_y_spec = support_y_spec or _label_spec(learner)

    def adapt_and_predict(support_x, support_y, query_x):
        params, non_trainable = learner._meta_state()
        task = {"support_x": support_x, "support_y": support_y, "query_x": query_x}
        return learner.task_predict(params, non_trainable, task, steps)["predictions"]

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="adapt_and_predict",
        fn=adapt_and_predict,
        input_signature=[support_x_spec, support_y_spec, query_x_spec],
    )
    archive.write_out(path, verbose=verbose)
    return path


def _input_spec(model):
    inputs = getattr(model, "inputs", None)
    if inputs and len(inputs) == 1:
        return tf.TensorSpec((None,) + tuple(inputs[0].shape[1:]), inputs[0].dtype)
    build = model.get_build_config() if hasattr(model, "get_build_config") else None
    shape = (build or {}).get("input_shape")
    if shape is not None and all(isinstance(d, (int, type(None))) for d in shape):
        return tf.TensorSpec((None,) + tuple(shape[1:]), model.input_dtype)
    raise ValueError(
        f"Cannot infer the input shape of model {model.name!r}: pass "
        "`support_x_spec` and `query_x_spec` (tf.TensorSpec with a leading "
        "None axis)."
    )


def _label_spec(learner):
    loss = learner._inner_loss_fn()
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "")
    if "sparse" in str(name):
        return tf.TensorSpec((None,), tf.int32)
    output = learner.model.compute_output_spec(
        keras.KerasTensor(_input_spec(learner.model).shape, _input_spec(learner.model).dtype)
    )
    return tf.TensorSpec((None,) + tuple(output.shape[1:]), output.dtype)
