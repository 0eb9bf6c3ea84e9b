"""The few-shot evaluation protocol: adapt per task, score the query set, average over tasks."""

import keras
import numpy as np

from keras_meta.data.episodes import EPISODE_KEYS
from keras_meta.validation import check_positive_int


def evaluate_episodes(learner, episodes, num_tasks=600, steps=None, verbose=0):
    """Per-task query loss (and accuracy) after each number of inner steps.

    Draws meta-batches from `episodes` until `num_tasks` tasks have been
    evaluated; every task is adapted on its support set with the learner's
    inner loop and scored on its query set after each number of steps in
    `steps` (0 = before adaptation). Accuracy is reported for classification
    (integer or one-hot query labels and one score per class).

    Args:
        learner: a compiled `keras_meta.MetaLearner`.
        episodes: a `tf.data.Dataset` (or any iterable) of episode dicts.
        num_tasks: tasks to evaluate (MAML's protocol: 600).
        steps: increasing inner-step counts; default `[learner's eval steps]`.
        verbose: 1 shows a progress bar over the tasks
            (`keras.utils.Progbar`), 2 one line at the end, 0 nothing.

    Returns:
        A dict of numpy arrays: `"steps"` `[S]`, `"loss"` `[num_tasks, S]`
        and, for classification, `"accuracy"` `[num_tasks, S]`.

    Example:

    ```python
    results = km.evaluation.evaluate_episodes(maml, test_episodes, 600, steps=[0, 10])
    mean, ci95 = km.evaluation.mean_and_ci95(results["accuracy"][:, -1])
    ```
    """
    num_tasks = check_positive_int("num_tasks", num_tasks)
    steps = [learner.adaptation_steps] if steps is None else list(steps)
    losses, accuracies, seen = [], [], 0
    progress = (
        keras.utils.Progbar(num_tasks, verbose=verbose, unit_name="task") if verbose else None
    )
    for element in episodes:
        episode = {key: element[key] for key in EPISODE_KEYS if key in element}
        results = learner.evaluate_tasks(episode, steps=steps)
        take = min(num_tasks - seen, results["loss"].shape[0])
        losses.append(results["loss"][:take])
        accuracy = _accuracy(np.asarray(episode["query_y"])[:take], results["predictions"][:take])
        if accuracy is not None:
            accuracies.append(accuracy)
        seen += take
        if progress is not None:
            progress.update(seen)
        if seen >= num_tasks:
            break
    if not seen:
        raise ValueError("`episodes` yielded no episode to evaluate.")
    if seen < num_tasks:
        raise ValueError(
            f"`episodes` ran out after {seen} tasks; `num_tasks={num_tasks}` "
            "were requested. Pass a larger (or repeated) dataset or a smaller "
            "`num_tasks`."
        )
    out = {"steps": np.asarray(steps), "loss": np.concatenate(losses)}
    if accuracies:
        out["accuracy"] = np.concatenate(accuracies)
    return out


def mean_and_ci95(values, axis=0):
    """Mean and 95% interval half-width, 1.96 std / sqrt(n), along `axis`."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    return values.mean(axis=axis), 1.96 * values.std(axis=axis) / np.sqrt(n)


def _accuracy(query_y, predictions):
    """[tasks, S] accuracies, or None for regression.

    `predictions` is `[tasks, S, queries, classes]`.
    """
    if predictions.ndim < 4 or predictions.shape[-1] < 2:
        return None
    labels = query_y
    if labels.ndim == predictions.ndim - 1 and labels.shape[-1] == predictions.shape[-1]:
        labels = labels.argmax(axis=-1)  # one-hot
    if labels.ndim == predictions.ndim - 1 and labels.shape[-1] == 1 and labels.ndim > 2:
        labels = labels[..., 0]
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) and not np.all(
        labels == np.round(labels)
    ):
        return None
    predicted = predictions.argmax(axis=-1)  # [tasks, S, queries]
    return (predicted == labels[:, None, :]).mean(axis=-1)
