"""Reptile: move the meta-parameters toward each task's adapted weights."""

import keras
import tensorflow as tf

from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import check_bool


@keras.saving.register_keras_serializable(package="keras_meta")
class Reptile(MetaLearner):
    """Reptile (first-order meta-learning without second derivatives), trained with `model.fit`.

    Per task, `inner_steps` steps of the inner optimiser on the task's
    training examples adapt fast weights `phi` from the meta-parameters
    `theta`: the support set, or the support and query sets together with
    `use_query_in_inner_loop=True` (the paper trains on all the examples of
    a task). The task's meta-gradient is `theta - phi`, averaged over the
    meta-batch and applied by the compiled optimizer: with
    `keras.optimizers.SGD(learning_rate=epsilon)` the update is the paper's
    batched Reptile, `theta <- theta + epsilon * mean_tasks(phi - theta)`;
    Adam gives its Adam variant. Nothing is differentiated through the inner
    loop (no second derivatives, memory flat in `inner_steps`). The logged
    `loss` is the query loss after adaptation (with
    `use_query_in_inner_loop=True`, a loss on examples the inner loop saw).

    Evaluation (`evaluate`, `predict`, `adapt`, `export_adaptive`) adapts on
    the support set only, `eval_inner_steps` steps (the paper: 50 on
    Omniglot), and scores the query set. The paper's "transductive" rows
    normalise the query set with its own BatchNorm statistics
    (`transductive_batch_norm=True`, the default here); its
    non-transductive rows predict each query example with statistics of the
    support set plus that one example; `transductive_batch_norm=False`
    normalises the query set with the support set's moments, the nearest
    non-transductive protocol here.

    Args:
        model: a built `keras.Model`; its trainable weights are theta.
        inner_learning_rate: inner step size (paper, Omniglot: Adam 0.001;
            with SGD on mean-reduced losses, larger).
        inner_steps: inner steps per task in meta-training (paper: 5 on
            Omniglot, 8 on mini-ImageNet).
        inner_optimizer: `"sgd"` (default), `"momentum"`, `"adam"` or a dict
            `{"name": ..., **kwargs}` (the paper's inner Adam has
            `beta_1 = 0`: `{"name": "adam", "beta_1": 0.0}`); see
            `keras_meta.inner_loop.get_inner_optimizer`.
        use_query_in_inner_loop: also take the inner steps on the query set
            in meta-training (the paper's setting: no support/query split).
        eval_inner_steps: inner steps for `evaluate`/`predict`/`adapt`
            (default `inner_steps`).
        inner_learning_rate_scaling: `None` or `"inverse_steps"`.
        transductive_batch_norm: as in `km.MAML`.
        task_execution: `"auto"` (default), `"vectorized"` or `"sequential"`.

    Example:

    ```python
    import keras, keras_meta as km
    reptile = km.Reptile(km.models.mlp(seed=0), inner_learning_rate=0.02, inner_steps=5)
    reptile.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")  # epsilon = 1.0
    reptile.fit(km.data.sinusoid(meta_batch_size=5, seed=0), steps_per_epoch=10)
    ```

    Reference:
        - [Nichol, Achiam, Schulman, 2018](https://arxiv.org/abs/1803.02999)
    """

    # The inner loop is never differentiated: one `tf.while_loop`, vectorized
    # or not (graph and memory flat in the steps).
    unroll_inner_loop_when_vectorized = False

    def __init__(
        self,
        model,
        inner_learning_rate=0.01,
        inner_steps=5,
        inner_optimizer="sgd",
        use_query_in_inner_loop=False,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        **kwargs,
    ):
        super().__init__(**self.base_arguments(locals()))
        self.use_query_in_inner_loop = check_bool(
            "use_query_in_inner_loop", use_query_in_inner_loop
        )

    def task_train(self, params, non_trainable, task):
        adaptation = self.adaptation(training=True)
        # Adapt on the task's training examples (support, and query).
        examples = dict(task)
        if self.use_query_in_inner_loop:
            for kind in ("x", "y"):
                examples[f"support_{kind}"] = tf.concat(
                    [task[f"support_{kind}"], task[f"query_{kind}"]], axis=0
                )
        state = adaptation.advance(adaptation.start(params, non_trainable, examples), self.inner_steps)
        # Outer loss on query: logged, not differentiated.
        loss, predictions = adaptation.score(state)
        # Meta-gradient: theta - phi.
        gradients = [theta - phi for theta, phi in zip(params, adaptation.full_weights(state))]
        return {"gradients": gradients, "loss": loss, "predictions": predictions}
