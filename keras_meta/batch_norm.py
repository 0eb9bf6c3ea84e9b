"""The network at fast weights, and BatchNorm's conventions, in one place.

`forward` calls a model at fast weights through `stateless_call` (with exact
second derivatives through BatchNorm). `BatchNorm` is the one object that
knows which statistics normalise which set: transductive (every batch with
its own statistics, the reference MAML) or with the support set's moments at
the adapted weights (Meta-Dataset's non-transductive protocol); and which
`training` flag each call of the network gets.
"""

import contextlib
import inspect

import keras

from keras_meta import _internals


def exact_higher_derivatives():
    """Makes Keras BatchNorm twice differentiable while the context is open.

    See `keras_meta._internals.exact_moments`: the same values, exact
    derivatives of every order; a RuntimeError on first use if this Keras no
    longer computes BatchNorm's moments where keras_meta replaces them.
    """
    return _internals.exact_moments()


def batch_norm_layers(model):
    """The `keras.layers.BatchNormalization` layers of `model` (recursively)."""
    return [
        layer
        for layer in _internals.sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def training_kwargs(model, training):
    """`{"training": training}` if `model.call` takes it, else `{}`.

    `stateless_call` hands its keyword arguments straight to `model.call`
    (unlike `model(...)`, which drops `training` for calls without it).
    """
    accepts = _internals.call_has_training_arg(model)
    if accepts is None:
        parameters = inspect.signature(model.call).parameters
        accepts = "training" in parameters or any(
            p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
    return {"training": training} if accepts else {}


def _exact(model):
    # Only networks with BatchNorm need (and check) the exact moments.
    if batch_norm_layers(model):
        return exact_higher_derivatives()
    return contextlib.nullcontext()


def forward(model, params, non_trainable, x, training):
    """Calls `model` at fast weights `params`.

    Returns:
        `(outputs, non_trainable, losses)`: the network outputs, the values the
        non-trainable variables would take after the call (e.g. BatchNorm moving
        statistics; they are never assigned), and the regularisation losses
        the layers added (e.g. `kernel_regularizer`) at those weights.
    """
    with _exact(model):
        return model.stateless_call(
            params, non_trainable, x, return_losses=True, **training_kwargs(model, training)
        )


@contextlib.contextmanager
def _momentum_zero(model):
    """Temporarily sets every BatchNorm `momentum` of `model` to 0.

    With momentum 0 a training-mode call replaces the moving statistics by the
    current batch's moments exactly (Keras normalises with the biased variance
    and stores the same), which is how `batch_moments` reads them out for
    any architecture. The momentum is a Python attribute read when the layer
    is called (or traced), and it is restored on exit.
    """
    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def forward_with_batch_moments(model, params, non_trainable, x):
    """One training-mode call of `model` returning its outputs and batch moments.

    The outputs and losses of `forward(model, params, non_trainable, x,
    training=True)` together with the non-trainable values of
    `batch_moments(model, params, non_trainable, x)`, from a single pass.

    Returns:
        `(outputs, moments, losses)`.
    """
    with _momentum_zero(model):
        return forward(model, params, non_trainable, x, True)


def batch_moments(model, params, non_trainable, x):
    """Non-trainable values whose BatchNorm statistics are the moments of `x`.

    Runs `model` on `x` at weights `params` in training mode and returns the
    non-trainable values with every BatchNorm layer's `moving_mean` and
    `moving_variance` set to the mean and (biased) variance of its input on
    this batch. Running the network in inference mode with these values
    reproduces its training-mode output on `x`. Differentiable in `params`.
    """
    return forward_with_batch_moments(model, params, non_trainable, x)[1]


class BatchNorm:
    """BatchNorm's conventions for one wrapped model.

    Args:
        model: the wrapped model.
        transductive: `True`: every batch is normalised with its own
            statistics, support and query alike (the reference MAML).
            `False`: the query set is normalised with the support set's
            moments at the weights it is scored at.
    """

    def __init__(self, model, transductive):
        self.present = bool(batch_norm_layers(model))
        self.transductive = transductive

    @property
    def support_statistics(self):
        """Whether query sets are normalised with support moments."""
        return self.present and not self.transductive

    def training_flags(self, training):
        """`(support, query)` `training` arguments of the network's calls.

        Meta-training runs the network in training mode. Evaluation runs it
        in training mode only where BatchNorm needs batch statistics: the
        support passes always, the query pass when transductive.
        """
        if training:
            return True, True
        return self.present, self.present and self.transductive

    def query(self, model, params, non_trainable, support_x, query_x, training):
        """`(outputs, losses)` of (a part of) the network on the query set.

        With support statistics, the support set's moments at `params`
        normalise the query set (inference mode; a part without BatchNorm
        runs in inference mode with its own non-trainable values).
        """
        if not self.support_statistics:
            outputs, _, losses = forward(model, params, non_trainable, query_x, training)
            return outputs, list(losses)
        if batch_norm_layers(model):
            non_trainable = batch_moments(model, params, non_trainable, support_x)
        outputs, _, losses = forward(model, params, non_trainable, query_x, False)
        return outputs, list(losses)

    def support_and_query(
        self, model, params, non_trainable, support_x, query_x, support_training, query_training
    ):
        """`((support outputs, losses), (query outputs, losses))` from one support pass.

        `query_x` may be None (adapting without a query set).
        """
        if self.support_statistics:
            support, moments, support_losses = forward_with_batch_moments(
                model, params, non_trainable, support_x
            )
        else:
            support, _, support_losses = forward(
                model, params, non_trainable, support_x, support_training
            )
        query = None
        if query_x is not None:
            if self.support_statistics:
                outputs, _, losses = forward(model, params, moments, query_x, False)
            else:
                outputs, _, losses = forward(model, params, non_trainable, query_x, query_training)
            query = (outputs, list(losses))
        return (support, list(support_losses)), query

    def export_statistics(self, model, params, non_trainable, support_x):
        """Non-trainable values for a standalone adapted model: support moments."""
        return batch_moments(model, params, non_trainable, support_x)
