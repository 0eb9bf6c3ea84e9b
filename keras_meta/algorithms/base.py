"""`MetaLearner`: the `keras.Model` skeleton shared by every algorithm.

A meta-learner wraps a built Keras model whose trainable weights are the
meta-parameters. `model.fit` feeds it episodes (dicts with `support_x`,
`support_y`, `query_x`, `query_y`, each with a leading meta-batch axis); per
task it adapts fast weights on the support set and scores the query set.
Subclasses say how one task produces its meta-gradient (`task_train`); this
class does the rest: episode checks, running the tasks of a meta-batch, the
outer update, metrics, evaluation, prediction, `adapt()` and serialization.
"""

import copy

import keras
import keras.src.trainers.trainer
import numpy as np
import tensorflow as tf

from keras_meta import _internals, inner_loop
from keras_meta.data.episodes import EPISODE_KEYS
from keras_meta.validation import (
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
)

PREDICT_KEYS = ("support_x", "support_y", "query_x")
TASK_EXECUTIONS = ("auto", "vectorized", "sequential")
INNER_LEARNING_RATE_SCALINGS = (None, "inverse_steps")
# Whether `compile(jit_compile="auto")` turns XLA on for networks without
# convolutions on CPU-only machines (see `_resolve_auto_jit_compile`). The
# test suite turns it off outside the tests of this rule, to save compile time.
AUTO_XLA_ON_CPU = True


class MetaLearner(keras.Model):
    """Base class of keras_meta's meta-learners (a `keras.Model`).

    Not used directly: see `keras_meta.MAML`. A subclass implements
    `task_train(params, non_trainable, task)`, returning the meta-gradient of
    one task; everything else (`train_step`, `test_step`, `predict_step`,
    `adapt`, `get_config`) is shared.

    Args:
        model: a built `keras.Model` (Sequential, functional or subclassed).
            Its trainable weights are the meta-parameters.
        inner_learning_rate: positive float, the inner-loop step size.
        inner_steps: positive int, inner gradient steps during meta-training.
        eval_inner_steps: positive int or `None` (= `inner_steps`), inner steps
            in `evaluate`, `predict` and `adapt`.
        inner_learning_rate_scaling: `None` or `"inverse_steps"`. With
            `"inverse_steps"` the inner step size is
            `inner_learning_rate / inner_steps`, the choice under which Ji,
            Yang and Liang (2020) prove N-step MAML converges. The same step
            size is used for any number of evaluation steps.
        transductive_batch_norm: `True` (default) normalises every batch with
            its own statistics, support and query alike, in both loops, as
            the reference MAML does. `False` normalises the query set with the
            support set's moments at the adapted weights (Meta-Dataset's
            non-transductive protocol). Moving statistics are never updated
            by meta-training.
        task_execution: how the tasks of a meta-batch run: `"vectorized"`
            (`tf.vectorized_map`, tasks batched into single kernels),
            `"sequential"` (`tf.map_fn`, one task at a time, lower memory), or
            `"auto"` (default): sequential for networks with convolutions,
            whose per-task filter gradients TensorFlow cannot batch, and
            vectorized otherwise (see docs/performance.md for the figures).
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    # Whether the constructor refuses multi-output models (ANIL refuses them
    # with its own message, along with multi-input ones).
    _check_outputs = True

    def __init__(
        self,
        model,
        inner_learning_rate=0.01,
        inner_steps=1,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"{name} wraps a `keras.Model` (Sequential, functional or "
                f"subclassed). Received: model={model!r} of type "
                f"{type(model).__name__}"
            )
        if not model.built:
            raise ValueError(
                f"{name} needs a built model: its weights are the "
                f"meta-parameters. Build `{model.name}` first, e.g. with "
                "`model.build(input_shape)` or by calling it on a batch. "
                f"Received: an unbuilt model {model.name!r}"
            )
        if not model.trainable_variables:
            raise ValueError(
                f"{name} needs a model with trainable weights (the "
                f"meta-parameters). Received: model {model.name!r} with "
                "no trainable weights"
            )
        outputs = getattr(model, "outputs", None)
        if isinstance(outputs, (list, tuple)) and len(outputs) > 1 and self._check_outputs:
            raise ValueError(
                f"{name} meta-learns single-output models (one loss on one "
                f"output). Received: model {model.name!r} with {len(outputs)} "
                f"outputs of shapes {[tuple(o.shape) for o in outputs]}"
            )
        self.model = model
        self.inner_learning_rate = check_positive_float(
            "inner_learning_rate", inner_learning_rate
        )
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.eval_inner_steps = check_positive_int(
            "eval_inner_steps", eval_inner_steps, allow_none=True
        )
        self.inner_learning_rate_scaling = check_choice(
            "inner_learning_rate_scaling",
            inner_learning_rate_scaling,
            INNER_LEARNING_RATE_SCALINGS,
        )
        self.transductive_batch_norm = check_bool(
            "transductive_batch_norm", transductive_batch_norm
        )
        self.task_execution = check_choice(
            "task_execution", task_execution, TASK_EXECUTIONS
        )
        self._has_batch_norm = bool(inner_loop.batch_norm_layers(model))
        self.pre_adaptation_loss_tracker = keras.metrics.Mean(
            name="pre_adaptation_loss"
        )
        # Tasks of the epoch whose query loss or meta-gradient was not finite
        # (their meta-batch's update was skipped).
        self.non_finite_tasks_tracker = keras.metrics.Sum(name="non_finite_tasks")
        # Epoch means of the extra per-task scalars of `task_train`.
        self._extra_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.extra_train_outputs
        }
        self.built = True

    # ------------------------------------------------------------------
    # Hyper-parameters derived from the arguments.

    @property
    def step_size(self):
        """The inner step size actually used (after any scaling)."""
        if self.inner_learning_rate_scaling == "inverse_steps":
            return self.inner_learning_rate / self.inner_steps
        return self.inner_learning_rate

    @property
    def resolved_task_execution(self):
        """`"vectorized"` or `"sequential"`: what `task_execution` resolves to."""
        if self.task_execution != "auto":
            return self.task_execution
        return self._auto_task_execution()

    def _auto_task_execution(self):
        # Measured on 2 CPU cores (docs/performance.md): conv4 MAML runs ~1.8x
        # faster task by task (TensorFlow's vectorization falls back to a loop
        # for per-task convolution filter gradients), the sinusoid MLP ~3x
        # faster vectorized.
        return "sequential" if self._has_convolutions() else "vectorized"

    def _has_convolutions(self):
        return any(
            "Conv" in type(layer).__name__  # Conv1D/2D/3D, Depthwise, Separable...
            for layer in self.model._flatten_layers(include_self=False, recursive=True)
        )

    def _resolve_auto_jit_compile(self):
        # `compile(jit_compile="auto")`, the default. Keras turns XLA off on
        # machines without an accelerator. For networks without convolutions
        # a meta-step is hundreds of small ops that XLA fuses: sinusoid MAML
        # (PEERS.md B1) ran 1.7x faster with XLA on 2 CPU cores (515 vs 298
        # meta-steps/s; 1270 vs 701 with steps_per_execution=25), for a first
        # step of 2.6 s instead of 0.8 s. XLA:CPU is slow for convolutions
        # inside loops (docs/performance.md), so conv nets keep Keras' rule,
        # and so do distribution strategies.
        if super()._resolve_auto_jit_compile():
            return True
        if not AUTO_XLA_ON_CPU or self._distribute_strategy or self._has_convolutions():
            return False
        return keras.src.trainers.trainer.model_supports_jit(self)

    @property
    def _unroll_inner_loop(self):
        # Task by task (a `tf.map_fn` loop), the inner steps run in a
        # `tf.while_loop`: tracing time and graph size stay flat in the number
        # of steps. Vectorized, they are unrolled: `tf.vectorized_map` over a
        # while loop traced 1.6x longer (conv4, 5 steps).
        return self.resolved_task_execution == "vectorized"

    @property
    def adaptation_steps(self):
        """Inner steps used by `evaluate`, `predict` and `adapt`."""
        return self.eval_inner_steps or self.inner_steps

    # ------------------------------------------------------------------
    # Per-task building blocks: the network at fast weights.

    def compute_task_loss(self, y_true, y_pred, layer_losses=()):
        """The compiled loss of one task's predictions, plus layer losses.

        With a sparse classification loss, a class label outside
        `[0, outputs)` (or not an integer) makes the loss NaN instead of
        reaching the loss kernel: XLA would silently compute garbage, and
        TensorFlow's kernels raise an opaque error. The step then skips its
        update and `fit` raises a `ValueError` that names the label.
        """
        loss_fn = self._inner_loss_fn()
        valid = None
        if _is_sparse_loss(loss_fn) and y_pred.shape[-1] is not None:
            y_true, valid = _safe_labels(y_true, y_pred.shape[-1])
        loss = loss_fn(y_true, y_pred)
        if loss.shape.rank:
            loss = tf.reduce_mean(loss)
        elif isinstance(loss_fn, keras.losses.Loss) and loss_fn.reduction in (
            "sum_over_batch_size", "mean", "mean_with_sample_weight"
        ):
            # Under a tf.distribute strategy, Keras divides mean-reduced
            # losses by the replica count (so that summed replica gradients
            # average). A task's loss is not split across replicas: undo it,
            # or the inner step would shrink with the number of replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                loss = loss * tf.cast(replicas, loss.dtype)
        for extra in layer_losses:
            loss = loss + tf.cast(extra, loss.dtype)
        if valid is not None:
            loss = tf.where(valid, loss, tf.constant(float("nan"), loss.dtype))
        return loss

    def _inner_loss_fn(self):
        loss = getattr(self, "loss", None)
        if loss is None:
            raise ValueError(
                f"{type(self).__name__} needs a loss: call "
                "`compile(optimizer=..., loss=...)` first (the compiled loss "
                "is the inner and the outer objective)."
            )
        if isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                "keras_meta supports one loss for a single-output model. "
                f"Received: loss={loss!r}"
            )
        return keras.losses.get(loss)

    def _training_flags(self, training):
        """(support, query) `training` arguments of the network's calls.

        Meta-training runs the network in training mode. Evaluation runs
        it in training mode only where BatchNorm needs batch statistics:
        the support passes always, the query pass when transductive.
        """
        if training:
            return True, True
        support = self._has_batch_norm
        return support, support and self.transductive_batch_norm

    def support_loss(self, params, non_trainable, x, y, training):
        """Loss on the support set at fast weights `params`."""
        y_pred, _, losses = inner_loop.forward(
            self.model, params, non_trainable, x, training
        )
        return self.compute_task_loss(y, y_pred, losses)

    def adapt_parameters(
        self, params, non_trainable, x, y, steps, training, create_graph
    ):
        """Fast weights after `steps` inner steps on the support set."""
        return inner_loop.gradient_descent(
            lambda p: self.support_loss(p, non_trainable, x, y, training),
            params,
            steps=steps,
            learning_rate=self.step_size,
            create_graph=create_graph,
            unroll=self._unroll_inner_loop,
        )

    def query_outputs(self, params, non_trainable, support_x, query_x, training):
        """Query predictions and layer losses at fast weights `params`.

        Transductive BatchNorm normalises the query set with its own
        statistics; otherwise with the support set's moments at `params`.
        """
        if self.transductive_batch_norm or not self._has_batch_norm:
            y_pred, _, losses = inner_loop.forward(
                self.model, params, non_trainable, query_x, training
            )
        else:
            moments = inner_loop.batch_moments(
                self.model, params, non_trainable, support_x
            )
            y_pred, _, losses = inner_loop.forward(
                self.model, params, moments, query_x, False
            )
        return y_pred, losses

    def query_loss(self, params, non_trainable, task, training):
        """(loss, predictions) on the query set at fast weights `params`."""
        y_pred, losses = self.query_outputs(
            params, non_trainable, task["support_x"], task["query_x"], training
        )
        return self.compute_task_loss(task["query_y"], y_pred, losses), y_pred

    # ------------------------------------------------------------------
    # What a subclass defines.

    # Names of extra per-task scalars `task_train` returns; they are averaged
    # over the meta-batch and logged (e.g. iMAML's CG diagnostics).
    extra_train_outputs = ()

    def task_train(self, params, non_trainable, task):
        """Meta-gradient of one task.

        Args:
            params: list of tensors, the meta-parameters (the wrapped model's
                trainable weights, in order).
            non_trainable: list of tensors, its non-trainable weights.
            task: dict with one task's `support_x`, `support_y`, `query_x`,
                `query_y` (no meta-batch axis).

        Returns:
            A dict with `"gradients"` (list aligned with `params`), `"loss"`
            (the query loss after adaptation) and `"predictions"` (query
            predictions after adaptation); optional extra scalar entries
            are averaged over the meta-batch and logged.
        """
        raise NotImplementedError

    def task_evaluate(self, params, non_trainable, task, steps):
        """Query predictions and losses of one task after adaptation."""
        support_training, query_training = self._training_flags(False)
        pre_loss, _ = self.query_loss(params, non_trainable, task, query_training)
        fast = self.adapt_parameters(
            params,
            non_trainable,
            task["support_x"],
            task["support_y"],
            steps,
            support_training,
            create_graph=False,
        )
        loss, y_pred = self.query_loss(fast, non_trainable, task, query_training)
        return {"loss": loss, "pre_adaptation_loss": pre_loss, "predictions": y_pred}

    def task_predict(self, params, non_trainable, task, steps):
        """Query predictions of one task after adaptation."""
        support_training, query_training = self._training_flags(False)
        fast = self.adapt_parameters(
            params,
            non_trainable,
            task["support_x"],
            task["support_y"],
            steps,
            support_training,
            create_graph=False,
        )
        y_pred, _ = self.query_outputs(
            fast, non_trainable, task["support_x"], task["query_x"], query_training
        )
        return {"predictions": y_pred}

    # ------------------------------------------------------------------
    # Running the tasks of a meta-batch.

    def map_tasks(self, task_fn, episode, keys):
        """Runs `task_fn(task)` on every task of `episode`; stacks the results.

        `task_fn` returns a dict with the given `keys` (`"gradients"` maps to a
        list aligned with the meta-parameters, every other key to a tensor).
        Results come back with a leading meta-batch axis, cast to the
        meta-parameters' dtype.
        """
        dtype = self.model.trainable_variables[0].dtype

        def fn(task):
            out = task_fn(task)
            return {key: tf.nest.map_structure(lambda t: tf.cast(t, dtype), out[key]) for key in keys}

        if self.resolved_task_execution == "vectorized":
            return tf.vectorized_map(fn, episode)
        spec = tf.TensorSpec(None, dtype)
        signature = {
            key: [spec] * len(self.model.trainable_variables)
            if key == "gradients"
            else spec
            for key in keys
        }
        return tf.map_fn(fn, episode, fn_output_signature=signature)

    # ------------------------------------------------------------------
    # Episode checks.

    def _check_episode(self, data, keys=EPISODE_KEYS, single_task=False):
        name = type(self).__name__
        data = _as_episode_dict(data)
        if not isinstance(data, dict):
            raise ValueError(
                f"{name} expects episodes as dicts with keys {list(keys)}, "
                "each with a leading meta-batch axis. Received: "
                f"{type(data).__name__}"
            )
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(
                f"Episode is missing key(s) {missing}. {name} expects dicts "
                f"with keys {list(keys)}, each with a leading meta-batch "
                f"axis. Received keys: {sorted(data)}"
            )
        episode = {key: tf.convert_to_tensor(data[key]) for key in keys}
        for key, value in episode.items():
            if value.shape.rank is not None and value.shape.rank < 2:
                raise ValueError(
                    f"Episode entry `{key}` must have shape [meta_batch, "
                    f"examples, ...] (rank >= 2). Received: shape={value.shape}"
                )
        shapes = {key: value.shape for key, value in episode.items()}
        self._check_shapes(shapes, single_task)
        meta_batch = {k: s[0] for k, s in shapes.items() if s.rank and s[0] is not None}
        if len(set(meta_batch.values())) > 1:
            raise ValueError(
                "All episode entries must share the meta-batch size (axis 0). "
                f"Received shapes: { {k: tuple(s) for k, s in shapes.items()} }"
            )
        for prefix in ("support", "query"):
            x_key, y_key = f"{prefix}_x", f"{prefix}_y"
            if x_key in shapes and y_key in shapes:
                nx, ny = shapes[x_key][1], shapes[y_key][1]
                if nx is not None and ny is not None and nx != ny:
                    raise ValueError(
                        f"`{x_key}` and `{y_key}` must hold the same number of "
                        f"examples per task (axis 1). Received: {x_key} shape="
                        f"{tuple(shapes[x_key])}, {y_key} shape="
                        f"{tuple(shapes[y_key])}"
                    )
        return episode

    def _input_shape(self):
        """The model's input shape per example, or None if it has no `inputs`."""
        inputs = getattr(self.model, "inputs", None)
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            return tuple(inputs[0].shape[1:])
        return None

    def _output_shape(self, x_shape, dtype):
        """The model's output shape per example for inputs of `x_shape`."""
        outputs = getattr(self.model, "outputs", None)
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            return tuple(outputs[0].shape[1:])
        cache = self.__dict__.setdefault("_output_shapes", {})
        key = (tuple(x_shape), dtype)
        if key not in cache:
            with tf.init_scope():
                spec = self.model.compute_output_spec(
                    keras.KerasTensor((None,) + tuple(x_shape), dtype)
                )
            if not isinstance(spec, keras.KerasTensor):
                raise ValueError(
                    f"{type(self).__name__} meta-learns single-output models "
                    f"(one loss on one output). Received: model "
                    f"{self.model.name!r} returning "
                    f"{tf.nest.map_structure(lambda t: tuple(t.shape), spec)}"
                )
            cache[key] = tuple(spec.shape[1:])
            self.__dict__["_output_width"] = spec.shape[-1]
        return cache[key]

    def _check_shapes(self, shapes, single_task=False):
        """Static checks of the per-example shapes of an episode's entries."""
        expected = self._input_shape()
        for key in ("support_x", "query_x"):
            shape = shapes.get(key)
            if expected is None or shape is None or shape.rank is None:
                continue
            example = tuple(shape[2:])
            if _compatible(example, expected):
                continue
            hint = ""
            if single_task:
                shape = shape[1:]
                if _compatible(tuple(shape[2:]), expected):
                    hint = (
                        " `adapt` takes one task without a meta-batch axis: "
                        "pass `support_x[0]`, `support_y[0]`."
                    )
                raise ValueError(
                    f"`support_x` of one task must have shape [examples] + "
                    f"{expected} (the model's input shape per example). "
                    f"Received: support_x shape={tuple(shape)}.{hint}"
                )
            if _compatible(tuple(shape[1:]), expected):
                hint = (
                    " The meta-batch axis is missing: add one (`x[None]` for "
                    "a single task), or use `adapt()` for one task."
                )
            elif shape.rank > 2 and _compatible(tuple(shape[3:]), expected):
                hint = " There is one axis too many (a meta-batch axis added twice?)."
            raise ValueError(
                f"Episode entry `{key}` must have shape [meta_batch, examples] + "
                f"{expected} (the model's input shape per example). Received: "
                f"{key} shape={tuple(shape)}.{hint}"
            )
        if getattr(self, "loss", None) is None:
            return
        sparse = _is_sparse_loss(self._inner_loss_fn())
        x_shape = shapes.get("query_x", shapes.get("support_x"))
        if x_shape is None or x_shape.rank is None:
            return
        output = self._output_shape(x_shape[2:], "float32")
        for key in ("support_y", "query_y"):
            shape = shapes.get(key)
            if shape is None or shape.rank is None:
                continue
            target = tuple(shape[2:])
            if sparse:
                if target in ((), (1,)):
                    continue
                raise ValueError(
                    f"With the sparse classification loss "
                    f"({_loss_name(self._inner_loss_fn())}), `{key}` holds one "
                    "class index per example: shape [meta_batch, examples] (or "
                    f"[..., 1]). Received: {key} shape={tuple(shape)} for model "
                    f"outputs of shape {(None,) + output}. One-hot targets need "
                    "`keras.losses.CategoricalCrossentropy`; or pass the class "
                    "indices (`argmax` over the last axis)."
                )
            if not _compatible(target, output):
                raise ValueError(
                    f"`{key}` must have the model's output shape per example: "
                    f"the model outputs {(None,) + output}, so `{key}` should "
                    f"be [meta_batch, examples] + {output}. Received: {key} "
                    f"shape={tuple(shape)}; the loss would broadcast "
                    f"{target} against {output} without an error."
                )

    # ------------------------------------------------------------------
    # Keras trainer hooks.

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TF trainer calls this before tracing a step function. Left
        # to itself it defers building to the first trace (without a
        # distribution strategy) or builds by calling the model on a
        # symbolic batch with `y` (with one). Neither fits a learner: the
        # optimizer slots and compiled metrics would be created inside the
        # first trace, which makes `tf.function` trace the whole meta-step
        # twice, and `call` takes an episode, not `x`. Build both here,
        # eagerly, from the episode's shapes.
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        if data_batch is None:
            return
        local = self.distribute_strategy.experimental_local_results
        for value in tf.nest.flatten(data_batch):
            if isinstance(value, tf.distribute.DistributedValues):
                sizes = [int(tf.shape(t)[0]) for t in local(value)]
                if len(set(sizes)) > 1:
                    raise ValueError(
                        "The global meta-batch must split evenly across the "
                        f"{self.distribute_strategy.num_replicas_in_sync} "
                        "replicas: make meta_batch_size a multiple of the "
                        f"replica count. Received per-replica sizes {sizes}"
                    )
                break
        data_batch = tf.nest.map_structure(
            lambda t: local(t)[0]
            if isinstance(t, tf.distribute.DistributedValues)
            else t,
            data_batch,
        )
        data = _as_episode_dict(data_batch)
        if isinstance(data, dict):
            present = [k for k in EPISODE_KEYS if k in data]
            self._check_values(self._check_episode(data, present), finite=False)
        with self.distribute_strategy.scope():
            self._build_training_state(data_batch)

    def _build_training_state(self, data_batch):
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)
        metrics = self._compile_metrics
        if metrics is None or metrics.built:
            return
        data = _as_episode_dict(data_batch)
        if not isinstance(data, dict) or "query_y" not in data:
            return  # predict: no metrics; bad episodes fail in the step
        episode = self._check_episode(data)
        query_y = episode["query_y"]
        y_true = keras.KerasTensor((None,) + tuple(query_y.shape[2:]), query_y.dtype)
        y_pred = self.model.compute_output_spec(
            keras.KerasTensor(
                (None,) + tuple(episode["query_x"].shape[2:]), episode["query_x"].dtype
            )
        )
        metrics.build(y_true, y_pred)

    def _meta_state(self):
        params = [tf.convert_to_tensor(v) for v in self.model.trainable_variables]
        non_trainable = [
            tf.convert_to_tensor(v) for v in self.model.non_trainable_variables
        ]
        return params, non_trainable

    def train_step(self, data):
        episode = self._check_episode(data)
        params, non_trainable = self._meta_state()

        # Adapt on support, outer loss on query: per task, in parallel.
        results = self.map_tasks(
            lambda task: self.task_train(params, non_trainable, task),
            episode,
            ("gradients", "loss", "predictions") + self.extra_train_outputs,
        )

        # Meta-gradient: mean over the tasks (and over replicas: Keras' TF
        # optimizer sums the replicas' gradients, which equals the mean over
        # the global meta-batch when every replica holds as many tasks).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.control_dependencies(self._check_even_split(episode)):
            gradients = [
                tf.reduce_mean(g, axis=0) / replicas for g in results["gradients"]
            ]

        # Update, unless a task's loss or meta-gradient is not finite.
        finite = tf.math.is_finite(results["loss"])
        for g in results["gradients"]:
            finite = finite & tf.reduce_all(
                tf.reshape(tf.math.is_finite(g), [tf.shape(g)[0], -1]), axis=1
            )
        self.apply_meta_gradients(gradients, non_finite_tasks=_count_false(finite))
        return self._update_metrics(episode, results, training=True)

    def apply_meta_gradients(self, gradients, non_finite_tasks):
        """Applies `gradients` with the compiled optimizer, if every task was finite.

        `non_finite_tasks` counts this replica's tasks whose query loss or
        meta-gradient was NaN or infinite; it is added to the
        `non_finite_tasks` metric. When any replica counts one, no replica
        applies its update: the weights and the optimizer state stay as they
        were (the step is skipped, as `optax.apply_if_finite` does).
        """
        self.non_finite_tasks_tracker.update_state(non_finite_tasks)
        total = non_finite_tasks
        context = tf.distribute.get_replica_context()
        if tf.distribute.get_strategy().num_replicas_in_sync > 1 and context is not None:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, non_finite_tasks)
        finite = tf.equal(total, 0)
        variables = self.model.trainable_variables

        def apply(gradients):
            self.optimizer.apply_gradients(zip(gradients, variables))

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(finite, lambda: apply(gradients), lambda: None)
            return

        # Like `keras.optimizers.LossScaleOptimizer`: a cond whose branch
        # calls `merge_call` must run in the cross-replica context.
        def cross_replica(strategy, gradients, finite):
            finite = strategy.experimental_local_results(finite)[0]
            tf.cond(
                finite,
                lambda: strategy.extended.call_for_each_replica(apply, args=(gradients,)),
                lambda: None,
            )

        context.merge_call(cross_replica, args=(gradients, finite))

    def test_step(self, data):
        episode = self._check_episode(data)
        params, non_trainable = self._meta_state()
        results = self.map_tasks(
            lambda task: self.task_evaluate(
                params, non_trainable, task, self.adaptation_steps
            ),
            episode,
            ("loss", "pre_adaptation_loss", "predictions"),
        )
        return self._update_metrics(episode, results, training=False)

    def predict_step(self, data):
        episode = self._check_episode(data, PREDICT_KEYS)
        predictions = _merge_meta_batch(self._adapt_and_predict(episode))
        violation = self._label_violation(episode)
        if not violation:
            return predictions
        # Read (and removed) by the guarded predict function.
        return {"predictions": predictions, **{k: v[None] for k, v in violation.items()}}

    def call(self, inputs, training=False):
        """Query predictions after adaptation, `[meta_batch, queries, ...]`.

        `inputs` is an episode dict (`support_x`, `support_y`, `query_x`).
        """
        return self._adapt_and_predict(self._check_episode(inputs, PREDICT_KEYS))

    def _adapt_and_predict(self, episode):
        params, non_trainable = self._meta_state()
        results = self.map_tasks(
            lambda task: self.task_predict(
                params, non_trainable, task, self.adaptation_steps
            ),
            episode,
            ("predictions",),
        )
        return results["predictions"]

    # ------------------------------------------------------------------
    # In-memory episodes: checked before Keras slices them into batches
    # (its adapters would report mismatched support and query sizes as an
    # ambiguous cardinality, or fail on a missing meta-batch axis).

    def fit(self, x=None, *args, **kwargs):
        self._check_in_memory(x, EPISODE_KEYS)
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_in_memory(x, EPISODE_KEYS)
        return super().evaluate(x, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check_in_memory(x, PREDICT_KEYS)
        return super().predict(x, *args, **kwargs)

    def _check_in_memory(self, x, keys):
        if isinstance(x, dict) and not isinstance(x, tf.data.Dataset):
            present = [key for key in keys if key in x]
            self._check_episode(x, present if len(present) == len(keys) else keys)

    # ------------------------------------------------------------------
    # Step functions: Keras' own, run with the checks below.

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        self.train_function = self._guarded(self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function
        super().make_test_function(force=force)
        self.test_function = self._guarded(self.test_function)
        return self.test_function

    def make_predict_function(self, force=False):
        if self.predict_function is not None and not force:
            return self.predict_function
        super().make_predict_function(force=force)
        self.predict_function = self._guarded(self.predict_function)
        return self.predict_function

    def _guarded(self, function):
        """`function` run without Grappler's memory optimizer, then checked.

        The memory optimizer breaks second-order gradients through inner
        loops (see `_internals.memory_optimizer_off`). The check raises the
        label errors the step recorded in its logs (an in-graph assertion
        would not survive `jit_compile`).
        """

        def guarded(*args, **kwargs):
            with _internals.memory_optimizer_off():
                logs = function(*args, **kwargs)
            if isinstance(logs, dict) and _LABEL_KEYS[0] in logs:
                logs = dict(logs)
                count, value, key = (
                    float(np.ravel(keras.ops.convert_to_numpy(logs.pop(k)))[0])
                    for k in _LABEL_KEYS
                )
                if count > 0:
                    raise ValueError(
                        self._label_message(
                            ("support_y", "query_y")[int(round(key))], value, count
                        )
                    )
                if set(logs) == {"predictions"}:
                    return logs["predictions"]
            return logs

        return guarded

    def _label_width(self):
        """The model's output width if the compiled loss is sparse, else None."""
        if getattr(self, "loss", None) is None or not _is_sparse_loss(self._inner_loss_fn()):
            return None
        outputs = getattr(self.model, "outputs", None)
        if outputs:
            return outputs[0].shape[-1]
        return self.__dict__.get("_output_width")

    def _label_message(self, key, value, count=1):
        width = self._label_width()
        return (
            f"Class labels must be integers in [0, {width}): the model has "
            f"{width} outputs and the loss "
            f"({_loss_name(self._inner_loss_fn())}) reads labels as indices "
            f"into them. Received: a label {value:g} in `{key}` ({int(count)} "
            "invalid label(s) in the meta-batch). An episode's labels run "
            "from 0 to n_way - 1: build the model with as many outputs as the "
            "episodes' n_way (e.g. `km.models.conv4(n_way)`)."
        )

    def _label_violation(self, episode):
        """In-graph count, first value and key of invalid class labels.

        Empty unless the compiled loss is a sparse classification loss.
        """
        width = self._label_width()
        if width is None:
            return {}
        counts, values, keys = [], [], []
        for index, key in enumerate(("support_y", "query_y")):
            if key not in episode:
                continue
            y = tf.reshape(episode[key], [-1])
            bad = _invalid_labels(y, width)
            counts.append(tf.reduce_sum(tf.cast(bad, tf.float32)))
            first = tf.argmax(tf.cast(bad, tf.int32))
            values.append(tf.cast(tf.gather(y, first), tf.float32))
            keys.append(float(index))
        counts = tf.stack(counts)
        which = tf.argmax(tf.cast(counts > 0, tf.int32))
        return {
            _LABEL_KEYS[0]: tf.reduce_sum(counts),
            _LABEL_KEYS[1]: tf.gather(tf.stack(values), which),
            _LABEL_KEYS[2]: tf.gather(tf.constant(keys), which),
        }

    def _check_values(self, episode, finite=True):
        """Host-side checks of one batch: class labels and finite values.

        Runs on the first batch of `fit`/`evaluate` (labels only: a training
        step skips and counts non-finite tasks) and on the inputs of
        `evaluate_tasks` and `adapt`, before anything is traced.
        """
        width = self._label_width()
        for key, value in episode.items():
            array = np.asarray(keras.ops.convert_to_numpy(value))
            if finite and array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
                bad = array[~np.isfinite(array)].ravel()[0]
                raise ValueError(
                    f"Episode entry `{key}` contains non-finite values "
                    f"({int(np.sum(~np.isfinite(array)))} NaN/inf, e.g. {bad}). "
                    "Clean the data source (in training, keras_meta skips the "
                    "meta-batches whose losses are not finite and counts their "
                    "tasks in the `non_finite_tasks` metric)."
                )
            if width is None or not key.endswith("_y"):
                continue
            flat = array.ravel()
            bad = (flat < 0) | (flat >= width) | (np.round(flat) != flat)
            if np.any(bad):
                raise ValueError(self._label_message(key, float(flat[bad][0]), np.sum(bad)))
            if key == "support_y" and array.ndim >= 2:
                classes = max(len(np.unique(task)) for task in array.reshape(array.shape[0], -1))
                if classes > width:
                    raise ValueError(
                        f"A task of `support_y` has {classes} classes but the "
                        f"model has {width} outputs: the episodes' n_way must "
                        "not exceed the model's output width."
                    )

    def _check_even_split(self, episode):
        """Under a multi-replica strategy, asserts equal local meta-batches."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        context = tf.distribute.get_replica_context()
        if replicas == 1 or context is None:
            return []
        local = tf.shape(episode["support_x"], out_type=tf.int64)[0]
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        return [
            tf.debugging.assert_equal(
                total,
                local * replicas,
                message=(
                    "The global meta-batch must split evenly across the "
                    f"{replicas} replicas (meta_batch_size divisible by "
                    f"{replicas}): a replica received a different number of tasks"
                ),
            )
        ]

    def _update_metrics(self, episode, results, training):
        """Shared bookkeeping of train and test steps; returns the logs."""
        self._loss_tracker.update_state(tf.reduce_mean(results["loss"]))
        if training:
            for name in self.extra_train_outputs:
                self._extra_trackers[name].update_state(tf.reduce_mean(results[name]))
        else:
            self.pre_adaptation_loss_tracker.update_state(
                tf.reduce_mean(results["pre_adaptation_loss"])
            )
        logs = self.compute_metrics(
            None,
            _merge_meta_batch(episode["query_y"]),
            _merge_meta_batch(results["predictions"]),
        )
        # Trackers that belong to the other kind of step stay out of the logs.
        unused = (
            self.extra_train_outputs + ("non_finite_tasks",)
            if not training
            else ("pre_adaptation_loss",)
        )
        logs = {key: value for key, value in logs.items() if key not in unused}
        logs.update(self._label_violation(episode))
        if _multi_worker(self.distribute_strategy):
            # Keras reduces multi-worker logs with `strategy.reduce("MEAN",
            # value, axis=0)`, which fails on scalars: give them an axis.
            logs = {key: tf.reshape(value, [1]) for key, value in logs.items()}
        return logs

    # ------------------------------------------------------------------
    # Few-shot evaluation, task by task.

    def evaluate_tasks(self, episode, steps=None):
        """Per-task query losses and predictions along the adaptation path.

        Adapts every task of one meta-batch and records the query loss and
        predictions after each number of inner steps in `steps` (0 = before
        adaptation). This is the few-shot protocol's raw material: means and
        95% intervals over tasks, adaptation curves, accuracies.

        Args:
            episode: one meta-batch (dict of arrays or tensors).
            steps: increasing non-negative ints; default `[0, eval_inner_steps]`.

        Returns:
            A dict of numpy arrays: `"steps"` `[S]`, `"loss"`
            `[meta_batch, S]` and `"predictions"`
            `[meta_batch, S, queries, ...]`.
        """
        steps = [0, self.adaptation_steps] if steps is None else list(steps)
        if not steps or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps
        ) or steps != sorted(set(steps)):
            raise ValueError(
                "`steps` must be a non-empty, strictly increasing list of "
                f"non-negative ints. Received: steps={steps!r}"
            )
        episode = self._check_episode(episode)
        self._check_values(episode)
        key = tuple(steps)
        functions = self.__dict__.setdefault("_evaluate_tasks_functions", {})
        if key not in functions:
            functions[key] = tf.function(
                lambda e: self._evaluate_tasks(e, key), reduce_retracing=True
            )
        results = functions[key](episode)
        results = {k: v.numpy() for k, v in results.items()}
        results["steps"] = np.array(steps)
        return results

    def _evaluate_tasks(self, episode, steps):
        params, non_trainable = self._meta_state()
        support_training, query_training = self._training_flags(False)

        def task_fn(task):
            fast, losses, predictions = params, [], []
            for previous, current in zip((0,) + steps[:-1], steps):
                fast = self.adapt_parameters(
                    fast,
                    non_trainable,
                    task["support_x"],
                    task["support_y"],
                    current - previous,
                    support_training,
                    create_graph=False,
                )
                loss, y_pred = self.query_loss(
                    fast, non_trainable, task, query_training
                )
                losses.append(loss)
                predictions.append(y_pred)
            return {"loss": tf.stack(losses), "predictions": tf.stack(predictions)}

        return self.map_tasks(task_fn, episode, ("loss", "predictions"))

    # ------------------------------------------------------------------
    # Adapted models.

    def adapt(self, support_x, support_y, steps=None):
        """Adapts to one task and returns a standalone Keras model.

        Runs `steps` (default `eval_inner_steps`) inner steps on the support
        set, then returns a clone of the wrapped model holding the adapted
        weights: a plain `keras.Model` that predicts, saves (`.keras`) and
        exports (`export()`) without keras_meta. Its BatchNorm layers carry
        the support set's moments at the adapted weights as moving statistics,
        so in inference mode it normalises every input with the support
        statistics: its query predictions equal the learner's exactly with
        `transductive_batch_norm=False`, and differ from the transductive
        learner's (which normalises the query set with its own statistics)
        by that change of statistics only. The wrapped model is not modified.

        Args:
            support_x: one task's support inputs, `[examples, ...]` (no
                meta-batch axis).
            support_y: one task's support targets, `[examples, ...]`.
            steps: inner steps (positive int); default `eval_inner_steps`.

        Returns:
            A new, uncompiled `keras.Model` with the adapted weights.
        """
        steps = check_positive_int(
            "steps", self.adaptation_steps if steps is None else steps
        )
        support_x = tf.convert_to_tensor(support_x)
        support_y = tf.convert_to_tensor(support_y)
        if support_x.shape.rank < 1 or support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                "`support_x` and `support_y` must hold the same number of "
                "examples (axis 0; one task, no meta-batch axis). Received: "
                f"support_x shape={tuple(support_x.shape)}, support_y "
                f"shape={tuple(support_y.shape)}"
            )
        # One task: checked as a meta-batch of one.
        self._check_values(
            self._check_episode(
                {"support_x": support_x[None], "support_y": support_y[None]},
                ("support_x", "support_y"),
                single_task=True,
            )
        )
        params, non_trainable = self._meta_state()
        support_training, _ = self._training_flags(False)
        fast = self.adapt_parameters(
            params,
            non_trainable,
            support_x,
            support_y,
            steps,
            support_training,
            create_graph=False,
        )
        names = [v.path for v in self.model.trainable_variables]
        try:
            self.check_finite_weights("adapt", list(zip(names, fast)))
        except ValueError as error:
            raise ValueError(
                f"{error} (here: the weights after {steps} inner steps on "
                "this support set; the inner loop diverged, lower "
                "`inner_learning_rate` or the steps)"
            ) from None
        return self.export_model(fast, non_trainable, support_x)

    def check_finite_weights(self, action="save", weights=None):
        """Raises ValueError if a weight of the wrapped model is NaN or infinite.

        keras_meta never saves or exports non-finite weights: `save`,
        `export_adaptive` and `adapt` call this first.
        """
        if weights is None:
            weights = [(v.path, v) for v in self.model.weights]
        bad = [name for name, value in weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(value)))]
        if bad:
            raise ValueError(
                f"Refusing to {action} {type(self).__name__} {self.name!r}: "
                f"{len(bad)} weight tensor(s) hold NaN or infinite values "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). The "
                "training diverged: lower the learning rates "
                "(`inner_learning_rate`, the optimizer's) and retrain, or "
                "restore an earlier checkpoint."
            )

    def save(self, filepath, *args, **kwargs):
        self.check_finite_weights("save")
        return super().save(filepath, *args, **kwargs)

    def export_model(self, params, non_trainable, support_x):
        """A clone of the wrapped model holding fast weights `params`.

        Its non-trainable values are the support set's BatchNorm moments at
        `params` (see `adapt`).
        """
        statistics = inner_loop.batch_moments(
            self.model, params, non_trainable, support_x
        )
        clone = _clone(self.model, support_x)
        for variable, value in zip(clone.trainable_variables, params):
            variable.assign(value)
        for variable, value in zip(clone.non_trainable_variables, statistics):
            variable.assign(value)
        return clone

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            "inner_learning_rate": self.inner_learning_rate,
            "inner_steps": self.inner_steps,
            "eval_inner_steps": self.eval_inner_steps,
            "inner_learning_rate_scaling": self.inner_learning_rate_scaling,
            "transductive_batch_norm": self.transductive_batch_norm,
            "task_execution": self.task_execution,
        }

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes the dict
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


_LABEL_KEYS = ("_invalid_labels", "_invalid_label_value", "_invalid_label_key")


def _is_sparse_loss(loss_fn):
    """Whether `loss_fn` reads targets as class indices (sparse cross-entropy)."""
    if isinstance(loss_fn, keras.losses.SparseCategoricalCrossentropy):
        return getattr(loss_fn, "_fn_kwargs", {}).get("ignore_class") is None
    return getattr(loss_fn, "__name__", "") == "sparse_categorical_crossentropy"


def _loss_name(loss_fn):
    return getattr(loss_fn, "name", None) or getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _invalid_labels(y, width):
    """Boolean mask of labels outside `[0, width)` or not integers."""
    y = tf.convert_to_tensor(y)
    bad = (y < tf.cast(0, y.dtype)) | (y >= tf.cast(width, y.dtype))
    if y.dtype.is_floating:
        bad = bad | tf.logical_not(tf.math.is_finite(y)) | tf.not_equal(y, tf.round(y))
    return bad


def _safe_labels(y, width):
    """(labels with invalid entries set to 0, whether all were valid)."""
    y = tf.convert_to_tensor(y)
    bad = _invalid_labels(y, width)
    return tf.where(bad, tf.zeros_like(y), y), tf.logical_not(tf.reduce_any(bad))


def _compatible(shape, expected):
    """Whether two static shapes can be equal (None matches any size)."""
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )


def _count_false(mask):
    return tf.reduce_sum(tf.cast(tf.logical_not(mask), tf.float32))


def _multi_worker(strategy):
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def _as_episode_dict(data):
    """The episode from what Keras passes a step: `x` or `(x, y, weight)`."""
    if isinstance(data, (tuple, list)):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(tuple(data))
    return data


def _merge_meta_batch(tensor):
    """[meta_batch, examples, ...] -> [meta_batch * examples, ...]."""
    shape = tf.shape(tensor)
    return tf.reshape(tensor, tf.concat([[-1], shape[2:]], axis=0))


def _clone(model, sample_x):
    """A new model with `model`'s architecture and fresh variables."""
    try:
        clone = keras.models.clone_model(model)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"Could not clone model {model.name!r} to hold adapted weights. "
            "Subclassed models must be re-creatable from `get_config()` "
            f"(implement `get_config`/`from_config`). Cause: {error}"
        ) from error
    if not clone.built:
        build_config = model.get_build_config()
        if build_config:
            clone.build_from_config(build_config)
        else:
            clone(sample_x[:1])
    if len(clone.trainable_variables) != len(model.trainable_variables) or len(
        clone.non_trainable_variables
    ) != len(model.non_trainable_variables):
        raise ValueError(
            f"The clone of model {model.name!r} does not have the same "
            "variables as the original; implement `get_config`/`from_config` "
            "so that `keras.models.clone_model` re-creates it."
        )
    return clone
