"""ANIL: MAML whose inner loop adapts only the head, over features computed once."""

import collections

import keras
import numpy as np
import tensorflow as tf

from keras_meta import inner_loop
from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import check_bool, check_non_negative_float


# What the body computes for one task, once: the features of the support and
# query sets and the body layers' losses of each pass (e.g. kernel_regularizer).
TaskFeatures = collections.namedtuple(
    "TaskFeatures", ["support", "support_losses", "query", "query_losses"]
)


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
        **kwargs,
    ):
        if isinstance(model, (tuple, list)):
            if head is not None:
                raise ValueError(
                    "`head` must be None when `model` is a (body, head) pair: "
                    f"the pair designates the head. Received: head={head!r}"
                )
            model, head = _compose(model), 1
        super().__init__(
            model,
            inner_learning_rate=inner_learning_rate,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            inner_learning_rate_scaling=inner_learning_rate_scaling,
            transductive_batch_norm=transductive_batch_norm,
            task_execution=task_execution,
            **kwargs,
        )
        self.first_order = check_bool("first_order", first_order)
        self.head_l2_regularization = check_non_negative_float(
            "head_l2_regularization", head_l2_regularization
        )
        head_layers, self.head = _resolve_head(self.model, 1 if head is None else head)
        body_model, head_model = _split(self.model, head_layers, self.head)
        # Plain attributes (not tracked by Keras): the parts share the wrapped
        # model's variables, which `self.model` already saves.
        self.__dict__["_parts"] = (body_model, head_model)
        self._head_has_batch_norm = bool(inner_loop.batch_norm_layers(head_model))

    @property
    def body_model(self):
        """The body: a functional model from the input to the features."""
        return self._parts[0]

    @property
    def head_model(self):
        """The head: a functional model from the features to the output."""
        return self._parts[1]

    # ------------------------------------------------------------------
    # Splitting weights into body and head.

    def _partition(self, params, non_trainable):
        """(body params, head params, body non-trainable, head non-trainable)."""
        body, head = self._parts
        model = self.model
        return (
            [params[i] for i in _positions(model, body, True)],
            [params[i] for i in _positions(model, head, True)],
            [non_trainable[i] for i in _positions(model, body, False)],
            [non_trainable[i] for i in _positions(model, head, False)],
        )

    def _merge(self, body_params, head_params):
        """The full list of trainable values, in the wrapped model's order."""
        merged = [None] * len(self.model.trainable_variables)
        body, head = self._parts
        for part, values in ((body, body_params), (head, head_params)):
            for position, value in zip(_positions(self.model, part, True), values):
                merged[position] = value
        return merged

    def _auto_task_execution(self):
        # Task by task for convolutional bodies, as for MAML. Vectorized, the
        # body runs as one batched computation with one batched backward
        # pass; task by task measured faster on CPU with every thread setting
        # tried and holds one task's activations at a time: conv4 ANIL
        # (PEERS.md B4, AMD EPYC, 2 cores, default thread pools) 1.23-1.26
        # meta-steps/s against 0.74-0.76 vectorized, peak RSS 968-977 MB
        # against 1607-1636 (docs/benchmarks.md); on an Intel Xeon task by
        # task was ahead in most runs by up to 25% with the default pools
        # and 2.43 vs 1.58 under `km.configure_cpu_threads()`.
        if self._has_convolutions():
            return "sequential"
        return "vectorized"

    def _support_statistics(self):
        """Whether the query set is normalised with support moments."""
        return self._has_batch_norm and not self.transductive_batch_norm

    # ------------------------------------------------------------------
    # The body, once per task; the head, per inner step.

    def task_features(
        self, body_params, body_non_trainable, support_x, query_x, support_training,
        query_training,
    ):
        """Support and query features: the body's only two calls per task.

        Returns:
            A `TaskFeatures(support, support_losses, query, query_losses)`.
        """
        body = self.body_model
        if self._support_statistics():
            # One support pass gives the features and the support moments
            # that normalise the query set.
            support, moments, support_losses = inner_loop.forward_with_batch_moments(
                body, body_params, body_non_trainable, support_x
            )
            query, _, query_losses = inner_loop.forward(
                body, body_params, moments, query_x, False
            )
        else:
            support, _, support_losses = inner_loop.forward(
                body, body_params, body_non_trainable, support_x, support_training
            )
            query, _, query_losses = inner_loop.forward(
                body, body_params, body_non_trainable, query_x, query_training
            )
        return TaskFeatures(support, list(support_losses), query, list(query_losses))

    def head_penalty(self, head_params):
        """`head_l2_regularization / 2 * ||w_head||^2`."""
        if not self.head_l2_regularization:
            return 0.0
        squares = tf.add_n([tf.reduce_sum(tf.square(w)) for w in head_params])
        return tf.constant(self.head_l2_regularization / 2, squares.dtype) * squares

    def head_support_loss(
        self, head_params, head_non_trainable, features, y, body_losses, training
    ):
        """The inner objective: loss of the head on the support features."""
        y_pred, _, losses = inner_loop.forward(
            self.head_model, head_params, head_non_trainable, features, training
        )
        loss = self.compute_task_loss(y, y_pred, body_losses + list(losses))
        return loss + self.head_penalty(head_params)

    def adapt_head(
        self, head_params, head_non_trainable, features, y, body_losses, steps,
        training, create_graph,
    ):
        """Fast head weights after `steps` inner steps on the support features."""
        return inner_loop.gradient_descent(
            lambda p: self.head_support_loss(
                p, head_non_trainable, features, y, body_losses, training
            ),
            head_params,
            steps=steps,
            learning_rate=self.step_size,
            create_graph=create_graph,
            unroll=self._unroll_inner_loop,
        )

    def head_query_outputs(
        self, head_params, head_non_trainable, support_features, query_features,
        training,
    ):
        """(predictions, head losses) on the query features."""
        head = self.head_model
        if self._support_statistics():
            statistics = head_non_trainable
            if self._head_has_batch_norm:
                statistics = inner_loop.batch_moments(
                    head, head_params, head_non_trainable, support_features
                )
            y_pred, _, losses = inner_loop.forward(
                head, head_params, statistics, query_features, False
            )
        else:
            y_pred, _, losses = inner_loop.forward(
                head, head_params, head_non_trainable, query_features, training
            )
        return y_pred, list(losses)

    def _head_query_loss(self, head_params, head_non_trainable, features, y, training):
        y_pred, losses = self.head_query_outputs(
            head_params, head_non_trainable, features.support, features.query, training
        )
        return self.compute_task_loss(y, y_pred, features.query_losses + losses), y_pred

    def _task_setup(self, params, non_trainable, task, support_training, query_training):
        body_params, head_params, body_nt, head_nt = self._partition(params, non_trainable)
        features = self.task_features(
            body_params, body_nt, task["support_x"], task["query_x"],
            support_training, query_training,
        )
        return body_params, head_params, head_nt, features

    # ------------------------------------------------------------------
    # MetaLearner hooks.

    def task_loss(self, params, non_trainable, task):
        """(query loss after adaptation, query predictions) of one task.

        Differentiable in `params`: second order, the adapted head stays a
        function of the head weights and (through the support features) of
        the body; first order, the inner gradients are constants.
        """
        _, head_params, head_nt, features = self._task_setup(
            params, non_trainable, task, True, True
        )
        # Adapt on support (the head, on the support features).
        fast = self.adapt_head(
            head_params, head_nt, features.support, task["support_y"], features.support_losses,
            self.inner_steps, True, create_graph=not self.first_order,
        )
        # Outer loss on query.
        return self._head_query_loss(fast, head_nt, features, task["query_y"], True)

    def task_train(self, params, non_trainable, task):
        # Used by `task_execution="sequential"`: one task's meta-gradient.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss, y_pred = self.task_loss(params, non_trainable, task)
        gradients = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return {"gradients": gradients, "loss": loss, "predictions": y_pred}

    def train_step(self, data):
        if self.resolved_task_execution != "vectorized":
            return super().train_step(data)  # per-task gradients, low memory
        # Vectorized: the body's weights are shared by every task, so its
        # gradient is one backward pass over the whole meta-batch. Taking
        # per-task gradients inside `tf.vectorized_map` (the base class's
        # way) would make TensorFlow loop over the tasks for every
        # convolution's filter gradient (no batched Conv2DBackpropFilter).
        episode = self._check_episode(data)
        params, non_trainable = self._meta_state()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            # Adapt on support, outer loss on query: all tasks at once.
            results = self.map_tasks(
                lambda task: dict(
                    zip(("loss", "predictions"), self.task_loss(params, non_trainable, task))
                ),
                episode,
                ("loss", "predictions"),
            )
            loss = tf.reduce_mean(results["loss"])
        # Meta-gradient of the mean query loss (Keras' TF optimizer sums the
        # replicas' gradients, as in `MetaLearner.train_step`).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        gradients = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        with tf.control_dependencies(self._check_even_split(episode)):
            gradients = [g / replicas for g in gradients]
        # Update, unless a task's loss (or the batched gradient) is not finite.
        finite = tf.math.is_finite(results["loss"]) & tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
        )
        non_finite = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.float32))
        self.apply_meta_gradients(gradients, non_finite_tasks=non_finite)
        return self._update_metrics(episode, results, training=True)

    def task_evaluate(self, params, non_trainable, task, steps):
        support_training, query_training = self._training_flags(False)
        _, head_params, head_nt, features = self._task_setup(
            params, non_trainable, task, support_training, query_training
        )
        pre_loss, _ = self._head_query_loss(
            head_params, head_nt, features, task["query_y"], query_training
        )
        fast = self.adapt_head(
            head_params, head_nt, features.support, task["support_y"], features.support_losses,
            steps, support_training, create_graph=False,
        )
        loss, y_pred = self._head_query_loss(
            fast, head_nt, features, task["query_y"], query_training
        )
        return {"loss": loss, "pre_adaptation_loss": pre_loss, "predictions": y_pred}

    def task_predict(self, params, non_trainable, task, steps):
        support_training, query_training = self._training_flags(False)
        _, head_params, head_nt, features = self._task_setup(
            params, non_trainable, task, support_training, query_training
        )
        fast = self.adapt_head(
            head_params, head_nt, features.support, task["support_y"], features.support_losses,
            steps, support_training, create_graph=False,
        )
        y_pred, _ = self.head_query_outputs(
            fast, head_nt, features.support, features.query, query_training
        )
        return {"predictions": y_pred}

    def _evaluate_tasks(self, episode, steps):
        # The base version re-runs the whole network at every recorded step;
        # here the body runs once per task and only the head is re-adapted.
        params, non_trainable = self._meta_state()
        support_training, query_training = self._training_flags(False)

        def task_fn(task):
            _, fast, head_nt, features = self._task_setup(
                params, non_trainable, task, support_training, query_training
            )
            losses, predictions = [], []
            for previous, current in zip((0,) + steps[:-1], steps):
                fast = self.adapt_head(
                    fast, head_nt, features.support, task["support_y"], features.support_losses,
                    current - previous, support_training, create_graph=False,
                )
                loss, y_pred = self._head_query_loss(
                    fast, head_nt, features, task["query_y"], query_training
                )
                losses.append(loss)
                predictions.append(y_pred)
            return {"loss": tf.stack(losses), "predictions": tf.stack(predictions)}

        return self.map_tasks(task_fn, episode, ("loss", "predictions"))

    def support_loss(self, params, non_trainable, x, y, training):
        """Inner objective at full weights `params`: loss plus head penalty."""
        loss = super().support_loss(params, non_trainable, x, y, training)
        _, head_params, _, _ = self._partition(params, non_trainable)
        return loss + self.head_penalty(head_params)

    def adapt_parameters(self, params, non_trainable, x, y, steps, training, create_graph):
        """Full weights after `steps` inner steps; only the head moves.

        The body runs once on `x`; `adapt()` and the base class's per-task
        tools use this. Returns the list aligned with `params`.
        """
        body_params, head_params, body_nt, head_nt = self._partition(params, non_trainable)
        features, _, losses = inner_loop.forward(
            self.body_model, body_params, body_nt, x, training
        )
        fast = self.adapt_head(
            head_params, head_nt, features, y, list(losses), steps, training,
            create_graph,
        )
        return self._merge(body_params, fast)

    # query_loss / query_outputs at full weights: the base class's versions
    # (one call of the whole network) are exact for ANIL too.

    def get_config(self):
        config = super().get_config()
        config["head"] = self.head
        config["first_order"] = self.first_order
        config["head_l2_regularization"] = self.head_l2_regularization
        return config


# ----------------------------------------------------------------------
# Head designation and the body/head split.



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


def _split(model, head_layers, head):
    """(body model, head model): functional models sharing `model`'s weights."""
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None) if inputs else None
    if not inputs or not outputs:
        raise ValueError(
            "ANIL cuts the wrapped model into body and head along its layer "
            f"graph, which model {model.name!r} (a subclassed "
            f"{type(model).__name__}) does not expose. Pass a Sequential or "
            "functional model, or the parts as model=(body, head)."
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            "ANIL needs a model with one input and one output. Received: "
            f"model {model.name!r} with {len(inputs)} inputs and "
            f"{len(outputs)} outputs"
        )
    names = [layer.name for layer in head_layers]
    head_ids = {id(layer) for layer in head_layers}
    described = f"head={head!r}" + (f" (layers {names})" if isinstance(head, int) else "")
    last = outputs[0]._keras_history.operation
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
        operation, node_index, _ = tensor._keras_history
        if id(operation) in head_ids:
            reached.add(id(operation))
            stack.extend(operation._inbound_nodes[node_index].input_tensors)
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
        sources = sorted({t._keras_history.operation.name for t in fed_by.values()})
        raise ValueError(
            f"The head must be fed by a single tensor (a tail of layers), but "
            f"{described} takes {len(fed_by)} tensors from the rest "
            f"of model {model.name!r} (from layer(s) {sources})."
        )
    (features,) = fed_by.values()
    if any(features is x for x in inputs):
        raise ValueError(
            f"{described} leaves no body: it takes the model's input "
            "directly. ANIL needs body layers before the head (use km.MAML to "
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
                f"{described}; ANIL needs separate weights for each."
            )
        if sorted(body_ids + head_ids_) != sorted(whole):
            raise ValueError(
                f"Model {model.name!r} has {kind} weights outside both its body "
                f"and {described} (layers not on the path from input to output)."
            )
    if not head_model.trainable_variables:
        raise ValueError(
            f"{described} has no trainable weights: ANIL adapts the "
            "head in the inner loop."
        )
    return body_model, head_model


def _ids(model, trainable):
    variables = model.trainable_variables if trainable else model.non_trainable_variables
    return [id(v) for v in variables]


def _positions(model, part, trainable):
    """Positions of `part`'s variables among `model`'s (same objects)."""
    index = {v: i for i, v in enumerate(_ids(model, trainable))}
    return [index[v] for v in _ids(part, trainable)]
