"""keras_meta.linalg in float64: CG against dense solves, Hessian-vector products."""

import numpy as np
import pytest
import tensorflow as tf

from keras_meta import inner_loop, linalg
from tests import helpers


def random_spd(n, seed, condition=50.0):
    """A random symmetric positive-definite matrix with the given condition number."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.geomspace(1.0, condition, n)
    return (q * eigenvalues) @ q.T


def dense_matvec(matrix):
    matrix = tf.constant(matrix)
    return lambda x: tf.linalg.matvec(matrix, x)


def test_cg_matches_dense_solve_on_random_spd_systems():
    for seed, n in [(0, 4), (1, 12), (2, 30)]:
        a = random_spd(n, seed)
        b = np.random.default_rng(seed + 100).normal(size=n)
        result = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b), 3 * n, tolerance=1e-12)
        expected = np.linalg.solve(a, b)
        np.testing.assert_allclose(result.solution, expected, rtol=1e-9, atol=1e-12)
        assert 0 < int(result.iterations) <= 3 * n
        assert float(result.residual) <= 1e-12
        # The reported residual is the true relative residual.
        true = np.linalg.norm(b - a @ np.array(result.solution)) / np.linalg.norm(b)
        assert true <= 1e-11


def test_cg_in_exact_arithmetic_finishes_in_n_iterations_with_few_eigenvalues():
    # CG needs at most as many iterations as A has distinct eigenvalues.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    a = (q * np.repeat([1.0, 2.0, 5.0], [7, 7, 6])) @ q.T
    b = rng.normal(size=20)
    result = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b), 20, tolerance=1e-10)
    assert int(result.iterations) == 3
    np.testing.assert_allclose(result.solution, np.linalg.solve(a, b), rtol=1e-9)


def block_system(seed):
    """A 13-dim SPD system acting on a nest {"w": [3, 2], "b": [4], "s": []} (shapes)."""
    a = random_spd(11, seed)
    shapes = {"b": (4,), "s": (), "w": (3, 2)}  # tf.nest orders dict keys
    sizes = [int(np.prod(s)) for s in shapes.values()]

    def unflatten(vector):
        parts = np.split(vector, np.cumsum(sizes)[:-1])
        return {k: p.reshape(s) for (k, s), p in zip(shapes.items(), parts)}

    def matvec(nest):
        flat = tf.concat([tf.reshape(t, [-1]) for t in tf.nest.flatten(nest)], 0)
        out = tf.linalg.matvec(tf.constant(a), flat)
        parts = tf.split(out, sizes)
        return {k: tf.reshape(p, s) for (k, s), p in zip(shapes.items(), parts)}

    rhs = np.random.default_rng(seed + 7).normal(size=11)
    return a, rhs, matvec, unflatten


def test_cg_on_nests_of_tensors_matches_dense_solve():
    a, rhs, matvec, unflatten = block_system(seed=5)
    b = {k: tf.constant(v) for k, v in unflatten(rhs).items()}
    result = linalg.conjugate_gradient(matvec, b, 40, tolerance=1e-13)
    assert set(result.solution) == {"w", "b", "s"}
    assert result.solution["w"].shape == (3, 2) and result.solution["s"].shape == ()
    expected = unflatten(np.linalg.solve(a, rhs))
    for key in expected:
        np.testing.assert_allclose(result.solution[key], expected[key], rtol=1e-9, atol=1e-12)
    # Lists keep their structure too.
    as_list = lambda d: [d["b"], d["s"], d["w"]]  # noqa: E731
    listed = linalg.conjugate_gradient(
        lambda x: as_list(matvec({"b": x[0], "s": x[1], "w": x[2]})), as_list(b), 40, tolerance=1e-13
    )
    assert isinstance(listed.solution, list)
    for got, want in zip(listed.solution, as_list(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("early_exit", [True, False])
def test_cg_eager_function_xla_and_vectorized_map_agree(early_exit):
    a, rhs, matvec, unflatten = block_system(seed=8)
    b = {k: tf.constant(v) for k, v in unflatten(rhs).items()}

    def solve(b):
        result = linalg.conjugate_gradient(matvec, b, 6, tolerance=1e-13, early_exit=early_exit)
        return result.solution, result.iterations, result.residual

    eager = solve(b)
    assert int(eager[1]) == 6  # not converged after 6 of 11 dimensions
    for compiled in (tf.function(solve), tf.function(solve, jit_compile=True)):
        other = compiled(b)
        for key in b:
            np.testing.assert_allclose(other[0][key], eager[0][key], rtol=1e-10, atol=1e-13)
        assert int(other[1]) == 6
        np.testing.assert_allclose(other[2], eager[2], rtol=1e-8)
    # A batch of right-hand sides under tf.vectorized_map (XLA needs early_exit=False).
    batch = {k: tf.stack([v, 2 * v, -v]) for k, v in b.items()}
    mapped = tf.function(
        lambda b: tf.vectorized_map(solve, b), jit_compile=not early_exit
    )(batch)
    for i, scale in enumerate([1.0, 2.0, -1.0]):
        for key in b:
            np.testing.assert_allclose(mapped[0][key][i], scale * eager[0][key], rtol=1e-9, atol=1e-12)


def test_cg_stops_at_tolerance_and_masks_after_convergence():
    a = random_spd(40, seed=11, condition=10.0)
    b = tf.constant(np.random.default_rng(0).normal(size=40))
    loose = linalg.conjugate_gradient(dense_matvec(a), b, 50, tolerance=1e-3)
    assert 0 < int(loose.iterations) < 20 and float(loose.residual) <= 1e-3
    # Without early exit the converged iterate is frozen: the same answer.
    frozen = linalg.conjugate_gradient(dense_matvec(a), b, 50, tolerance=1e-3, early_exit=False)
    assert int(frozen.iterations) == int(loose.iterations)
    np.testing.assert_array_equal(frozen.solution, loose.solution)
    # A cap below convergence: all iterations used, residual above tolerance.
    capped = linalg.conjugate_gradient(dense_matvec(a), b, 2, tolerance=1e-12)
    assert int(capped.iterations) == 2 and float(capped.residual) > 1e-12


def test_cg_initial_guess_and_zero_right_hand_side():
    a = random_spd(6, seed=2)
    b = np.random.default_rng(1).normal(size=6)
    exact = np.linalg.solve(a, b)
    result = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b), 10, tolerance=1e-8,
                                       initial=tf.constant(exact))
    assert int(result.iterations) == 0
    np.testing.assert_allclose(result.solution, exact)
    near = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b), 10, tolerance=1e-13,
                                     initial=tf.constant(exact + 0.1))
    np.testing.assert_allclose(near.solution, exact, rtol=1e-10)
    zero = linalg.conjugate_gradient(dense_matvec(a), tf.zeros(6, tf.float64), 10)
    assert int(zero.iterations) == 0 and float(zero.residual) == 0.0
    np.testing.assert_array_equal(zero.solution, np.zeros(6))


def indefinite(n, seed, negative):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.concatenate([-np.geomspace(0.5, 2.0, negative), np.geomspace(1.0, 5.0, n - negative)])
    return (q * eigenvalues) @ q.T


def test_cg_reports_and_optionally_stops_at_negative_curvature():
    # Positive definite: no negative curvature, "stop" is plain CG.
    a = random_spd(8, seed=1)
    b = tf.constant(np.random.default_rng(2).normal(size=8))
    plain = linalg.conjugate_gradient(dense_matvec(a), b, 20, tolerance=1e-12)
    stop = linalg.conjugate_gradient(dense_matvec(a), b, 20, tolerance=1e-12, negative_curvature="stop")
    assert not bool(plain.negative_curvature) and not bool(stop.negative_curvature)
    np.testing.assert_array_equal(plain.solution, stop.solution)
    # Indefinite: a direction p with p.Ap <= 0 shows up within n iterations.
    a = indefinite(8, seed=3, negative=3)
    b_np = np.random.default_rng(4).normal(size=8)
    ignored = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b_np), 8, tolerance=0.0)
    assert bool(ignored.negative_curvature)
    stopped = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b_np), 8, tolerance=0.0,
                                        negative_curvature="stop")
    assert bool(stopped.negative_curvature) and int(stopped.iterations) < 8
    # The truncated solution is plain CG's iterate where the stop happened.
    k = int(stopped.iterations)
    if k:
        same = linalg.conjugate_gradient(dense_matvec(a), tf.constant(b_np), k, tolerance=0.0)
        np.testing.assert_allclose(stopped.solution, same.solution, rtol=1e-12)
    # Negative curvature along b itself: "stop" returns b (steepest descent).
    a = -random_spd(5, seed=5)
    b = tf.constant(np.random.default_rng(6).normal(size=5))
    result = linalg.conjugate_gradient(dense_matvec(a), b, 5, negative_curvature="stop")
    assert int(result.iterations) == 0 and bool(result.negative_curvature)
    np.testing.assert_array_equal(result.solution, b)
    # ... also inside tf.function and XLA.
    for compiled in (tf.function, lambda f: tf.function(f, jit_compile=True)):
        got = compiled(lambda b: linalg.conjugate_gradient(
            dense_matvec(a), b, 5, negative_curvature="stop", early_exit=False).solution)(b)
        np.testing.assert_array_equal(got, b)


def test_cg_errors_name_the_argument():
    matvec = dense_matvec(np.eye(2))
    b = tf.ones(2, tf.float64)
    with pytest.raises(ValueError, match=r"`max_iterations` must be a non-negative integer. Received: max_iterations=-1"):
        linalg.conjugate_gradient(matvec, b, -1)
    with pytest.raises(ValueError, match=r"`tolerance` must be a non-negative number. Received: tolerance=-0.1"):
        linalg.conjugate_gradient(matvec, b, 2, tolerance=-0.1)
    with pytest.raises(ValueError, match=r"`b` must hold floating-point tensors. Received: dtype=int32"):
        linalg.conjugate_gradient(matvec, tf.ones(2, tf.int32), 2)
    with pytest.raises(ValueError, match=r"`matvec` must return a nest with the structure of `b` \(2 tensors\)"):
        linalg.conjugate_gradient(lambda x: x[0], [b, b], 2)
    with pytest.raises(ValueError, match=r"`negative_curvature` must be one of \['ignore', 'stop'\]. Received: negative_curvature='skip'"):
        linalg.conjugate_gradient(matvec, b, 2, negative_curvature="skip")
    with pytest.raises(ValueError, match=r"`b` must hold at least one tensor"):
        linalg.conjugate_gradient(matvec, [], 2)


# ----------------------------------------------------------------------
# Hessian-vector products.


def mlp_loss(model, x, y):
    def loss_fn(params):
        y_pred, _, _ = inner_loop.forward(model, params, [], x, True)
        return tf.reduce_mean((y_pred - y) ** 2)

    return loss_fn


def dense_hessian(loss_fn, params):
    """The full Hessian by differentiating the gradient (float64 reference)."""
    sizes = [int(np.prod(p.shape)) for p in params]
    flat = tf.concat([tf.reshape(p, [-1]) for p in params], 0)

    def unflat(v):
        return [tf.reshape(t, p.shape) for t, p in zip(tf.split(v, sizes), params)]

    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            loss = loss_fn(unflat(flat))
        grad = inner.gradient(loss, flat)
    return outer.jacobian(grad, flat).numpy(), unflat


@pytest.mark.parametrize("method", linalg.HVP_METHODS)
def test_hvp_matches_dense_hessian_on_tanh_mlp(float64, method):
    model = helpers.tanh_mlp()
    episode = helpers.regression_episode(meta_batch=1, k=7, seed=2)
    loss_fn = mlp_loss(model, episode["support_x"][0], episode["support_y"][0])
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    hessian, unflat = dense_hessian(loss_fn, params)
    rng = np.random.default_rng(0)
    vector = rng.normal(size=hessian.shape[0])
    got = linalg.hessian_vector_product(loss_fn, params, unflat(tf.constant(vector)), method=method)
    got = np.concatenate([np.ravel(g) for g in got])
    np.testing.assert_allclose(got, hessian @ vector, rtol=1e-11, atol=1e-13)


def test_hvp_methods_agree_with_each_other_and_with_finite_differences(float64):
    """Through BatchNorm (training mode) on a conv net, in tf.function and XLA."""
    model = helpers.small_convnet()
    episode = helpers.classification_episode(meta_batch=1, seed=3)
    x, y = episode["support_x"][0], episode["support_y"][0]

    def loss_fn(params):
        y_pred, _, _ = inner_loop.forward(
            model, params, [tf.convert_to_tensor(v) for v in model.non_trainable_variables], x, True
        )
        return tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        )

    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    rng = np.random.default_rng(4)
    vector = [tf.constant(rng.normal(size=p.shape)) for p in params]
    products = {}
    for method in linalg.HVP_METHODS:
        hvp = lambda v, m=method: linalg.hessian_vector_product(loss_fn, params, v, method=m)  # noqa: E731
        products[method] = [np.array(t) for t in hvp(vector)]
        for compiled in (tf.function(hvp), tf.function(hvp, jit_compile=True)):
            for a, b in zip(compiled(vector), products[method]):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    for a, b in zip(*products.values()):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)

    # Central differences of the gradient along the vector.
    def gradient(p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = loss_fn(p)
        return tape.gradient(loss, p)

    eps = 1e-5
    plus = gradient([p + eps * v for p, v in zip(params, vector)])
    minus = gradient([p - eps * v for p, v in zip(params, vector)])
    numeric = np.concatenate([np.ravel((a - b) / (2 * eps)) for a, b in zip(plus, minus)])
    analytic = np.concatenate([np.ravel(t) for t in products["reverse_over_reverse"]])
    assert np.linalg.norm(numeric - analytic) <= 1e-7 * np.linalg.norm(analytic)


def test_hvp_operator_solves_with_cg_against_dense_solve(float64):
    """CG on (I + H / lam) with HVPs against np.linalg.solve with the dense Hessian."""
    model = helpers.tanh_mlp()
    episode = helpers.regression_episode(meta_batch=1, k=7, seed=5)
    loss_fn = mlp_loss(model, episode["support_x"][0], episode["support_y"][0])
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    hessian, unflat = dense_hessian(loss_fn, params)
    lam = 5.0  # the Hessian at these weights has an eigenvalue near -2.3
    operator = np.eye(len(hessian)) + hessian / lam
    assert np.linalg.eigvalsh(operator).min() > 0
    rhs = np.random.default_rng(6).normal(size=len(hessian))
    hvp = linalg.hessian_vector_product_fn(loss_fn, params)
    result = linalg.conjugate_gradient(
        lambda v: [a + b / lam for a, b in zip(v, hvp(v))], unflat(tf.constant(rhs)), 200, tolerance=1e-13
    )
    got = np.concatenate([np.ravel(t) for t in result.solution])
    np.testing.assert_allclose(got, np.linalg.solve(operator, rhs), rtol=1e-9, atol=1e-12)


def test_hvp_method_error():
    with pytest.raises(ValueError, match=r"`method` must be one of \['reverse_over_reverse', 'forward_over_reverse'\]. Received: method='bogus'"):
        linalg.hessian_vector_product_fn(lambda p: p, [tf.ones(1)], method="bogus")
