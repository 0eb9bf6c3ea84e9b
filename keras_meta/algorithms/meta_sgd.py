"""Meta-SGD: MAML with a learned step size for every weight element."""

import keras

from keras_meta.algorithms.maml import MAML


@keras.saving.register_keras_serializable(package="keras_meta")
class MetaSGD(MAML):
    """Meta-SGD: MAML whose inner step sizes are learned, one per parameter.

    The inner update is `w <- w - alpha * grad L_support(w)`, where `alpha`
    has the shape of `w` (one rate per weight element), initialised to
    `inner_learning_rate` and meta-learned together with the initial weights
    by the compiled optimizer: the meta-gradient of the query loss reaches
    the rates through the inner update (Li et al., 2017, Algorithm 1; their
    experiments take one inner step). This is `km.MAML` with
    `learned_inner_learning_rates="per_parameter"`; every MAML option is
    available (MAML++'s multi-step loss and per-step BatchNorm included).
    The rates are not constrained to be positive, as in the paper.

    The learned rates are `learner.inner_learning_rates`, a list aligned with
    `model.trainable_variables` (`None` for a weight that does not adapt,
    with `per_step_batch_norm`). They are trainable variables of the
    learner: saved in `.keras` files, restored by `BackupAndRestore`, and
    used by `evaluate`, `predict`, `adapt()` and `export_adaptive`. Every
    inner step uses the same rates, so adaptation with more steps than
    meta-training is well defined (it may not be what the rates were
    learned for).

    Args:
        model: a built `keras.Model`; its trainable weights are the
            meta-parameters, with the rates.
        inner_learning_rate: the initial value of every rate.
        inner_steps: inner steps during meta-training (the paper: 1).
        first_order: drop second-order terms; the rates still learn, from
            the first-order path `-alpha * grad` (as MAML++'s first order).
        Other arguments: as in `km.MAML`.

    Example:

    ```python
    import keras, keras_meta as km
    meta_sgd = km.MetaSGD(km.models.mlp(), inner_learning_rate=0.01)
    meta_sgd.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    meta_sgd.fit(km.data.sinusoid(meta_batch_size=25, seed=0), steps_per_epoch=10)
    rates = meta_sgd.inner_learning_rates  # one array per weight, its shape
    ```

    Reference:
        - [Li, Zhou, Chen, Li, 2017](https://arxiv.org/abs/1707.09835)
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
        inner_optimizer="sgd",
        multi_step_loss=False,
        multi_step_loss_epochs=10,
        per_step_batch_norm=False,
        **kwargs,
    ):
        arguments = dict(locals())
        arguments.pop("self")
        arguments.pop("__class__", None)
        kwargs = arguments.pop("kwargs")
        super().__init__(learned_inner_learning_rates="per_parameter", **arguments, **kwargs)
