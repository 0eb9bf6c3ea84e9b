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

from keras_meta import inner_loop
from keras_meta.data.episodes import EPISODE_KEYS
from keras_meta.validation import check_choice, check_positive_float, check_positive_int

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
        self.transductive_batch_norm = bool(transductive_batch_norm)
        self.task_execution = check_choice(
            "task_execution", task_execution, TASK_EXECUTIONS
        )
        self._has_batch_norm = bool(inner_loop.batch_norm_layers(model))
        self.pre_adaptation_loss_tracker = keras.metrics.Mean(
            name="pre_adaptation_loss"
        )
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
        """The compiled loss of one task's predictions, plus layer losses."""
        loss_fn = self._inner_loss_fn()
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

    def _check_episode(self, data, keys=EPISODE_KEYS):
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

        # Update.
        self.optimizer.apply_gradients(
            zip(gradients, self.model.trainable_variables)
        )
        return self._update_metrics(episode, results, training=True)

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
        predictions = self._adapt_and_predict(self._check_episode(data, PREDICT_KEYS))
        return _merge_meta_batch(predictions)

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
        unused = self.extra_train_outputs if not training else ("pre_adaptation_loss",)
        logs = {key: value for key, value in logs.items() if key not in unused}
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
        return self.export_model(fast, non_trainable, support_x)

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
