"""Bad inputs to the learners' Python API: each gives a clear error (asserted).

One case per way a user gets it wrong: constructor arguments, compile, the
episodes given to `fit`/`evaluate`/`predict`/`evaluate_tasks`/`adapt`, class
labels (also under `jit_compile`, where XLA drops TensorFlow's range check),
target shapes, non-finite data, diverging inner loops, and saving or
exporting non-finite weights. The data sources' cases are in
`test_bad_inputs_data.py`, the command line's in `test_cli_edges.py`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests.helpers import classification_episode, regression_episode, small_convnet, sparse_ce, tanh_mlp

SPARSE = sparse_ce()


def dense_classifier(n_way=3, features=4):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(n_way)])


def compiled(learner, loss=SPARSE, jit_compile=False, optimizer=None):
    learner.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit_compile
    )
    return learner


def classification(n_way=3, shift=0, meta_batch=2, features=4):
    episode = classification_episode(
        meta_batch=meta_batch, n_way=n_way, shape=(features,), dtype="float32"
    )
    episode["query_y"] = episode["query_y"] + shift
    return episode


def regression():
    return regression_episode(dtype="float32")


def dataset(*episodes):
    return tf.data.Dataset.from_tensor_slices(
        {key: np.stack([e[key] for e in episodes]) for key in episodes[0]}
    )


def weights(model):
    return [np.array(v) for v in model.weights]


# ----------------------------------------------------------------------
# Constructor arguments: errors at construction, not inside `fit`.

CONSTRUCTOR_CASES = [
    # (learner, kwargs, message)
    ("MAML", dict(first_order="False"), r"`first_order` must be True or False\. Received: first_order='False'"),
    ("MAML", dict(first_order=1), r"`first_order` must be True or False\. Received: first_order=1"),
    ("MAML", dict(transductive_batch_norm="no"), r"`transductive_batch_norm` must be True or False"),
    ("MAML", dict(inner_learning_rate=tf.constant(0.1)), r"`inner_learning_rate` must be a positive number\. Received: inner_learning_rate=<tf\.Tensor"),
    ("MAML", dict(inner_learning_rate=0.0), r"`inner_learning_rate` must be a positive number\. Received: inner_learning_rate=0\.0"),
    ("MAML", dict(inner_learning_rate=float("nan")), r"`inner_learning_rate` must be a positive number\. Received: inner_learning_rate=nan"),
    ("MAML", dict(inner_learning_rate="0.1"), r"`inner_learning_rate` must be a positive number\. Received: inner_learning_rate='0\.1'"),
    ("MAML", dict(inner_steps=tf.constant(2)), r"`inner_steps` must be a positive integer\. Received: inner_steps=<tf\.Tensor"),
    ("MAML", dict(inner_steps=0), r"`inner_steps` must be a positive integer\. Received: inner_steps=0"),
    ("MAML", dict(inner_steps=1.5), r"`inner_steps` must be a positive integer\. Received: inner_steps=1\.5"),
    ("MAML", dict(inner_steps=True), r"`inner_steps` must be a positive integer\. Received: inner_steps=True"),
    ("MAML", dict(eval_inner_steps=-1), r"`eval_inner_steps` must be a positive integer\. Received: eval_inner_steps=-1"),
    ("MAML", dict(task_execution="parallel"), r"`task_execution` must be one of \['auto', 'vectorized', 'sequential'\]\. Received: task_execution='parallel'"),
    ("MAML", dict(inner_learning_rate_scaling="linear"), r"`inner_learning_rate_scaling` must be one of \[None, 'inverse_steps'\]"),
    ("ANIL", dict(first_order="False"), r"`first_order` must be True or False"),
    ("ANIL", dict(head_l2_regularization=-1.0), r"`head_l2_regularization` must be a non-negative number\. Received: head_l2_regularization=-1\.0"),
    ("ANIL", dict(head=0), r"`head` as an int counts the final layers of the model; it must be between 1 and"),
    ("ANIL", dict(head="no_such_layer"), r"`head` names layer\(s\) \['no_such_layer'\] that model"),
    ("IMAML", dict(l2_regularization=0.0), r"`l2_regularization` must be a positive number"),
    ("IMAML", dict(cg_iterations=0), r"`cg_iterations` must be a positive integer"),
    ("IMAML", dict(cg_damping=-0.1), r"`cg_damping` must be a non-negative number\. Received: cg_damping=-0\.1"),
    ("IMAML", dict(proximal_pull_back="True"), r"`proximal_pull_back` must be True or False"),
    ("IMAML", dict(hvp_method="finite_differences"), r"`hvp_method` must be one of"),
    ("IMAML", dict(inner_optimizer={"name": "momentum", "momentum": "0.9"}), r"`momentum` must be a number in \[0, 1\)\. Received: momentum='0\.9'"),
    ("IMAML", dict(inner_optimizer={"name": "adam", "beta_1": 1.5}), r"`beta_1` must be a number in \[0, 1\)\. Received: beta_1=1\.5"),
    ("IMAML", dict(inner_optimizer={"name": "adam", "epsilon": 0}), r"`epsilon` must be a positive number\. Received: epsilon=0"),
    ("IMAML", dict(inner_optimizer={"name": "momentum", "nesterov": "yes"}), r"`nesterov` must be True or False\. Received: nesterov='yes'"),
    ("IMAML", dict(inner_optimizer={"name": "rmsprop"}), r"Unknown inner optimiser 'rmsprop'"),
    ("IMAML", dict(inner_optimizer={"name": "sgd", "momentum": 0.9}), r"Invalid arguments for inner optimiser 'sgd'"),
]


@pytest.mark.parametrize(
    "learner, kwargs, message",
    CONSTRUCTOR_CASES,
    ids=[f"{c[0]}-{next(iter(c[1]))}-{i}" for i, c in enumerate(CONSTRUCTOR_CASES)],
)
def test_constructor_argument(learner, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(km, learner)(tanh_mlp(), **kwargs)


def test_model_that_is_not_a_keras_model():
    with pytest.raises(TypeError, match=r"MAML wraps a `keras\.Model`.*Received: model=.*of type function"):
        km.MAML(lambda x: x)


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"MAML needs a built model.*model\.build\(input_shape\)"):
        km.MAML(model)


def test_model_without_trainable_weights():
    model = tanh_mlp()
    model.trainable = False
    with pytest.raises(ValueError, match=r"needs a model with trainable weights"):
        km.MAML(model)


def test_multi_output_model():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(ValueError, match=r"single-output models.*2 outputs of shapes \[\(None, 1\), \(None, 2\)\]"):
        km.MAML(model)


# ----------------------------------------------------------------------
# Compile.


def test_fit_before_compile():
    learner = km.MAML(tanh_mlp())
    learner.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"MAML needs a loss: call `compile\(optimizer=\.\.\., loss=\.\.\.\)` first"):
        learner.train_on_batch(regression())


def test_one_loss_per_output_dict():
    learner = compiled(km.MAML(tanh_mlp()), loss={"out": "mse"})
    with pytest.raises(ValueError, match=r"keras_meta supports one loss for a single-output model"):
        learner.train_on_batch(regression())


# ----------------------------------------------------------------------
# Episode structure.


def test_episode_missing_a_key():
    episode = regression()
    del episode["query_y"]
    with pytest.raises(ValueError, match=r"Episode is missing key\(s\) \['query_y'\]"):
        compiled(km.MAML(tanh_mlp()), loss="mse").train_on_batch(episode)


def test_episode_that_is_not_a_dict():
    episode = regression()
    with pytest.raises(ValueError, match=r"expects episodes as dicts with keys"):
        compiled(km.MAML(tanh_mlp()), loss="mse").train_on_batch(episode["support_x"])


def test_meta_batch_sizes_differ():
    episode = regression()
    episode["query_x"] = episode["query_x"][:2]
    episode["query_y"] = episode["query_y"][:2]
    with pytest.raises(ValueError, match=r"All episode entries must share the meta-batch size"):
        compiled(km.MAML(tanh_mlp()), loss="mse").train_on_batch(episode)


def test_support_inputs_and_targets_differ_in_count():
    episode = regression()
    episode["support_y"] = episode["support_y"][:, :4]
    with pytest.raises(ValueError, match=r"`support_x` and `support_y` must hold the same number of examples"):
        compiled(km.MAML(tanh_mlp()), loss="mse").fit(dataset(episode), verbose=0)


def test_fit_on_arrays_without_the_meta_batch_axis():
    episode = {key: value[0] for key, value in regression().items()}
    with pytest.raises(ValueError, match=r"Episode entry `support_x` must have shape \[meta_batch, examples\] \+ \(2,\).*The meta-batch axis is missing"):
        compiled(km.MAML(tanh_mlp()), loss="mse").fit(episode, verbose=0)


def test_predict_without_the_meta_batch_axis():
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    task = {key: value[0] for key, value in regression().items() if key != "query_y"}
    with pytest.raises(ValueError, match=r"Received: support_x shape=\(6, 2\)\. The meta-batch axis is missing: add one \(`x\[None\]`"):
        learner.predict(task, verbose=0)


def test_predict_with_an_extra_axis():
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    episode = {key: value[None] for key, value in regression().items() if key != "query_y"}
    with pytest.raises(ValueError, match=r"There is one axis too many"):
        learner.predict(episode, verbose=0)


def test_inputs_of_the_wrong_shape():
    episode = regression()
    episode["support_x"] = np.concatenate([episode["support_x"]] * 2, axis=-1)
    with pytest.raises(ValueError, match=r"`support_x` must have shape \[meta_batch, examples\] \+ \(2,\).*Received: support_x shape=\(3, 6, 4\)"):
        compiled(km.MAML(tanh_mlp()), loss="mse").train_on_batch(episode)


# ----------------------------------------------------------------------
# Targets.


def test_regression_targets_that_would_broadcast():
    episode = regression()
    episode["query_y"] = episode["query_y"][..., 0]
    with pytest.raises(ValueError, match=r"`query_y` must have the model's output shape per example: the model outputs \(None, 1\).*Received: query_y shape=\(3, 5\)"):
        compiled(km.MAML(tanh_mlp()), loss="mse").train_on_batch(episode)


def test_one_hot_targets_with_a_sparse_loss():
    episode = classification()
    episode["query_y"] = np.eye(3, dtype="float32")[episode["query_y"]]
    with pytest.raises(ValueError, match=r"holds one class index per example.*Received: query_y shape=\(2, 9, 3\) for model outputs of shape \(None, 3\)\. One-hot targets need `keras\.losses\.CategoricalCrossentropy`"):
        compiled(km.MAML(dense_classifier())).train_on_batch(episode)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("too_large", lambda y: y + 1, r"Received: a label 3 in `query_y`"),
        ("negative", lambda y: y - 1, r"Received: a label -1 in `query_y`"),
        ("fractional", lambda y: y.astype("float32") + 0.5, r"Received: a label 0\.5 in `query_y`"),
    ],
)
def test_class_labels_outside_the_outputs(name, change, message):
    episode = classification()
    episode["query_y"] = change(episode["query_y"])
    learner = compiled(km.MAML(dense_classifier()))
    with pytest.raises(ValueError, match=r"Class labels must be integers in \[0, 3\): the model has 3 outputs.*" + message):
        learner.fit(dataset(episode), verbose=0)


def test_episodes_with_more_ways_than_outputs():
    learner = compiled(km.MAML(dense_classifier(n_way=3)))
    with pytest.raises(ValueError, match=r"a label [345] in `support_y`.*build the model with as many outputs as the episodes' n_way"):
        learner.fit(dataset(classification(n_way=5)), verbose=0)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_bad_labels_in_a_later_batch_are_caught_in_the_graph(jit_compile):
    # The first batch is checked on the host; later ones in the step itself,
    # in a way that survives XLA (which drops TensorFlow's range check).
    model = dense_classifier()
    learner = compiled(km.MAML(model), jit_compile=jit_compile)
    good, bad = classification(), classification(shift=2)
    with pytest.raises(ValueError, match=r"Class labels must be integers in \[0, 3\).*Received: a label [345] in `query_y`"):
        learner.fit(dataset(good, bad), verbose=0)
    # The bad meta-batch was not applied: only the first update happened.
    assert int(learner.optimizer.iterations) == 1
    assert all(np.all(np.isfinite(w)) for w in weights(model))


def test_bad_labels_on_a_conv_net_give_no_raw_tensorflow_error():
    model = small_convnet()
    learner = compiled(km.MAML(model, task_execution="sequential"))
    good = classification_episode(dtype="float32")
    bad = classification_episode(dtype="float32")
    bad["support_y"] = bad["support_y"] + 3
    with pytest.raises(ValueError, match=r"Class labels must be integers in \[0, 3\).*in `support_y`"):
        learner.fit(dataset(good, bad), verbose=0)


def test_bad_labels_in_predict():
    learner = compiled(km.MAML(dense_classifier()))
    episode = classification()
    episode["support_y"] = episode["support_y"] + 5
    del episode["query_y"]
    with pytest.raises(ValueError, match=r"Received: a label 5 in `support_y`"):
        learner.predict(episode, verbose=0)


def test_bad_labels_in_evaluate_tasks():
    learner = compiled(km.MAML(dense_classifier()))
    episode = classification(shift=-2)
    with pytest.raises(ValueError, match=r"Received: a label -2 in `query_y`"):
        learner.evaluate_tasks(episode)


def test_bad_labels_in_adapt():
    learner = compiled(km.MAML(dense_classifier()))
    episode = classification()
    with pytest.raises(ValueError, match=r"Received: a label 7 in `support_y`"):
        learner.adapt(episode["support_x"][0], episode["support_y"][0] + 7)


# ----------------------------------------------------------------------
# Non-finite values.


@pytest.mark.parametrize("key", ["support_x", "query_y"])
def test_non_finite_values_in_adapt_and_evaluate_tasks(key):
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    episode = regression()
    episode[key][0, 0, 0] = np.inf if key == "query_y" else np.nan
    with pytest.raises(ValueError, match=rf"Episode entry `{key}` contains non-finite values \(1 NaN/inf"):
        learner.evaluate_tasks(episode)
    if key == "support_x":
        with pytest.raises(ValueError, match=r"Episode entry `support_x` contains non-finite values"):
            learner.adapt(episode["support_x"][0], episode["support_y"][0])


def test_non_finite_values_later_skip_the_update_and_are_counted():
    model = tanh_mlp()
    learner = compiled(km.MAML(model), loss="mse")
    good, bad = regression(), regression()
    bad["query_x"][1, 0, 0] = np.nan
    reference = compiled(km.MAML(tanh_mlp()), loss="mse")
    reference.fit(dataset(good), verbose=0)
    history = learner.fit(dataset(bad, good, bad), verbose=0).history
    assert history["non_finite_tasks"] == [2.0]  # one task in each of two meta-batches
    assert np.isnan(history["loss"][0])
    # Only the first meta-batch was applied.
    assert int(learner.optimizer.iterations) == 1
    assert all(np.array_equal(a, b) for a, b in zip(weights(reference.model), weights(model)))


@pytest.mark.parametrize(
    "name, kwargs",
    [("MAML", {}), ("IMAML", {}), ("ANIL", {"task_execution": "vectorized"}),
     ("ANIL", {"task_execution": "sequential"})],
)
def test_diverging_inner_loop_is_counted_and_never_applied(name, kwargs):
    model = tanh_mlp()
    learner = compiled(
        getattr(km, name)(model, inner_learning_rate=1e6, inner_steps=5, **kwargs),
        loss="mse",
        optimizer=keras.optimizers.Adam(1e-3),
    )
    before = weights(model)
    history = learner.fit(dataset(regression(), regression()), verbose=0).history
    assert history["non_finite_tasks"] == [6.0]  # 3 tasks x 2 meta-batches
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(model)))
    assert int(learner.optimizer.iterations) == 0
    if name == "ANIL":
        return  # its linear head grows to 1e30 in 5 steps, large but finite
    # Adapting with the diverging step size is refused, not returned as NaN.
    episode = regression()
    with pytest.raises(ValueError, match=r"Refusing to adapt .*the inner loop diverged, lower `inner_learning_rate`"):
        learner.adapt(episode["support_x"][0], episode["support_y"][0])


def test_terminate_on_nan_stops_the_run():
    learner = compiled(km.MAML(tanh_mlp(), inner_learning_rate=1e6, inner_steps=5), loss="mse")
    history = learner.fit(
        dataset(*[regression()] * 4), callbacks=[keras.callbacks.TerminateOnNaN()], verbose=0
    )
    assert learner.stop_training and len(history.history["loss"]) == 1


def test_save_and_export_refuse_non_finite_weights(tmp_path):
    model = tanh_mlp()
    learner = compiled(km.MAML(model), loss="mse")
    model.trainable_variables[0].assign(np.full(model.trainable_variables[0].shape, np.nan))
    with pytest.raises(ValueError, match=r"Refusing to save MAML .*1 weight tensor\(s\) hold NaN or infinite values"):
        learner.save(str(tmp_path / "learner.keras"))
    assert not (tmp_path / "learner.keras").exists()
    with pytest.raises(ValueError, match=r"Refusing to export MAML"):
        km.export_adaptive(learner, str(tmp_path / "served"))
    assert not (tmp_path / "served").exists()


# ----------------------------------------------------------------------
# adapt() and evaluate_tasks().


def test_adapt_with_the_meta_batch_axis_left_in():
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    episode = regression()
    with pytest.raises(ValueError, match=r"`support_x` of one task must have shape \[examples\] \+ \(2,\).*Received: support_x shape=\(1, 6, 2\)\. `adapt` takes one task without a meta-batch axis: pass `support_x\[0\]`"):
        learner.adapt(episode["support_x"][:1], episode["support_y"][:1])


def test_adapt_with_different_counts():
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    episode = regression()
    with pytest.raises(ValueError, match=r"`support_x` and `support_y` must hold the same number of examples \(axis 0; one task"):
        learner.adapt(episode["support_x"][0], episode["support_y"][0, :3])


def test_adapt_with_zero_steps():
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    episode = regression()
    with pytest.raises(ValueError, match=r"`steps` must be a positive integer\. Received: steps=0"):
        learner.adapt(episode["support_x"][0], episode["support_y"][0], steps=0)


@pytest.mark.parametrize("steps", [[3, 1], [], [0, -1], [0, 1.5]])
def test_evaluate_tasks_steps(steps):
    learner = compiled(km.MAML(tanh_mlp()), loss="mse")
    with pytest.raises(ValueError, match=r"`steps` must be a non-empty, strictly increasing list of non-negative ints"):
        learner.evaluate_tasks(regression(), steps=steps)
