"""One conformance suite that every meta-learner passes (optax's common test).

The suite is `keras_meta.testing.LearnerConformance`; each algorithm joins it
with a factory in LEARNERS, and every check runs for each.
"""

import keras_meta as km
from keras_meta.testing import LearnerConformance

LEARNERS = {
    "maml": lambda model: km.MAML(model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3),
    "fomaml": lambda model: km.MAML(model, inner_learning_rate=0.3, inner_steps=1, first_order=True),
    "maml_support_bn": lambda model: km.MAML(model, inner_learning_rate=0.3, transductive_batch_norm=False,
                                             inner_learning_rate_scaling="inverse_steps"),
    "maml_momentum_proto": lambda model: km.MAML(  # Proto-MAML, second order
        model, inner_learning_rate=0.1, inner_steps=2,
        inner_optimizer={"name": "momentum", "momentum": 0.5}, head_initialization="prototypes"),
    "maml_plus_plus": lambda model: km.MAML(  # LSLR + multi-step loss + per-step BatchNorm
        model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3,
        learned_inner_learning_rates="per_layer_per_step", multi_step_loss=True,
        per_step_batch_norm=True),
    "anil": lambda model: km.ANIL(model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3),
    "anil_first_order_support_bn": lambda model: km.ANIL(
        model, head=1, inner_learning_rate=0.3, inner_steps=2, first_order=True,
        head_l2_regularization=0.1, transductive_batch_norm=False, task_execution="sequential",
        head_initialization="prototypes"),  # first-order Proto-MAML on ANIL
    "imaml": lambda model: km.IMAML(model, inner_learning_rate=0.3, inner_steps=3, cg_iterations=3,
                                    eval_inner_steps=4, task_execution="vectorized"),
    "imaml_official_support_bn": lambda model: km.IMAML(  # iMAML
        model, inner_learning_rate=0.1, inner_steps=2, cg_iterations=2, cg_damping=1.0,
        cg_l2_damping=10.0, proximal_pull_back=True, eval_l2_regularization=0.0,
        inner_optimizer={"name": "momentum", "momentum": 0.5}, transductive_batch_norm=False,
        task_execution="sequential"),
    "reptile": lambda model: km.Reptile(model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3,
                                        use_query_in_inner_loop=True),
    "boil_first_order_support_bn": lambda model: km.BOIL(
        model, head=1, inner_learning_rate=0.3, inner_steps=2, first_order=True,
        transductive_batch_norm=False),
    "protonet": lambda model: km.ProtoNet(model, n_way=3),  # n_way: XLA needs it
}

# One learner per algorithm (MAML second and first order, ANIL, iMAML): the
# expensive suites (Keras callbacks, Mirrored) run on these; the adapt-at-serving
# export serves the sequential iMAML entry (its vectorized trace is the slowest).
ALGORITHMS = ("maml", "fomaml", "anil", "imaml")
# The learners added on the same hooks: the expensive suites run them under --run-large.
LATER_ALGORITHMS = ("maml_plus_plus", "reptile", "boil_first_order_support_bn", "protonet")


class TestConformance(LearnerConformance):
    learners = LEARNERS
    serving = ("maml", "fomaml", "anil", "imaml_official_support_bn")
    backbone = ()  # tests/test_backbone_matrix.py: every learner, every backbone
    # Every check of these in every run; the other entries' .keras, eager/XLA
    # and standalone checks are `large` (the options they add are checked by
    # the cheap checks and by their own test files).
    thorough = ("maml", "fomaml", "anil", "imaml_official_support_bn")
