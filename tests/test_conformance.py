"""One conformance suite that every meta-learner passes (optax's common test).

Each algorithm registers a factory in LEARNERS; every test below runs for each.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _as_json(config):
    return json.loads(json.dumps(config))


LEARNERS = {
    "maml": lambda model: km.MAML(model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3),
    "fomaml": lambda model: km.MAML(model, inner_learning_rate=0.3, inner_steps=1, first_order=True),
    "maml_support_bn": lambda model: km.MAML(model, inner_learning_rate=0.3, transductive_batch_norm=False,
                                             inner_learning_rate_scaling="inverse_steps"),
    "anil": lambda model: km.ANIL(model, inner_learning_rate=0.3, inner_steps=2, eval_inner_steps=3),
    "anil_first_order_support_bn": lambda model: km.ANIL(
        model, head=1, inner_learning_rate=0.3, inner_steps=2, first_order=True,
        head_l2_regularization=0.1, transductive_batch_norm=False, task_execution="sequential"),
    "imaml": lambda model: km.IMAML(model, inner_learning_rate=0.3, inner_steps=3, cg_iterations=3,
                                    eval_inner_steps=4, task_execution="vectorized"),
    "imaml_official_support_bn": lambda model: km.IMAML(  # iMAML
        model, inner_learning_rate=0.1, inner_steps=2, cg_iterations=2, cg_damping=1.0,
        cg_l2_damping=10.0, proximal_pull_back=True, eval_l2_regularization=0.0,
        inner_optimizer={"name": "momentum", "momentum": 0.5}, transductive_batch_norm=False,
        task_execution="sequential"),
}

# One learner per algorithm (MAML second and first order, ANIL, iMAML): the
# expensive suites (Keras callbacks, adapt-at-serving export) run on these.
ALGORITHMS = ("maml", "fomaml", "anil", "imaml")


@pytest.fixture(params=sorted(LEARNERS))
def learner(request):
    learner = LEARNERS[request.param](helpers.small_convnet(seed=11))
    learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_sce(), metrics=["accuracy"])
    return learner


@pytest.fixture
def episode():
    return helpers.classification_episode(meta_batch=2, dtype="float32", seed=4)


def test_config_round_trip(learner):
    config = learner.get_config()
    clone = type(learner).from_config(config)
    assert clone.get_config() == config
    assert type(clone.model) is type(learner.model)
    assert len(clone.model.weights) == len(learner.model.weights)


def test_keras_file_round_trip_keeps_outputs_and_optimizer(learner, episode, tmp_path):
    learner.train_on_batch(episode)  # non-trivial weights and optimizer slots
    path = str(tmp_path / "learner.keras")
    learner.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(learner)
    # (JSON turns the tuples of the wrapped model's shapes into lists.)
    assert _as_json(loaded.get_config()) == _as_json(learner.get_config())
    np.testing.assert_allclose(loaded.predict(episode, verbose=0),
                               learner.predict(episode, verbose=0), rtol=1e-6, atol=1e-6)
    for a, b in zip(loaded.optimizer.variables, learner.optimizer.variables):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # Training resumes identically.
    la = learner.train_on_batch(episode, return_dict=True)
    lb = loaded.train_on_batch(episode, return_dict=True)
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6)
    for a, b in zip(learner.model.weights, loaded.model.weights):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_inner_loop_leaves_variables_untouched(learner, episode):
    before = helpers.weights_of(learner.model)
    learner.evaluate(episode, verbose=0)
    learner.predict(episode, verbose=0)
    learner.adapt(episode["support_x"][0], episode["support_y"][0])
    for b, a in zip(before, helpers.weights_of(learner.model)):
        np.testing.assert_array_equal(b, a)


def test_meta_gradients_are_finite_and_nonzero(learner, episode):
    before = [np.array(v) for v in learner.model.trainable_variables]
    logs = learner.train_on_batch(episode, return_dict=True)
    assert np.isfinite(logs["loss"])
    after = [np.array(v) for v in learner.model.trainable_variables]
    assert all(np.all(np.isfinite(a)) for a in after)
    assert sum(np.abs(a - b).sum() for a, b in zip(after, before)) > 0


def test_eager_function_and_xla_agree(learner, episode):
    config = learner.get_config()
    results = []
    for kwargs in ({"run_eagerly": True}, {}, {"jit_compile": True}):
        fresh = type(learner).from_config(config)
        fresh.model.set_weights(learner.model.get_weights())
        fresh.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sce(), **kwargs)
        fresh.train_on_batch(episode)
        results.append(fresh.model.get_weights())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_adapted_model_is_standalone(learner, episode, tmp_path):
    learner.train_on_batch(episode)
    adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0])
    assert isinstance(adapted, keras.Model) and not isinstance(adapted, km.MetaLearner)
    query_x = episode["query_x"][0]
    expected = adapted.predict(query_x, verbose=0)
    # .keras round trip without any keras_meta object inside.
    path = str(tmp_path / "adapted.keras")
    adapted.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(query_x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    # SavedModel served in a fresh process that never imports keras_meta.
    export_dir = str(tmp_path / "exported")
    adapted.export(export_dir, verbose=False)
    np.save(tmp_path / "x.npy", query_x)
    script = (
        "import sys, numpy as np\n"
        "class NoKerasMeta:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'keras_meta':\n"
        "            raise ImportError('keras_meta is not available here')\n"
        "sys.meta_path.insert(0, NoKerasMeta())\n"
        "import tensorflow as tf\n"
        f"m = tf.saved_model.load({export_dir!r})\n"
        f"y = m.serve(tf.constant(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y.numpy())\n"
        "assert 'keras_meta' not in sys.modules\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-6)
