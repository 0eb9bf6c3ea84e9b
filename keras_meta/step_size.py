"""Inner step-size rules: the rate each inner step takes.

A rule turns a learner's `inner_learning_rate` (and its
`inner_learning_rate_scaling`) into what the inner optimiser takes as
`learning_rate` (`keras_meta.inner_loop`): a number (`StepSize`), one tensor
per adapted weight (`PerParameter`, Meta-SGD), or a callable `rate(count)`
of the inner step `count` returning one tensor per weight
(`PerLayerPerStep`, MAML++'s LSLR). A learned rule holds its
meta-parameters in `variables` (the learner's variables, meta-learned with
the model's weights) and builds the optimiser's rate from their values with
`learning_rate_of(values)`, so that a tape watching the values
differentiates the meta-loss with respect to the rates.
"""

import tensorflow as tf

from keras_meta.validation import check_choice

SCALINGS = (None, "inverse_steps")


class StepSize:
    """A scalar inner step size, optionally divided by the number of inner steps.

    Args:
        inner_learning_rate: positive float.
        scaling: `None` (the rate as given) or `"inverse_steps"`
            (`inner_learning_rate / inner_steps`, the choice under which Ji,
            Yang and Liang (2020) prove N-step MAML converges; the same rate
            is used for any number of evaluation steps).
        inner_steps: the meta-training inner steps.
    """

    variables = ()  # a learned rule's meta-parameters

    def __init__(self, inner_learning_rate, scaling=None, inner_steps=1):
        self.inner_learning_rate = inner_learning_rate
        self.scaling = check_choice("inner_learning_rate_scaling", scaling, SCALINGS)
        self.inner_steps = inner_steps

    @property
    def learning_rate(self):
        """What the inner optimiser takes (here: a float)."""
        if self.scaling == "inverse_steps":
            return self.inner_learning_rate / self.inner_steps
        return self.inner_learning_rate


LEARNED = (None, "per_parameter", "per_layer_per_step")


class PerParameter:
    """Meta-SGD's learned step sizes: one per element of every adapted weight.

    The inner update of weight `w` is `w - alpha * grad`, with `alpha` a
    tensor of `w`'s shape, meta-learned with the weights (Li et al., 2017).
    The rates are not constrained to be positive (the paper's choice): a rate
    may turn negative where ascending the support loss helps the query loss.
    Every inner step, in training and at test time, uses the same rates.

    Args:
        variables: one variable per adapted weight, of its shape.
    """

    name = "per_parameter"

    def __init__(self, variables):
        self.variables = list(variables)

    def learning_rate_of(self, values):
        """What the inner optimiser takes, from the rates' values: one tensor per weight."""
        return list(values)

    @property
    def learning_rate(self):
        return self.learning_rate_of(self.variables)


class PerLayerPerStep:
    """MAML++'s LSLR: one learned scalar per adapted weight tensor and inner step.

    Inner step `i` (0-based) of weight `w` uses `alpha_w[i]`, each `alpha_w`
    a vector of `inner_steps` rates meta-learned with the weights (Antoniou,
    Edwards, Storkey, 2019). Adaptation with more steps than meta-training
    (`eval_inner_steps > inner_steps`, or `adapt(steps=...)`) reuses the last
    step's rate for the extra steps: the rates of steps that were never
    meta-trained do not exist (MAML++'s own code indexes past its array
    there).

    Args:
        variables: one variable of shape `[inner_steps]` per adapted weight.
    """

    name = "per_layer_per_step"

    def __init__(self, variables):
        self.variables = list(variables)

    def learning_rate_of(self, values):
        """A callable `rate(count)`: step `count`'s rate of every weight."""
        values = list(values)

        def rate(count):
            return [_at_step(v, count) for v in values]

        return rate

    @property
    def learning_rate(self):
        return self.learning_rate_of(self.variables)


def _at_step(vector, count):
    """`vector[min(count, len - 1)]` for a Python or tensor `count`."""
    last = int(vector.shape[0]) - 1
    if isinstance(count, int):
        return vector[min(count, last)]
    return select(vector, tf.minimum(count, last))


def select(stacked, index):
    """`stacked[index]` for a scalar tensor `index`, as a one-hot product (a
    dense gradient, where `tf.gather`'s is `IndexedSlices`)."""
    one_hot = tf.one_hot(index, int(stacked.shape[0]), dtype=stacked.dtype)
    return tf.tensordot(one_hot, stacked, axes=1)


def rate_shape(kind, shape, inner_steps):
    """The shape of the learned rate of a weight of `shape`."""
    return tuple(shape) if kind == "per_parameter" else (inner_steps,)


def learned_rule(kind, variables):
    """The learned rule of `kind` over `variables`."""
    return {"per_parameter": PerParameter, "per_layer_per_step": PerLayerPerStep}[kind](variables)
