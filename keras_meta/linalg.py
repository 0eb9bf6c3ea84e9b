"""Linear algebra on nests of tensors: conjugate gradient and Hessian-vector products.

Nothing here knows about meta-learning. `conjugate_gradient` solves `A x = b`
for a symmetric positive-definite operator given as a function, on any nest
of tensors (a list of weight tensors, a dict, a single tensor), and runs
eagerly, inside `tf.function`, under `jit_compile=True` and inside
`tf.vectorized_map`. `hessian_vector_product_fn` turns a scalar loss into such
an operator. iMAML (`keras_meta.IMAML`) combines the two to solve
`(I + H / lambda) v = g`.
"""

import collections
import numbers

import tensorflow as tf

HVP_METHODS = ("reverse_over_reverse", "forward_over_reverse")

NEGATIVE_CURVATURE = ("ignore", "stop")

ConjugateGradientResult = collections.namedtuple(
    "ConjugateGradientResult", ["solution", "iterations", "residual", "negative_curvature"]
)
ConjugateGradientResult.__doc__ = """What `conjugate_gradient` returns.

Fields:
    solution: the approximate solution, a nest with the structure of `b`.
    iterations: int32 scalar tensor, the iterations taken (each costs one
        `matvec`); fewer than `max_iterations` when the tolerance was met or
        the iteration stopped at negative curvature.
    residual: scalar tensor, the relative residual `||r|| / ||b||` of the
        last iterate (0 when `b` is 0), with `r` the conjugate-gradient
        recurrence's residual, which equals `b - A x` in exact arithmetic.
    negative_curvature: bool scalar tensor, whether a search direction `p`
        with `p . A p <= 0` was met, i.e. `A` is not positive definite.
"""


def _vdot(a, b, dtype):
    """Inner product of two flat lists of tensors, accumulated in `dtype`."""
    return tf.add_n([tf.cast(tf.reduce_sum(x * y), dtype) for x, y in zip(a, b)])


def _axpy(alpha, x, y):
    """`alpha * x + y` leaf by leaf (`alpha` a scalar tensor)."""
    return [tf.cast(alpha, b.dtype) * a + b for a, b in zip(x, y)]


def conjugate_gradient(
    matvec,
    b,
    max_iterations,
    tolerance=1e-5,
    initial=None,
    early_exit=True,
    negative_curvature="ignore",
):
    """Solves `A x = b` by conjugate gradient, keeping the structure of `b`.

    `A` is a symmetric positive-definite linear operator given as a function
    (`matvec(x)` returns `A x` with the structure of `x`); `b` is a tensor or
    any nest of tensors (e.g. a list of weight-shaped tensors), treated as one
    long vector whose inner product is the sum of the leaves' inner
    products. The iteration stops after `max_iterations` steps, or once the
    relative residual `||b - A x|| / ||b||` is at most `tolerance`.

    The loop is a `tf.while_loop`, so the graph does not grow with
    `max_iterations`, and it runs eagerly, in `tf.function`, under XLA and in
    `tf.vectorized_map`. Once stopped, the iterates are frozen (masked), so
    the result is the same whether the loop exits early or runs on.

    When `A` is not positive definite, CG may meet a direction `p` with
    `p . A p <= 0`; its step is then meaningless (for `p . A p < 0` it goes
    uphill on the quadratic `x . A x / 2 - b . x`). `negative_curvature`
    says what to do: `"ignore"` carries on (plain CG; the result reports that
    it happened), `"stop"` truncates there as Newton-CG does (Nocedal and
    Wright, Algorithm 7.1): the solution is the last iterate, or, if the
    very first direction has negative curvature, `initial + r0` (`b` from
    zero: the steepest-descent direction of the quadratic). With a
    positive-definite `A` both give plain CG's result.

    Args:
        matvec: callable mapping a nest like `b` to `A` applied to it.
        b: the right-hand side, a tensor or a nest of tensors (one dtype).
        max_iterations: non-negative int (or int scalar tensor), the maximum
            number of iterations, i.e. of `matvec` calls.
        tolerance: relative residual at which to stop.
        initial: starting point, a nest like `b`; default zeros (which saves
            one `matvec`).
        early_exit: `True` stops the loop once the tolerance is met (a
            data-dependent loop condition). `False` always runs
            `max_iterations` iterations, frozen once stopped: needed inside
            `tf.vectorized_map` under XLA, which cannot compile a vectorized
            loop with a data-dependent condition.
        negative_curvature: `"ignore"` (plain CG) or `"stop"` (see above).

    Returns:
        A `ConjugateGradientResult(solution, iterations, residual,
        negative_curvature)`.

    Example:

    >>> import tensorflow as tf
    >>> A = tf.constant([[4.0, 1.0], [1.0, 3.0]])
    >>> result = conjugate_gradient(lambda x: tf.linalg.matvec(A, x),
    ...                             tf.constant([1.0, 2.0]), max_iterations=2)
    >>> [round(float(v), 4) for v in result.solution]
    [0.0909, 0.6364]

    Reference:
        - [Hestenes and Stiefel, 1952](https://doi.org/10.6028/jres.049.044)
        - J. Nocedal and S. Wright, Numerical Optimization, Algorithms 5.2
          and 7.1.
    """
    if isinstance(max_iterations, bool) or (
        isinstance(max_iterations, int) and max_iterations < 0
    ):
        raise ValueError(
            "`max_iterations` must be a non-negative integer. Received: "
            f"max_iterations={max_iterations!r}"
        )
    if not tf.is_tensor(tolerance) and (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)
        or not tolerance >= 0
    ):
        raise ValueError(
            f"`tolerance` must be a non-negative number. Received: tolerance={tolerance!r}"
        )
    if negative_curvature not in NEGATIVE_CURVATURE:
        raise ValueError(
            f"`negative_curvature` must be one of {list(NEGATIVE_CURVATURE)}. "
            f"Received: negative_curvature={negative_curvature!r}"
        )
    stop_on_negative = negative_curvature == "stop"
    structure = b
    b = [tf.convert_to_tensor(t) for t in tf.nest.flatten(b)]
    if not b:
        raise ValueError("`b` must hold at least one tensor. Received: an empty nest")
    dtype = b[0].dtype
    if not dtype.is_floating:
        raise ValueError(
            f"`b` must hold floating-point tensors. Received: dtype={dtype.name}"
        )

    def pack(flat):
        return tf.nest.pack_sequence_as(structure, flat)

    def apply(flat):
        out = tf.nest.flatten(matvec(pack(flat)))
        if len(out) != len(flat):
            raise ValueError(
                "`matvec` must return a nest with the structure of `b` "
                f"({len(flat)} tensors). Received: {len(out)} tensors"
            )
        return [tf.convert_to_tensor(t) for t in out]

    if initial is None:
        x = [tf.zeros_like(t) for t in b]
        r = list(b)
    else:
        tf.nest.assert_same_structure(structure, initial)
        x = [tf.convert_to_tensor(t, t_b.dtype) for t, t_b in zip(tf.nest.flatten(initial), b)]
        r = [t_b - t_a for t_b, t_a in zip(b, apply(x))]
    b_norm_sq = _vdot(b, b, dtype)
    threshold_sq = tf.cast(tolerance, dtype) ** 2 * b_norm_sq
    rs = _vdot(r, r, dtype)

    def cond(i, x, r, p, rs, stopped, negative):
        if not early_exit:
            return True  # `maximum_iterations` bounds the loop
        return (rs > threshold_sq) & tf.logical_not(stopped)

    def body(i, x, r, p, rs, stopped, negative):
        ap = apply(p)
        curvature = _vdot(p, ap, dtype)
        is_negative = (curvature <= 0) & (rs > 0)
        running = (rs > threshold_sq) & tf.logical_not(stopped)
        negative = negative | (running & is_negative)
        if stop_on_negative:
            stopped = stopped | (running & is_negative)
            running = running & tf.logical_not(is_negative)
        alpha = tf.math.divide_no_nan(rs, curvature)
        new_x = _axpy(alpha, p, x)
        new_r = _axpy(-alpha, ap, r)
        new_rs = _vdot(new_r, new_r, dtype)
        beta = tf.math.divide_no_nan(new_rs, rs)
        new_p = _axpy(beta, p, new_r)

        def keep(new, old):
            return [tf.where(running, n, o) for n, o in zip(new, old)]

        return (
            i + tf.cast(running, tf.int32),
            keep(new_x, x),
            keep(new_r, r),
            keep(new_p, p),
            tf.where(running, new_rs, rs),
            stopped,
            negative,
        )

    false = tf.constant(False)
    iterations, x, r, _, rs, stopped, negative = tf.while_loop(
        cond,
        body,
        (tf.constant(0, tf.int32), x, r, list(r), rs, false, false),
        maximum_iterations=max_iterations,
    )
    if stop_on_negative:
        # Negative curvature along the first direction: the steepest-descent
        # direction of the quadratic, r0 (Newton-CG's fallback).
        first = stopped & tf.equal(iterations, 0)
        x = [tf.where(first, t + u, t) for t, u in zip(x, r)]
    residual = tf.sqrt(tf.math.divide_no_nan(rs, b_norm_sq))
    return ConjugateGradientResult(pack(x), iterations, residual, negative)


def hessian_vector_product_fn(loss_fn, params, method="reverse_over_reverse"):
    """The operator `v -> H v`, `H` the Hessian of `loss_fn` at `params`.

    Two ways to compute exact Hessian-vector products:

    - `"reverse_over_reverse"` (default; "double backward"): the gradient is
      computed under an outer `tf.GradientTape`, and the product is the
      outer tape's gradient of it with `output_gradients=v`, i.e. the
      gradient of `<grad loss, v>`.
    - `"forward_over_reverse"`: the gradient is computed under a
      `tf.autodiff.ForwardAccumulator` whose tangent is `v`; the product is
      its directional derivative (TensorFlow computes most forward-mode
      derivatives by transposing backward functions).

    Each product runs the forward and the first backward pass again. On
    keras_meta's conv4 (5-way 1-shot support sets, CPU, no XLA) single
    products cost the same, but a 5-iteration CG solve took 1.09-1.10x as
    long with forward-over-reverse, whose trace was also up to 2.5x as long,
    hence the default (numbers and command in `docs/imaml.md`).

    Args:
        loss_fn: callable taking `params` (a nest of tensors) and returning a
            scalar loss.
        params: the point at which the Hessian is taken, a nest of tensors.
        method: `"reverse_over_reverse"` or `"forward_over_reverse"`.

    Returns:
        A function mapping a nest like `params` to `H` applied to it.

    Example:

    >>> import tensorflow as tf
    >>> w = [tf.constant([1.0, 2.0])]
    >>> hvp = hessian_vector_product_fn(lambda p: tf.reduce_sum(p[0] ** 3), w)
    >>> hvp([tf.constant([1.0, 1.0])])[0]    # diag(6 w) @ [1, 1]
    <tf.Tensor: shape=(2,), dtype=float32, numpy=array([ 6., 12.], dtype=float32)>
    """
    if method not in HVP_METHODS:
        raise ValueError(
            f"`method` must be one of {list(HVP_METHODS)}. Received: method={method!r}"
        )
    structure = params
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(params)]
    zero = tf.UnconnectedGradients.ZERO

    def gradient():
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(flat)
            loss = loss_fn(tf.nest.pack_sequence_as(structure, flat))
        return tape.gradient(loss, flat, unconnected_gradients=zero)

    def matvec(vector):
        v = [tf.cast(t, p.dtype) for t, p in zip(tf.nest.flatten(vector), flat)]
        if method == "reverse_over_reverse":
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(flat)
                grads = gradient()
            hv = tape.gradient(grads, flat, output_gradients=v, unconnected_gradients=zero)
        else:
            with tf.autodiff.ForwardAccumulator(flat, v) as accumulator:
                grads = gradient()
            hv = accumulator.jvp(grads, unconnected_gradients=zero)
        return tf.nest.pack_sequence_as(structure, hv)

    return matvec


def hessian_vector_product(loss_fn, params, vector, method="reverse_over_reverse"):
    """`H v`, with `H` the Hessian of the scalar `loss_fn` at `params`.

    `hessian_vector_product_fn(loss_fn, params, method)(vector)`.

    Args:
        loss_fn: callable taking `params` and returning a scalar loss.
        params: a nest of tensors, the point.
        vector: a nest like `params`, the direction.
        method: `"reverse_over_reverse"` (double backward) or
            `"forward_over_reverse"` (`tf.autodiff.ForwardAccumulator` over a
            `tf.GradientTape`).

    Returns:
        A nest like `params`.

    Example:

    >>> import tensorflow as tf
    >>> hessian_vector_product(lambda w: tf.reduce_sum(w ** 3),
    ...                        tf.constant([1.0, 2.0]), tf.constant([1.0, 0.0]))
    <tf.Tensor: shape=(2,), dtype=float32, numpy=array([6., 0.], dtype=float32)>
    """
    return hessian_vector_product_fn(loss_fn, params, method=method)(vector)
