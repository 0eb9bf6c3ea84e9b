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
from keras_meta.step_size import select

State = collections.namedtuple(
    "State", ["fast", "optimizer_state", "cache", "step"], defaults=(0,)
)
State.__doc__ = """One task's adaptation state.

`fast`: the adapted tensors (all the trainable weights for MAML, the head's
for ANIL). `optimizer_state`: the inner optimiser's (and its transforms')
state, e.g. momentum and iMAML's anchor. `cache`: what the start computed
once (the task's tensors, ANIL's features, the weights that do not adapt).
`step`: the inner steps taken (a Python int).
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
        step_weights: `None` (default), or `(positions, later)`: weights of
            the network that take other values at every inner step (per-step
            BatchNorm). `positions` index the full weights (they must not
            adapt); `later[s - 1]` lists their values at step `s >= 1` (step
            0 uses the start weights' own). The support pass of step `s`
            (0-based) runs with set `s`, the query set after `s >= 1` steps
            is scored with set `s - 1` (the set of the last step taken, as
            MAML++ does), and steps beyond the last set reuse it.
    """

    def __init__(self, network, loss_fn, optimizer, support_training, query_training,
                 unroll=True, finalize=None, step_weights=None):
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.support_training = support_training
        self.query_training = query_training
        self.unroll = unroll
        self.finalize = finalize
        self.step_weights = step_weights

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
        if self.step_weights is not None:
            positions, later = self.step_weights
            cache["step_weights"] = [[params[i] for i in positions]] + [list(s) for s in later]
        return State(list(fast), self.optimizer.init(fast), cache)

    def at_step(self, cache, step):
        """`cache` whose full weights hold the per-step weights of set `step`
        (a Python int or a scalar tensor; past the last set, the last)."""
        if self.step_weights is None:
            return cache
        sets = cache["step_weights"]
        positions, last = self.step_weights[0], len(sets) - 1
        params = list(cache["params"])
        for j, position in enumerate(positions):
            if isinstance(step, int):
                params[position] = sets[min(step, last)][j]
            else:
                stacked = tf.stack([values[j] for values in sets])
                params[position] = select(stacked, tf.minimum(step, last))
        return dict(cache, params=params)

    def _query_cache(self, state):
        # The query set after `step` steps: the last step's set.
        return self.at_step(state.cache, max(state.step - 1, 0))

    def inner_loss(self, fast, cache, step=0):
        """The support loss at fast weights (the transforms add their terms' gradients)."""
        cache = self.at_step(cache, step)
        y_pred, losses = self.network.support_outputs(fast, cache, self.support_training)
        return self.loss_fn(cache["task"]["support_y"], y_pred, losses)

    def advance(self, state, steps, create_graph=False):
        """`state` after `steps` more inner steps (continuable)."""
        if self.step_weights is None:
            loss_fn, first_step = (lambda p: self.inner_loss(p, state.cache)), None
        else:
            loss_fn, first_step = (lambda p, i: self.inner_loss(p, state.cache, i)), state.step
        fast, optimizer_state = inner_loop.run(
            loss_fn, state.fast, steps, self.optimizer,
            state=state.optimizer_state, create_graph=create_graph, unroll=self.unroll,
            first_step=first_step,
        )
        return State(fast, optimizer_state, state.cache, state.step + steps)

    def advance_first_order(self, state, steps):
        """`advance` whose path is a constant: the fast weights move by a shift
        through which gradients reach the start weights unchanged (first-order
        MAML and ANIL). Learned step sizes, which the optimiser holds, still
        receive the gradient of that shift (the inner gradients being
        constants), as in MAML++'s first-order mode."""
        constant = State(*tf.nest.map_structure(tf.stop_gradient, tuple(state[:3])), state.step)
        end = self.advance(constant, steps)
        fast = [s + (e - tf.stop_gradient(s)) for s, e in zip(state.fast, end.fast)]
        return State(fast, end.optimizer_state, state.cache, end.step)

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
        return self.network.query_outputs(weights, self._query_cache(state), self.query_training)

    def score(self, state, weights=None):
        """`(query loss, query predictions)` at the adapted weights (or `weights`)."""
        y_pred, losses = self.outputs(state, weights)
        return self.loss_fn(state.cache["task"]["query_y"], y_pred, losses), y_pred

    def full_weights(self, state):
        """Every trainable weight of the wrapped model, adapted ones included."""
        return self.network.full_weights(self.weights(state), self._query_cache(state))

