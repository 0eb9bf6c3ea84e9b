"""iMAML in float64: closed forms on a quadratic, then finite differences on networks.

The ladder: (1) on least squares the implicit meta-gradient has the closed
form lambda (A + lambda I)^-1 grad L_query(phi*), also with the official
code's damped operator and pull-back step; (2) on a tanh MLP and on a conv
net with BatchNorm, it equals central finite differences of the query loss
at the inner problem solved exactly (Newton's method, in the test) and the
dense-Hessian formula; then behaviour: CG diagnostics, evaluation and
`adapt` semantics, inner optimisers, configuration and errors.
"""

import inspect
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import inner_loop
from tests import helpers

# ----------------------------------------------------------------------
# (1) Least squares: closed forms.


def linear_model(features):
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.linspace(-0.5, 0.7, features)[:, None])
    return model


def least_squares_parts(xs, ys, w):
    """mean((X w - y)^2): gradient at w and Hessian."""
    n = len(xs)
    return 2.0 / n * xs.T @ (xs @ w - ys), 2.0 / n * xs.T @ xs


def proximal_solution(theta, xs, ys, lam):
    """argmin mean((X phi - y)^2) + lam/2 ||phi - theta||^2, exactly."""
    n = len(xs)
    a = 2.0 / n * xs.T @ xs
    return np.linalg.solve(a + lam * np.eye(len(theta)), 2.0 / n * xs.T @ ys + lam * theta)


def closed_form_meta_gradient(theta, episode, lam, damping=0.0, lam_damping=0.0, phi_fn=None):
    """Mean over tasks of ((1 + d) I + A / (lam + delta))^-1 grad L_query(phi)."""
    grads = []
    for xs, ys, xq, yq in zip(*(episode[k] for k in ("support_x", "support_y", "query_x", "query_y"))):
        phi = proximal_solution(theta, xs, ys, lam) if phi_fn is None else phi_fn(theta, xs, ys)
        _, a = least_squares_parts(xs, ys, phi)
        g, _ = least_squares_parts(xq, yq, phi)
        operator = (1.0 + damping) * np.eye(len(theta)) + a / (lam + lam_damping)
        grads.append(np.linalg.solve(operator, g))
    return np.mean(grads, axis=0)


def converging_step_size(episode, lam):
    """1 / (largest eigenvalue of A + lam I) over the tasks: GD contracts fast."""
    top = max(np.linalg.eigvalsh(2.0 / len(x) * x.T @ x).max() for x in episode["support_x"])
    return 1.0 / (top + lam)


def compile_sgd(learner, loss="mse"):
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
    return learner


def relative_error(got, expected):
    return np.linalg.norm(np.ravel(got) - np.ravel(expected)) / np.linalg.norm(np.ravel(expected))


@pytest.mark.parametrize("task_execution", ["vectorized", "sequential"])
def test_meta_gradient_on_least_squares_matches_closed_form(float64, task_execution):
    episode = helpers.regression_episode(meta_batch=4, k=7, q=5, features=3, seed=3)
    lam = 2.0
    model = linear_model(3)
    theta = np.array(model.layers[0].kernel)
    imaml = compile_sgd(km.IMAML(
        model, inner_learning_rate=converging_step_size(episode, lam), inner_steps=200,
        l2_regularization=lam, cg_iterations=3, cg_tolerance=1e-14, task_execution=task_execution,
    ))
    expected = closed_form_meta_gradient(theta, episode, lam)
    got = helpers.meta_gradient_by_update(imaml, episode)[0]
    assert relative_error(got, expected) <= 1e-10
    # Not the first-order (FOMAML-like) gradient: the implicit correction matters.
    first_order = np.mean([least_squares_parts(xq, yq, proximal_solution(theta, xs, ys, lam))[0]
                           for xs, ys, xq, yq in zip(*(episode[k] for k in
                           ("support_x", "support_y", "query_x", "query_y")))], axis=0)
    assert relative_error(first_order, expected) > 1e-2


def test_damped_operator_matches_closed_form(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=3, seed=4)
    lam = 1.5
    model = linear_model(3)
    theta = np.array(model.layers[0].kernel)
    imaml = compile_sgd(km.IMAML(
        model, inner_learning_rate=converging_step_size(episode, lam), inner_steps=200,
        l2_regularization=lam, cg_iterations=3, cg_damping=0.7, cg_l2_damping=3.0, cg_tolerance=1e-14,
    ))
    expected = closed_form_meta_gradient(theta, episode, lam, damping=0.7, lam_damping=3.0)
    assert relative_error(helpers.meta_gradient_by_update(imaml, episode)[0], expected) <= 1e-10


def test_official_configuration_reproduces_the_official_computation(float64):
    """proximal_pull_back + cg_damping=1 + cg_l2_damping=10: n plain GD steps on
    the support loss, one step on the proximal term, operator 2 I + H / (lam + 10)."""
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=3, seed=5)
    lam, alpha, steps = 2.0, 0.1, 16
    model = linear_model(3)
    theta = np.array(model.layers[0].kernel)

    def official_phi(theta, xs, ys):
        w = theta.copy()
        for _ in range(steps):
            w = w - alpha * least_squares_parts(xs, ys, w)[0]
        return w - alpha * lam * (w - theta)  # the pull-back step

    imaml = compile_sgd(km.IMAML(
        model, inner_learning_rate=alpha, inner_steps=steps, l2_regularization=lam,
        cg_iterations=3, cg_damping=1.0, cg_l2_damping=10.0, proximal_pull_back=True,
        cg_tolerance=1e-14,
    ))
    expected = closed_form_meta_gradient(theta, episode, lam, damping=1.0, lam_damping=10.0,
                                         phi_fn=official_phi)
    assert relative_error(helpers.meta_gradient_by_update(imaml, episode)[0], expected) <= 1e-10


def test_meta_gradient_does_not_depend_on_the_inner_optimiser(float64):
    """Momentum reaches the same phi*, hence the same implicit meta-gradient."""
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=3, seed=6)
    lam = 2.0
    theta = np.array(linear_model(3).layers[0].kernel)
    expected = closed_form_meta_gradient(theta, episode, lam)
    imaml = compile_sgd(km.IMAML(
        linear_model(3), inner_learning_rate=0.5 * converging_step_size(episode, lam),
        inner_steps=300, l2_regularization=lam, cg_iterations=3, cg_tolerance=1e-14,
        inner_optimizer={"name": "momentum", "momentum": 0.5},
    ))
    assert relative_error(helpers.meta_gradient_by_update(imaml, episode)[0], expected) <= 1e-10


def test_cg_diagnostics_are_logged(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=3, seed=7)
    lam = 2.0
    for task_execution in ("vectorized", "sequential"):
        # Three unknowns: CG converges in (at most) three iterations of ten.
        imaml = compile_sgd(km.IMAML(
            linear_model(3), inner_learning_rate=0.1, inner_steps=5, l2_regularization=lam,
            cg_iterations=10, cg_tolerance=1e-10, task_execution=task_execution,
        ))
        logs = imaml.train_on_batch(episode, return_dict=True)
        assert logs["cg_iterations"] == 3.0
        assert 0.0 <= logs["cg_residual"] <= 1e-10
        assert logs["cg_negative_curvature"] == 0.0
    # One iteration on a network: not converged, and it says so.
    imaml = compile_sgd(km.IMAML(helpers.tanh_mlp(features=3), inner_learning_rate=0.1, inner_steps=3,
                                 cg_iterations=1))
    history = imaml.fit(tf.data.Dataset.from_tensors(episode).repeat(), steps_per_epoch=1, epochs=2,
                        verbose=0)
    assert history.history["cg_iterations"] == [1.0, 1.0]
    assert all(0.01 < r < 1.0 for r in history.history["cg_residual"])


def test_negative_curvature_stops_cg_or_is_ignored(float64):
    """A concave support loss (-MSE): the operator I - A / lam is negative definite.

    Plain CG still solves it; "stop" falls back to the query gradient."""
    episode = helpers.regression_episode(meta_batch=2, k=6, q=5, features=3, seed=11)
    lam = 0.2

    def loss(y_true, y_pred):
        return -keras.losses.mean_squared_error(y_true, y_pred)

    grads = {}
    for mode in ("ignore", "stop"):
        imaml = km.IMAML(linear_model(3), inner_learning_rate=0.01, inner_steps=2, l2_regularization=lam,
                         cg_iterations=3, cg_tolerance=1e-14, cg_negative_curvature=mode)
        imaml.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
        params, non_trainable = imaml._meta_state()
        theta = np.array(params[0])
        expected = []
        for t, task in enumerate(tasks_of(episode)):
            # Nothing exact to compare phi with here: take the learner's own phi.
            fast = np.array(imaml.inner_solve(params, non_trainable, tf.constant(task["support_x"]),
                                              tf.constant(task["support_y"]), 2, lam, True)[0])
            _, a = least_squares_parts(task["support_x"], task["support_y"], fast)
            g = -least_squares_parts(task["query_x"], task["query_y"], fast)[0]
            assert np.linalg.eigvalsh(np.eye(3) - a / lam).max() < 0
            expected.append(np.linalg.solve(np.eye(3) - a / lam, g) if mode == "ignore" else g)
        before = theta
        logs = imaml.train_on_batch(episode, return_dict=True)
        grads[mode] = before - np.array(imaml.model.layers[0].kernel)
        assert logs["cg_negative_curvature"] == 1.0
        assert logs["cg_iterations"] == (3.0 if mode == "ignore" else 0.0)
        assert relative_error(grads[mode], np.mean(expected, axis=0)) <= 1e-10


# ----------------------------------------------------------------------
# (2) Networks: the inner problem solved exactly by Newton's method.


class ExactInnerProblem:
    """phi*(theta) for one task by damped GD then Newton, to ~1e-13."""

    def __init__(self, learner, lam):
        self.learner = learner
        self.lam = lam
        self.variables = learner.model.trainable_variables
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.non_trainable = [tf.convert_to_tensor(v) for v in learner.model.non_trainable_variables]
        self._grad_hess = tf.function(self._grad_hess_fn)
        self._grad = tf.function(self._grad_fn)

    def unflat(self, vector):
        return [tf.reshape(t, v.shape) for t, v in zip(tf.split(vector, self.sizes), self.variables)]

    def flat(self, tensors):
        return np.concatenate([np.ravel(t) for t in tensors])

    def _objective(self, phi, theta, x, y):
        loss = self.learner.support_loss(self.unflat(phi), self.non_trainable, x, y, True)
        return loss + 0.5 * self.lam * tf.reduce_sum((phi - theta) ** 2)

    def _grad_fn(self, phi, theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(phi)
            loss = self._objective(phi, theta, x, y)
        return tape.gradient(loss, phi)

    def _grad_hess_fn(self, phi, theta, x, y):
        with tf.GradientTape() as outer:
            outer.watch(phi)
            grad = self._grad_fn(phi, theta, x, y)
        return grad, outer.jacobian(grad, phi)

    def solve(self, theta, x, y, start=None, gd_steps=100, step=0.05):
        phi = theta.copy() if start is None else start.copy()
        args = (tf.constant(theta), tf.constant(x), tf.constant(y))
        for _ in range(gd_steps if start is None else 0):
            phi = phi - step * self._grad(tf.constant(phi), *args).numpy()
        for _ in range(20):
            grad, hessian = (t.numpy() for t in self._grad_hess(tf.constant(phi), *args))
            if np.linalg.norm(grad) < 1e-13:
                break
            phi = phi - np.linalg.solve(hessian, grad)
        assert np.linalg.norm(grad) < 1e-12, np.linalg.norm(grad)
        assert np.linalg.eigvalsh(hessian).min() > 0  # a strict local minimum
        return phi

    def query_loss(self, phi, task):
        loss, _ = self.learner.query_loss(self.unflat(tf.constant(phi)), self.non_trainable, task, True)
        return float(loss)


def tasks_of(episode):
    return [{k: v[t] for k, v in episode.items()} for t in range(len(episode["support_x"]))]


def check_against_exact_inner_solution(learner, episode, lam, directions=3, eps=1e-5, seed=0):
    problem = ExactInnerProblem(learner, lam)
    theta = problem.flat(learner.model.trainable_variables)
    tasks = tasks_of(episode)
    solutions = [problem.solve(theta, t["support_x"], t["support_y"]) for t in tasks]

    # The learner's own inner solve reached phi* (a precondition of the check).
    non_trainable = problem.non_trainable
    inner_solve = tf.function(lambda p, x, y: learner.inner_solve(
        p, non_trainable, x, y, learner.inner_steps, lam, training=True))
    for task, phi in zip(tasks, solutions):
        fast = inner_solve(problem.unflat(tf.constant(theta)), task["support_x"], task["support_y"])
        assert relative_error(problem.flat(fast), phi) <= 1e-11

    applied = problem.flat(helpers.meta_gradient_by_update(learner, episode))

    # The implicit-function formula with dense Hessians: (I + H / lam)^-1 g.
    dense = []
    for task, phi in zip(tasks, solutions):
        args = (tf.constant(phi), tf.constant(theta), tf.constant(task["support_x"]),
                tf.constant(task["support_y"]))
        hessian = problem._grad_hess(*args)[1].numpy() - lam * np.eye(len(theta))
        params = problem.unflat(tf.constant(phi))
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss, _ = learner.query_loss(params, non_trainable, task, True)
        g = problem.flat(tape.gradient(loss, params))
        dense.append(np.linalg.solve(np.eye(len(theta)) + hessian / lam, g))
    assert relative_error(applied, np.mean(dense, axis=0)) <= 1e-9

    # Central finite differences of the query loss at the exact inner solution.
    def meta_objective(point):
        return np.mean([
            problem.query_loss(problem.solve(point, t["support_x"], t["support_y"], start=phi), t)
            for t, phi in zip(tasks, solutions)
        ])

    rng = np.random.default_rng(seed)
    for _ in range(directions):
        direction = rng.normal(size=theta.shape)
        numeric = (meta_objective(theta + eps * direction) - meta_objective(theta - eps * direction)) / (2 * eps)
        analytic = float(applied @ direction)
        assert abs(numeric - analytic) <= 1e-6 * abs(numeric), (numeric, analytic)


def test_meta_gradient_on_tanh_mlp_matches_finite_differences(float64):
    episode = helpers.regression_episode(meta_batch=2, k=6, q=5, features=2, seed=1)
    lam = 5.0
    imaml = compile_sgd(km.IMAML(
        helpers.tanh_mlp(seed=2), inner_learning_rate=0.1, inner_steps=300, l2_regularization=lam,
        cg_iterations=80, cg_tolerance=1e-14, task_execution="sequential",
    ))
    check_against_exact_inner_solution(imaml, episode, lam)


@pytest.mark.parametrize("transductive", [True, False])
def test_meta_gradient_with_batch_norm_matches_finite_differences(float64, transductive):
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=2)
    lam = 4.0
    imaml = compile_sgd(km.IMAML(
        helpers.small_convnet(), inner_learning_rate=0.1, inner_steps=300, l2_regularization=lam,
        cg_iterations=150, cg_tolerance=1e-14, transductive_batch_norm=transductive,
        task_execution="sequential",  # traces 7x faster than vectorized here
    ), loss=helpers.sparse_ce())
    check_against_exact_inner_solution(imaml, episode, lam)


def test_vectorized_and_sequential_tasks_agree(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=2, seed=5)
    results = []
    # (and the two Hessian-vector product methods agree)
    for task_execution, method in (("vectorized", "reverse_over_reverse"),
                                   ("sequential", "forward_over_reverse")):
        imaml = compile_sgd(km.IMAML(
            helpers.tanh_mlp(seed=4), inner_learning_rate=0.2, inner_steps=4, cg_iterations=4,
            task_execution=task_execution, hvp_method=method,
        ))
        logs = imaml.train_on_batch(episode, return_dict=True)
        results.append((helpers.weights_of(imaml.model), logs))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    for key in ("loss", "cg_iterations", "cg_residual"):
        assert results[0][1][key] == pytest.approx(results[1][1][key], rel=1e-9)


# ----------------------------------------------------------------------
# Evaluation, prediction and adapt().


def gd_iterates(theta, xs, ys, lam, alpha, steps):
    w = theta.copy()
    for _ in range(steps):
        w = w - alpha * (least_squares_parts(xs, ys, w)[0] + lam * (w - theta))
    return w


def test_evaluation_adapts_with_the_proximal_term_by_default(float64):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=3, seed=8)
    lam, alpha = 2.0, 0.1
    imaml = compile_sgd(km.IMAML(linear_model(3), inner_learning_rate=alpha, inner_steps=2,
                                 eval_inner_steps=4, l2_regularization=lam))
    theta = np.array(imaml.model.layers[0].kernel)
    adapted = [gd_iterates(theta, xs, ys, lam, alpha, 4)
               for xs, ys in zip(episode["support_x"], episode["support_y"])]
    expected = np.mean([np.mean((xq @ w - yq) ** 2) for w, xq, yq in
                        zip(adapted, episode["query_x"], episode["query_y"])])
    logs = imaml.evaluate(episode, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-12)
    # predict() and adapt() use the same adapted weights.
    predictions = imaml.predict(episode, verbose=0).reshape(3, 5, 1)
    for t in range(3):
        np.testing.assert_allclose(predictions[t], episode["query_x"][t] @ adapted[t], rtol=1e-12)
    model = imaml.adapt(episode["support_x"][1], episode["support_y"][1])
    np.testing.assert_allclose(model.layers[0].kernel, adapted[1], rtol=1e-12)


def test_eval_l2_regularization_zero_is_plain_gradient_descent(float64):
    """The official evaluation (lam = 0) equals MAML's plain adaptation."""
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=9)
    sce = helpers.sparse_ce()
    imaml = km.IMAML(helpers.small_convnet(seed=3), inner_learning_rate=0.3, inner_steps=2,
                     eval_inner_steps=5, eval_l2_regularization=0.0, proximal_pull_back=True,
                     task_execution="sequential")
    maml = km.MAML(helpers.small_convnet(seed=3), inner_learning_rate=0.3, inner_steps=5,
                   task_execution="sequential")
    for learner in (imaml, maml):
        learner.compile(optimizer="sgd", loss=sce)
    a = imaml.evaluate(episode, verbose=0, return_dict=True)
    b = maml.evaluate(episode, verbose=0, return_dict=True)
    for key in ("loss", "pre_adaptation_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    np.testing.assert_allclose(imaml.predict(episode, verbose=0), maml.predict(episode, verbose=0),
                               rtol=1e-12)


@pytest.mark.parametrize("inner_optimizer,pull_back", [("adam", False), ("sgd", True)])
def test_evaluate_tasks_continues_the_anchored_path(float64, inner_optimizer, pull_back):
    """Checkpoints along the path equal separate solves (state and anchor carried)."""
    episode = helpers.regression_episode(meta_batch=2, k=6, q=5, seed=10)
    imaml = compile_sgd(km.IMAML(helpers.tanh_mlp(seed=5), inner_learning_rate=0.05, inner_steps=2,
                                 l2_regularization=3.0, inner_optimizer=inner_optimizer,
                                 proximal_pull_back=pull_back, task_execution="sequential"))
    results = imaml.evaluate_tasks(episode, steps=[0, 2, 5])
    params, non_trainable = imaml._meta_state()
    for t, task in enumerate(tasks_of(episode)):
        task = {k: tf.constant(v) for k, v in task.items()}
        for s, steps in enumerate([0, 2, 5]):
            fast = imaml.inner_solve(params, non_trainable, task["support_x"], task["support_y"],
                                     steps, 3.0, training=False) if steps else params
            loss, _ = imaml.query_loss(fast, non_trainable, task, False)
            assert results["loss"][t, s] == pytest.approx(float(loss), rel=1e-12)


# ----------------------------------------------------------------------
# Inner optimisers (keras_meta.inner_loop).


def quadratic(params):
    w = params[0]
    weights = tf.constant([1.0, 3.0, 0.5], w.dtype)
    return tf.reduce_sum(weights * (w - 1.0) ** 2) + tf.reduce_sum(w) ** 2


def test_minimize_with_sgd_is_gradient_descent(float64):
    start = [tf.constant([0.3, -0.2, 0.8], tf.float64)]
    expected = inner_loop.gradient_descent(quadratic, start, steps=7, learning_rate=0.05, create_graph=False)
    for create_graph in (False, True):
        got, state = inner_loop.minimize(quadratic, start, 7, inner_loop.sgd(0.05), create_graph=create_graph)
        np.testing.assert_array_equal(got[0], expected[0])
        assert state == ()
    compiled = tf.function(lambda p: inner_loop.minimize(quadratic, p, 7, inner_loop.sgd(0.05))[0])
    np.testing.assert_array_equal(compiled(start)[0], expected[0])


@pytest.mark.parametrize("name,keras_optimizer", [
    ({"name": "momentum", "momentum": 0.7}, lambda: keras.optimizers.SGD(0.05, momentum=0.7)),
    ({"name": "momentum", "momentum": 0.7, "nesterov": True},
     lambda: keras.optimizers.SGD(0.05, momentum=0.7, nesterov=True)),
])
def test_inner_optimisers_match_keras_optimizers(name, keras_optimizer):
    # float32: Keras' optimizers cast their float hyper-parameters through
    # float32 even for float64 variables (beta_2 = 0.999 becomes 0.99900001).
    start = np.array([0.3, -0.2, 0.8], "float32")
    variable = tf.Variable(start)
    optimizer = keras_optimizer()
    for _ in range(6):
        with tf.GradientTape() as tape:
            loss = quadratic([variable])
        optimizer.apply_gradients([(tape.gradient(loss, variable), variable)])
    ours = inner_loop.get_inner_optimizer(name, 0.05)
    got, _ = inner_loop.minimize(quadratic, [tf.constant(start)], 6, ours)
    np.testing.assert_allclose(got[0], variable.numpy(), rtol=1e-6)
    # Continuing from the returned state equals one longer run.
    first, state = inner_loop.minimize(quadratic, [tf.constant(start)], 2, ours)
    second, _ = inner_loop.minimize(quadratic, first, 4, ours, state=state)
    np.testing.assert_allclose(second[0], got[0], rtol=1e-6)


def test_inner_adam_matches_the_adam_update(float64):
    """Kingma and Ba's Adam with Keras' epsilon placement, in numpy.

    (`keras.optimizers.Adam` itself differs from this formula, and from
    ours, by 2e-5 relative after 6 steps here.)
    """
    c = np.array([1.0, 3.0, 0.5])
    w, m, v = np.array([0.3, -0.2, 0.8]), np.zeros(3), np.zeros(3)
    for t in range(1, 7):
        g = 2 * c * (w - 1) + 2 * np.sum(w)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - 0.05 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-7)
    ours = inner_loop.get_inner_optimizer("adam", 0.05)
    got, _ = inner_loop.minimize(quadratic, [tf.constant([0.3, -0.2, 0.8], tf.float64)], 6, ours)
    np.testing.assert_allclose(got[0], w, rtol=1e-13)
    first, state = inner_loop.minimize(quadratic, [tf.constant([0.3, -0.2, 0.8], tf.float64)], 2, ours)
    second, _ = inner_loop.minimize(quadratic, first, 4, ours, state=state)
    np.testing.assert_allclose(second[0], w, rtol=1e-13)


def test_minimize_create_graph_is_differentiable(float64):
    start = tf.constant([0.3, -0.2, 0.8], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(start)
        end, _ = inner_loop.minimize(quadratic, [start], 3, inner_loop.momentum(0.05), create_graph=True)
        loss = tf.reduce_sum(end[0] ** 2)
    gradient = tape.gradient(loss, start)
    eps = 1e-6
    direction = tf.constant([1.0, -2.0, 0.5], tf.float64)

    def f(point):
        return float(tf.reduce_sum(inner_loop.minimize(quadratic, [point], 3, inner_loop.momentum(0.05))[0][0] ** 2))

    numeric = (f(start + eps * direction) - f(start - eps * direction)) / (2 * eps)
    assert float(tf.reduce_sum(gradient * direction)) == pytest.approx(numeric, rel=1e-7)


def test_get_inner_optimizer_errors():
    with pytest.raises(ValueError, match=r"Unknown inner optimiser 'rmsprop': expected one of \['adam', 'momentum', 'sgd'\]"):
        inner_loop.get_inner_optimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match=r"Invalid arguments for inner optimiser 'momentum'"):
        inner_loop.get_inner_optimizer({"name": "momentum", "beta": 3}, 0.1)
    with pytest.raises(ValueError, match=r"An inner optimiser is one of .* Received: 3"):
        inner_loop.get_inner_optimizer(3, 0.1)


# ----------------------------------------------------------------------
# Configuration and errors.


def test_config_holds_every_argument_and_round_trips_through_json():
    imaml = km.IMAML(helpers.tanh_mlp(), inner_learning_rate=0.2, inner_steps=7, l2_regularization=0.5,
                     cg_iterations=9, cg_damping=1.0, cg_l2_damping=10.0, cg_tolerance=1e-7,
                     cg_negative_curvature="ignore",
                     inner_optimizer={"name": "momentum", "momentum": 0.5}, proximal_pull_back=True,
                     eval_inner_steps=16, eval_l2_regularization=0.0,
                     inner_learning_rate_scaling="inverse_steps", transductive_batch_norm=False,
                     task_execution="sequential", hvp_method="forward_over_reverse", name="imaml")
    config = imaml.get_config()
    arguments = set(inspect.signature(km.IMAML.__init__).parameters) - {"self", "kwargs"}
    assert arguments <= set(config)
    clone = km.IMAML.from_config(json.loads(json.dumps(config)))
    assert json.loads(json.dumps(clone.get_config())) == json.loads(json.dumps(config))
    assert clone.inner_optimizer == {"name": "momentum", "momentum": 0.5}
    assert clone.evaluation_l2_regularization == 0.0 and clone.step_size == pytest.approx(0.2 / 7)
    assert keras.saving.get_registered_name(km.IMAML) == "keras_meta>IMAML"


@pytest.mark.parametrize("kwargs,message", [
    ({"l2_regularization": 0.0}, r"`l2_regularization` must be a positive number. Received: l2_regularization=0.0"),
    ({"cg_iterations": 0}, r"`cg_iterations` must be a positive integer. Received: cg_iterations=0"),
    ({"cg_damping": -1.0}, r"`cg_damping` must be a non-negative number. Received: cg_damping=-1.0"),
    ({"cg_l2_damping": "10"}, r"`cg_l2_damping` must be a non-negative number. Received: cg_l2_damping='10'"),
    ({"cg_tolerance": -1e-3}, r"`cg_tolerance` must be a non-negative number. Received: cg_tolerance=-0.001"),
    ({"cg_negative_curvature": "skip"},
     r"`cg_negative_curvature` must be one of \['ignore', 'stop'\]. Received: cg_negative_curvature='skip'"),
    ({"eval_l2_regularization": -2.0},
     r"`eval_l2_regularization` must be a non-negative number. Received: eval_l2_regularization=-2.0"),
    ({"inner_optimizer": "rmsprop"},
     r"`inner_optimizer` must be one of \['adam', 'momentum', 'sgd'\] .* Received: inner_optimizer='rmsprop'"),
    ({"hvp_method": "exact"},
     r"`hvp_method` must be one of \['reverse_over_reverse', 'forward_over_reverse'\]. Received: hvp_method='exact'"),
    ({"inner_steps": 0}, r"`inner_steps` must be a positive integer. Received: inner_steps=0"),
])
def test_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        km.IMAML(helpers.tanh_mlp(), **kwargs)
