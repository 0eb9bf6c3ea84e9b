"""Every reference backbone x every learner x the settings users run.

Each configuration meta-trains a few steps through `fit` on episodes from
`km.data.episodes` and evaluates once, and checks that the weights moved, the
logs are finite and no task was skipped. The full matrix (conv4 strided and
max-pooled, 28x28x1 and 84x84x3 inputs, 32 and 64 filters, every learner,
both task executions, 1 and 5 shots, 1, 2 and 5 inner steps) is `large`; the
default suite runs the configuration that used to crash (second-order MAML on
the MAML paper's mini-ImageNet network, task by task, 5-shot, 2 inner steps)
and one row per learner and task execution.
"""

import itertools

import keras
import pytest

import keras_meta as km
from keras_meta import testing

LEARNERS = ("maml", "fomaml", "anil", "imaml")
N_WAY = 5


def _learner(name, model, inner_steps, task_execution):
    common = dict(
        inner_learning_rate=0.1,
        inner_steps=inner_steps,
        eval_inner_steps=inner_steps,
        task_execution=task_execution,
    )
    if name in ("maml", "fomaml"):
        learner = km.MAML(model, first_order=name == "fomaml", **common)
    elif name == "anil":
        learner = km.ANIL(model, head=1, **common)
    else:
        learner = km.IMAML(model, l2_regularization=1.0, cg_iterations=2, **common)
    learner.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=testing.sparse_ce(),
        metrics=["accuracy"],
    )
    return learner


def _run(learner_name, downsampling, shape, filters, task_execution, k_shot, inner_steps):
    model = km.models.conv4(
        N_WAY, filters=filters, input_shape=shape, downsampling=downsampling, seed=0
    )
    learner = _learner(learner_name, model, inner_steps, task_execution)
    testing.check_meta_training(learner, shape, k_shot, head_moves=learner_name == "anil")


# The configuration that crashed with `AlreadyExistsError` (Grappler's memory
# optimizer rewriting AddN inside the inner while loop's gradient).
def test_mini_imagenet_conv4_second_order_maml_task_by_task():
    _run("maml", "max_pool", (84, 84, 3), 32, "sequential", 5, 2)


# Vectorized second-order MAML and iMAML take 30-70 s here: in the matrix.
# Vectorized FOMAML and ANIL (~12 s each): large too; the conformance suite
# runs both executions on a small conv net.
@pytest.mark.parametrize(
    "learner_name, task_execution",
    [(name, "sequential") for name in LEARNERS]
    + [pytest.param("fomaml", "vectorized", marks=pytest.mark.large),
       pytest.param("anil", "vectorized", marks=pytest.mark.large)],
)
def test_every_learner_on_conv4(learner_name, task_execution):
    _run(learner_name, "strided", (28, 28, 1), 32, task_execution, 1, 2)


MATRIX = list(
    itertools.product(
        LEARNERS,
        ("strided", "max_pool"),
        ((28, 28, 1), (84, 84, 3)),
        (32, 64),
        ("sequential", "vectorized"),
        (1, 5),
        (1, 2, 5),
    )
)


@pytest.mark.large
@pytest.mark.parametrize(
    "learner_name, downsampling, shape, filters, task_execution, k_shot, inner_steps",
    MATRIX,
    ids=["-".join(str(p) for p in row).replace(", ", "x") for row in MATRIX],
)
def test_backbone_matrix(
    learner_name, downsampling, shape, filters, task_execution, k_shot, inner_steps
):
    _run(learner_name, downsampling, shape, filters, task_execution, k_shot, inner_steps)
