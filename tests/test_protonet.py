"""ProtoNet and Proto-MAML: logits against numpy, gradients in float64, the standalone model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import testing
from tests import helpers


def _embedding(features=4, units=5, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(units, activation="tanh"),
                             keras.layers.Dense(units)])


def _episode(meta_batch=2, n_way=3, k=2, q=3, seed=0, dtype="float64"):
    """Flat features; support labels shuffled (not sorted by class)."""
    episode = helpers.classification_episode(meta_batch, n_way, k, q, shape=(4,), seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for t in range(meta_batch):
        order = rng.permutation(n_way * k)
        episode["support_x"][t] = episode["support_x"][t][order]
        episode["support_y"][t] = episode["support_y"][t][order]
    return episode


def _reference_logits(embed, episode, distance):
    """numpy: -||f(q) - c_k||^2 (or -(1 - cos)), c_k the class means of f(support)."""
    out = []
    for t in range(len(episode["support_x"])):
        support, query = embed(episode["support_x"][t]), embed(episode["query_x"][t])
        labels = episode["support_y"][t]
        centres = np.stack([support[labels == k].mean(axis=0) for k in range(labels.max() + 1)])
        if distance == "cosine":
            unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
            out.append(unit(query) @ unit(centres).T - 1)
        else:
            out.append(-((query[:, None, :] - centres[None]) ** 2).sum(-1))
    return np.concatenate(out)


def _protonet(model, **kwargs):
    learner = km.ProtoNet(model, **kwargs)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce(), metrics=["accuracy"],
                    run_eagerly=True)
    return learner


@pytest.mark.parametrize("distance, n_way", [("squared_euclidean", None), ("cosine", 3)])
def test_logits_equal_the_numpy_reference(float64, distance, n_way):
    model = _embedding()
    learner = _protonet(model, distance=distance, n_way=n_way)
    episode = _episode()
    expected = _reference_logits(lambda x: np.array(model(x)), episode, distance)
    np.testing.assert_allclose(learner.predict(episode, verbose=0), expected, rtol=1e-10, atol=1e-12)


def test_meta_gradient_matches_finite_differences_of_the_reference_loss(float64):
    model = _embedding(seed=1)
    learner = _protonet(model)
    episode = _episode(seed=1)
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]

    def loss(p):  # mean over tasks of the query cross-entropy, written with broadcasting
        total = 0.0
        for t in range(2):
            embed = lambda x: model.stateless_call(p, [], x)[0]  # noqa: E731
            support, query = embed(episode["support_x"][t]), embed(episode["query_x"][t])
            labels = episode["support_y"][t]
            centres = tf.stack([tf.reduce_mean(tf.boolean_mask(support, labels == k), 0) for k in range(3)])
            logits = -tf.reduce_sum((query[:, None] - centres[None]) ** 2, -1)
            total += tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                episode["query_y"][t], logits))
        return total / 2

    applied = helpers.meta_gradient_by_update(learner, episode)
    assert max(np.abs(g).max() for g in applied) > 1e-3
    helpers.assert_matches_finite_differences(loss, params, applied, directions=3, rtol=1e-6)


def test_any_number_of_ways_and_one_hot_labels(float64):
    """Trained on 3-way tasks, it scores 5-way ones; one-hot labels give the same logits."""
    model = _embedding(seed=2)
    learner = _protonet(model)
    learner.fit(_episode(seed=2), epochs=1, verbose=0)
    five = _episode(meta_batch=1, n_way=5, k=1, q=2, seed=3)
    expected = _reference_logits(lambda x: np.array(model(x)), five, "squared_euclidean")
    logs = learner.evaluate(five, verbose=0, return_dict=True)
    np.testing.assert_allclose(learner.predict(five, verbose=0), expected, rtol=1e-10)
    assert logs["loss"] == pytest.approx(logs["pre_adaptation_loss"])  # nothing adapts
    one_hot = dict(five, support_y=np.eye(5)[five["support_y"]], query_y=np.eye(5)[five["query_y"]])
    categorical = km.ProtoNet(model)
    categorical.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True), run_eagerly=True)
    np.testing.assert_allclose(categorical.predict(one_hot, verbose=0), expected, rtol=1e-10)


def test_adapted_model_serves_without_keras_meta(tmp_path):
    """adapt(): Keras layers only; the .keras file, its SavedModel and export_adaptive serve alone."""
    model = _embedding(seed=4)
    learner = _protonet(model)
    episode = _episode(meta_batch=1, n_way=4, k=2, q=3, seed=4, dtype="float32")
    task = {k: v[0] for k, v in episode.items()}
    adapted = learner.adapt(task["support_x"], task["support_y"])
    assert not any("keras_meta" in type(layer).__module__ for layer in adapted.layers)
    expected = learner.predict(episode, verbose=0)
    np.testing.assert_allclose(adapted.predict(task["query_x"], verbose=0), expected, rtol=1e-5, atol=1e-6)
    adapted.save(tmp_path / "adapted.keras")
    adapted.export(str(tmp_path / "adapted"), verbose=False)
    km.export_adaptive(learner, str(tmp_path / "adaptive"))
    np.savez(tmp_path / "task.npz", **task)
    testing.run_without_keras_meta(
        "import keras, numpy as np, tensorflow as tf\n"
        f"root = {str(tmp_path)!r}\n"
        "task = np.load(root + '/task.npz')\n"
        "keras_file = keras.saving.load_model(root + '/adapted.keras')\n"
        "served, adaptive = tf.saved_model.load(root + '/adapted'), tf.saved_model.load(root + '/adaptive')\n"
        "np.savez(root + '/out.npz', keras_file=keras_file.predict(task['query_x'], verbose=0),\n"
        "         served=served.serve(task['query_x']).numpy(),\n"
        "         adaptive=adaptive.adapt_and_predict(task['support_x'], task['support_y'].astype('int32'),\n"
        "                                             task['query_x']).numpy())\n",
        timeout=300,
    )
    out = np.load(tmp_path / "out.npz")
    for key in ("keras_file", "served", "adaptive"):
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_and_episodes():
    with pytest.raises(ValueError, match=r"`distance` must be one of \['squared_euclidean', 'cosine'\]"):
        km.ProtoNet(_embedding(), distance="manhattan")
    with pytest.raises(ValueError, match=r"`n_way` must be a positive integer"):
        km.ProtoNet(_embedding(), n_way=0)
    learner = km.ProtoNet(_embedding())
    with pytest.raises(ValueError, match=r"`n_way=None` .* pass `n_way=`"):
        learner.compile(loss=helpers.sparse_ce(), jit_compile=True)
    learner.compile(loss=helpers.sparse_ce())
    episode = _episode(dtype="float32")
    episode["support_y"][1] = np.where(episode["support_y"][1] == 1, 2, episode["support_y"][1])
    with pytest.raises(ValueError, match=r"task 1 has no support example of class\(es\) \[1\]"):
        learner.evaluate(episode, verbose=0)
    with pytest.raises(ValueError, match=r"no support example of class\(es\) \[1\]"):
        learner.adapt(episode["support_x"][1], episode["support_y"][1])
    config = km.ProtoNet(_embedding(), distance="cosine", n_way=3).get_config()
    assert config["distance"] == "cosine" and config["n_way"] == 3 and "model" not in config
    assert km.ProtoNet.from_config(config).get_config() == config


# ----------------------------------------------------------------------
# Proto-MAML: the head set from the prototypes before the inner loop.


def _classifier(seed=5, features=4, units=5, n_way=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(units, activation="tanh"),
                             keras.layers.Dense(n_way, name="logits")])


def _start(learner, task):
    params = [tf.convert_to_tensor(v) for v in learner.model.trainable_variables]
    adaptation = learner.adaptation(training=False)
    return adaptation.start(params, [], {k: tf.convert_to_tensor(v) for k, v in task.items()})


@pytest.mark.parametrize("cls, head", [(km.MAML, None), (km.ANIL, 1), (km.ANIL, 2)])
def test_initial_head_is_twice_the_prototypes_and_minus_their_squared_norms(float64, cls, head):
    """MAML: the features of the layers before the last; ANIL: its cached body features, or
    (a head of two layers) the features feeding the head's last layer."""
    model = _classifier()
    if head == 2:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    kwargs = {} if head is None else {"head": head}
    learner = cls(model, inner_learning_rate=0.1, head_initialization="prototypes", **kwargs)
    learner.compile(loss=helpers.sparse_ce())
    task = {k: v[0] for k, v in _episode(seed=6).items()}
    features = keras.Model(model.inputs[0], model.layers[-2].output)(task["support_x"]).numpy()
    centres = np.stack([features[task["support_y"] == k].mean(0) for k in range(3)])
    kernel, bias = _start(learner, task).fast[-2:]
    np.testing.assert_allclose(np.array(kernel), 2 * centres.T, rtol=1e-12)
    np.testing.assert_allclose(np.array(bias), -(centres**2).sum(-1), rtol=1e-12)


def test_unadapted_proto_maml_is_protonet_on_the_body(float64):
    """Before any inner step, the same softmax as ProtoNet on the features: the same loss."""
    model = _classifier(seed=7)
    episode = _episode(seed=7)
    maml = km.MAML(model, inner_learning_rate=0.1, head_initialization="prototypes")
    maml.compile(loss=helpers.sparse_ce(), run_eagerly=True)
    body = keras.Sequential([keras.Input((4,)), model.layers[0]])
    protonet = _protonet(body)
    pre = maml.evaluate(episode, verbose=0, return_dict=True)["pre_adaptation_loss"]
    assert pre == pytest.approx(protonet.evaluate(episode, verbose=0, return_dict=True)["loss"], rel=1e-10)


@pytest.mark.parametrize("cls", [km.MAML, km.ANIL])
def test_second_order_flows_through_the_initialisation(float64, cls):
    model = _classifier(seed=8)
    learner = cls(model, inner_learning_rate=0.3, inner_steps=2, head_initialization="prototypes",
                  task_execution="sequential")
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce(), run_eagerly=True)
    episode = _episode(seed=8)
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    applied = helpers.meta_gradient_by_update(learner, episode)
    # The meta-learned head is replaced in every task: no gradient reaches it.
    assert np.all(applied[2] == 0) and np.all(applied[3] == 0)
    helpers.assert_matches_finite_differences(
        lambda p: helpers.meta_loss(learner, p, episode), params, applied, directions=3, rtol=1e-6)


def test_first_order_stops_the_initialisation(float64):
    """First order: the body's gradient is the query gradient at the adapted weights."""
    model = _classifier(seed=9)
    learner = km.MAML(model, inner_learning_rate=0.3, inner_steps=2, first_order=True,
                      head_initialization="prototypes", task_execution="sequential")
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce(), run_eagerly=True)
    episode = _episode(seed=9)
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    expected = []
    for t in range(2):
        task = {k: tf.convert_to_tensor(v[t]) for k, v in episode.items()}
        fast = learner.adapt_parameters(params, [], task["support_x"], task["support_y"], 2,
                                        training=True, create_graph=False)
        fast = [tf.convert_to_tensor(np.array(f)) for f in fast]
        with tf.GradientTape() as tape:
            tape.watch(fast)
            loss, _ = learner.query_loss(fast, [], task, True)
        expected.append([np.array(g) for g in tape.gradient(loss, fast)])
    applied = helpers.meta_gradient_by_update(learner, episode)
    for i in range(2):
        np.testing.assert_allclose(applied[i], np.mean([e[i] for e in expected], 0), rtol=1e-10, atol=1e-14)
    assert np.all(applied[2] == 0) and np.all(applied[3] == 0)


def test_head_initialization_errors_and_config():
    with pytest.raises(ValueError, match=r"`head_initialization` must be one of \[None, 'prototypes'\]"):
        km.MAML(_classifier(), head_initialization="zeros")
    relu_head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
    with pytest.raises(ValueError, match=r"last layer is a trainable `keras.layers.Dense` with a bias"):
        km.MAML(relu_head, head_initialization="prototypes")
    learner = km.ANIL(_classifier(), head_initialization="prototypes")
    config = learner.get_config()
    assert config["head_initialization"] == "prototypes"
    assert km.ANIL.from_config(config).get_config() == config
