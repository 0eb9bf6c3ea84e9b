"""Prototypical networks: queries scored by their distance to the support class means."""

import copy

import keras
import numpy as np
import tensorflow as tf

from keras_meta import export, prototypes
from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import check_choice, check_positive_int


class Prototypes:
    """The network of `ProtoNet`: nothing adapts; the start state holds the prototypes.

    The start state embeds the support and query sets once (BatchNorm's
    conventions, as `BodyHead`'s body) and averages the support embeddings
    per class; outputs are `prototype_logits` of the cached embeddings.
    """

    def __init__(self, backbone, batch_norm, distance, n_way):
        self.backbone = backbone
        self.batch_norm = batch_norm
        self.distance = distance
        self.n_way = n_way

    def adapted(self, params):
        return []

    def start(self, params, non_trainable, task, support_training, query_training):
        """`([], cache)`: the embeddings and the prototypes, differentiable in `params`."""
        support, query = self.batch_norm.support_and_query(
            self.backbone, params, non_trainable, task["support_x"], task.get("query_x"),
            support_training, query_training,
        )
        cache = {"task": task, "params": list(params), "embeddings": {}, "losses": {}}
        for name, outputs in (("support", support), ("query", query)):
            if outputs is not None:
                embedded, cache["losses"][name] = outputs
                cache["embeddings"][name] = _flat(embedded)
        cache["prototypes"] = prototypes.class_prototypes(
            cache["embeddings"]["support"], task["support_y"], self.n_way
        )
        return [], cache

    def full_weights(self, fast, cache):
        return list(cache["params"])

    def _outputs(self, cache, name):
        logits = prototypes.prototype_logits(
            cache["embeddings"][name], cache["prototypes"], self.distance
        )
        return logits, cache["losses"][name]

    def support_outputs(self, fast, cache, training):
        return self._outputs(cache, "support")

    def query_outputs(self, fast, cache, training):
        return self._outputs(cache, "query")


def _flat(embedded):
    """`[examples, features]`: the backbone's outputs flattened per example."""
    if embedded.shape.rank == 2:
        return embedded
    return tf.reshape(embedded, [tf.shape(embedded)[0], -1])


@keras.saving.register_keras_serializable(package="keras_meta")
class ProtoNet(MetaLearner):
    """Prototypical networks, trained with `model.fit` on episodes.

    The backbone embeds every example; a class's prototype `c_k` is the mean
    embedding of its support examples, and the logits of a query `x` are its
    negative distances to the prototypes, `-d(f(x), c_k)`. The compiled
    loss (softmax cross-entropy on these logits:
    `SparseCategoricalCrossentropy(from_logits=True)`) on the query set is
    the task's loss; its gradient, averaged over the meta-batch, trains the
    backbone. There is no inner loop: nothing adapts, so the number of
    inner steps of `evaluate`, `evaluate_tasks` and `adapt` changes nothing.

    The episode contract is the other learners': `fit`, `evaluate`,
    `predict` (query logits, `[queries, classes]` per task),
    `evaluate_tasks`, `.keras` save/load, `export_adaptive` (the SavedModel
    embeds the support set and scores the queries in the graph). The number
    of classes is read from each task's support labels (classes
    `0 .. max(support_y)`, each with at least one support example), so one
    learner serves any n_way; `n_way=` fixes it instead, which XLA
    (`jit_compile=True`) needs. `adapt(support_x, support_y)` returns a plain
    Keras model (the backbone, then a Dense layer named `"prototypes"`
    holding the prototypes) that predicts, saves and exports without
    keras_meta (`keras_meta.prototypes.prototype_model`).

    BatchNorm in the backbone follows `km.MAML`: transductive by default
    (support and query sets each with their own statistics), or
    `transductive_batch_norm=False` (the query set normalised with the
    support set's moments, which is what the model `adapt()` returns does).

    Args:
        backbone: a built `keras.Model` with one output, the embedding
            (flattened per example if it has more axes). Its trainable
            weights are the meta-parameters.
        distance: `"squared_euclidean"` (default, the paper's) or
            `"cosine"` (`d = 1 - cos`).
        n_way: `None` (default: from each task's labels) or the number of
            classes of every task.
        transductive_batch_norm: BatchNorm in the backbone, as in `km.MAML`.
        task_execution: how the tasks of a meta-batch run (`"auto"`,
            `"vectorized"`, `"sequential"`), as in `km.MAML`.

    Example:

    ```python
    import keras, keras_meta as km
    backbone = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(64, activation="relu")])
    protonet = km.ProtoNet(backbone)
    protonet.compile(optimizer=keras.optimizers.Adam(1e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
    protonet.fit(episodes, steps_per_epoch=100)   # dicts support_x/_y, query_x/_y
    classifier = protonet.adapt(support_x, support_y)  # a plain keras.Model
    ```

    Reference:
        - [Snell, Swersky, Zemel, 2017](https://arxiv.org/abs/1703.05175)
    """

    def __init__(
        self,
        backbone,
        distance="squared_euclidean",
        n_way=None,
        transductive_batch_norm=True,
        task_execution="auto",
        **kwargs,
    ):
        super().__init__(
            backbone, transductive_batch_norm=transductive_batch_norm,
            task_execution=task_execution, **kwargs,
        )
        self.distance = check_choice("distance", distance, prototypes.DISTANCES)
        self.n_way = check_positive_int("n_way", n_way, allow_none=True)

    @property
    def backbone(self):
        """The embedding network (the wrapped model)."""
        return self.model

    def build_network(self):
        return Prototypes(self.model, self.batch_norm, self.distance, self.n_way)

    # ------------------------------------------------------------------
    # Outputs are logits over the task's classes, not the backbone's.

    def prediction_spec(self, x_spec):
        return keras.KerasTensor((None, self.n_way), self.model.compute_dtype)

    def _output_shape(self, x_shape, dtype):
        return (self.n_way,)

    def _label_width(self):
        return self.n_way if super()._label_width() is not None else None

    def _check_values(self, episode, finite=True):
        super()._check_values(episode, finite)
        if getattr(self, "loss", None) is None or "support_y" not in episode:
            return
        labels = {key: np.asarray(episode[key]) for key in ("support_y", "query_y") if key in episode}
        if not np.issubdtype(labels["support_y"].dtype, np.number) or (
            labels["support_y"].ndim >= 3 and labels["support_y"].shape[-1] != 1
        ):
            return  # one-hot labels: the classes are the columns
        for task, support in enumerate(labels["support_y"].reshape(len(labels["support_y"]), -1)):
            classes = int(support.max()) + 1 if self.n_way is None else self.n_way
            missing = sorted(set(range(classes)) - set(support.astype(int).tolist()))
            query = labels.get("query_y")
            outside = [] if query is None else sorted(
                {int(v) for v in query[task].ravel() if v >= classes}
            )
            problems = ([f"no support example of class(es) {missing}"] if missing else []) + (
                [f"query labels {outside} outside them"] if outside else []
            )
            if problems:
                raise ValueError(
                    "ProtoNet needs a support example of every class of a task "
                    f"(labels 0 .. {classes - 1}, from "
                    + ("`n_way`" if self.n_way is not None else "the largest support label")
                    + f"). Received: task {task} has " + " and ".join(problems)
                )

    # ------------------------------------------------------------------
    # XLA needs the number of classes as a constant.

    def compile(self, *args, jit_compile="auto", **kwargs):
        if jit_compile is True and self.n_way is None:
            raise ValueError(
                "ProtoNet with `n_way=None` reads the number of classes from each "
                "task's labels, a shape XLA cannot compile: pass `n_way=` (every "
                "task's number of classes) to use `jit_compile=True`. Received: "
                "jit_compile=True, n_way=None"
            )
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def _auto_jit_compile(self):
        return self.n_way is not None and super()._auto_jit_compile()

    # ------------------------------------------------------------------
    # The standalone classifier, and serialization.

    def adapt(self, support_x, support_y, steps=None):
        """A standalone Keras model classifying among one task's classes.

        The backbone (a clone holding the meta-learned weights, its BatchNorm
        layers with the support set's moments as statistics, as `km.MAML.adapt`
        returns it), then the negative distances to the task's prototypes
        from Keras' own layers (`keras_meta.prototypes.prototype_model`): it
        predicts, saves (`.keras`) and exports without keras_meta. Its query
        logits equal `predict`'s with `transductive_batch_norm=False` (or
        without BatchNorm).

        Args:
            support_x: one task's support inputs, `[examples, ...]`.
            support_y: its labels, `[examples]` (or one-hot rows).
            steps: accepted for the `MetaLearner` signature (a positive int);
                nothing adapts.

        Returns:
            A new, uncompiled `keras.Model` returning `[examples, classes]` logits.
        """
        backbone = super().adapt(support_x, support_y, steps)  # checked, with the support moments
        params, non_trainable = self._meta_state()
        task = {"support_x": tf.convert_to_tensor(support_x),
                "support_y": tf.convert_to_tensor(support_y)}
        support_training, query_training = self.batch_norm.training_flags(False)
        _, cache = self.network.start(params, non_trainable, task, support_training, query_training)
        return prototypes.prototype_model(
            backbone, cache["prototypes"], self.distance, export._input_spec(self.model)
        )

    def get_config(self):
        config = super().get_config()
        config["backbone"] = config.pop("model")
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
