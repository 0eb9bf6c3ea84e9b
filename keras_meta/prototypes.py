"""Class prototypes: ProtoNet's logits and Proto-MAML's head initialisation.

A class prototype is the mean of the support features of the class
(Snell, Swersky, Zemel 2017). `km.ProtoNet` scores queries by their negative
distance to the prototypes; `km.MAML(..., head_initialization="prototypes")`
and `km.ANIL(...)` (Proto-MAML, Triantafillou et al. 2020) start each task's
inner loop from the last Dense layer

    W_k = 2 c_k,    b_k = -||c_k||^2,

whose logits `2 c_k . x - ||c_k||^2 = -||x - c_k||^2 + ||x||^2` differ from the
negative squared distances by `||x||^2`, the same for every class of a query:
the same softmax, the same cross-entropy and the same argmax.
"""

import keras
import tensorflow as tf

from keras_meta.batch_norm import forward
from keras_meta.validation import check_choice

DISTANCES = ("squared_euclidean", "cosine")
HEAD_INITIALIZATIONS = (None, "prototypes")


def class_prototypes(features, labels, num_classes=None):
    """The mean feature of every class: `[classes, features]`.

    Args:
        features: `[examples, features]`.
        labels: class indices `[examples]` (or `[examples, 1]`), or one-hot
            rows `[examples, classes]`.
        num_classes: the number of classes for class indices; default
            `max(labels) + 1` (a shape known only when the labels are, so
            not under XLA). A class without examples gets a zero prototype.
    """
    features = tf.convert_to_tensor(features)
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] != 1:
        members = tf.cast(labels, features.dtype)
    else:
        indices = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        depth = tf.reduce_max(indices) + 1 if num_classes is None else num_classes
        members = tf.one_hot(indices, depth, dtype=features.dtype)
    counts = tf.reduce_sum(members, axis=0)
    sums = tf.matmul(members, features, transpose_a=True)
    return sums / tf.maximum(counts, tf.ones_like(counts))[:, None]


def prototype_logits(queries, prototypes, distance="squared_euclidean"):
    """Negative distances `[queries, classes]` of `queries` to `prototypes`.

    `"squared_euclidean"`: `-||q - c||^2`, computed as
    `2 q . c - ||c||^2 - ||q||^2` (the adapted models' Dense layer, see
    `prototype_model`). `"cosine"`: `-(1 - cos(q, c))`.
    """
    if distance == "cosine":
        queries, prototypes = _unit(queries), _unit(prototypes)
        return tf.matmul(queries, prototypes, transpose_b=True) - tf.ones((), queries.dtype)
    kernel, bias = prototype_head(prototypes)
    return tf.matmul(queries, kernel) + bias - tf.reduce_sum(queries**2, axis=-1, keepdims=True)


def prototype_head(prototypes):
    """`(kernel [features, classes], bias [classes])` = `(2 C^T, -||c_k||^2)`."""
    return 2 * tf.transpose(prototypes), -tf.reduce_sum(prototypes**2, axis=-1)


def _unit(x):
    # What `keras.layers.UnitNormalization` computes (the adapted models').
    return keras.ops.normalize(x, axis=-1, order=2, epsilon=1e-12)


def prototype_model(backbone, prototypes, distance="squared_euclidean", input_spec=None,
                    name="prototypical"):
    """A plain Keras model: `backbone`, then the negative distances to `prototypes`.

    Built from Keras' own layers and ops only (a Dense layer named
    `"prototypes"` holds them), so its `.keras` file loads and its
    SavedModel serves without keras_meta. Squared Euclidean: the Dense layer
    has `W = 2 C^T`, `b = -||c_k||^2`, and `||x||^2` is subtracted, which gives
    `-||x - c_k||^2` exactly as `prototype_logits` computes it. Cosine:
    `UnitNormalization`, then `W = C^T / ||c_k||`, `b = -1`.

    `input_spec`: a `tf.TensorSpec` of the inputs (`[None, ...]`); default
    the backbone's input.
    """
    prototypes = tf.convert_to_tensor(prototypes)
    if input_spec is None:
        (spec,) = backbone.inputs
        input_spec = tf.TensorSpec((None,) + tuple(spec.shape[1:]), spec.dtype)
    inputs = keras.Input(batch_shape=tuple(input_spec.shape), dtype=input_spec.dtype)
    features = backbone(inputs)
    if len(features.shape) > 2:
        features = keras.layers.Flatten(name="flatten_features")(features)
    dense = keras.layers.Dense(int(prototypes.shape[0]), name="prototypes", dtype=backbone.dtype_policy)
    if distance == "cosine":
        features = keras.layers.UnitNormalization(name="unit_features")(features)
        logits = dense(features)
        kernel = tf.transpose(_unit(prototypes))
        bias = -tf.ones(prototypes.shape[:1], prototypes.dtype)
    else:
        logits = dense(features) - keras.ops.sum(keras.ops.square(features), axis=-1, keepdims=True)
        kernel, bias = prototype_head(prototypes)
    dense.set_weights([kernel.numpy(), bias.numpy()])
    return keras.Model(inputs, logits, name=name)


# ----------------------------------------------------------------------
# Proto-MAML: the last Dense layer set from the support prototypes.


def check_head_initialization(value, model):
    """`head_initialization` of `km.MAML`/`km.ANIL`, checked against `model`."""
    value = check_choice("head_initialization", value, HEAD_INITIALIZATIONS)
    if value is not None:
        _last_dense(model)
    return value


def _last_dense(model):
    layers = [
        layer for layer in getattr(model, "layers", [])
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    layer = layers[-1] if layers and getattr(model, "outputs", None) else None
    if (
        not isinstance(layer, keras.layers.Dense)
        or not layer.use_bias
        or not layer.trainable
        or layer.activation is not keras.activations.linear
    ):
        raise ValueError(
            "`head_initialization='prototypes'` sets the last layer from the "
            "support prototypes: it needs a Sequential or functional model whose "
            "last layer is a trainable `keras.layers.Dense` with a bias and no "
            f"activation (logits). Received: model {model.name!r} whose last layer is "
            f"{layer.name if layer is not None else 'not exposed'!r}"
            + (f" ({type(layer).__name__})" if layer is not None else "")
        )
    return layer


class PrototypeHead:
    """A network whose start state sets the last Dense layer from support prototypes.

    Wraps a `keras_meta.adaptation` network (`WholeNetwork`, `BodyHead`):
    the same parts, except that `start` replaces the fast kernel and bias of
    the model's last Dense layer by `2 c_k` and `-||c_k||^2`, `c_k` the mean
    over the support examples of class `k` of the features feeding that layer
    (at the start weights, with the support calls' `training` flag). The
    initialisation is differentiable (second order), or a constant with
    `first_order=True`. Classes without support examples get `c_k = 0`.

    Args:
        learner: a `MAML` or `ANIL` (its model, network and `first_order`).
        network: the learner's network to wrap.
    """

    def __init__(self, learner, network):
        from keras_meta.adaptation import BodyHead
        from keras_meta.algorithms import anil

        model = learner.model
        layer = _last_dense(model)
        self.network = network
        self.units = layer.units
        self.first_order = learner.first_order
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        adapted = network.adapted(list(range(len(model.trainable_variables))))
        positions = [index[id(layer.kernel)], index[id(layer.bias)]]
        if not set(positions) <= set(adapted):
            raise ValueError(
                "`head_initialization='prototypes'` needs the last Dense layer "
                f"{layer.name!r} among the weights the inner loop adapts."
            )
        self.slots = [adapted.index(p) for p in positions]
        head = getattr(network, "head", None)
        layers = [x for x in model.layers if not isinstance(x, keras.layers.InputLayer)]
        if len(layers) == 1:
            self.body = "inputs"  # the layer reads the model's input
        elif isinstance(network, BodyHead) and [w.path for w in head.trainable_variables] == [
            w.path for w in layer.trainable_variables
        ]:
            self.body = None  # the features the network caches
        else:
            body = anil._split(model, [layer], layer.name)[0]
            self.body = (body, anil._positions(model, body, True), anil._positions(model, body, False))

    def __getattr__(self, name):
        return getattr(self.network, name)

    def support_features(self, params, non_trainable, task, support_training, cache):
        """The support features feeding the last Dense layer."""
        if self.body is None:
            return cache["support"]
        if self.body == "inputs":
            return task["support_x"]
        body, trainable, non = self.body
        return forward(body, [params[i] for i in trainable], [non_trainable[i] for i in non],
                       task["support_x"], support_training)[0]

    def start(self, params, non_trainable, task, support_training, query_training):
        fast, cache = self.network.start(params, non_trainable, task, support_training, query_training)
        features = self.support_features(params, non_trainable, task, support_training, cache)
        head = prototype_head(class_prototypes(features, task["support_y"], self.units))
        fast = list(fast)
        for slot, value in zip(self.slots, head):
            value = tf.cast(value, fast[slot].dtype)
            fast[slot] = tf.stop_gradient(value) if self.first_order else value
        return fast, cache
