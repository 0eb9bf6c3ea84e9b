"""`MetaLearner`: the `keras.Model` skeleton shared by every algorithm.

A meta-learner wraps a built Keras model whose trainable weights are the
meta-parameters. `model.fit` feeds it episodes (dicts with `support_x`,
`support_y`, `query_x`, `query_y`, each with a leading meta-batch axis); per
task it adapts fast weights on the support set and scores the query set.

Every path adapts a task through one primitive, a
`keras_meta.adaptation.Adaptation` (start, advance k steps, score the query
set, full weights for export) that this class builds from what an algorithm
states. An algorithm is these hooks, each with a default (MAML's):

- `build_network()`: which weights adapt and what the start state computes
  once (default: every weight, the whole network at the fast weights);
- `inner_transforms(training)`: terms of the inner objective as gradient
  transforms chained before the inner optimiser (default: none);
- `finalize(training)`: a map of the fast weights before they are scored
  (default: none);
- `task_train(params, non_trainable, task)`: one task's meta-gradient
  (default: differentiate the query loss through the adaptation, second order,
  or first order with `first_order = True`);

and class attributes: `extra_train_outputs`, `batched_tape_when_vectorized`,
`unroll_inner_loop_when_vectorized`.

The meta-parameters are `meta_variables`: the wrapped model's trainable
weights, followed by the learner's own `learned_variables` when it has any
(learned inner rates, per-step BatchNorm weights; `build_learned_state`).
The `params` lists the hooks receive are aligned with them, and so are the
gradients the compiled optimizer applies; `split_meta_parameters(params)`
separates the model's weights from the learned values, which
`adaptation(..., learned=...)` adapts with.
"""

import collections
import copy
import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_meta import _internals, devices, inner_loop, prototypes
from keras_meta import step_size as step_size_rules
from keras_meta.adaptation import Adaptation, WholeNetwork
from keras_meta.algorithms.checks import (
    PREDICT_KEYS,
    EpisodeChecks,
    _as_episode_dict,
    _count_false,
    _is_sparse_loss,
    _safe_labels,
)
from keras_meta.batch_norm import BatchNorm, batch_norm_layers, forward
from keras_meta.data.episodes import EPISODE_KEYS
from keras_meta.step_size import StepSize
from keras_meta.validation import check_bool, check_choice, check_positive_float, check_positive_int

TASK_EXECUTIONS = ("auto", "vectorized", "sequential")
# Whether `compile(jit_compile="auto")` turns XLA on for networks without
# convolutions on CPU-only machines (see `_auto_jit_compile`). The test suite
# turns it off outside the tests of this rule, to save compile time.
AUTO_XLA_ON_CPU = True

Execution = collections.namedtuple(
    "Execution", ["tasks", "unroll_inner_loop", "early_exit", "batched_tape"]
)
Execution.__doc__ = """What `task_execution` decides, in one place.

`tasks`: `"vectorized"` (`tf.vectorized_map`) or `"sequential"` (`tf.map_fn`).
`unroll_inner_loop`: inner steps unrolled (vectorized: `tf.vectorized_map` over a
`tf.while_loop` traced 1.6x longer, conv4 MAML, 5 steps) or one `tf.while_loop`
(task by task: tracing time and graph size flat in the number of steps).
`early_exit`: loops may stop early (CG), which only a task-by-task loop can.
`batched_tape`: one tape around the vectorized tasks (one backward pass over
the meta-batch for weights every task shares, ANIL's body) instead of per-task
gradients.
"""

# The `MetaLearner.__init__` arguments that subclasses forward.
_BASE_ARGUMENTS = (
    "model", "inner_learning_rate", "inner_steps", "eval_inner_steps",
    "inner_learning_rate_scaling", "transductive_batch_norm", "task_execution",
    "inner_optimizer", "learned_inner_learning_rates", "multi_step_loss",
    "multi_step_loss_epochs", "per_step_batch_norm",
)

# MAML++'s floor on the multi-step loss weights of the non-final steps,
# `0.03 / inner_steps` (`get_per_step_loss_importance_vector`).
_MSL_FLOOR = 0.03


class MetaLearner(EpisodeChecks, keras.Model):
    """Base class of keras_meta's meta-learners (a `keras.Model`).

    Not used directly: see `keras_meta.MAML`. A subclass states its math in
    the hooks listed in this module's docstring; `train_step`, `test_step`,
    `predict_step`, `adapt`, `evaluate_tasks` and `get_config` are shared.

    Args:
        model: a built `keras.Model` (Sequential, functional or subclassed).
            Its trainable weights are the meta-parameters.
        inner_learning_rate: positive float, the inner-loop step size.
        inner_steps: positive int, inner gradient steps during meta-training.
        eval_inner_steps: positive int or `None` (= `inner_steps`), inner steps
            in `evaluate`, `predict` and `adapt`.
        inner_learning_rate_scaling: `None` or `"inverse_steps"`
            (`keras_meta.step_size.StepSize`): with `"inverse_steps"` the inner
            step size is `inner_learning_rate / inner_steps`.
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
        inner_optimizer: `"sgd"` (default), `"momentum"`, `"adam"`, or a dict
            `{"name": ..., **kwargs}` (e.g. `{"name": "momentum",
            "momentum": 0.5}`); see `keras_meta.inner_loop.get_inner_optimizer`.
            Differentiable: second-order MAML differentiates through it.
        learned_inner_learning_rates: `None` (default: the fixed step size),
            `"per_parameter"` (Meta-SGD: one learned rate per element of every
            adapted weight) or `"per_layer_per_step"` (MAML++'s LSLR: one
            learned scalar per adapted weight tensor and inner step); see
            `keras_meta.step_size`. Initialised to the step size, meta-learned
            by the compiled optimizer with the model's weights.
        multi_step_loss: `True`: the meta-loss is MAML++'s multi-step loss,
            the weighted sum over inner steps of the query loss after each
            step (`multi_step_loss_weights`).
        multi_step_loss_epochs: epochs over which the multi-step weights
            anneal from uniform to the last step (MAML++: 10 for Omniglot).
        per_step_batch_norm: `True`: MAML++'s per-step BatchNorm, one set of
            BatchNorm scales and offsets per inner step (the wrapped model's
            own for step 0, learner variables for the others), not adapted
            by the inner loop.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    # Whether the constructor refuses multi-output models (ANIL refuses them
    # with its own message, along with multi-input ones).
    _check_outputs = True
    # First order: the adapted weights are the start weights plus a constant
    # shift (the inner gradients are constants); else second order.
    first_order = False
    # Names of extra per-task scalars `task_train` returns; they are averaged
    # over the meta-batch and logged (e.g. iMAML's CG diagnostics).
    extra_train_outputs = ()
    # Vectorized, one tape around all tasks instead of per-task gradients.
    batched_tape_when_vectorized = False
    # Vectorized, inner steps unrolled instead of one `tf.while_loop`.
    unroll_inner_loop_when_vectorized = True

    def __init__(
        self,
        model,
        inner_learning_rate=0.01,
        inner_steps=1,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        inner_optimizer="sgd",
        learned_inner_learning_rates=None,
        multi_step_loss=False,
        multi_step_loss_epochs=10,
        per_step_batch_norm=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_model(type(self).__name__, model, self._check_outputs)
        self.model = model
        if any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in _internals.sublayers(model)):
            # The exact-moments check, eagerly now: inside the first trace
            # it builds a layer, which made TensorFlow trace the step twice.
            _internals.verify_exact_moments()
        self.inner_learning_rate = check_positive_float(
            "inner_learning_rate", inner_learning_rate
        )
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.eval_inner_steps = check_positive_int(
            "eval_inner_steps", eval_inner_steps, allow_none=True
        )
        self.inner_learning_rate_scaling = inner_learning_rate_scaling
        self.step_size_rule = StepSize(
            self.inner_learning_rate, inner_learning_rate_scaling, self.inner_steps
        )
        self.transductive_batch_norm = check_bool(
            "transductive_batch_norm", transductive_batch_norm
        )
        self.task_execution = check_choice(
            "task_execution", task_execution, TASK_EXECUTIONS
        )
        self.inner_optimizer = _check_inner_optimizer(inner_optimizer)
        self.learned_inner_learning_rates = check_choice(
            "learned_inner_learning_rates", learned_inner_learning_rates, step_size_rules.LEARNED
        )
        self.multi_step_loss = check_bool("multi_step_loss", multi_step_loss)
        self.multi_step_loss_epochs = check_positive_int(
            "multi_step_loss_epochs", multi_step_loss_epochs
        )
        self.per_step_batch_norm = check_bool("per_step_batch_norm", per_step_batch_norm)
        if self.per_step_batch_norm and not _batch_norm_positions(model):
            raise ValueError(
                "`per_step_batch_norm=True` needs a model with BatchNormalization "
                f"layers that have a trainable scale or offset. Received: model "
                f"{model.name!r} without any"
            )
        # Built by `build_learned_state()` (subclasses call it once their
        # network is defined): the learned rates, per-step BatchNorm weights
        # and the multi-step loss's epoch.
        self.learned_step_size_rule = None
        self._batch_norm_steps = []
        self._epoch = None
        self.batch_norm = BatchNorm(model, self.transductive_batch_norm)
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

    @staticmethod
    def base_arguments(arguments):
        """The `MetaLearner.__init__` arguments among a subclass's `locals()`."""
        forwarded = {name: arguments[name] for name in _BASE_ARGUMENTS if name in arguments}
        return {**forwarded, **arguments.get("kwargs", {})}

    # ------------------------------------------------------------------
    # What an algorithm states (see the module docstring).

    def build_network(self):
        """Which weights adapt, and how the network runs at the fast weights.

        With `per_step_batch_norm`, every weight but BatchNorm's scales and
        offsets (which change from step to step instead).
        """
        if not self.per_step_batch_norm:
            return WholeNetwork(self.model, self.batch_norm)
        fixed = set(_batch_norm_positions(self.model))
        count = len(self.model.trainable_variables)
        return WholeNetwork(
            self.model, self.batch_norm, [i for i in range(count) if i not in fixed]
        )

    def inner_transforms(self, training):
        """Gradient transforms of the inner objective (`keras_meta.inner_loop`).

        `training`: meta-training (`True`) or test-time adaptation (`False`).
        """
        return []

    def finalize(self, training):
        """`finalize(fast, start) -> fast` applied before scoring, or None."""
        return None

    def task_train(self, params, non_trainable, task):
        """Meta-gradient of one task.

        Args:
            params: list of tensors, the meta-parameters (the wrapped model's
                trainable weights, in order, then the learned values of
                `learned_variables`, if any).
            non_trainable: list of tensors, its non-trainable weights.
            task: dict with one task's `support_x`, `support_y`, `query_x`,
                `query_y` (no meta-batch axis).

        Returns:
            A dict with `"gradients"` (list aligned with `params`), `"loss"`
            (the query loss after adaptation) and `"predictions"` (query
            predictions after adaptation); optional extra scalar entries
            (`extra_train_outputs`) are averaged over the meta-batch and logged.
        """
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss, y_pred = self.task_loss(params, non_trainable, task)
            scaled = self.scale_loss(loss)
        gradients = tape.gradient(
            scaled, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return {"gradients": gradients, "loss": loss, "predictions": y_pred}

    def scale_loss(self, loss):
        """The meta-loss as the compiled optimizer wants it differentiated.

        Keras' own `train_step` differentiates `optimizer.scale_loss(loss)`:
        a `keras.optimizers.LossScaleOptimizer` (which `compile` wraps around
        the optimizer under `mixed_float16`) multiplies by its dynamic scale,
        an optimizer's `loss_scale_factor` by that factor, and the optimizer
        divides the gradients back before applying them. Per-task gradients
        of a learner are scaled the same way (the mean is linear).
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return loss
        return tf.cast(optimizer.scale_loss(loss), loss.dtype)

    # ------------------------------------------------------------------
    # The adaptation primitive, built from the hooks.

    @property
    def network(self):
        """The `build_network()` of this learner (built once)."""
        if "_network" not in self.__dict__:
            network = self.build_network()
            if getattr(self, "head_initialization", None) == "prototypes":
                # Proto-MAML: the start state sets the last Dense layer.
                network = prototypes.PrototypeHead(self, network)
            self.__dict__["_network"] = network
        return self.__dict__["_network"]

    def adaptation(self, training, support_training=None, learned=None):
        """The `keras_meta.adaptation.Adaptation` of meta-training or test time.

        Args:
            training: `True` for meta-training's inner loop, `False` for
                test-time adaptation (evaluate, predict, adapt, export).
            support_training: overrides the `training` flag of the network's
                support calls (default: BatchNorm's convention).
            learned: values of `learned_variables` (tensors, in order) to
                adapt with, e.g. watched by a tape; default the variables'.
        """
        support, query = self.batch_norm.training_flags(training)
        if learned is None:
            learned = [tf.convert_to_tensor(v) for v in self.learned_variables]
        rates = len(self.learned_step_size_rule.variables) if self.learned_step_size_rule else 0
        optimizer = self.base_inner_optimizer(
            self.learned_step_size_rule.learning_rate_of(learned[:rates])
            if self.learned_step_size_rule else None
        )
        step_weights = None
        if self.per_step_batch_norm:
            positions = _batch_norm_positions(self.model)
            later = learned[rates:]
            step_weights = (positions, [later[i:i + len(positions)]
                                        for i in range(0, len(later), len(positions))])
        return Adaptation(
            self.network,
            self.compute_task_loss,
            inner_loop.chain(*self.inner_transforms(training), optimizer),
            support if support_training is None else support_training,
            query,
            unroll=self.execution.unroll_inner_loop,
            finalize=self.finalize(training),
            step_weights=step_weights,
        )

    def base_inner_optimizer(self, learning_rate=None):
        """The inner optimiser (`inner_optimizer` at the step size), no transforms.

        `learning_rate`: what the optimiser takes instead of the fixed step
        size (a learned rule's `learning_rate_of(values)`).
        """
        return inner_loop.get_inner_optimizer(
            self.inner_optimizer,
            self.step_size_rule.learning_rate if learning_rate is None else learning_rate,
        )

    def task_loss(self, params, non_trainable, task):
        """`(query loss, predictions)` after meta-training adaptation.

        Differentiable in `params` (the meta-parameters, learned rates
        included): second order through every inner step, or first order
        (`first_order = True`) through a constant shift. With
        `multi_step_loss`, the loss is the weighted sum of the query losses
        after each inner step (the predictions are the last step's).
        """
        params, learned = self.split_meta_parameters(params)
        adaptation = self.adaptation(training=True, learned=learned)
        state = adaptation.start(params, non_trainable, task)

        def advance(state, steps):
            if self.first_order:
                return adaptation.advance_first_order(state, steps)
            return adaptation.advance(state, steps, create_graph=True)

        if not self.multi_step_loss:
            return adaptation.score(advance(state, self.inner_steps))
        weights = self.multi_step_loss_weights()
        total = 0.0
        for step in range(self.inner_steps):
            state = advance(state, 1)
            loss, y_pred = adaptation.score(state)
            total = total + tf.cast(weights[step], loss.dtype) * loss
        return total, y_pred

    def multi_step_loss_weights(self, epoch=None):
        """MAML++'s weights of the query losses after steps 1..`inner_steps`.

        At epoch `e < multi_step_loss_epochs` (`E`), with `N = inner_steps`:
        every non-final step weighs `max(1/N - e/(N E), 0.03/N)` and the last
        `min(1/N + e (N-1)/(N E), 1 - (N-1) 0.03/N)` (uniform at epoch 0,
        summing to 1); from epoch `E` on, the last step weighs 1 and the
        others 0 (MAML++ then scores the last step only). Default `epoch`:
        the current one (`fit`'s epoch index, kept in a variable).

        Returns:
            A float32 tensor `[inner_steps]`.
        """
        n, total = self.inner_steps, float(self.multi_step_loss_epochs)
        if epoch is None:
            epoch = self._epoch if self._epoch is not None else 0.0
        epoch = tf.cast(tf.convert_to_tensor(epoch), tf.float32)
        floor = _MSL_FLOOR / n
        non_final = tf.maximum(1.0 / n - epoch / (n * total), floor)
        final = tf.minimum(1.0 / n + epoch * (n - 1) / (n * total), 1.0 - (n - 1) * floor)
        annealed = tf.concat([tf.fill([n - 1], non_final), tf.reshape(final, [1])], axis=0)
        return tf.where(epoch < total, annealed, tf.one_hot(n - 1, n))

    def adaptation_path(self, params, non_trainable, task, checkpoints):
        """`[(query loss, predictions)]` after each number of test-time steps."""
        params, learned = self.split_meta_parameters(params)
        adaptation = self.adaptation(training=False, learned=learned)
        state, done, scores = adaptation.start(params, non_trainable, task), 0, []
        for steps in checkpoints:
            state, done = adaptation.advance(state, steps - done), steps
            scores.append(adaptation.score(state))
        return scores

    def task_evaluate(self, params, non_trainable, task, steps):
        """Query losses (before, after) and predictions of one task."""
        (pre_loss, _), (loss, y_pred) = self.adaptation_path(
            params, non_trainable, task, (0, steps)
        )
        return {"loss": loss, "pre_adaptation_loss": pre_loss, "predictions": y_pred}

    def task_predict(self, params, non_trainable, task, steps):
        """Query predictions of one task after adaptation."""
        params, learned = self.split_meta_parameters(params)
        adaptation = self.adaptation(training=False, learned=learned)
        state = adaptation.advance(adaptation.start(params, non_trainable, task), steps)
        return {"predictions": adaptation.outputs(state)[0]}

    # ------------------------------------------------------------------
    # The learner's own meta-parameters: learned rates, per-step BatchNorm.

    def build_learned_state(self):
        """Creates the learner's own variables; subclasses call it once, at the
        end of `__init__` (when `network` can be built).

        The learned rates (`learned_inner_learning_rates`) and the per-step
        BatchNorm weights (`per_step_batch_norm`) are trainable variables of
        the learner, after the wrapped model's weights in `meta_variables`;
        the multi-step loss keeps the epoch in a non-trainable one. Keras
        tracks them: they are saved in `.keras` files and weight checkpoints
        (`BackupAndRestore`) with the model's.
        """
        trainable = self.model.trainable_variables
        dtype = trainable[0].dtype
        if self.learned_inner_learning_rates is not None:
            positions = self.network.adapted(list(range(len(trainable))))
            variables = []
            for i in positions:
                shape = step_size_rules.rate_shape(
                    self.learned_inner_learning_rates, trainable[i].shape, self.inner_steps
                )
                rate = self.add_weight(
                    shape=shape, dtype=dtype, name=f"inner_learning_rate_{i}", initializer="zeros"
                )
                # (A Constant initializer would go through float32.)
                rate.assign(np.full(shape, self.step_size, dtype=dtype))
                variables.append(rate)
            self.learned_step_size_rule = step_size_rules.learned_rule(
                self.learned_inner_learning_rates, variables
            )
            self._rate_positions = list(positions)
        if self.per_step_batch_norm:
            positions = _batch_norm_positions(self.model)
            steps = []
            for step in range(1, self.inner_steps):
                copies = []
                for i in positions:
                    copy_ = self.add_weight(
                        shape=trainable[i].shape, dtype=dtype, initializer="zeros",
                        name=f"batch_norm_step_{step}_{trainable[i].name}",
                    )
                    copy_.assign(trainable[i])
                    copies.append(copy_)
                steps.append(copies)
            self._batch_norm_steps = steps
        if self.multi_step_loss:
            self._epoch = self.add_weight(
                shape=(), dtype="float32", initializer="zeros", trainable=False,
                name="multi_step_loss_epoch",
            )

    @property
    def learned_variables(self):
        """The learner's own trainable variables, in order: learned rates
        (aligned with the adapted weights), then the per-step BatchNorm
        weights of steps 1, 2, ... (each aligned with BatchNorm's scales and
        offsets in the model's trainable weights)."""
        rates = list(self.learned_step_size_rule.variables) if self.learned_step_size_rule else []
        return rates + [v for step in self._batch_norm_steps for v in step]

    @property
    def meta_variables(self):
        """Every meta-parameter: the wrapped model's trainable weights, then
        `learned_variables`. The compiled optimizer updates these."""
        return list(self.model.trainable_variables) + self.learned_variables

    def split_meta_parameters(self, params):
        """`(model weights, learned values)` of a list aligned with
        `meta_variables`; learned values `None` (the variables') when
        `params` holds the model's weights only."""
        count = len(self.model.trainable_variables)
        params = list(params)
        return params[:count], (params[count:] if len(params) > count else None)

    @property
    def inner_learning_rates(self):
        """The learned rates, aligned with `model.trainable_variables`.

        A list with, for every trainable weight of the wrapped model, its
        rate variable (the weight's shape for `"per_parameter"`,
        `[inner_steps]` for `"per_layer_per_step"`), or `None` for a weight
        the inner loop does not adapt (ANIL's body, per-step BatchNorm).
        `None` without learned rates.
        """
        if self.learned_step_size_rule is None:
            return None
        rates = [None] * len(self.model.trainable_variables)
        for position, variable in zip(self._rate_positions, self.learned_step_size_rule.variables):
            rates[position] = variable
        return rates

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        # The multi-step loss reads `fit`'s epoch index from a variable, set
        # at each epoch's start (resumed epochs included: `initial_epoch`,
        # `BackupAndRestore`).
        if self.multi_step_loss:
            tracker = _EpochTracker(self._epoch)
            if isinstance(callbacks, keras.callbacks.CallbackList):
                tracker.set_model(self)
                callbacks.callbacks.insert(0, tracker)
            else:
                callbacks = [tracker] + list(callbacks or [])
        return super().fit(x, y, batch_size, epochs, verbose, callbacks, **kwargs)

    def check_finite_weights(self, action="save", weights=None):
        if weights is None:
            weights = [(v.path, v) for v in self.model.weights + self.learned_variables]
        return super().check_finite_weights(action, weights)

    # ------------------------------------------------------------------
    # Hyper-parameters derived from the arguments.

    @property
    def step_size(self):
        """The inner step size actually used (after any scaling)."""
        return self.step_size_rule.learning_rate

    @property
    def adaptation_steps(self):
        """Inner steps used by `evaluate`, `predict` and `adapt`."""
        return self.eval_inner_steps or self.inner_steps

    @property
    def execution(self):
        """The `Execution` that `task_execution` resolves to."""
        tasks = self.task_execution
        if tasks == "auto":
            # By device kind (`keras_meta.devices`): on CPU as measured (conv4
            # MAML ~1.8x faster task by task, where TensorFlow's vectorizer
            # falls back to a loop for per-task filter gradients; the
            # sinusoid MLP ~3x faster vectorized; conv4 ANIL 1.6x faster and
            # lighter task by task, docs/performance.md), on accelerators
            # batched, unless measured rules are in use.
            tasks = devices.resolve(self._has_convolutions())[0]
        vectorized = tasks == "vectorized"
        return Execution(
            tasks,
            unroll_inner_loop=vectorized and self.unroll_inner_loop_when_vectorized,
            early_exit=not vectorized,
            batched_tape=vectorized and self.batched_tape_when_vectorized,
        )

    @property
    def resolved_task_execution(self):
        """`"vectorized"` or `"sequential"`: what `task_execution` resolves to."""
        return self.execution.tasks

    def _has_convolutions(self):
        return any(
            "Conv" in type(layer).__name__  # Conv1D/2D/3D, Depthwise, Separable...
            for layer in _internals.sublayers(self.model)
        )

    def compile(self, *args, jit_compile="auto", run_eagerly=False, **kwargs):
        # `jit_compile="auto"` (the default): Keras turns XLA off on machines
        # without an accelerator. For networks without convolutions a
        # meta-step is hundreds of small ops that XLA fuses: sinusoid MAML
        # (PEERS.md B1) ran 1.7x faster with XLA on 2 CPU cores (515 vs 298
        # meta-steps/s; 1270 vs 701 with steps_per_execution=25), for a first
        # step of 2.6 s instead of 0.8 s. XLA:CPU is slow for convolutions
        # inside loops (docs/performance.md), so conv nets keep Keras' rule,
        # and so do distribution strategies.
        if jit_compile == "auto" and not run_eagerly:
            jit_compile = self._auto_jit_compile()
        super().compile(*args, jit_compile=jit_compile, run_eagerly=run_eagerly, **kwargs)
        if self.optimizer is not None and not self.optimizer.built:
            # Optimizer slots created now, not inside the first trace.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.meta_variables)

    def compile_from_config(self, config):
        # Keras skips an overridden `compile()` when loading (it cannot know
        # what it does); ours only resolves `jit_compile` and builds the
        # optimizer, so a loaded learner compiles as Keras would compile it.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _auto_jit_compile(self):
        distributed = (
            tf.distribute.has_strategy() or self.distribute_strategy.num_replicas_in_sync > 1
        )
        kind = devices.device_kind()
        if kind == "cpu" and not AUTO_XLA_ON_CPU:
            return False
        if not devices.resolve(self._has_convolutions(), distributed, kind)[1]:
            return False
        return _internals.model_supports_jit(self)

    # ------------------------------------------------------------------
    # Per-task building blocks: the loss, and the network at full weights.

    def compute_task_loss(self, y_true, y_pred, layer_losses=()):
        """The compiled loss of one task's predictions, plus layer losses.

        With a sparse classification loss, a class label outside
        `[0, outputs)` (or not an integer) makes the loss NaN instead of
        reaching the loss kernel: XLA would silently compute garbage, and
        TensorFlow's kernels raise an opaque error. The step then skips its
        update and `fit` raises a `ValueError` that names the label.

        Under a mixed-precision policy (`mixed_bfloat16`, `mixed_float16`)
        the network computes in half precision and the loss in float32:
        half-precision predictions are cast first, so that the inner
        gradients and the meta-loss do not round to 8 (or 11) bits.
        """
        loss_fn = self._inner_loss_fn()
        if y_pred.dtype in (tf.float16, tf.bfloat16):
            y_pred = tf.cast(y_pred, tf.float32)
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

    def support_loss(self, params, non_trainable, x, y, training):
        """The inner objective at the start of adaptation, at full weights `params`.

        The compiled loss of the whole network on `(x, y)` plus the terms of
        the inner transforms (ANIL's head L2) on the weights that adapt.
        """
        y_pred, _, losses = forward(self.model, params, non_trainable, x, training)
        loss = self.compute_task_loss(y, y_pred, losses)
        adapted = self.network.adapted(params)
        for transform in self.inner_transforms(True):
            if transform.penalty is not None:
                loss = loss + transform.penalty(adapted, transform.init(adapted))
        return loss

    def query_loss(self, params, non_trainable, task, training):
        """`(loss, predictions)` on the query set at full weights `params`."""
        y_pred, losses = self.batch_norm.query(
            self.model, params, non_trainable, task["support_x"], task["query_x"], training
        )
        return self.compute_task_loss(task["query_y"], y_pred, losses), y_pred

    def adapt_parameters(self, params, non_trainable, x, y, steps, training, create_graph):
        """Full weights after `steps` test-time inner steps on `(x, y)`.

        `training` is the `training` flag of the network's support calls.
        """
        params, learned = self.split_meta_parameters(params)
        adaptation = self.adaptation(training=False, support_training=training, learned=learned)
        state = adaptation.start(params, non_trainable, {"support_x": x, "support_y": y})
        return adaptation.full_weights(adaptation.advance(state, steps, create_graph))

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
        meta_parameters = len(self.meta_variables)

        def fn(task):
            out = task_fn(task)
            return {key: tf.nest.map_structure(lambda t: tf.cast(t, dtype), out[key]) for key in keys}

        if self.execution.tasks == "vectorized":
            return tf.vectorized_map(fn, episode)
        spec = tf.TensorSpec(None, dtype)
        signature = {
            key: [spec] * meta_parameters
            if key == "gradients"
            else spec
            for key in keys
        }
        return tf.map_fn(fn, episode, fn_output_signature=signature)

    def meta_gradients(self, params, non_trainable, episode):
        """The meta-gradient of a meta-batch: the one place tasks meet.

        Per task (`task_train` mapped over the tasks, gradients averaged), or,
        with `Execution.batched_tape`, one tape around the vectorized tasks'
        query losses. Keras' TF optimizer sums the replicas' gradients, which
        equals the mean over the global meta-batch when every replica holds
        as many tasks: the mean is divided by the replica count.

        Returns:
            `(gradients, results, non_finite_tasks)`: the gradients aligned
            with `params`, the per-task results (`loss`, `predictions`,
            `extra_train_outputs`) and the number of tasks whose query loss
            or meta-gradient is not finite.
        """
        keys = ("loss", "predictions")
        if self.execution.batched_tape:  # (no `extra_train_outputs` then)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(params)
                results = self.map_tasks(
                    lambda task: dict(zip(keys, self.task_loss(params, non_trainable, task))),
                    episode,
                    keys,
                )
                loss = self.scale_loss(tf.reduce_mean(results["loss"]))
            gradients = tape.gradient(
                loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            finite = tf.math.is_finite(results["loss"]) & tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
            )
        else:
            results = self.map_tasks(
                lambda task: self.task_train(params, non_trainable, task),
                episode,
                ("gradients",) + keys + self.extra_train_outputs,
            )
            gradients = [tf.reduce_mean(g, axis=0) for g in results["gradients"]]
            finite = tf.math.is_finite(results["loss"])
            for g in results["gradients"]:
                finite = finite & tf.reduce_all(
                    tf.reshape(tf.math.is_finite(g), [tf.shape(g)[0], -1]), axis=1
                )
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.control_dependencies(self._check_even_split(episode)):
            gradients = [g / replicas for g in gradients]
        return gradients, results, _count_false(finite)

    # ------------------------------------------------------------------
    # Keras trainer hooks.

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TF trainer calls this before tracing a step function. Left
        # to itself it defers building to the first trace (without a
        # distribution strategy) or builds by calling the model on a
        # symbolic batch with `y` (with one). Neither fits a learner: the
        # compiled metrics would be created inside the first trace, which
        # makes `tf.function` trace the whole meta-step twice, and `call`
        # takes an episode, not `x`. Build them here, eagerly, from the
        # first episode's shapes, and check its values.
        if iterator is not None:
            data_batch = _internals.first_batch(iterator)
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
            self.optimizer.build(self.meta_variables)
        metrics = _internals.compile_metrics(self)
        if metrics is None or metrics.built:
            return
        data = _as_episode_dict(data_batch)
        if not isinstance(data, dict) or "query_y" not in data:
            return  # predict: no metrics; bad episodes fail in the step
        episode = self._check_episode(data)
        query_y = episode["query_y"]
        y_true = keras.KerasTensor((None,) + tuple(query_y.shape[2:]), query_y.dtype)
        y_pred = self.prediction_spec(
            keras.KerasTensor(
                (None,) + tuple(episode["query_x"].shape[2:]), episode["query_x"].dtype
            )
        )
        metrics.build(y_true, y_pred)

    def prediction_spec(self, x_spec):
        """The `KerasTensor` of the query predictions for query inputs `x_spec`."""
        return self.model.compute_output_spec(x_spec)

    def _meta_state(self):
        params = [tf.convert_to_tensor(v) for v in self.meta_variables]
        non_trainable = [
            tf.convert_to_tensor(v) for v in self.model.non_trainable_variables
        ]
        return params, non_trainable

    def train_step(self, data):
        episode = self._check_episode(data)
        params, non_trainable = self._meta_state()

        # Adapt on support, outer loss on query, meta-gradient: per task (or
        # under one tape for the meta-batch), averaged over the tasks.
        gradients, results, non_finite_tasks = self.meta_gradients(
            params, non_trainable, episode
        )

        # Update, unless a task's loss or meta-gradient is not finite.
        self.apply_meta_gradients(gradients, non_finite_tasks=non_finite_tasks)
        return self._update_metrics(episode, results, training=True)

    def apply_meta_gradients(self, gradients, non_finite_tasks):
        """Applies `gradients` with the compiled optimizer, if every task was finite.

        `non_finite_tasks` counts this replica's tasks whose query loss or
        meta-gradient was NaN or infinite; it is added to the
        `non_finite_tasks` metric. When any replica counts one, no replica
        applies its update: the weights and the optimizer state stay as they
        were (the step is skipped, as `optax.apply_if_finite` does). A
        `keras.optimizers.LossScaleOptimizer` gets every step: it skips the
        non-finite ones itself and lowers its loss scale on them.
        """
        self.non_finite_tasks_tracker.update_state(non_finite_tasks)
        total = non_finite_tasks
        context = tf.distribute.get_replica_context()
        if tf.distribute.get_strategy().num_replicas_in_sync > 1 and context is not None:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, non_finite_tasks)
        finite = tf.equal(total, 0)
        variables = self.meta_variables

        def apply(gradients):
            self.optimizer.apply_gradients(zip(gradients, variables))

        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # It skips non-finite steps itself, and lowers its scale on them
            # (skipping around it would keep an overflowing scale forever).
            apply(gradients)
            return
        if _internals.strategy_supports_no_merge_call():
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

    def _update_metrics(self, episode, results, training):
        """Shared bookkeeping of train and test steps; returns the logs."""
        _internals.loss_tracker(self).update_state(tf.reduce_mean(results["loss"]))
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
        if training and self.multi_step_loss:
            weights = self.multi_step_loss_weights()
            for step in range(self.inner_steps):
                logs[f"msl_weight_step_{step + 1}"] = weights[step]
        logs.update(self._label_violation(episode))
        if _internals.in_multi_worker_mode(self.distribute_strategy):
            # Keras reduces multi-worker logs with `strategy.reduce("MEAN",
            # value, axis=0)`, which fails on scalars: give them an axis.
            logs = {key: tf.reshape(value, [1]) for key, value in logs.items()}
        return logs

    # ------------------------------------------------------------------
    # Step functions: Keras' own, run with the checks (`_guarded`).

    def make_train_function(self, force=False):
        return self._make_guarded("train", super().make_train_function, force)

    def make_test_function(self, force=False):
        return self._make_guarded("test", super().make_test_function, force)

    def make_predict_function(self, force=False):
        return self._make_guarded("predict", super().make_predict_function, force)

    def _make_guarded(self, kind, make, force):
        name = f"{kind}_function"
        if getattr(self, name) is None or force:
            make(force=force)
            setattr(self, name, self._guarded(getattr(self, name)))
        return getattr(self, name)

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

        def task_fn(task):
            losses, predictions = zip(
                *self.adaptation_path(params, non_trainable, task, steps)
            )
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
        params, learned = self.split_meta_parameters(params)
        adaptation = self.adaptation(training=False, learned=learned)
        state = adaptation.start(
            params, non_trainable, {"support_x": support_x, "support_y": support_y}
        )
        fast = adaptation.full_weights(adaptation.advance(state, steps))
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

    def export_model(self, params, non_trainable, support_x):
        """A clone of the wrapped model holding fast weights `params`.

        Its non-trainable values are the support set's BatchNorm moments at
        `params` (see `adapt`).
        """
        statistics = self.batch_norm.export_statistics(
            self.model, params, non_trainable, support_x
        )
        clone = _clone(self.model, support_x)
        for variable, value in zip(clone.trainable_variables, params):
            variable.assign(value)
        for variable, value in zip(clone.non_trainable_variables, statistics):
            variable.assign(value)
        return clone

    # ------------------------------------------------------------------
    # Serialization: one entry per `__init__` argument, read from the
    # attribute of the same name (keras-hub's Task pattern).

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
        }
        for name in inspect.signature(type(self).__init__).parameters:
            if name not in ("self", "model", "kwargs"):
                config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes the dict
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


class _EpochTracker(keras.callbacks.Callback):
    """Writes `fit`'s epoch index into a variable at each epoch's start."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(float(epoch))


def _batch_norm_positions(model):
    """Positions of BatchNorm's trainable scales and offsets among
    `model.trainable_variables`."""
    ids = {
        id(v) for layer in batch_norm_layers(model) for v in layer.trainable_variables
    }
    return [i for i, v in enumerate(model.trainable_variables) if id(v) in ids]


def _check_model(name, model, check_outputs):
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
    if isinstance(outputs, (list, tuple)) and len(outputs) > 1 and check_outputs:
        raise ValueError(
            f"{name} meta-learns single-output models (one loss on one "
            f"output). Received: model {model.name!r} with {len(outputs)} "
            f"outputs of shapes {[tuple(o.shape) for o in outputs]}"
        )


def _check_inner_optimizer(inner_optimizer):
    try:
        inner_loop.get_inner_optimizer(inner_optimizer, 1.0)
    except ValueError as error:
        raise ValueError(
            f"`inner_optimizer` must be one of "
            f"{sorted(inner_loop.INNER_OPTIMIZERS)} or a dict with a `name` "
            f"among those and its keyword arguments ({error}). Received: "
            f"inner_optimizer={inner_optimizer!r}"
        ) from None
    return inner_optimizer


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
