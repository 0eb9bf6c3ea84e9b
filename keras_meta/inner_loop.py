"""The inner loop: one loop, optax-style inner optimisers and transforms.

Fast weights are plain tensors. They reach the network through
`model.stateless_call` (`forward`), so adaptation never assigns to the model's
variables and never copies the model. Every algorithm adapts through `run`
below; `gradient_descent` and `minimize` are thin wrappers around it.

An inner optimiser is a pair of pure functions on lists of tensors (optax's
shape): `init(params) -> state` and `update(grads, state, params) ->
(updates, state)`, the new fast weights being `params + updates`. A
*transform* has the same shape and rewrites the gradients before the
optimiser sees them (`add_decayed_weights`: ANIL's head L2, `add_proximal`:
iMAML's proximal term); `chain` composes them, as `optax.chain` does:

    chain(add_proximal(2.0), momentum(0.1, momentum=0.5))

Every optimiser is differentiable: with `create_graph=True` an enclosing tape
takes second-order derivatives through the whole path, momentum and Adam
included. Learning rates are numbers, scalar tensors, one tensor per adapted
weight, or a callable `rate(count)` returning either (count = steps taken so
far), which is where learned and per-step rates plug in
(see `keras_meta.step_size`).
"""

import collections

import numpy as np
import tensorflow as tf

from keras_meta.batch_norm import (  # noqa: F401  (the network calls, re-exported)
    batch_moments,
    batch_norm_layers,
    exact_higher_derivatives,
    forward,
    forward_with_batch_moments,
    training_kwargs,
)
from keras_meta.validation import check_bool, check_positive_float

InnerOptimizer = collections.namedtuple(
    "InnerOptimizer", ["name", "init", "update", "penalty"], defaults=(None,)
)
InnerOptimizer.__doc__ = """An inner optimiser or transform.

`init(params) -> state`, `update(grads, state, params) -> (updates, state)`;
`penalty(params, state)`, where not None, is the term of the inner objective
whose gradient the transform adds (reported by `MetaLearner.support_loss`).
"""


def run(loss_fn, params, steps, optimizer, state=None, create_graph=False, unroll=True,
        first_step=None):
    """Runs `steps` steps of an inner optimiser on `loss_fn` from `params`.

    The one inner loop of keras_meta. Each step takes the gradient of
    `loss_fn` at the current point with its own `tf.GradientTape` and applies
    `optimizer`. With `create_graph=True` the steps stay differentiable, so an
    enclosing tape can take second-order derivatives through the whole path
    (MAML). With `create_graph=False` every inner gradient is wrapped in
    `tf.stop_gradient`: nothing outside sees through the updates and no tape
    is kept across steps.

    Args:
        loss_fn: callable taking a list of tensors and returning a scalar.
        params: list of tensors, the starting point.
        steps: Python int >= 0.
        optimizer: an `InnerOptimizer` (`sgd`, `momentum`, `adam`, `chain`).
        state: the optimiser state to continue from; default
            `optimizer.init(params)`.
        create_graph: whether the updates stay differentiable.
        unroll: with `False`, and when tracing a graph, the steps run in one
            `tf.while_loop` (differentiable: its gradient replays the steps
            backwards, second order included) instead of `steps` copies of
            the step in the graph. Same result; tracing time and graph memory
            no longer grow with `steps` (conv4 MAML, 40 inner steps: first
            step 12 s instead of 133 s). Eager execution always unrolls.
        first_step: `None` (default), or the number of steps taken before
            this run (a Python int): `loss_fn` is then called as
            `loss_fn(params, step)` with the index of the step it computes
            the gradient for (`first_step`, `first_step + 1`, ...; a Python
            int when unrolled, a scalar int32 tensor inside the
            `tf.while_loop`), for losses that change from step to step
            (per-step BatchNorm).

    Returns:
        `(params, state)`: the adapted tensors and the optimiser state.
    """
    params = list(params)
    if state is None:
        state = optimizer.init(params)

    def step(params, state, index):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = loss_fn(params) if first_step is None else loss_fn(params, index)
        grads = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        if not create_graph:
            grads = [tf.stop_gradient(g) for g in grads]
        updates, state = optimizer.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    start = first_step or 0
    if unroll or steps <= 1 or tf.executing_eagerly():
        for i in range(steps):
            params, state = step(params, state, start + i)
        return params, state
    _, params, state = tf.while_loop(
        lambda i, p, s: i < steps,
        lambda i, p, s: (i + 1,) + step(p, s, i + start),
        (tf.constant(0), params, state),
        maximum_iterations=steps,
    )
    return list(params), state


def gradient_descent(loss_fn, params, steps, learning_rate, create_graph=True, unroll=True):
    """Runs `steps` steps of plain gradient descent from `params`.

    `params <- params - learning_rate * grad loss_fn(params)`: `run` with
    `sgd(learning_rate)`, returning the adapted tensors only.

    Example:

    >>> import tensorflow as tf
    >>> w = [tf.constant(3.0)]
    >>> gradient_descent(lambda p: p[0] ** 2, w, steps=1, learning_rate=0.25)[0]
    <tf.Tensor: shape=(), dtype=float32, numpy=1.5>
    """
    return run(
        loss_fn, params, steps, sgd(learning_rate), create_graph=create_graph, unroll=unroll
    )[0]


def minimize(loss_fn, params, steps, optimizer, state=None, create_graph=False):
    """`run` with the steps in a `tf.while_loop` unless `create_graph=True`.

    With `create_graph=False` (the default) the graph does not grow with
    `steps` and memory does not either (iMAML's inner solve, evaluation);
    with `create_graph=True` the steps are unrolled and differentiable.

    Returns:
        `(params, state)`: the adapted tensors and the optimiser state.

    Example:

    >>> import tensorflow as tf
    >>> w, _ = minimize(lambda p: p[0] ** 2, [tf.constant(3.0)], steps=1,
    ...                 optimizer=sgd(0.25))
    >>> w[0]
    <tf.Tensor: shape=(), dtype=float32, numpy=1.5>
    """
    return run(
        loss_fn, params, steps, optimizer, state=state, create_graph=create_graph,
        unroll=create_graph,
    )


def _as_dtype(value, dtype):
    # `tf.cast(0.1, tf.float64)` goes through float32 (1.5e-8 off): convert
    # Python numbers straight to the target dtype.
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype=dtype)


# ----------------------------------------------------------------------
# Learning rates: a number, a tensor, one per weight, or a schedule.


def _check_rate(learning_rate):
    # Tensors, lists and schedules are fine here (scaled or learned rates).
    if not (tf.is_tensor(learning_rate) or callable(learning_rate)
            or isinstance(learning_rate, (list, tuple))):
        check_positive_float("learning_rate", learning_rate)


def _rate_init(learning_rate):
    """The state a learning rate needs: a step count for schedules, else none."""
    return tf.zeros([], tf.int32) if callable(learning_rate) else ()


def _rates(learning_rate, count, grads):
    """One rate per gradient, in its dtype; and the next count."""
    if callable(learning_rate):
        rate, count = learning_rate(count), count + 1
    else:
        rate = learning_rate
    if not isinstance(rate, (list, tuple)):
        rate = [rate] * len(grads)
    return [_as_dtype(r, g.dtype) for r, g in zip(rate, grads)], count


# ----------------------------------------------------------------------
# Inner optimisers.


def sgd(learning_rate):
    """Plain gradient descent: `params - learning_rate * grads`."""
    _check_rate(learning_rate)

    def init(params):
        return _rate_init(learning_rate)

    def update(grads, count, params):
        rates, count = _rates(learning_rate, count, grads)
        return [-r * g for r, g in zip(rates, grads)], count

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
        return [tf.zeros_like(p) for p in params], _rate_init(learning_rate)

    def update(grads, state, params):
        velocity, count = state
        rate, count = _rates(learning_rate, count, grads)
        mu = [_as_dtype(momentum, g.dtype) for g in grads]
        velocity = [m * v - r * g for m, v, r, g in zip(mu, velocity, rate, grads)]
        if nesterov:
            updates = [m * v - r * g for m, v, r, g in zip(mu, velocity, rate, grads)]
        else:
            updates = list(velocity)
        return updates, (velocity, count)

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
            _rate_init(learning_rate),
        )

    def update(grads, state, params):
        count, first, second, rate_count = state
        rates, rate_count = _rates(learning_rate, rate_count, grads)
        count = count + 1
        b1 = _as_dtype(beta_1, count.dtype)
        b2 = _as_dtype(beta_2, count.dtype)
        correction = tf.sqrt(1 - b2**count) / (1 - b1**count)
        first = [m + (1 - tf.cast(b1, g.dtype)) * (g - m) for m, g in zip(first, grads)]
        second = [v + (1 - tf.cast(b2, g.dtype)) * (g * g - v) for v, g in zip(second, grads)]
        updates = [
            -(r * tf.cast(correction, m.dtype)) * m / (tf.sqrt(v) + _as_dtype(epsilon, v.dtype))
            for r, m, v in zip(rates, first, second)
        ]
        return updates, (count, first, second, rate_count)

    return InnerOptimizer("adam", init, update)


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
        learning_rate: the step size (see the module docstring).

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


# ----------------------------------------------------------------------
# Transforms of the inner gradients, and their composition.


def add_decayed_weights(weight_decay):
    """Adds `weight_decay * params` to the gradients.

    The gradient of `weight_decay / 2 * ||params||^2` (ANIL's head L2).
    """

    def init(params):
        return ()

    def update(grads, state, params):
        return [g + _as_dtype(weight_decay, g.dtype) * p for g, p in zip(grads, params)], state

    def penalty(params, state):
        squares = tf.add_n([tf.reduce_sum(tf.square(p)) for p in params])
        return _as_dtype(weight_decay / 2, squares.dtype) * squares

    return InnerOptimizer("add_decayed_weights", init, update, penalty)


def add_proximal(strength):
    """Adds `strength * (params - anchor)`, the anchor being where `init` ran.

    The gradient of `strength / 2 * ||params - anchor||^2` (iMAML's proximal
    term). The anchor is the transform's state, so a continued run (from a
    returned state) stays anchored at the same point.
    """

    def init(params):
        return list(params)

    def update(grads, anchor, params):
        return [
            g + _as_dtype(strength, g.dtype) * (p - a) for g, p, a in zip(grads, params, anchor)
        ], anchor

    def penalty(params, anchor):
        distance = tf.add_n([tf.reduce_sum(tf.square(p - a)) for p, a in zip(params, anchor)])
        return _as_dtype(strength / 2, distance.dtype) * distance

    return InnerOptimizer("add_proximal", init, update, penalty)


def chain(*transforms):
    """Applies `transforms` in order (the last is usually the optimiser)."""
    if len(transforms) == 1:
        return transforms[0]

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params):
        states = []
        for transform, inner in zip(transforms, state):
            grads, inner = transform.update(grads, inner, params)
            states.append(inner)
        return grads, tuple(states)

    def penalty(params, state):
        terms = [
            t.penalty(params, s) for t, s in zip(transforms, state) if t.penalty is not None
        ]
        return tf.add_n(terms) if terms else None

    name = "+".join(t.name for t in transforms)
    return InnerOptimizer(name, init, update, penalty)
