"""Fast-weight adaptation: the one place where inner loops run.

Fast weights are plain tensors. They reach the network through
`model.stateless_call`, so adaptation never assigns to the model's variables and
never copies the model. Every algorithm (MAML, ANIL, iMAML) adapts through
`gradient_descent` below and calls the network through `forward`.
"""

import collections
import contextlib
import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_meta.validation import check_bool, check_positive_float


def gradient_descent(loss_fn, params, steps, learning_rate, create_graph=True, unroll=True):
    """Runs `steps` steps of plain gradient descent from `params`.

    Each step computes `params <- params - learning_rate * grad loss_fn(params)`
    with its own `tf.GradientTape`. With `create_graph=True` the steps stay
    differentiable, so an enclosing tape can take second-order derivatives
    through the whole path (MAML). With `create_graph=False` every inner
    gradient is wrapped in `tf.stop_gradient`, so nothing outside sees through
    the inner updates (first-order MAML, evaluation, iMAML's inner solve) and
    no tape is kept across steps.

    Args:
        loss_fn: callable taking a list of tensors (the fast weights) and
            returning a scalar loss.
        params: list of tensors, the starting point.
        steps: Python int, number of gradient steps (0 returns `params`).
        learning_rate: float or scalar tensor, the step size.
        create_graph: whether the updates stay differentiable.
        unroll: with `False`, and when tracing a graph, the steps run in one
            `tf.while_loop` (differentiable: its gradient replays the steps
            backwards, second order included) instead of `steps` copies of
            the step in the graph. Same result; tracing time and graph memory
            no longer grow with `steps` (conv4 MAML, 40 inner steps: first
            step 12 s instead of 133 s). Eager execution always unrolls.

    Returns:
        The list of adapted tensors, in the order of `params`.

    Example:

    >>> import tensorflow as tf
    >>> w = [tf.constant(3.0)]
    >>> gradient_descent(lambda p: p[0] ** 2, w, steps=1, learning_rate=0.25)[0]
    <tf.Tensor: shape=(), dtype=float32, numpy=1.5>
    """
    params = list(params)

    def step(params):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        if not create_graph:
            grads = [tf.stop_gradient(g) for g in grads]
        return [p - _as_dtype(learning_rate, p.dtype) * g for p, g in zip(params, grads)]

    if unroll or steps <= 1 or tf.executing_eagerly():
        for _ in range(steps):
            params = step(params)
        return params
    _, params = tf.while_loop(
        lambda i, p: i < steps,
        lambda i, p: (i + 1, step(p)),
        (tf.constant(0), params),
        maximum_iterations=steps,
    )
    return list(params)


def _as_dtype(value, dtype):
    # `tf.cast(0.1, tf.float64)` goes through float32 (1.5e-8 off): convert
    # Python numbers straight to the target dtype.
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype=dtype)


def _moments(x, axes, keepdims=False):
    # tf.nn.moments computes the variance around `stop_gradient(mean)`: exact
    # first derivatives, wrong second derivatives (the mean's dependence on
    # the inputs drops out of the Hessian). Same values, exact derivatives.
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def exact_higher_derivatives():
    """Makes Keras BatchNorm twice differentiable while the context is open.

    Keras' TensorFlow backend computes batch moments with `tf.nn.moments`,
    whose variance treats the mean as a constant (`stop_gradient`). Its
    forward values and first derivatives are exact, but second derivatives
    through BatchNorm (which second-order MAML and iMAML's Hessian-vector
    products need) are wrong. Inside this context Keras' moments are computed
    without the `stop_gradient`: the same values, exact derivatives of every
    order. keras_meta opens it around its own calls of the network only.
    """
    try:
        from keras.src.backend.tensorflow import nn as backend_nn
    except ImportError:  # pragma: no cover - Keras moved its internals
        yield
        return
    if not hasattr(backend_nn, "_compute_moments"):  # pragma: no cover
        yield
        return
    original = backend_nn._compute_moments
    backend_nn._compute_moments = _moments
    try:
        yield
    finally:
        backend_nn._compute_moments = original


def training_kwargs(model, training):
    """`{"training": training}` if `model.call` takes it, else `{}`.

    `stateless_call` hands its keyword arguments straight to `model.call`
    (unlike `model(...)`, which drops `training` for calls without it).
    """
    accepts = getattr(model, "_call_has_training_arg", None)
    if accepts is None:
        parameters = inspect.signature(model.call).parameters
        accepts = "training" in parameters or any(
            p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
    return {"training": training} if accepts else {}


def forward(model, params, non_trainable, x, training):
    """Calls `model` at fast weights `params`.

    Returns:
        `(outputs, non_trainable, losses)`: the network outputs, the values the
        non-trainable variables would take after the call (e.g. BatchNorm moving
        statistics; they are never assigned), and the regularisation losses
        the layers added (e.g. `kernel_regularizer`) at those weights.
    """
    with exact_higher_derivatives():
        outputs, new_non_trainable, losses = model.stateless_call(
            params, non_trainable, x, return_losses=True, **training_kwargs(model, training)
        )
    return outputs, new_non_trainable, losses


def batch_norm_layers(model):
    """The `keras.layers.BatchNormalization` layers of `model` (recursively)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@contextlib.contextmanager
def _exact_batch_moments(model):
    """Temporarily sets every BatchNorm `momentum` of `model` to 0.

    With momentum 0 a training-mode call replaces the moving statistics by the
    current batch's moments exactly (Keras normalises with the biased variance
    and stores the same), which is how `batch_moments` reads them out for
    any architecture. The momentum is a Python attribute read when the layer
    is called (or traced), and it is restored on exit.
    """
    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def batch_moments(model, params, non_trainable, x):
    """Non-trainable values whose BatchNorm statistics are the moments of `x`.

    Runs `model` on `x` at weights `params` in training mode and returns the
    non-trainable values with every BatchNorm layer's `moving_mean` and
    `moving_variance` set to the mean and (biased) variance of its input on
    this batch. Running the network in inference mode with these values
    reproduces its training-mode output on `x`. Differentiable in `params`.
    """
    with _exact_batch_moments(model), exact_higher_derivatives():
        _, new_non_trainable = model.stateless_call(
            params, non_trainable, x, **training_kwargs(model, True)
        )
    return new_non_trainable


def forward_with_batch_moments(model, params, non_trainable, x):
    """One training-mode call of `model` returning its outputs and batch moments.

    The outputs and losses of `forward(model, params, non_trainable, x,
    training=True)` together with the non-trainable values of
    `batch_moments(model, params, non_trainable, x)`, from a single pass over
    `x`. ANIL uses it to normalise query features with the support set's
    moments without running its body twice on the support set.

    Returns:
        `(outputs, moments, losses)`.
    """
    with _exact_batch_moments(model), exact_higher_derivatives():
        outputs, moments, losses = model.stateless_call(
            params, non_trainable, x, return_losses=True, **training_kwargs(model, True)
        )
    return outputs, moments, losses


# ----------------------------------------------------------------------
# Inner optimisers beyond plain gradient descent.
#
# An inner optimiser is a pair of pure functions on plain tensors (optax's
# shape): `init(params) -> state` and `update(grads, state, params) ->
# (updates, state)`, the new fast weights being `params + updates`. `minimize`
# runs one. iMAML's inner solve uses them: its meta-gradient does not depend
# on how the inner problem was solved, so any optimiser will do.

InnerOptimizer = collections.namedtuple("InnerOptimizer", ["name", "init", "update"])
InnerOptimizer.__doc__ = """An inner optimiser: `init(params)` and `update(grads, state, params)`."""


def sgd(learning_rate):
    """Plain gradient descent: `params - learning_rate * grads`.

    `minimize` with it computes exactly what `gradient_descent` computes.
    """
    _check_rate(learning_rate)

    def init(params):
        return ()

    def update(grads, state, params):
        return [-_as_dtype(learning_rate, g.dtype) * g for g in grads], state

    return InnerOptimizer("sgd", init, update)


def momentum(learning_rate, momentum=0.9, nesterov=False):
    """Heavy-ball (or Nesterov) momentum, as `keras.optimizers.SGD` computes it.

    `velocity <- momentum * velocity - learning_rate * grads`, then
    `params <- params + velocity` (Nesterov:
    `params <- params + momentum * velocity - learning_rate * grads`).
    """
    _check_rate(learning_rate)
    momentum = _check_fraction("momentum", momentum)
    nesterov = check_bool("nesterov", nesterov)

    def init(params):
        return [tf.zeros_like(p) for p in params]

    def update(grads, velocity, params):
        rate = [_as_dtype(learning_rate, g.dtype) for g in grads]
        mu = [_as_dtype(momentum, g.dtype) for g in grads]
        velocity = [m * v - r * g for m, v, r, g in zip(mu, velocity, rate, grads)]
        if nesterov:
            updates = [m * v - r * g for m, v, r, g in zip(mu, velocity, rate, grads)]
        else:
            updates = list(velocity)
        return updates, velocity

    return InnerOptimizer("momentum", init, update)


def adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Adam, as `keras.optimizers.Adam` computes it (same default epsilon).

    `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`, `params <- params
    - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)`.
    """
    _check_rate(learning_rate)
    beta_1 = _check_fraction("beta_1", beta_1)
    beta_2 = _check_fraction("beta_2", beta_2)
    epsilon = check_positive_float("epsilon", epsilon)

    def init(params):
        dtype = params[0].dtype if params else tf.float32
        return (
            tf.zeros([], dtype),
            [tf.zeros_like(p) for p in params],
            [tf.zeros_like(p) for p in params],
        )

    def update(grads, state, params):
        count, first, second = state
        count = count + 1
        b1 = _as_dtype(beta_1, count.dtype)
        b2 = _as_dtype(beta_2, count.dtype)
        scale = _as_dtype(learning_rate, count.dtype) * tf.sqrt(1 - b2**count) / (1 - b1**count)
        first = [m + (1 - tf.cast(b1, g.dtype)) * (g - m) for m, g in zip(first, grads)]
        second = [v + (1 - tf.cast(b2, g.dtype)) * (g * g - v) for v, g in zip(second, grads)]
        updates = [
            -tf.cast(scale, m.dtype) * m / (tf.sqrt(v) + _as_dtype(epsilon, v.dtype))
            for m, v in zip(first, second)
        ]
        return updates, (count, first, second)

    return InnerOptimizer("adam", init, update)


def _check_rate(learning_rate):
    # A tensor is fine here (a scaled or learned step size inside a step).
    if not tf.is_tensor(learning_rate):
        check_positive_float("learning_rate", learning_rate)


def _check_fraction(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0 <= value < 1
    ):
        raise ValueError(
            f"`{name}` must be a number in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


INNER_OPTIMIZERS = {"sgd": sgd, "momentum": momentum, "adam": adam}


def get_inner_optimizer(identifier, learning_rate):
    """An `InnerOptimizer` from a name or a config dict.

    Args:
        identifier: `"sgd"`, `"momentum"` or `"adam"`, or a dict with a
            `"name"` among those and the optimiser's keyword arguments
            (e.g. `{"name": "momentum", "momentum": 0.5}`).
        learning_rate: the step size.

    Returns:
        An `InnerOptimizer`.
    """
    if isinstance(identifier, str):
        name, kwargs = identifier, {}
    elif isinstance(identifier, dict) and isinstance(identifier.get("name"), str):
        kwargs = dict(identifier)
        name = kwargs.pop("name")
    else:
        raise ValueError(
            f"An inner optimiser is one of {sorted(INNER_OPTIMIZERS)} or a dict "
            "with a `name` among those and its keyword arguments. Received: "
            f"{identifier!r}"
        )
    if name not in INNER_OPTIMIZERS:
        raise ValueError(
            f"Unknown inner optimiser {name!r}: expected one of "
            f"{sorted(INNER_OPTIMIZERS)}. Received: {identifier!r}"
        )
    try:
        return INNER_OPTIMIZERS[name](learning_rate, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"Invalid arguments for inner optimiser {name!r}: {error}. "
            f"Received: {identifier!r}"
        ) from error


def minimize(loss_fn, params, steps, optimizer, state=None, create_graph=False):
    """Runs `steps` steps of an inner optimiser on `loss_fn` from `params`.

    With `create_graph=False` (the default) the steps run in a
    `tf.while_loop` (a Python loop when eager): the graph does not grow with
    `steps`, each gradient is wrapped in `tf.stop_gradient`, and no tape is
    kept across steps, so memory does not grow with `steps` either (iMAML's
    inner solve, evaluation). With `create_graph=True` the steps are unrolled
    and stay differentiable, like `gradient_descent(create_graph=True)`.

    Args:
        loss_fn: callable taking a list of tensors and returning a scalar.
        params: list of tensors, the starting point.
        steps: Python int >= 0.
        optimizer: an `InnerOptimizer` (`sgd`, `momentum`, `adam`).
        state: the optimiser state to continue from; default
            `optimizer.init(params)`.
        create_graph: whether the updates stay differentiable.

    Returns:
        `(params, state)`: the adapted tensors and the optimiser state.

    Example:

    >>> import tensorflow as tf
    >>> w, _ = minimize(lambda p: p[0] ** 2, [tf.constant(3.0)], steps=1,
    ...                 optimizer=sgd(0.25))
    >>> w[0]
    <tf.Tensor: shape=(), dtype=float32, numpy=1.5>
    """
    params = list(params)
    if state is None:
        state = optimizer.init(params)

    def step(params, state):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        if not create_graph:
            grads = [tf.stop_gradient(g) for g in grads]
        updates, state = optimizer.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    if steps == 0:
        return params, state
    if create_graph:
        for _ in range(steps):
            params, state = step(params, state)
        return params, state
    _, params, state = tf.while_loop(
        lambda i, p, s: i < steps,
        lambda i, p, s: (i + 1,) + step(p, s),
        (tf.constant(0), params, state),
    )
    return list(params), state
