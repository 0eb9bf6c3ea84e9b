"""BOIL: MAML whose inner loop adapts only the body; the head is meta-learned."""

import keras

from keras_meta.adaptation import WholeNetwork
from keras_meta.algorithms import anil
from keras_meta.algorithms.base import MetaLearner
from keras_meta.validation import check_bool


@keras.saving.register_keras_serializable(package="keras_meta")
class BOIL(MetaLearner):
    """Body Only update in Inner Loop: ANIL's mirror.

    The wrapped model is split into a **body** and a **head** exactly as by
    `km.ANIL` (same `head=` designation, same `model=(body, head)` pair).
    Per task, `inner_steps` gradient steps on the support loss adapt the
    body's fast weights while the head stays at its meta-learned weights;
    the query loss of the network at the adapted body is the task's
    meta-loss. The outer update meta-learns every trainable weight: the head
    through the query loss (and, second order, through the inner steps, in
    which it shapes the body's gradients), the body through its adapted
    weights. With `first_order=True` the inner gradients are constants.

    Unlike ANIL, the whole network runs at fast weights in every inner step
    (as in MAML); the head's weights never change within a task, which is
    what makes the body learn representations that change across tasks
    (Oh et al. 2021). `adapt()` returns the network with the adapted body and
    the meta-learned head as one plain Keras model; BatchNorm follows
    `km.MAML`.

    Args:
        model: a built Sequential or functional `keras.Model`, or a pair
            `(body, head)` of built models/layers (as `km.ANIL`).
        head: the head, as in `km.ANIL` (default: the last layer).
        inner_learning_rate: inner step size on the body (mean-reduced
            Keras losses, as `km.MAML`).
        inner_steps: inner gradient steps on the body in meta-training.
        first_order: treat the inner gradients as constants.
        eval_inner_steps: inner steps for `evaluate`/`predict`/`adapt`
            (default `inner_steps`).
        inner_learning_rate_scaling: `None` or `"inverse_steps"`.
        transductive_batch_norm: as in `km.MAML`.
        task_execution: `"auto"` (default), `"vectorized"` or `"sequential"`.
        inner_optimizer: the body's inner optimiser, as in `km.MAML`.

    Example:

    ```python
    import keras, keras_meta as km
    boil = km.BOIL(km.models.conv4(5), head="head", inner_learning_rate=0.5)
    boil.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    boil.fit(episodes, steps_per_epoch=100)   # dicts support_x/_y, query_x/_y
    ```

    Reference:
        - [Oh, Yoo, Kim, Yun, 2021](https://arxiv.org/abs/2008.08882)
    """

    _check_outputs = False  # the body/head split says what BOIL needs

    def __init__(
        self,
        model,
        head=None,
        inner_learning_rate=0.01,
        inner_steps=1,
        first_order=False,
        eval_inner_steps=None,
        inner_learning_rate_scaling=None,
        transductive_batch_norm=True,
        task_execution="auto",
        inner_optimizer="sgd",
        **kwargs,
    ):
        model, head = anil._designated(model, head)
        super().__init__(**self.base_arguments(locals()))
        self.first_order = check_bool("first_order", first_order)
        head_layers, self.head = anil._resolve_head(self.model, 1 if head is None else head)
        # Plain attributes: the parts share the wrapped model's variables.
        self.__dict__["_parts"] = anil._split(self.model, head_layers, self.head, learner="BOIL")
        if not self.body_model.trainable_variables:
            raise ValueError(
                f"The body of model {self.model.name!r} (before head={self.head!r}) "
                "has no trainable weights: BOIL adapts the body in the inner loop."
            )

    # The parts, as ANIL names them (`_parts`: body and head models).
    body_model = anil.ANIL.body_model
    head_model = anil.ANIL.head_model

    def build_network(self):
        # The whole network runs at the fast weights; the body's weights adapt.
        return WholeNetwork(
            self.model, self.batch_norm, positions=anil._positions(self.model, self.body_model, True)
        )
