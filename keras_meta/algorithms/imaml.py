"""iMAML: implicit model-agnostic meta-learning (proximal inner solve, CG meta-gradient)."""

import keras
import tensorflow as tf

from keras_meta import inner_loop, linalg
from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import (
    check_bool,
    check_choice,
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
)


@keras.saving.register_keras_serializable(package="keras_meta")
class IMAML(MetaLearner):
    """Implicit MAML, trained with `model.fit`.

    Per task, the inner loop approximately solves the proximal problem

        phi* = argmin_phi  L_support(phi) + (lambda / 2) ||phi - theta||^2

    by `inner_steps` steps of an inner optimiser started at `phi = theta`
    (plain gradient descent by default), with no tape across steps and no
    gradient through the path. At an exact solution,
    `d phi* / d theta = (I + H / lambda)^-1`, with `H` the Hessian of the
    support loss at `phi*`, so the task's meta-gradient is the `v` that
    solves

        (I + H / lambda) v = grad L_query(phi*),

    found by `cg_iterations` steps of conjugate gradient on Hessian-vector
    products (`keras_meta.linalg`). Memory does not depend on `inner_steps`.
    The compiled optimizer applies the mean of `v` over the meta-batch.

    The training logs carry, averaged over the meta-batch, `cg_iterations`
    (iterations used; fewer than the maximum once the relative residual fell
    below `cg_tolerance` or CG stopped at negative curvature),
    `cg_residual` (the final relative residual `||g - A v|| / ||g||`) and
    `cg_negative_curvature` (the fraction of tasks whose operator showed a
    direction of non-positive curvature, i.e. was not positive definite),
    so that one can see whether the linear solve converged.

    Args:
        model: a built `keras.Model`; its trainable weights are the
            meta-parameters theta.
        inner_learning_rate: inner step size (mean-reduced Keras losses;
            0.1 is the official code's 5-way Omniglot setting).
        inner_steps: inner optimiser steps during meta-training (paper: 16 for
            5-way, 25 for 20-way Omniglot).
        l2_regularization: lambda > 0, the proximal strength (paper: 2.0).
        cg_iterations: maximum conjugate-gradient iterations, i.e.
            Hessian-vector products per task (paper: 5).
        cg_damping: `d >= 0`; the linear operator is
            `(1 + d) I + H / (lambda + cg_l2_damping)` (0 and 0: the paper's
            `I + H / lambda`). The official code uses `d = 1`.
        cg_l2_damping: `delta >= 0` added to lambda in the operator; the
            official code hard-codes 10 (`lam_damping`).
        cg_tolerance: relative residual at which CG stops early.
        cg_negative_curvature: `"stop"` (default) or `"ignore"`. The paper's
            operator is positive definite when the inner problem is strongly
            convex at phi*; with deep networks it often is not (support-loss
            Hessian eigenvalues below -lambda), and a plain CG step along a
            direction of negative curvature can point uphill. `"stop"`
            truncates CG there (Newton-CG's rule: keep the last iterate, or
            the query gradient itself if the first direction already has
            negative curvature); `"ignore"` runs plain CG. Both are the same
            whenever the operator is positive definite. See
            `keras_meta.linalg.conjugate_gradient`.
        inner_optimizer: `"sgd"` (default), `"momentum"`, `"adam"`, or a
            dict `{"name": ..., **kwargs}` (e.g.
            `{"name": "momentum", "momentum": 0.5}`); see
            `keras_meta.inner_loop.get_inner_optimizer`.
        proximal_pull_back: `False` (default): the inner optimiser minimises
            the proximal objective. `True`: the official code's inner loop,
            which minimises the support loss alone and then takes one
            gradient step on the proximal term, `phi <- phi - alpha lambda
            (phi - theta)`.
        eval_inner_steps: inner steps of `evaluate`/`predict`/`adapt`
            (default `inner_steps`).
        eval_l2_regularization: lambda of the test-time inner problem
            (`evaluate`, `predict`, `evaluate_tasks`, `adapt`); `None`
            (default) = `l2_regularization`, the problem the meta-parameters
            were trained for. The official code evaluates with 0.0 (plain
            gradient descent on the support loss).
        inner_learning_rate_scaling: `None` or `"inverse_steps"`
            (step size `inner_learning_rate / inner_steps`).
        transductive_batch_norm: BatchNorm with each batch's own statistics
            (default, as the official iMAML), or `False`: query normalised
            with the support moments at the adapted weights.
        task_execution: `"auto"` (default: sequential for convolutional
            networks, vectorized otherwise), `"vectorized"` or `"sequential"`.
            Sequential tasks let CG exit its loop early; vectorized ones run
            `cg_iterations` iterations with converged iterates frozen (the
            same result).
        hvp_method: `"reverse_over_reverse"` (default, double backward) or
            `"forward_over_reverse"`; see
            `keras_meta.linalg.hessian_vector_product_fn`.

    Example:

    ```python
    import keras, keras_meta as km
    imaml = km.IMAML(km.models.conv4(5), inner_learning_rate=0.1,
                     inner_steps=16, l2_regularization=2.0, cg_iterations=5)
    imaml.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    imaml.fit(episodes, steps_per_epoch=500)  # logs loss, accuracy, cg_iterations, cg_residual
    ```

    Reference:
        - [Rajeswaran, Finn, Kakade, Levine, 2019](https://arxiv.org/abs/1909.04630)
    """

    extra_train_outputs = ("cg_iterations", "cg_residual", "cg_negative_curvature")
    # The inner solve is never differentiated and runs many steps: one
    # `tf.while_loop`, vectorized or not (graph and memory flat in the steps).
    unroll_inner_loop_when_vectorized = False

    def __init__(
        self,
        model,
        inner_learning_rate=0.1,
        inner_steps=16,
        l2_regularization=2.0,
        cg_iterations=5,
        cg_damping=0.0,
        cg_l2_damping=0.0,
        cg_tolerance=1e-5,
        cg_negative_curvature="stop",
        inner_optimizer="sgd",
        proximal_pull_back=False,
        eval_inner_steps=None,
        eval_l2_regularization=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        hvp_method="reverse_over_reverse",
        **kwargs,
    ):
        super().__init__(**self.base_arguments(locals()))
        self.l2_regularization = check_positive_float("l2_regularization", l2_regularization)
        self.cg_iterations = check_positive_int("cg_iterations", cg_iterations)
        self.cg_damping = check_non_negative_float("cg_damping", cg_damping)
        self.cg_l2_damping = check_non_negative_float("cg_l2_damping", cg_l2_damping)
        self.cg_tolerance = check_non_negative_float("cg_tolerance", cg_tolerance)
        self.cg_negative_curvature = check_choice(
            "cg_negative_curvature", cg_negative_curvature, linalg.NEGATIVE_CURVATURE
        )
        self.proximal_pull_back = check_bool("proximal_pull_back", proximal_pull_back)
        self.eval_l2_regularization = (
            None
            if eval_l2_regularization is None
            else check_non_negative_float("eval_l2_regularization", eval_l2_regularization)
        )
        self.hvp_method = check_choice("hvp_method", hvp_method, linalg.HVP_METHODS)

    @property
    def evaluation_l2_regularization(self):
        """Lambda of the test-time inner problem."""
        if self.eval_l2_regularization is None:
            return self.l2_regularization
        return self.eval_l2_regularization

    # ------------------------------------------------------------------
    # The inner problem: support loss plus the proximal term.

    def _l2(self, training):
        return self.l2_regularization if training else self.evaluation_l2_regularization

    def _proximal(self, l2):
        # The inner optimiser minimises the proximal objective, unless the
        # official code's pull-back step replaces the term.
        if l2 == 0 or self.proximal_pull_back:
            return []
        return [inner_loop.add_proximal(l2)]

    def _pull_back(self, l2):
        # The official code's final step on the proximal term:
        # `phi <- phi - alpha lambda (phi - theta)`.
        if not self.proximal_pull_back or l2 == 0:
            return None
        rate = self.step_size * l2
        return lambda fast, start: [
            p - inner_loop._as_dtype(rate, p.dtype) * (p - a) for p, a in zip(fast, start)
        ]

    def inner_transforms(self, training):
        return self._proximal(self._l2(training))

    def finalize(self, training):
        return self._pull_back(self._l2(training))

    def inner_solve(
        self, params, non_trainable, x, y, steps, l2_regularization, training, create_graph=False
    ):
        """Approximate `argmin L_support(phi) + (l2 / 2) ||phi - params||^2`.

        `steps` inner-optimiser steps from `phi = params` (then the pull-back
        step with `proximal_pull_back=True`). With `l2_regularization=0` this
        is plain adaptation on the support loss.
        """
        adaptation = self.adaptation(training=False, support_training=training).replace(
            optimizer=inner_loop.chain(*self._proximal(l2_regularization), self.base_inner_optimizer()),
            finalize=self._pull_back(l2_regularization),
        )
        state = adaptation.start(params, non_trainable, {"support_x": x, "support_y": y})
        return adaptation.weights(adaptation.advance(state, steps, create_graph))

    # ------------------------------------------------------------------
    # The implicit meta-gradient.

    def implicit_gradient(self, support_loss, fast, query_gradient):
        """Solves `((1 + d) I + H / (lambda + delta)) v = query_gradient` by CG.

        `H` is the Hessian of `support_loss` (a function of the fast weights)
        at `fast`; `d` is `cg_damping`, `delta` `cg_l2_damping`.

        Returns:
            A `keras_meta.linalg.ConjugateGradientResult`.
        """
        hvp = linalg.hessian_vector_product_fn(support_loss, fast, method=self.hvp_method)
        dtype = fast[0].dtype
        identity = inner_loop._as_dtype(1.0 + self.cg_damping, dtype)
        curvature = inner_loop._as_dtype(
            1.0 / (self.l2_regularization + self.cg_l2_damping), dtype
        )

        def operator(v):
            return [identity * a + curvature * b for a, b in zip(v, hvp(v))]

        return linalg.conjugate_gradient(
            operator,
            query_gradient,
            self.cg_iterations,
            tolerance=self.cg_tolerance,
            early_exit=self.execution.early_exit,
            negative_curvature=self.cg_negative_curvature,
        )

    def task_train(self, params, non_trainable, task):
        adaptation = self.adaptation(training=True)

        # Adapt on support: the proximal inner solve, no gradient through it.
        state = adaptation.advance(
            adaptation.start(params, non_trainable, task), self.inner_steps
        )
        fast = [tf.stop_gradient(p) for p in adaptation.weights(state)]

        # Outer loss on query, and its gradient at the adapted weights.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(fast)
            loss, y_pred = adaptation.score(state, weights=fast)
            scaled = self.scale_loss(loss)  # (loss scaling: the solve is linear in it)
        query_gradient = tape.gradient(
            scaled, fast, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

        # Meta-gradient: the implicit gradient, by CG on Hessian-vector
        # products of the support loss at the adapted weights.
        solve = self.implicit_gradient(
            lambda p: adaptation.inner_loss(p, state.cache), fast, query_gradient
        )
        return {
            "gradients": solve.solution,
            "loss": loss,
            "predictions": y_pred,
            "cg_iterations": solve.iterations,
            "cg_residual": solve.residual,
            "cg_negative_curvature": solve.negative_curvature,
        }
