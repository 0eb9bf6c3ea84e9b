"""One task's adaptation: the primitive every path of every learner uses.

Training, `evaluate`, `predict`, `evaluate_tasks`' checkpoints, `adapt()` and
`export_adaptive` all adapt a task the same way:

    state = adaptation.start(params, non_trainable, task)   # fast weights, optimiser state, cache
    state = adaptation.advance(state, steps)                # k inner steps (continuable)
    loss, predictions = adaptation.score(state)             # the query set
    weights = adaptation.full_weights(state)                # every trainable weight, for export

What differs between algorithms is stated by the parts an `Adaptation` is
built from: the *network* (which weights adapt and what the start state
computes once: `WholeNetwork` adapts every weight or a subset of them,
`BodyHead` adapts a head over features the body computes once), the inner
optimiser (a chain of `keras_meta.inner_loop` transforms), and an optional
`finalize` applied to the fast weights before they are scored (iMAML's
pull-back step).
"""

import collections

import tensorflow as tf

from keras_meta import inner_loop
from keras_meta.batch_norm import forward

State = collections.namedtuple("State", ["fast", "optimizer_state", "cache"])
State.__doc__ = """One task's adaptation state.

`fast`: the adapted tensors (all the trainable weights for MAML, the head's
for ANIL). `optimizer_state`: the inner optimiser's (and its transforms')
state, e.g. momentum and iMAML's anchor. `cache`: what the start computed
once (the task's tensors, ANIL's features, the weights that do not adapt).
"""


class WholeNetwork:
    """The whole network runs at the fast weights; `positions` of its weights adapt.

    Args:
        model: the wrapped model.
        batch_norm: its `keras_meta.batch_norm.BatchNorm`.
        positions: indices into `model.trainable_variables` of the weights
            the inner loop moves; default all (MAML).
    """

    def __init__(self, model, batch_norm, positions=None):
        self.model = model
        self.batch_norm = batch_norm
        self.positions = positions

    def adapted(self, params):
        """The weights among `params` that the inner loop moves."""
        return list(params) if self.positions is None else [params[i] for i in self.positions]

    def start(self, params, non_trainable, task, support_training, query_training):
        """`(fast weights, cache)`. The network is not called."""
        return self.adapted(params), {"params": list(params), "non_trainable": list(non_trainable),
                            "task": task}

    def full_weights(self, fast, cache):
        if self.positions is None:
            return list(fast)
        full = list(cache["params"])
        for position, value in zip(self.positions, fast):
            full[position] = value
        return full

    def support_outputs(self, fast, cache, training):
        y_pred, _, losses = forward(
            self.model, self.full_weights(fast, cache), cache["non_trainable"],
            cache["task"]["support_x"], training,
        )
        return y_pred, list(losses)

    def query_outputs(self, fast, cache, training):
        task = cache["task"]
        return self.batch_norm.query(
            self.model, self.full_weights(fast, cache), cache["non_trainable"],
            task["support_x"], task["query_x"], training,
        )


class BodyHead:
    """The head adapts over features the body computes once, in the start state.

    Args:
        body, head: functional models sharing the wrapped model's weights.
        batch_norm: the wrapped model's `BatchNorm`.
        parts: `(body, head)` positions among the wrapped model's trainable
            and non-trainable weights: `(body_trainable, head_trainable,
            body_non_trainable, head_non_trainable)`.
    """

    def __init__(self, body, head, batch_norm, parts):
        self.body = body
        self.head = head
        self.batch_norm = batch_norm
        self.parts = parts

    def adapted(self, params):
        """The head's weights among `params`."""
        return [params[i] for i in self.parts[1]]

    def start(self, params, non_trainable, task, support_training, query_training):
        """`(head weights, cache)`: the body's only calls, on support and query."""
        body_t, head_t, body_nt, head_nt = self.parts
        body_params = [params[i] for i in body_t]
        (support, support_losses), query = self.batch_norm.support_and_query(
            self.body, body_params, [non_trainable[i] for i in body_nt],
            task["support_x"], task.get("query_x"), support_training, query_training,
        )
        cache = {"task": task, "params": list(params),
                 "head_non_trainable": [non_trainable[i] for i in head_nt],
                 "support": support, "support_losses": support_losses}
        if query is not None:
            cache["query"], cache["query_losses"] = query
        return self.adapted(params), cache

    def full_weights(self, fast, cache):
        full = list(cache["params"])
        for position, value in zip(self.parts[1], fast):
            full[position] = value
        return full

    def support_outputs(self, fast, cache, training):
        y_pred, _, losses = forward(
            self.head, fast, cache["head_non_trainable"], cache["support"], training
        )
        return y_pred, cache["support_losses"] + list(losses)

    def query_outputs(self, fast, cache, training):
        y_pred, losses = self.batch_norm.query(
            self.head, fast, cache["head_non_trainable"], cache["support"], cache["query"],
            training,
        )
        return y_pred, cache["query_losses"] + losses


class Adaptation:
    """Start, advance, score: one task's adaptation in one phase.

    Args:
        network: `WholeNetwork` or `BodyHead` (which weights adapt, what is
            computed once).
        loss_fn: `loss_fn(y_true, y_pred, layer_losses) -> scalar`.
        optimizer: the inner optimiser (`keras_meta.inner_loop`), transforms
            chained in front.
        support_training, query_training: the `training` flags of the
            network's support and query calls (`BatchNorm.training_flags`).
        unroll: whether differentiable inner loops are unrolled (see
            `keras_meta.inner_loop.run`); others run in a `tf.while_loop`.
        finalize: `finalize(fast, start) -> fast`, applied to the fast weights
            before they are scored or exported (`start`: the fast weights the
            adaptation started from); default none.
    """

    def __init__(self, network, loss_fn, optimizer, support_training, query_training,
                 unroll=True, finalize=None):
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.support_training = support_training
        self.query_training = query_training
        self.unroll = unroll
        self.finalize = finalize

    def replace(self, **changes):
        """A copy with some parts replaced (e.g. `optimizer`, `finalize`)."""
        parts = dict(vars(self), **changes)
        return Adaptation(**parts)

    def start(self, params, non_trainable, task):
        """The start state of `task` (a dict; `query_x`/`query_y` optional)."""
        fast, cache = self.network.start(
            params, non_trainable, task, self.support_training, self.query_training
        )
        cache["start"] = list(fast)
        return State(list(fast), self.optimizer.init(fast), cache)

    def inner_loss(self, fast, cache):
        """The support loss at fast weights (the transforms add their terms' gradients)."""
        y_pred, losses = self.network.support_outputs(fast, cache, self.support_training)
        return self.loss_fn(cache["task"]["support_y"], y_pred, losses)

    def advance(self, state, steps, create_graph=False):
        """`state` after `steps` more inner steps (continuable)."""
        fast, optimizer_state = inner_loop.run(
            lambda p: self.inner_loss(p, state.cache), state.fast, steps, self.optimizer,
            state=state.optimizer_state, create_graph=create_graph, unroll=self.unroll,
        )
        return State(fast, optimizer_state, state.cache)

    def advance_first_order(self, state, steps):
        """`advance` whose path is a constant: the fast weights move by a shift
        through which gradients reach the start weights unchanged (first-order
        MAML and ANIL)."""
        constant = tf.nest.map_structure(tf.stop_gradient, state)
        end = self.advance(constant, steps)
        fast = [s + tf.stop_gradient(e - s) for s, e in zip(state.fast, end.fast)]
        return State(fast, end.optimizer_state, state.cache)

    def weights(self, state):
        """The adapted fast weights as scored (after `finalize`)."""
        if self.finalize is None:
            return state.fast
        return self.finalize(state.fast, state.cache["start"])

    def outputs(self, state, weights=None):
        """`(query predictions, layer losses)` at the adapted weights.

        `weights`: the fast weights to use instead of `weights(state)`.
        """
        weights = self.weights(state) if weights is None else weights
        return self.network.query_outputs(weights, state.cache, self.query_training)

    def score(self, state, weights=None):
        """`(query loss, query predictions)` at the adapted weights (or `weights`)."""
        y_pred, losses = self.outputs(state, weights)
        return self.loss_fn(state.cache["task"]["query_y"], y_pred, losses), y_pred

    def full_weights(self, state):
        """Every trainable weight of the wrapped model, adapted ones included."""
        return self.network.full_weights(self.weights(state), state.cache)

