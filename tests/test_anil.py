"""ANIL: meta-gradients in float64, equality with MAML, one body pass per task, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import inner_loop
from tests import helpers


_sce = helpers.sparse_ce


def _tensors(values):
    return [tf.convert_to_tensor(v) for v in values]


def _head_positions(learner):
    ids = [id(v) for v in learner.model.trainable_variables]
    return [ids.index(id(v)) for v in learner.head_model.trainable_variables]


def _task(episode, t):
    return {key: tf.convert_to_tensor(value[t]) for key, value in episode.items()}


# ----------------------------------------------------------------------
# References written on the whole network, independently of ANIL's
# body/head split: gradient descent on the head's weights only, with the
# whole model called at every step (MAML restricted to the head).


def reference_adapted(learner, params, task, l2, create_graph=True):
    """Full weights after `inner_steps` head-only steps, whole-model calls."""
    positions = _head_positions(learner)
    non_trainable = _tensors(learner.model.non_trainable_variables)

    def with_head(head):
        full = list(params)
        for position, value in zip(positions, head):
            full[position] = value
        return full

    def loss_fn(head):
        y_pred, _, losses = inner_loop.forward(
            learner.model, with_head(head), non_trainable, task["support_x"], True)
        loss = learner.compute_task_loss(task["support_y"], y_pred, losses)
        return loss + l2 / 2 * tf.add_n([tf.reduce_sum(h ** 2) for h in head])

    head = inner_loop.gradient_descent(
        loss_fn, [params[p] for p in positions], learner.inner_steps, learner.step_size,
        create_graph=create_graph)
    return with_head(head)


def reference_meta_loss(learner, params, episode, l2=0.0):
    """Mean over tasks of the query loss after head-only adaptation."""
    non_trainable = _tensors(learner.model.non_trainable_variables)
    losses = []
    for t in range(episode["support_x"].shape[0]):
        task = _task(episode, t)
        fast = reference_adapted(learner, params, task, l2)
        losses.append(learner.query_loss(fast, non_trainable, task, True)[0])
    return tf.add_n(losses) / len(losses)


check_against_finite_differences = helpers.assert_matches_finite_differences


def second_order_check(learner, episode, l2=0.0):
    """The applied meta-gradient = autodiff of the reference = finite differences."""
    params = _tensors(learner.model.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = reference_meta_loss(learner, params, episode, l2)
    autodiff = [np.array(g) for g in tape.gradient(loss, params)]
    applied = helpers.meta_gradient_by_update(learner, episode)  # SGD(1): the gradient
    for a, b in zip(applied, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # The body's gradient is not zero: the outer loop reaches it.
    head = set(_head_positions(learner))
    assert max(np.abs(g).max() for i, g in enumerate(applied) if i not in head) > 1e-4
    check_against_finite_differences(
        lambda p: reference_meta_loss(learner, p, episode, l2), params, autodiff)


def _regression_learner(**kwargs):
    learner = km.ANIL(helpers.tanh_mlp(seed=1), **kwargs)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return learner


def _convnet_learner(**kwargs):
    learner = km.ANIL(helpers.small_convnet(seed=2), **kwargs)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sce())
    return learner


# ----------------------------------------------------------------------
# Meta-gradients against finite differences (float64).


@pytest.mark.parametrize("task_execution", [
    "vectorized", pytest.param("sequential", marks=pytest.mark.large)])  # agreement tested below
def test_second_order_meta_gradient_matches_finite_differences(float64, task_execution):
    episode = helpers.regression_episode(meta_batch=3, k=6, q=5, features=2, seed=1)
    learner = _regression_learner(inner_learning_rate=0.3, inner_steps=3,
                                  task_execution=task_execution)
    second_order_check(learner, episode)


def test_two_layer_head_with_l2_matches_finite_differences(float64):
    # A nonlinear two-layer head and the (lambda/2)||w||^2 inner penalty.
    episode = helpers.regression_episode(meta_batch=2, k=6, q=5, features=2, seed=2)
    learner = _regression_learner(head=2, inner_learning_rate=0.2, inner_steps=3,
                                  head_l2_regularization=0.7)
    second_order_check(learner, episode, l2=0.7)


@pytest.mark.parametrize("transductive", [True, False])
def test_second_order_with_batch_norm_body_matches_finite_differences(float64, transductive):
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=2)
    learner = _convnet_learner(inner_learning_rate=0.4, inner_steps=3,
                               transductive_batch_norm=transductive, head_l2_regularization=0.1)
    second_order_check(learner, episode, l2=0.1)


@pytest.mark.parametrize("transductive", [True, False])
def test_first_order_meta_gradient_matches_finite_differences(float64, transductive):
    """First order: the adapted head is a constant shift of the head weights.

    The meta-gradient is the gradient of f(theta) = L_query(body theta_b,
    head phi* + theta_h - theta_h0), phi* the head adapted at theta_0: the
    head's part is the query gradient at phi*, the body's reaches it through
    the query features (and, in support-statistics mode, the support moments
    that normalise them) only.
    """
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=5)
    learner = _convnet_learner(inner_learning_rate=0.4, inner_steps=2, first_order=True,
                               transductive_batch_norm=transductive, head_l2_regularization=0.2)
    params0 = _tensors(learner.model.trainable_variables)
    non_trainable = _tensors(learner.model.non_trainable_variables)
    positions = _head_positions(learner)
    tasks = [_task(episode, t) for t in range(2)]
    adapted = [reference_adapted(learner, params0, task, 0.2, create_graph=False) for task in tasks]
    shift = [fast[p] - params0[p] for fast in adapted for p in positions]  # constants
    shift = [shift[i * len(positions):(i + 1) * len(positions)] for i in range(len(tasks))]

    def f(params):
        losses = []
        for task, task_shift in zip(tasks, shift):
            full = list(params)
            for p, delta in zip(positions, task_shift):
                full[p] = params[p] + delta
            losses.append(learner.query_loss(full, non_trainable, task, True)[0])
        return tf.add_n(losses) / len(losses)

    with tf.GradientTape() as tape:
        tape.watch(params0)
        loss = f(params0)
    autodiff = [np.array(g) for g in tape.gradient(loss, params0)]
    applied = helpers.meta_gradient_by_update(learner, episode)
    for a, b in zip(applied, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    check_against_finite_differences(f, params0, autodiff)


@pytest.mark.large
def test_first_order_differs_from_second_order_in_the_body(float64):
    episode = helpers.regression_episode(meta_batch=2, seed=5)
    grads = {}
    for first_order in (False, True):
        learner = _regression_learner(inner_learning_rate=0.5, inner_steps=2,
                                      first_order=first_order)
        grads[first_order] = helpers.meta_gradient_by_update(learner, episode)
    difference = max(np.max(np.abs(a - b)) for a, b in zip(grads[False], grads[True]))
    assert difference > 1e-4


def test_head_l2_regularization_is_half_lambda_squared_norm(float64):
    """One inner step with lambda moves the head by -alpha*lambda*w more."""
    episode = helpers.regression_episode(meta_batch=1, seed=7)
    x, y = episode["support_x"][0], episode["support_y"][0]
    plain = _regression_learner(inner_learning_rate=0.3)
    penalised = _regression_learner(inner_learning_rate=0.3, head_l2_regularization=0.5)
    params = _tensors(plain.model.trainable_variables)
    non_trainable = _tensors(plain.model.non_trainable_variables)
    a = plain.adapt_parameters(params, non_trainable, x, y, 1, True, False)
    b = penalised.adapt_parameters(params, non_trainable, x, y, 1, True, False)
    head = set(_head_positions(plain))
    for i, (p, pa, pb) in enumerate(zip(params, a, b)):
        expected = -0.3 * 0.5 * np.array(p) if i in head else 0.0
        np.testing.assert_allclose(np.array(pb) - np.array(pa), expected + 0 * np.array(p),
                                   rtol=1e-12, atol=1e-15)
    # support_loss at full weights carries the same penalty.
    difference = (penalised.support_loss(params, non_trainable, x, y, True)
                  - plain.support_loss(params, non_trainable, x, y, True))
    expected = 0.25 * sum(float(np.sum(np.array(params[i]) ** 2)) for i in head)
    assert float(difference) == pytest.approx(expected, rel=1e-12)


def test_vectorized_and_sequential_agree(float64):
    episode = helpers.classification_episode(meta_batch=3, seed=8)
    grads, logs = [], []
    for task_execution in ("vectorized", "sequential"):
        learner = _convnet_learner(inner_learning_rate=0.3, inner_steps=2,
                                   task_execution=task_execution)
        grads.append(helpers.meta_gradient_by_update(learner, episode))
        logs.append(learner.evaluate(episode, verbose=0, return_dict=True))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert logs[0] == pytest.approx(logs[1], rel=1e-10)


# ----------------------------------------------------------------------
# A body without trainable weights: ANIL is MAML.


def frozen_mlp(seed=4):
    model = helpers.tanh_mlp(seed=seed)
    for layer in model.layers[:-1]:
        layer.trainable = False
    return model


def fixed_feature_convnet(n_way=3, shape=(6, 6, 1), seed=0):
    """A conv body with no trainable weights but live BatchNorm statistics."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same", trainable=False)(inputs)
    h = keras.layers.BatchNormalization(center=False, scale=False)(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(n_way)(h)
    return keras.Model(inputs, outputs)


def _outputs(learner, episode, task=0):
    """Meta-gradient, evaluate logs, predictions, evaluate_tasks, adapt()."""
    curve = learner.evaluate_tasks(episode, steps=[0, 1, 3])
    adapted = learner.adapt(episode["support_x"][task], episode["support_y"][task])
    return [
        helpers.meta_gradient_by_update(learner, episode),
        learner.evaluate(episode, verbose=0, return_dict=True),
        np.array(learner(episode)),
        curve["loss"],
        curve["predictions"],
        np.array(adapted(episode["query_x"][task], training=False)),
    ]


def _assert_same(results_a, results_b):
    for a, b in zip(results_a, results_b):
        if isinstance(a, dict):
            assert a == pytest.approx(b, rel=1e-10)
        elif isinstance(a, list):
            for x, y in zip(a, b):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_frozen_body_anil_equals_maml(float64):
    episode = helpers.regression_episode(meta_batch=3, seed=9)
    results = []
    for cls in (km.ANIL, km.MAML):
        learner = cls(frozen_mlp(), inner_learning_rate=0.3, inner_steps=3, eval_inner_steps=4)
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        assert len(learner.model.trainable_variables) == 2  # the head only
        results.append(_outputs(learner, episode))
    _assert_same(*results)


def test_frozen_body_first_order_anil_equals_fomaml(float64):
    episode = helpers.regression_episode(meta_batch=3, seed=10)
    grads = []
    for cls in (km.ANIL, km.MAML):
        learner = cls(frozen_mlp(), inner_learning_rate=0.3, inner_steps=3, first_order=True,
                      task_execution="sequential")
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        grads.append(helpers.meta_gradient_by_update(learner, episode))
    _assert_same(*grads)


@pytest.mark.parametrize("transductive", [True, False])
def test_batch_norm_body_without_weights_anil_equals_maml(float64, transductive):
    """BatchNorm conventions (support/query statistics) match MAML's."""
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=6)
    results = []
    for cls in (km.ANIL, km.MAML):
        learner = cls(fixed_feature_convnet(seed=3), inner_learning_rate=0.5, inner_steps=2,
                      transductive_batch_norm=transductive)
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sce())
        results.append(_outputs(learner, episode, task=1))
    _assert_same(*results)


# ----------------------------------------------------------------------
# The body runs once per task, whatever the number of inner steps.


def _count_calls(layer):
    calls = []
    call = layer.call

    def counting_call(*args, **kwargs):
        calls.append(1)  # Python side effect: counts eager calls and traces
        return call(*args, **kwargs)

    layer.call = counting_call
    return calls


@pytest.mark.parametrize("transductive, first_order", [(True, False), (False, True)])
def test_body_runs_once_per_task_whatever_the_inner_steps(transductive, first_order):
    episode = helpers.classification_episode(meta_batch=2, dtype="float32")
    task = _task(episode, 0)
    for steps in (1, 4):
        model = helpers.small_convnet(seed=1)
        body_calls = _count_calls(model.layers[1])  # the first convolution
        head_calls = _count_calls(model.layers[-1])  # the dense head
        learner = km.ANIL(model, inner_learning_rate=0.3, inner_steps=steps,
                          first_order=first_order, transductive_batch_norm=transductive)
        learner.compile(optimizer="sgd", loss=_sce())
        params = _tensors(model.trainable_variables)
        non_trainable = _tensors(model.non_trainable_variables)
        # Eagerly, one task: support and query features; the head at every
        # inner step and on the query set.
        learner.task_train(params, non_trainable, task)
        assert (len(body_calls), len(head_calls)) == (2, steps + 1)
        del body_calls[:]
        learner.task_evaluate(params, non_trainable, task, steps=3)
        learner.task_predict(params, non_trainable, task, steps=3)
        assert len(body_calls) == 4
        del body_calls[:]
    # The vectorized train step and evaluate_tasks trace the task function once.
    learner.train_on_batch(episode)
    assert len(body_calls) == 2
    del body_calls[:]
    learner.evaluate_tasks(episode, steps=[0, 1, 2, 5])
    assert len(body_calls) == 2


def test_maml_reruns_the_body_every_step():
    """The contrast: MAML calls the whole network at every inner step."""
    episode = helpers.classification_episode(meta_batch=2, dtype="float32")
    model = helpers.small_convnet(seed=1)
    body_calls = _count_calls(model.layers[1])
    learner = km.MAML(model, inner_learning_rate=0.3, inner_steps=4)
    learner.compile(optimizer="sgd", loss=_sce())
    learner.task_train(_tensors(model.trainable_variables),
                       _tensors(model.non_trainable_variables), _task(episode, 0))
    assert len(body_calls) == 5


# ----------------------------------------------------------------------
# Head designation.


def test_head_designations_agree():
    model = helpers.tanh_mlp(seed=2)
    last, second = model.layers[-1].name, model.layers[-2].name
    for head in (None, 1, last, [last]):
        learner = km.ANIL(model, head=head)
        assert [id(v) for v in learner.head_model.trainable_variables] == [
            id(v) for v in model.layers[-1].trainable_variables]
        assert [id(v) for v in learner.body_model.trainable_variables] == [
            id(v) for layer in model.layers[:-1] for v in layer.trainable_variables]
    two = km.ANIL(model, head=[second, last])
    assert [id(v) for v in two.head_model.trainable_variables] == [
        id(v) for layer in model.layers[-2:] for v in layer.trainable_variables]
    assert km.ANIL(model, head=2).get_config()["head"] == 2
    assert two.get_config()["head"] == [second, last]
    # Functional models: conv4's last layer is named "head".
    conv4 = km.models.conv4(5, filters=4, seed=0)
    learner = km.ANIL(conv4, head="head")
    assert learner.head_model.output_shape == (None, 5)
    assert learner.body_model.output_shape == (None, 2 * 2 * 4)


def test_body_head_pair(float64, tmp_path):
    episode = helpers.classification_episode(meta_batch=2, n_way=3, seed=4)
    whole = helpers.small_convnet(seed=6)
    body = keras.Model(whole.inputs, whole.layers[-2].output, name="features")
    head = keras.Sequential([keras.Input((27,)), whole.layers[-1]], name="classifier")
    # The pair shares the weights of `whole`: ANIL on it is ANIL on `whole`.
    learners = [km.ANIL((body, head), inner_learning_rate=0.4, inner_steps=2),
                km.ANIL(whole, inner_learning_rate=0.4, inner_steps=2)]
    outputs = []
    for learner in learners:
        learner.compile(optimizer=keras.optimizers.SGD(0.0), loss=_sce())
        outputs.append((helpers.meta_gradient_by_update(learner, episode),
                        learner.predict(episode, verbose=0)))
    for a, b in zip(outputs[0][0], outputs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-10)
    pair = learners[0]
    assert isinstance(pair.model, keras.Sequential) and pair.head == 1
    clone = km.ANIL.from_config(pair.get_config())
    assert clone.get_config() == pair.get_config()
    # adapt(): one standalone model, body and adapted head, saved and reloaded.
    adapted = pair.adapt(episode["support_x"][0], episode["support_y"][0])
    path = str(tmp_path / "adapted.keras")
    adapted.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(episode["query_x"][0], verbose=0),
                               adapted.predict(episode["query_x"][0], verbose=0), rtol=1e-12)


def test_head_that_branches_internally_is_fed_by_one_tensor(float64):
    inputs = keras.Input((2,))
    features = keras.layers.Dense(4, activation="tanh", name="body")(inputs)
    a = keras.layers.Dense(3, activation="tanh", name="head_a")(features)
    b = keras.layers.Dense(3, name="head_b")(features)
    h = keras.layers.Add(name="head_add")([a, b])
    outputs = keras.layers.Dense(1, name="head_out")(h)
    model = keras.Model(inputs, outputs, name="branching_head")
    learner = km.ANIL(model, head=["head_a", "head_b", "head_add", "head_out"],
                      inner_learning_rate=0.2, inner_steps=2)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    assert len(learner.head_model.trainable_variables) == 6
    second_order_check(learner, helpers.regression_episode(meta_batch=2, seed=11))


@keras.saving.register_keras_serializable(package="keras_meta_tests")
class SubclassedBody(keras.Model):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, activation="tanh")

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_body_qualifies_as_a_pair(float64):
    episode = helpers.regression_episode(meta_batch=2, seed=6)
    body = SubclassedBody(name="sub_body")
    body(np.zeros((1, 2)))
    head = keras.layers.Dense(1, name="sub_head")
    head.build((None, 4))
    learner = km.ANIL((body, head), inner_learning_rate=0.3, inner_steps=2)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    second_order_check(learner, episode)
    adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0])
    fast = learner.adapt_parameters(_tensors(learner.model.trainable_variables), [],
                                    episode["support_x"][0], episode["support_y"][0], 2, False, False)
    expected = learner.model.stateless_call(fast, [], episode["query_x"][0])[0]
    np.testing.assert_allclose(adapted.predict(episode["query_x"][0], verbose=0), expected, rtol=1e-12)


def _branching_model():
    inputs = keras.Input((3,))
    a = keras.layers.Dense(2, name="branch_a")(inputs)
    b = keras.layers.Dense(2, name="branch_b")(inputs)
    h = keras.layers.Concatenate(name="merge")([a, b])
    outputs = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inputs, outputs, name="branching")


def _shared_output_layer_model():
    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3, name="shared")
    h = shared(inputs)
    h = keras.layers.Dense(3, name="middle")(h)
    return keras.Model(inputs, shared(h), name="shared_model")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.a = keras.layers.Dense(3)
        self.b = keras.layers.Dense(1)

    def call(self, x):
        return self.b(self.a(x))


def _built(model):
    model(np.zeros((1, 3), "float32"))
    return model


@pytest.mark.parametrize("model_fn, head, error, match", [
    (lambda: km.models.mlp(), 0, ValueError, r"must be between 1 and 2 .* Received: head=0"),
    (lambda: km.models.mlp(), 3, ValueError, r"must be between 1 and 2 for model 'mlp', which has 3 layers"),
    (lambda: km.models.mlp(), True, ValueError, r"`head` must be an int .* Received: head=True"),
    (lambda: km.models.mlp(), 1.0, ValueError, r"`head` must be an int .* Received: head=1.0"),
    (lambda: km.models.mlp(), [], ValueError, r"`head` must be an int .* Received: head=\[\]"),
    (lambda: km.models.mlp(), "nope", ValueError,
     r"names layer\(s\) \['nope'\] that model 'mlp' does not have. Its layers: \['dense_0'"),
    (lambda: km.models.mlp(), ["output", "output"], ValueError, r"names layer\(s\) \['output'\] more than once"),
    (lambda: km.models.mlp(), "dense_1", ValueError,
     r"must end at the model's output, which layer 'output' of model 'mlp' produces; "
     r"head='dense_1' does not include it"),
    (lambda: km.models.mlp(), ["dense_0", "output"], ValueError,
     r"Layer\(s\) \['dense_0'\] of head=.* do not feed the model's output"),
    (lambda: km.models.mlp(), ["dense_0", "dense_1", "output"], ValueError, r"leaves no body"),
    (_branching_model, ["merge", "out"], ValueError,
     r"fed by a single tensor .* takes 2 tensors from the rest of model 'branching' "
     r"\(from layer\(s\) \['branch_a', 'branch_b'\]\)"),
    (_shared_output_layer_model, "shared", ValueError, r"\['shared'\] of head='shared' are also used by the body"),
    (lambda: _built(Subclassed()), None, ValueError,
     r"model 'subclassed' \(a subclassed Subclassed\) does not expose.*model=\(body, head\)"),
    (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Activation("relu")]),
     1, ValueError, r"has no trainable weights: ANIL adapts the head"),
])
def test_bad_head_designations(model_fn, head, error, match):
    with pytest.raises(error, match=match):
        km.ANIL(model_fn(), head=head)


def test_bad_pairs_and_arguments():
    body, head = km.models.mlp(), keras.layers.Dense(1)
    head.build((None, 1))
    with pytest.raises(ValueError, match=r"`head` must be None when `model` is a \(body, head\) pair"):
        km.ANIL((body, head), head=1)
    with pytest.raises(TypeError, match=r"The head of the \(body, head\) pair must be a built `keras.Model` or layer"):
        km.ANIL((body, "dense"))
    with pytest.raises(ValueError, match=r"The head of the \(body, head\) pair must be built"):
        km.ANIL((body, keras.layers.Dense(1, name="unbuilt")))
    with pytest.raises(ValueError, match=r"must be the pair \(body, head\). Received: a tuple of length 3"):
        km.ANIL((body, head, head))
    with pytest.raises(ValueError, match="`head_l2_regularization` must be a non-negative number. "
                                         "Received: head_l2_regularization=-0.1"):
        km.ANIL(km.models.mlp(), head_l2_regularization=-0.1)
    inputs = keras.Input((2,))
    two_outputs = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)])
    with pytest.raises(ValueError, match="one input and one output. Received: model .* with 1 inputs and 2 outputs"):
        km.ANIL(two_outputs)


def test_config_carries_every_argument():
    learner = km.ANIL(km.models.mlp(seed=0), head=["dense_1", "output"], inner_learning_rate=0.2,
                      inner_steps=4, first_order=True, head_l2_regularization=0.3,
                      eval_inner_steps=7, inner_learning_rate_scaling="inverse_steps",
                      transductive_batch_norm=False, task_execution="sequential")
    config = learner.get_config()
    assert {k: config[k] for k in ("head", "inner_learning_rate", "inner_steps", "first_order",
                                   "head_l2_regularization", "eval_inner_steps",
                                   "inner_learning_rate_scaling", "transductive_batch_norm",
                                   "task_execution")} == {
        "head": ["dense_1", "output"], "inner_learning_rate": 0.2, "inner_steps": 4,
        "first_order": True, "head_l2_regularization": 0.3, "eval_inner_steps": 7,
        "inner_learning_rate_scaling": "inverse_steps", "transductive_batch_norm": False,
        "task_execution": "sequential"}
    clone = km.ANIL.from_config(config)
    assert clone.get_config() == config
    assert km.ANIL(helpers.small_convnet(), task_execution="auto").resolved_task_execution == "sequential"
    assert keras.saving.get_registered_name(km.ANIL) == "keras_meta>ANIL"


def test_auto_task_execution_is_task_by_task_for_conv_bodies(monkeypatch):
    """Conv bodies: task by task whatever the thread pools; dense: vectorized."""
    threading = tf.config.threading
    for threads in (0, 1):
        monkeypatch.setattr(threading, "get_intra_op_parallelism_threads", lambda: threads)
        assert km.ANIL(helpers.small_convnet()).resolved_task_execution == "sequential"
        assert km.ANIL(helpers.tanh_mlp()).resolved_task_execution == "vectorized"
        assert km.ANIL(helpers.small_convnet(), task_execution="vectorized"
                       ).resolved_task_execution == "vectorized"


def test_support_statistics_adapted_model_equals_learner_predictions(float64):
    episode = helpers.classification_episode(meta_batch=2, seed=9)
    learner = _convnet_learner(inner_learning_rate=0.5, inner_steps=1, eval_inner_steps=3,
                               transductive_batch_norm=False)
    learner.train_on_batch(episode)
    predictions = learner.predict(episode, verbose=0).reshape(2, -1, 3)
    for t in range(2):
        adapted = learner.adapt(episode["support_x"][t], episode["support_y"][t])
        np.testing.assert_allclose(adapted.predict(episode["query_x"][t], verbose=0),
                                   predictions[t], rtol=1e-10, atol=1e-12)
