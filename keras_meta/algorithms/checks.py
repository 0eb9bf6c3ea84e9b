"""The checks of a meta-learner's inputs, labels and weights (a mixin of `MetaLearner`).

Static checks of an episode's structure and shapes (`_check_episode`, also on
in-memory arrays before Keras slices them), host checks of the first batch's
values and labels (`_check_values`), in-graph label checks whose errors the
step functions raise (`_label_violation`, `_guarded`, so that they survive
`jit_compile`), the even split of a meta-batch across replicas, and the
refusal to save, export or return non-finite weights.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_meta import _internals
from keras_meta.data.episodes import EPISODE_KEYS

PREDICT_KEYS = ("support_x", "support_y", "query_x")


class EpisodeChecks:
    """Input, label and weight checks shared by every `MetaLearner`."""

    # ------------------------------------------------------------------
    # Episode structure and shapes.

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
    # Labels and values.

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


_LABEL_KEYS = ("_invalid_labels", "_invalid_label_value", "_invalid_label_key")


def _is_sparse_loss(loss_fn):
    """Whether `loss_fn` reads targets as class indices (sparse cross-entropy)."""
    if isinstance(loss_fn, keras.losses.SparseCategoricalCrossentropy):
        return _internals.loss_ignore_class(loss_fn) is None
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


def _as_episode_dict(data):
    """The episode from what Keras passes a step: `x` or `(x, y, weight)`."""
    if isinstance(data, (tuple, list)):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(tuple(data))
    return data

