"""MAML: model-agnostic meta-learning (second order, first order, multi-step)."""

import keras
import tensorflow as tf

from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import check_bool


@keras.saving.register_keras_serializable(package="keras_meta")
class MAML(MetaLearner):
    """Model-agnostic meta-learning, trained with `model.fit`.

    Per task, `inner_steps` gradient steps on the support loss (the compiled
    loss) adapt fast weights; the query loss at the adapted weights is the
    task's meta-loss. The meta-gradient, averaged over the meta-batch,
    flows through every inner step (second order) or, with
    `first_order=True`, is the query gradient at the adapted weights
    (FOMAML). The compiled optimizer applies it to the wrapped model's
    trainable weights.

    Args:
        model: a built `keras.Model`; its trainable weights are the
            meta-parameters.
        inner_learning_rate: inner step size (mean-reduced Keras losses: the
            reference code's sum/K losses need `N_way` times larger rates).
        inner_steps: inner gradient steps during meta-training; the
            meta-gradient flows through all of them (multi-step MAML).
        first_order: drop second-order terms (FOMAML).
        eval_inner_steps: inner steps for `evaluate`/`predict`/`adapt`
            (default `inner_steps`).
        inner_learning_rate_scaling: `None` or `"inverse_steps"`
            (step size `inner_learning_rate / inner_steps`, Ji et al. 2020).
        transductive_batch_norm: BatchNorm with each batch's own statistics
            (default, as the reference MAML), or `False`: query normalised
            with the support moments at the adapted weights.
        task_execution: `"auto"` (default), `"vectorized"` or `"sequential"`.

    Example:

    ```python
    import keras, keras_meta as km
    model = km.models.mlp()
    maml = km.MAML(model, inner_learning_rate=0.01, inner_steps=1)
    maml.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    maml.fit(km.data.sinusoid(meta_batch_size=25, seed=0), steps_per_epoch=10)
    support_x, support_y = ...   # one task, [K, 1] each
    adapted = maml.adapt(support_x, support_y)  # a plain keras.Model
    ```

    Reference:
        - [Finn, Abbeel, Levine, 2017](https://arxiv.org/abs/1703.03400)
        - [Ji, Yang, Liang, 2020](https://arxiv.org/abs/2002.07836)
          (multi-step MAML and the 1/N inner step size)
    """

    def __init__(
        self,
        model,
        inner_learning_rate=0.01,
        inner_steps=1,
        first_order=False,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        **kwargs,
    ):
        super().__init__(
            model,
            inner_learning_rate=inner_learning_rate,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            inner_learning_rate_scaling=inner_learning_rate_scaling,
            transductive_batch_norm=transductive_batch_norm,
            task_execution=task_execution,
            **kwargs,
        )
        self.first_order = check_bool("first_order", first_order)

    def task_train(self, params, non_trainable, task):
        adapt = lambda p, create_graph: self.adapt_parameters(  # noqa: E731
            p,
            non_trainable,
            task["support_x"],
            task["support_y"],
            self.inner_steps,
            training=True,
            create_graph=create_graph,
        )
        if self.first_order:
            # Adapt on support (no graph), outer loss on query at the adapted
            # weights: the meta-gradient is the query gradient there.
            fast = adapt(params, create_graph=False)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(fast)
                loss, y_pred = self.query_loss(fast, non_trainable, task, True)
            gradients = tape.gradient(
                loss, fast, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
        else:
            # Adapt on support and score the query set under one tape, so the
            # meta-gradient flows back through every inner step.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(params)
                fast = adapt(params, create_graph=True)
                loss, y_pred = self.query_loss(fast, non_trainable, task, True)
            gradients = tape.gradient(
                loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
        return {"gradients": gradients, "loss": loss, "predictions": y_pred}

    def get_config(self):
        config = super().get_config()
        config["first_order"] = self.first_order
        return config
