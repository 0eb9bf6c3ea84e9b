"""Inner step-size rules: the rate each inner step takes.

A rule turns a learner's `inner_learning_rate` (and its
`inner_learning_rate_scaling`) into what the inner optimiser takes as
`learning_rate` (`keras_meta.inner_loop`): a number today. The inner
optimisers also take one tensor per adapted weight, or a callable
`rate(count)` of the inner step `count` returning a scalar or one tensor per
weight: learned rates (Meta-SGD's per parameter, MAML++'s per layer and
step) are rules whose `learning_rate` is such a callable over meta-parameters
they hold in `variables`.
"""

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
