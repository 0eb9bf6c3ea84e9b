"""ANIL: MAML whose inner loop adapts only the head, over features computed once."""

import keras
import numpy as np

from keras_meta import _internals, inner_loop
from keras_meta.adaptation import BodyHead
from keras_meta.algorithms.base import MetaLearner
from keras_meta.prototypes import check_head_initialization
from keras_meta.validation import check_bool, check_non_negative_float


@keras.saving.register_keras_serializable(package="keras_meta")
class ANIL(MetaLearner):
    """Almost No Inner Loop: the inner loop adapts the head only.

    The wrapped model is split into a **body** (feature extractor) and a
    **head** (its final layer or layers). Per task, the body runs once on the
    support set and once on the query set; `inner_steps` gradient steps on
    the support loss (the compiled loss, plus
    `head_l2_regularization / 2 * ||w_head||^2`) then adapt the head's fast
    weights on the fixed support features, and the query loss of the adapted
    head on the query features is the task's meta-loss. The outer update
    meta-learns every trainable weight, body and head. The meta-gradient
    reaches the body through the query features and, second order, through
    the adapted head (which depends on the body through the support
    features); with `first_order=True` the inner gradients are constants, so
    the body is reached through the query features only and the head's
    gradient is the query gradient at the adapted head.

    Since the body never sees fast weights, its cost per task is one forward
    (and one backward) pass over support and query, whatever `inner_steps`:
    the inner loop costs a few small matrix products per step.

    Which models qualify: a `keras.Sequential` or functional `keras.Model`
    with one input and one output whose head is a *tail* of layers: the head
    layers produce the model's output and take exactly one tensor from the
    rest of the model (the features), and the body (everything from the
    input to that tensor) uses none of them. Any layer type may sit in
    either part. A subclassed model exposes no layer graph to cut: pass its
    parts as the pair `model=(body, head)` instead (each a built
    `keras.Model` or layer with one input and one output); they are wrapped
    into `keras.Sequential([Input, body, head])` (sharing their weights),
    which is what `learner.model` is and what `get_config` saves.

    BatchNorm follows `km.MAML` exactly. Transductive (default): support
    features and head calls on the support set use support statistics, query
    features and head calls on the query set use query statistics.
    `transductive_batch_norm=False`: the query set is normalised with the
    support set's moments (body: at the meta-parameters, read from the one
    support pass; a BatchNorm inside the head: at the adapted head).
    `adapt()` returns the whole network (body and adapted head) as one plain
    Keras model with the support moments as BatchNorm statistics, as
    `km.MAML.adapt` does.

    Args:
        model: a built Sequential or functional `keras.Model`, or a pair
            `(body, head)` of built models/layers. Its trainable weights are
            the meta-parameters.
        head: the head, for a single model: an int (the number of final
            layers, counted in `model.layers` without the input layer), a
            layer name, or a list of layer names. Default `None`: the last
            layer (with a pair: the pair's head; `head` must then be `None`).
        inner_learning_rate: inner step size (mean-reduced Keras losses; see
            `km.MAML`).
        inner_steps: inner gradient steps on the head during meta-training.
        first_order: treat the inner gradients as constants (first-order
            ANIL).
        head_l2_regularization: non-negative float `lambda`; adds
            `lambda / 2 * ||w_head||^2` (every trainable head weight, biases
            included) to the inner loss only. For a linear head with
            cross-entropy or MSE this makes the inner problem strongly
            convex, the setting in which Ji et al. (2020) show that more inner
            steps speed up ANIL's convergence.
        eval_inner_steps: inner steps for `evaluate`/`predict`/`adapt`
            (default `inner_steps`).
        inner_learning_rate_scaling: `None` or `"inverse_steps"` (step size
            `inner_learning_rate / inner_steps`).
        transductive_batch_norm: as in `km.MAML`.
        task_execution: `"vectorized"` (the tasks' bodies run as one
            batched computation and the body's meta-gradient is one backward
            pass over the meta-batch), `"sequential"` (task by task, per-task
            gradients, one task's activations in memory at a time), or
            `"auto"` (default): task by task for convolutional bodies (measured
            faster on CPU and lighter in memory, see docs/anil.md),
            vectorized otherwise.
        inner_optimizer: the head's inner optimiser, as in `km.MAML`.
        learned_inner_learning_rates: `None`, `"per_parameter"` or
            `"per_layer_per_step"`: learned rates of the head's weights, as
            in `km.MAML` (the body does not adapt, so it has none).
        multi_step_loss: MAML++'s multi-step loss on the head's inner steps,
            as in `km.MAML`.
        multi_step_loss_epochs: the annealing's length in epochs.
        head_initialization: `None` (default) or `"prototypes"`: the head's
            last Dense layer starts each task from the support prototypes
            (Proto-MAML), as in `km.MAML`.

    Example:

    ```python
    import keras, keras_meta as km
    model = km.models.conv4(5)             # its last layer, "head", is the head
    anil = km.ANIL(model, head="head", inner_learning_rate=0.5, inner_steps=5)
    anil.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
    anil.fit(episodes, steps_per_epoch=100)   # dicts support_x/_y, query_x/_y
    adapted = anil.adapt(support_x, support_y)  # body + adapted head, a keras.Model
    ```

    Reference:
        - [Raghu, Raghu, Bengio, Vinyals, 2020](https://arxiv.org/abs/1909.09157)
        - [Ji, Lee, Liang, Poor, 2020](https://arxiv.org/abs/2006.09486)
          (convergence of ANIL; strongly convex vs nonconvex head loss)
    """

    _check_outputs = False  # `_split` says what ANIL needs
    # Vectorized, the body's weights are shared by every task: its gradient
    # is one backward pass over the meta-batch. Per-task gradients inside
    # `tf.vectorized_map` would make TensorFlow loop over the tasks for
    # every convolution's filter gradient (no batched Conv2DBackpropFilter).
    batched_tape_when_vectorized = True

    def __init__(
        self,
        model,
        head=None,
        inner_learning_rate=0.01,
        inner_steps=1,
        first_order=False,
        head_l2_regularization=0.0,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        inner_optimizer="sgd",
        learned_inner_learning_rates=None,
        multi_step_loss=False,
        multi_step_loss_epochs=10,
        head_initialization=None,
        **kwargs,
    ):
        model, head = _designated(model, head)
        super().__init__(**self.base_arguments(locals()))
        self.first_order = check_bool("first_order", first_order)
        self.head_l2_regularization = check_non_negative_float(
            "head_l2_regularization", head_l2_regularization
        )
        head_layers, self.head = _resolve_head(self.model, 1 if head is None else head)
        # Plain attributes (not tracked by Keras): the parts share the wrapped
        # model's variables, which `self.model` already saves.
        self.__dict__["_parts"] = _split(self.model, head_layers, self.head)
        self.head_initialization = check_head_initialization(head_initialization, self.model)
        self.build_learned_state()

    @property
    def body_model(self):
        """The body: a functional model from the input to the features."""
        return self._parts[0]

    @property
    def head_model(self):
        """The head: a functional model from the features to the output."""
        return self._parts[1]

    def build_network(self):
        # The head adapts; the body runs once per task, in the start state.
        body, head = self._parts
        positions = tuple(
            _positions(self.model, part, trainable)
            for trainable in (True, False) for part in (body, head)
        )
        return BodyHead(body, head, self.batch_norm, positions)

    def inner_transforms(self, training):
        # The gradient of `head_l2_regularization / 2 * ||w_head||^2`.
        if not self.head_l2_regularization:
            return []
        return [inner_loop.add_decayed_weights(self.head_l2_regularization)]


# ----------------------------------------------------------------------
# Head designation and the body/head split.


def _designated(model, head):
    """`(model, head)`, a (body, head) pair composed into one model."""
    if not isinstance(model, (tuple, list)):
        return model, head
    if head is not None:
        raise ValueError(
            "`head` must be None when `model` is a (body, head) pair: "
            f"the pair designates the head. Received: head={head!r}"
        )
    return _compose(model), 1


def _compose(pair):
    """`keras.Sequential([Input, body, head])` from a (body, head) pair."""
    if len(pair) != 2:
        raise ValueError(
            "A `model` given as a tuple must be the pair (body, head). "
            f"Received: a {type(pair).__name__} of length {len(pair)}"
        )
    body, head = pair
    for role, part in (("body", body), ("head", head)):
        if not isinstance(part, keras.layers.Layer):
            raise TypeError(
                f"The {role} of the (body, head) pair must be a built "
                f"`keras.Model` or layer. Received: {role}={part!r} of type "
                f"{type(part).__name__}"
            )
        if not part.built:
            raise ValueError(
                f"The {role} of the (body, head) pair must be built (call it "
                f"on a batch or `build(input_shape)`). Received: an unbuilt "
                f"{role} {part.name!r}"
            )
    inputs = getattr(body, "inputs", None) if isinstance(body, keras.Model) else None
    if inputs:
        if len(inputs) != 1:
            raise ValueError(
                "The body of the (body, head) pair must have one input. "
                f"Received: body {body.name!r} with {len(inputs)} inputs"
            )
        shape, dtype = tuple(inputs[0].shape), inputs[0].dtype
    else:
        build_config = body.get_build_config() or {}
        shape = build_config.get("input_shape")
        if not isinstance(shape, (tuple, list)) or not shape or isinstance(shape[0], (tuple, list)):
            raise ValueError(
                "Could not read the input shape of the body of the (body, "
                f"head) pair: {body.name!r} was not built on a single input "
                f"shape. Received: build config {build_config!r}"
            )
        shape, dtype = tuple(shape), None
    return keras.Sequential(
        [keras.Input(batch_shape=shape, dtype=dtype), body, head],
        name=f"{body.name}_with_{head.name}",
    )


def _resolve_head(model, head):
    """(head layers, normalised designation) of `head` in `model`."""
    layers = [
        layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
    ]
    accepted = (
        "`head` must be an int (the number of final layers), a layer name, a "
        "list of layer names, or None (the last layer); or pass model=(body, "
        "head)."
    )
    if isinstance(head, (int, np.integer)) and not isinstance(head, bool):
        if not 1 <= head < len(layers):
            raise ValueError(
                f"`head` as an int counts the final layers of the model; it must "
                f"be between 1 and {len(layers) - 1} for model {model.name!r}, "
                f"which has {len(layers)} layers (at least one must remain for "
                f"the body). Received: head={head!r}"
            )
        return layers[len(layers) - int(head):], int(head)
    if isinstance(head, str):
        names = [head]
    elif (
        isinstance(head, (list, tuple))
        and head
        and all(isinstance(name, str) for name in head)
    ):
        names = list(head)
    else:
        raise ValueError(f"{accepted} Received: head={head!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"`head` names layer(s) {duplicates} more than once. Received: head={head!r}"
        )
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(
            f"`head` names layer(s) {missing} that model {model.name!r} does "
            f"not have. Its layers: {list(by_name)}. Received: head={head!r}"
        )
    return [by_name[name] for name in names], head if isinstance(head, str) else names


def _split(model, head_layers, head, learner="ANIL"):
    """(body model, head model): functional models sharing `model`'s weights.

    `learner`: the learner's name, for the errors.
    """
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None) if inputs else None
    if not inputs or not outputs:
        raise ValueError(
            f"{learner} cuts the wrapped model into body and head along its layer "
            f"graph, which model {model.name!r} (a subclassed "
            f"{type(model).__name__}) does not expose. Pass a Sequential or "
            "functional model, or the parts as model=(body, head)."
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"{learner} needs a model with one input and one output. Received: "
            f"model {model.name!r} with {len(inputs)} inputs and "
            f"{len(outputs)} outputs"
        )
    names = [layer.name for layer in head_layers]
    head_ids = {id(layer) for layer in head_layers}
    described = f"head={head!r}" + (f" (layers {names})" if isinstance(head, int) else "")
    last = _internals.keras_history(outputs[0]).operation
    if id(last) not in head_ids:
        raise ValueError(
            f"The head must end at the model's output, which layer "
            f"{last.name!r} of model {model.name!r} produces; {described} "
            "does not include it."
        )
    # Walk back from the output through the head layers; the tensors where
    # the walk leaves the head are what the head takes from the body.
    fed_by, reached, stack = {}, set(), [outputs[0]]
    while stack:
        tensor = stack.pop()
        operation, node_index, _ = _internals.keras_history(tensor)
        if id(operation) in head_ids:
            reached.add(id(operation))
            stack.extend(_internals.inbound_tensors(operation, node_index))
        else:
            fed_by[id(tensor)] = tensor
    unreached = [layer.name for layer in head_layers if id(layer) not in reached]
    if unreached:
        raise ValueError(
            f"Layer(s) {unreached} of {described} do not feed the model's "
            "output through the other head layers: the head must be a tail of "
            f"layers ending at the output of model {model.name!r}."
        )
    if len(fed_by) != 1:
        sources = sorted({_internals.keras_history(t).operation.name for t in fed_by.values()})
        raise ValueError(
            f"The head must be fed by a single tensor (a tail of layers), but "
            f"{described} takes {len(fed_by)} tensors from the rest "
            f"of model {model.name!r} (from layer(s) {sources})."
        )
    (features,) = fed_by.values()
    if any(features is x for x in inputs):
        raise ValueError(
            f"{described} leaves no body: it takes the model's input "
            f"directly. {learner} needs body layers before the head (use km.MAML to "
            "adapt every layer)."
        )
    body_model = keras.Model(inputs[0], features, name=f"{model.name}_body")
    shared = [layer.name for layer in body_model.layers if id(layer) in head_ids]
    if shared:
        raise ValueError(
            f"Layer(s) {shared} of {described} are also used by the body of "
            f"model {model.name!r}: the body must not call head layers."
        )
    head_model = keras.Model(features, outputs[0], name=f"{model.name}_head")
    for trainable in (True, False):
        kind = "trainable" if trainable else "non-trainable"
        whole = _ids(model, trainable)
        body_ids, head_ids_ = _ids(body_model, trainable), _ids(head_model, trainable)
        if set(body_ids) & set(head_ids_):
            raise ValueError(
                f"Model {model.name!r} shares {kind} weights between the body and "
                f"{described}; {learner} needs separate weights for each."
            )
        if sorted(body_ids + head_ids_) != sorted(whole):
            raise ValueError(
                f"Model {model.name!r} has {kind} weights outside both its body "
                f"and {described} (layers not on the path from input to output)."
            )
    if not head_model.trainable_variables:
        raise ValueError(
            f"{described} has no trainable weights: {learner} "
            + ("adapts the head in the inner loop." if learner == "ANIL" else "meta-learns the head.")
        )
    return body_model, head_model


def _ids(model, trainable):
    variables = model.trainable_variables if trainable else model.non_trainable_variables
    return [id(v) for v in variables]


def _positions(model, part, trainable):
    """Positions of `part`'s variables among `model`'s (same objects)."""
    index = {v: i for i, v in enumerate(_ids(model, trainable))}
    return [index[v] for v in _ids(part, trainable)]
