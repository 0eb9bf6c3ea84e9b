"""Keras callbacks for meta-learning: few-shot evaluation, adaptation curves, schedules.

Callbacks that add entries to the epoch logs (`MetaEvaluation`,
`AdaptationCurve`) must come before Keras' loggers and monitors in the
`callbacks` list (`CSVLogger`, `TensorBoard`, `EarlyStopping`,
`ModelCheckpoint`, ...): Keras calls callbacks in list order with one shared
logs dict. Callbacks that hold a dataset are not serializable (Keras does not
serialize callbacks with models); `DerivativeOrderAnnealing` is.

Keras' `CSVLogger` adds an empty `val_<key>` column for every key when none
of the first epoch's keys starts with `val_` (it expects `fit`'s own
validation). Give `MetaEvaluation` a prefix starting with `val` (e.g.
`prefix="val"`: `val_loss`, `val_accuracy`, ...) when it is the only
validation of a run logged by `CSVLogger`.
"""

import time

import keras
import numpy as np

from keras_meta.evaluation import evaluate_episodes, mean_and_ci95
from keras_meta.validation import check_positive_int


def _check_learner(callback, model):
    from keras_meta.algorithms.base import MetaLearner

    if not isinstance(model, MetaLearner):
        raise TypeError(
            f"{type(callback).__name__} works with keras_meta meta-learners. "
            f"Received a model of type {type(model).__name__}"
        )


class MetaEvaluation(keras.callbacks.Callback):
    """The standard few-shot evaluation, logged every `every_n_epochs` epochs.

    Adapts on each episode's support set (with `inner_steps`, default the
    learner's `eval_inner_steps`), scores its query set, and writes into the
    epoch logs `<prefix>_loss` and `<prefix>_loss_ci95`, plus, for
    classification, `<prefix>_accuracy` and `<prefix>_accuracy_ci95`
    (mean over `num_episodes` tasks, 95% interval 1.96 std / sqrt(n)), so that
    `EarlyStopping`, `ModelCheckpoint(monitor=...)`, `CSVLogger` and
    `TensorBoard` can use them. Place it before those in the callbacks list.

    Args:
        episodes: `tf.data.Dataset` of episode dicts (held-out classes/tasks).
            A seeded, finite or repeating dataset evaluates the same tasks
            every time.
        num_episodes: tasks to evaluate (MAML's protocol: 600).
        inner_steps: inner steps per task; default the learner's.
        every_n_epochs: evaluation frequency.
        prefix: prefix of the log keys (`"val"` gives Keras' validation
            names, `val_loss`, `val_accuracy`, which `CSVLogger` and
            `EarlyStopping`'s default monitor expect).
        verbose: 1 shows a progress bar over the tasks (`keras.utils.Progbar`,
            2 one line at the end); the values are printed too unless
            `fit`'s own progress bar shows them.

    An `AdaptationCurve` built on this callback (`AdaptationCurve(evaluation,
    max_steps=...)`) reads its curve from the same evaluation: the tasks are
    adapted once per epoch, along every step either callback needs.

    Example:

    ```python
    evaluation = km.callbacks.MetaEvaluation(test_episodes, num_episodes=600)
    maml.fit(train_episodes, epochs=10, steps_per_epoch=500, callbacks=[
        evaluation,
        keras.callbacks.ModelCheckpoint("best.keras", monitor="meta_test_accuracy",
                                        mode="max", save_best_only=True),
    ])
    ```
    """

    def __init__(
        self,
        episodes,
        num_episodes=600,
        inner_steps=None,
        every_n_epochs=1,
        prefix="meta_test",
        verbose=0,
    ):
        super().__init__()
        self.episodes = episodes
        self.num_episodes = check_positive_int("num_episodes", num_episodes)
        self.inner_steps = check_positive_int("inner_steps", inner_steps, allow_none=True)
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.prefix = prefix
        self.verbose = verbose
        self.results = None
        self._extra_steps = set()  # what an AdaptationCurve on this evaluation needs
        self._evaluated_epoch = None
        self._values = None

    def set_model(self, model):
        _check_learner(self, model)
        super().set_model(model)

    @property
    def steps(self):
        """The inner-step counts one evaluation scores, increasing."""
        return sorted({self.inner_steps or self.model.adaptation_steps} | self._extra_steps)

    def evaluate(self, print_values=None):
        """Runs the evaluation now; returns the logged values as a dict.

        `results` then holds `evaluate_episodes`' arrays for `steps`.
        """
        steps = self.steps
        self.results = evaluate_episodes(
            self.model, self.episodes, self.num_episodes, steps, verbose=self.verbose
        )
        column = steps.index(self.inner_steps or self.model.adaptation_steps)
        values = {}
        for name in ("loss", "accuracy"):
            if name in self.results:
                mean, ci95 = mean_and_ci95(self.results[name][:, column])
                values[f"{self.prefix}_{name}"] = float(mean)
                values[f"{self.prefix}_{name}_ci95"] = float(ci95)
        if self.verbose if print_values is None else print_values:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in values.items()))
        return values

    def on_train_begin(self, logs=None):
        self._evaluated_epoch = None

    def _evaluate_epoch(self, epoch):
        """One evaluation per epoch, whichever callback asks first."""
        if self._evaluated_epoch != epoch:
            # Inside `fit` with a progress bar, the values land in its logs.
            quiet = bool(self.params and self.params.get("verbose"))
            self._values = self.evaluate(print_values=self.verbose and not quiet)
            self._evaluated_epoch = epoch
        return self._values

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        values = self._evaluate_epoch(epoch)
        if logs is not None:
            logs.update(values)


class AdaptationCurve(keras.callbacks.Callback):
    """Query loss (and accuracy) after 0, 1, ..., `max_steps` inner steps.

    Every `every_n_epochs` epochs, evaluates `num_episodes` tasks along the
    adaptation path and writes `<prefix>_loss_step_<k>` (and
    `<prefix>_accuracy_step_<k>` for classification) into the epoch logs, so
    they land in the history, `CSVLogger` and `TensorBoard` scalars (place
    it before those). `curves` keeps every evaluated epoch; `plot(path)` draws
    them to a PNG.

    Args:
        episodes: `tf.data.Dataset` of episode dicts, or a `MetaEvaluation`
            callback: then the curve comes from that callback's evaluation of
            its tasks (one evaluation per epoch for both, instead of two of
            the same episodes; the `MetaEvaluation` may be in the callbacks
            list or not).
        max_steps: last inner step of the curve.
        num_episodes: tasks per evaluation (default 100; with a
            `MetaEvaluation`, its `num_episodes`).
        every_n_epochs: evaluation frequency.
        prefix: prefix of the log keys.

    Example:

    ```python
    curve = km.callbacks.AdaptationCurve(val_episodes, max_steps=10)
    maml.fit(episodes, epochs=5, steps_per_epoch=200, callbacks=[curve])
    curve.plot("adaptation.png")
    ```

    Sharing one evaluation with `MetaEvaluation`:

    ```python
    evaluation = km.callbacks.MetaEvaluation(val_episodes, num_episodes=100, prefix="val")
    curve = km.callbacks.AdaptationCurve(evaluation, max_steps=10)
    maml.fit(episodes, epochs=5, steps_per_epoch=200, callbacks=[evaluation, curve])
    ```
    """

    def __init__(
        self, episodes, max_steps=10, num_episodes=None, every_n_epochs=1, prefix="adaptation"
    ):
        super().__init__()
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.evaluation = episodes if isinstance(episodes, MetaEvaluation) else None
        if self.evaluation is not None:
            if num_episodes is not None and num_episodes != self.evaluation.num_episodes:
                raise ValueError(
                    "`num_episodes` is the MetaEvaluation's when `episodes` is a "
                    "MetaEvaluation: leave it unset. Received: "
                    f"num_episodes={num_episodes!r}, MetaEvaluation num_episodes="
                    f"{self.evaluation.num_episodes}"
                )
            num_episodes = self.evaluation.num_episodes
            self.evaluation._extra_steps.update(range(self.max_steps + 1))
            episodes = self.evaluation.episodes
        self.episodes = episodes
        self.num_episodes = check_positive_int(
            "num_episodes", 100 if num_episodes is None else num_episodes
        )
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.prefix = prefix
        self.curves = []  # dicts: epoch, steps, loss [S], accuracy [S] (optional)

    def set_model(self, model):
        _check_learner(self, model)
        super().set_model(model)
        if self.evaluation is not None and self.evaluation.model is not model:
            self.evaluation.set_model(model)  # not in the callbacks list

    def on_train_begin(self, logs=None):
        if self.evaluation is not None:
            self.evaluation.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        steps = list(range(self.max_steps + 1))
        if self.evaluation is not None:
            self.evaluation._evaluate_epoch(epoch)
            results = self.evaluation.results
            columns = [list(results["steps"]).index(step) for step in steps]
            results = {k: v[:, columns] for k, v in results.items() if k != "steps"}
        else:
            results = evaluate_episodes(self.model, self.episodes, self.num_episodes, steps)
        curve = {"epoch": epoch + 1, "steps": np.asarray(steps)}
        for name in ("loss", "accuracy"):
            if name in results:
                curve[name] = results[name].mean(axis=0)
                if logs is not None:
                    for step, value in zip(steps, curve[name]):
                        logs[f"{self.prefix}_{name}_step_{step}"] = float(value)
        self.curves.append(curve)

    def plot(self, path, title=None):
        """Writes the recorded curves to a PNG at `path`; returns `path`."""
        return plot_adaptation_curves(self.curves, path, title=title)


def plot_adaptation_curves(curves, path, title=None):
    """Plots query loss (and accuracy) against inner steps, one line per epoch.

    Args:
        curves: list of dicts with `epoch`, `steps`, `loss` and optionally
            `accuracy` (what `AdaptationCurve.curves` holds).
        path: PNG file to write.
        title: optional figure title.

    Returns:
        `path`.
    """
    if not curves:
        raise ValueError("No adaptation curve to plot: `curves` is empty.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib: pip install 'keras-meta[plots]'"
        ) from error
    panels = [name for name in ("loss", "accuracy") if name in curves[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(curves)))
    for ax, name in zip(axes[0], panels):
        for curve, color in zip(curves, colors):
            ax.plot(curve["steps"], curve[name], "o-", ms=3, color=color,
                    label=f"epoch {curve['epoch']}")
        ax.set_xlabel("inner steps")
        ax.set_ylabel(f"query {name}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "Query performance along the adaptation path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `seconds` of wall-clock (or CPU) time have passed.

    For comparisons at equal time: `clock="cpu"` counts the process's CPU
    time, fairer on a machine shared with other work. `steps` counts the
    meta-steps trained.

    Args:
        seconds: the budget.
        clock: `"wall"` (default) or `"cpu"`.
    """

    def __init__(self, seconds, clock="wall"):
        super().__init__()
        if clock not in ("wall", "cpu"):
            raise ValueError(f"`clock` must be 'wall' or 'cpu'. Received: clock={clock!r}")
        self.seconds = seconds
        self.clock = time.perf_counter if clock == "wall" else time.process_time
        self.steps = 0

    def on_train_begin(self, logs=None):
        self.start, self.steps = self.clock(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.clock() - self.start >= self.seconds:
            self.model.stop_training = True


@keras.saving.register_keras_serializable(package="keras_meta")
class DerivativeOrderAnnealing(keras.callbacks.Callback):
    """First-order meta-gradients for the first epochs, then second order.

    MAML++'s derivative-order annealing ("DA", Antoniou et al. 2019): epochs
    `0 .. second_order_from_epoch - 1` train with `first_order=True`, later
    epochs with full second-order meta-gradients. When the order changes the
    compiled train function is rebuilt, so the switch takes effect at once.
    Logs `second_order` (0 or 1) per epoch. Works with learners that have a
    `first_order` argument (MAML, ANIL).

    Args:
        second_order_from_epoch: first epoch (0-based) of second order.

    Reference:
        - [Antoniou, Edwards, Storkey, 2019](https://arxiv.org/abs/1810.09502)
    """

    def __init__(self, second_order_from_epoch):
        super().__init__()
        if (
            isinstance(second_order_from_epoch, bool)
            or not isinstance(second_order_from_epoch, int)
            or second_order_from_epoch < 0
        ):
            raise ValueError(
                "`second_order_from_epoch` must be a non-negative integer. "
                f"Received: second_order_from_epoch={second_order_from_epoch!r}"
            )
        self.second_order_from_epoch = second_order_from_epoch

    def get_config(self):
        return {"second_order_from_epoch": self.second_order_from_epoch}

    def set_model(self, model):
        _check_learner(self, model)
        if not hasattr(model, "first_order"):
            raise TypeError(
                "DerivativeOrderAnnealing needs a learner with a `first_order` "
                f"argument (MAML, ANIL). Received: {type(model).__name__}"
            )
        super().set_model(model)

    def on_epoch_begin(self, epoch, logs=None):
        first_order = epoch < self.second_order_from_epoch
        if self.model.first_order != first_order:
            self.model.first_order = first_order
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["second_order"] = float(not self.model.first_order)
