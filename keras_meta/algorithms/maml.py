"""MAML: model-agnostic meta-learning (second order, first order, multi-step),
with MAML++'s options (learned per-layer per-step rates, multi-step loss,
per-step BatchNorm) and Meta-SGD's learned per-parameter rates."""

import keras

from keras_meta.algorithms.base import MetaLearner
from keras_meta.prototypes import check_head_initialization
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
        inner_optimizer: `"sgd"` (default, the paper's), `"momentum"`,
            `"adam"` or a dict `{"name": ..., **kwargs}`; second order
            differentiates through it (`keras_meta.inner_loop`).
        learned_inner_learning_rates: `None` (default), `"per_parameter"`
            (Meta-SGD, see `km.MetaSGD`) or `"per_layer_per_step"` (MAML++'s
            LSLR): learned inner rates, initialised to the step size and
            meta-learned with the weights (`learner.inner_learning_rates`).
            With more test-time steps than `inner_steps`, LSLR reuses the
            last step's rate.
        multi_step_loss: MAML++'s multi-step loss (MSL): the meta-loss is
            the weighted sum of the query losses after each inner step,
            the weights annealing from uniform to the last step over
            `multi_step_loss_epochs` epochs (logged as `msl_weight_step_<k>`).
        multi_step_loss_epochs: the annealing's length in epochs.
        per_step_batch_norm: MAML++'s per-step BatchNorm (BNWB + BNRS): a
            set of BatchNorm scales and offsets per inner step, not adapted
            by the inner loop. With more test-time steps than `inner_steps`,
            the last step's set is reused.
        head_initialization: `None` (default: the inner loop starts from the
            meta-learned head) or `"prototypes"` (Proto-MAML): each task's
            inner loop starts from the last Dense layer `W_k = 2 c_k`,
            `b_k = -||c_k||^2`, `c_k` the mean support feature of class `k`
            (the features feeding that layer); the meta-gradient flows
            through this initialisation (second order) or not
            (`first_order=True`). See docs/prototypes.md.

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
        - [Antoniou, Edwards, Storkey, 2019](https://arxiv.org/abs/1810.09502)
          (MAML++: LSLR, MSL, per-step BatchNorm; docs/maml_plus_plus.md)
        - [Li, Zhou, Chen, Li, 2017](https://arxiv.org/abs/1707.09835)
          (Meta-SGD)
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
        learned_inner_learning_rates=None,
        multi_step_loss=False,
        multi_step_loss_epochs=10,
        per_step_batch_norm=False,
        head_initialization=None,
        **kwargs,
    ):
        super().__init__(**self.base_arguments(locals()))
        self.first_order = check_bool("first_order", first_order)
        self.head_initialization = check_head_initialization(head_initialization, self.model)
        self.build_learned_state()
