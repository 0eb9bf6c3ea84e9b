"""Learned inner step sizes (Meta-SGD, LSLR), MAML++'s multi-step loss and per-step BatchNorm.

The ladder of tests/test_maml_numerics.py in float64: Meta-SGD's one-step
meta-gradient against its closed form (weights and rates), an independent
reference of the LSLR + per-step BatchNorm + multi-step loss forward pass,
and central finite differences of its meta-gradient along random directions;
then saving, resuming, `adapt()`, `export_adaptive` and adaptation with more
steps than meta-training.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers

ADAPTED, BATCH_NORM = [0, 1, 4, 5], [2, 3]  # small_convnet's trainable weights


def linear_model(features):
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.linspace(-0.5, 0.7, features)[:, None])
    return model


def msl_weights_reference(epoch, steps, epochs):
    """MAML++'s `get_per_step_loss_importance_vector`, and its final-step-only
    loss once `epoch >= multi_step_loss_num_epochs`."""
    if epoch >= epochs:
        return np.eye(steps)[-1]
    weights = np.ones(steps) / steps
    decay = 1.0 / steps / epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


# ----------------------------------------------------------------------
# Meta-SGD: closed form.


def test_meta_sgd_one_step_least_squares_closed_form(float64):
    """w' = w - a * g_s(w); d Lq(w')/dw = g_q - H_s (a * g_q), d/da = -g_s * g_q."""
    episode = helpers.regression_episode(meta_batch=4, k=7, q=5, features=3, seed=3)
    learner = km.MetaSGD(linear_model(3), inner_learning_rate=0.3)
    rates = np.random.default_rng(0).uniform(0.05, 0.5, size=(3, 1))
    (rate_variable,) = learner.inner_learning_rates
    rate_variable.assign(rates)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    w = np.array(learner.model.layers[0].kernel)
    grad_w, grad_a = [], []
    for xs, ys, xq, yq in zip(*(episode[k] for k in ("support_x", "support_y", "query_x", "query_y"))):
        g_s = 2.0 / len(xs) * xs.T @ (xs @ w - ys)
        h_s = 2.0 / len(xs) * xs.T @ xs
        adapted = w - rates * g_s
        g_q = 2.0 / len(xq) * xq.T @ (xq @ adapted - yq)
        grad_w.append(g_q - h_s @ (rates * g_q))
        grad_a.append(-g_s * g_q)
    before = np.array(rate_variable)
    got_w = helpers.meta_gradient_by_update(learner, episode)[0]
    got_a = before - np.array(rate_variable)
    for got, expected in ((got_w, np.mean(grad_w, 0)), (got_a, np.mean(grad_a, 0))):
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel <= 1e-6, rel


def test_meta_sgd_is_maml_with_per_parameter_rates():
    learner = km.MetaSGD(helpers.tanh_mlp(), inner_learning_rate=0.2)
    assert learner.learned_inner_learning_rates == "per_parameter"
    rates = learner.inner_learning_rates
    assert [tuple(r.shape) for r in rates] == [tuple(v.shape) for v in learner.model.trainable_variables]
    assert all(np.all(np.array(r) == np.float32(0.2)) for r in rates)
    assert learner.meta_variables[-len(rates):] == rates
    assert "learned_inner_learning_rates" not in learner.get_config()
    clone = km.MetaSGD.from_config(learner.get_config())
    assert clone.get_config() == learner.get_config()
    assert km.MAML(helpers.tanh_mlp()).inner_learning_rates is None


# ----------------------------------------------------------------------
# LSLR + per-step BatchNorm + multi-step loss: an independent forward pass.


def reference_query_losses(learner, task, steps, training=True):
    """Query losses after 1..steps inner steps, computed by hand: LSLR rates
    `rates[w][min(i, S-1)]`, BatchNorm set `min(i, S-1)` on the support pass
    of step i and on the query after it; transductive BatchNorm."""
    model, S = learner.model, learner.inner_steps
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    rates = [tf.convert_to_tensor(r) for r in learner.inner_learning_rates if r is not None]
    sets = [[params[i] for i in BATCH_NORM]] + [[tf.convert_to_tensor(v) for v in step]
                                                  for step in learner._batch_norm_steps]
    loss_fn = helpers.sparse_ce()

    def at(fast, s):
        full = list(fast)
        for position, value in zip(BATCH_NORM, sets[min(s, S - 1)]):
            full[position] = value
        return full

    fast, losses = list(params), []
    for i in range(steps):
        full = at(fast, i)
        with tf.GradientTape() as tape:
            tape.watch(full)
            y = model.stateless_call(full, non_trainable, task["support_x"], training=True)[0]
            loss = loss_fn(task["support_y"], y)
        grads = tape.gradient(loss, full)
        for rate, position in zip(rates, ADAPTED):
            fast[position] = fast[position] - rate[min(i, S - 1)] * grads[position]
        y = model.stateless_call(at(fast, i), non_trainable, task["query_x"], training=training)[0]
        losses.append(float(loss_fn(task["query_y"], y)))
    return losses


def plus_plus(model, **kwargs):
    options = dict(inner_learning_rate=0.2, inner_steps=3, learned_inner_learning_rates="per_layer_per_step",
                   multi_step_loss=True, multi_step_loss_epochs=4, per_step_batch_norm=True)
    return km.MAML(model, **{**options, **kwargs})


def perturb(learner, seed=0):
    """Distinct rates per layer and step, distinct BatchNorm sets per step."""
    rng = np.random.default_rng(seed)
    for rate in learner.learned_variables:
        rate.assign(np.array(rate) * rng.uniform(0.5, 1.5, size=rate.shape))


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses(float64):
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=2)
    learner = plus_plus(helpers.small_convnet())
    perturb(learner)
    learner.compile(optimizer=keras.optimizers.SGD(0.0), loss=helpers.sparse_ce())
    losses = [reference_query_losses(learner, {k: v[t] for k, v in episode.items()}, 3)
              for t in range(2)]
    for epoch in (0, 2, 4):  # uniform, annealing, last step only
        learner._epoch.assign(epoch)
        weights = msl_weights_reference(epoch, 3, 4)
        np.testing.assert_allclose(learner.multi_step_loss_weights(), weights, rtol=1e-6)
        logs = learner.train_on_batch(episode, return_dict=True)
        expected = np.mean([np.dot(weights, task_losses) for task_losses in losses])
        assert logs["loss"] == pytest.approx(expected, rel=1e-6)
        for step in range(3):
            assert logs[f"msl_weight_step_{step + 1}"] == pytest.approx(weights[step], rel=1e-6)


def test_msl_weights_follow_maml_plus_plus_annealing():
    learner = km.MAML(helpers.tanh_mlp(), inner_steps=5, multi_step_loss=True, multi_step_loss_epochs=10)
    for epoch in (0, 1, 5, 9, 10, 11, 30):
        got = np.array(learner.multi_step_loss_weights(epoch))
        np.testing.assert_allclose(got, msl_weights_reference(epoch, 5, 10), rtol=1e-6, atol=1e-7)
        assert got.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(learner.multi_step_loss_weights(0), np.full(5, 0.2), rtol=1e-6)
    np.testing.assert_allclose(learner.multi_step_loss_weights(10), [0, 0, 0, 0, 1])


def test_lslr_per_step_batch_norm_msl_matches_finite_differences(float64):
    """Three steps, every meta-parameter: weights, rates, BatchNorm sets."""
    episode = helpers.classification_episode(meta_batch=2, n_way=3, k=2, q=3, seed=5)
    learner = plus_plus(helpers.small_convnet(seed=3))
    perturb(learner, seed=1)
    learner._epoch.assign(1)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce())
    non_trainable = [tf.convert_to_tensor(v) for v in learner.model.non_trainable_variables]
    tasks = [{k: tf.constant(v[t]) for k, v in episode.items()} for t in range(2)]

    def meta_loss(params):
        return tf.add_n([learner.task_loss(list(params), non_trainable, t)[0] for t in tasks]) / 2

    params = [tf.convert_to_tensor(v) for v in learner.meta_variables]
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = meta_loss(params)
    autodiff = tape.gradient(loss, params)
    # The train step applies this gradient (SGD, learning rate 1).
    before = [np.array(v) for v in learner.meta_variables]
    learner.train_on_batch(episode)
    applied = [b - np.array(v) for b, v in zip(before, learner.meta_variables)]
    for a, b in zip(applied, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Every rate and BatchNorm set of every step gets a gradient (but the
    # conv bias's rate: a bias before BatchNorm has none).
    # (meta-parameters: 6 weights, 4 rates, 2 steps x 2 BatchNorm weights).
    assert len(autodiff) == 6 + 4 + 4
    for i, g in enumerate(autodiff):
        assert (np.abs(g).sum() > 1e-12) != (i in (1, 7)), learner.meta_variables[i].path
    helpers.assert_matches_finite_differences(meta_loss, params, autodiff, rtol=1e-5)


def test_first_order_rates_get_the_first_order_gradient(float64):
    """One first-order LSLR step on least squares: d Lq / d a = -g_s . g_q(w')."""
    episode = helpers.regression_episode(meta_batch=1, k=7, q=5, features=3, seed=8)
    learner = km.MAML(linear_model(3), inner_learning_rate=0.3, first_order=True,
                      learned_inner_learning_rates="per_layer_per_step")
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    w = np.array(learner.model.layers[0].kernel)
    xs, ys, xq, yq = (episode[k][0] for k in ("support_x", "support_y", "query_x", "query_y"))
    g_s = 2.0 / 7 * xs.T @ (xs @ w - ys)
    g_q = 2.0 / 5 * xq.T @ (xq @ (w - 0.3 * g_s) - yq)
    (rate,) = learner.inner_learning_rates
    before = np.array(rate)
    got_w = helpers.meta_gradient_by_update(learner, episode)[0]
    np.testing.assert_allclose(got_w, g_q, rtol=1e-10)
    np.testing.assert_allclose(before - np.array(rate), [-np.sum(g_s * g_q)], rtol=1e-10)


# ----------------------------------------------------------------------
# More steps than meta-training, adapt() and export_adaptive.


def test_more_evaluation_steps_reuse_the_last_rate_and_batch_norm_set(float64):
    episode = helpers.classification_episode(meta_batch=1, n_way=3, k=2, q=3, seed=6)
    learner = plus_plus(helpers.small_convnet(seed=2), inner_steps=2, eval_inner_steps=4,
                        multi_step_loss=False)
    perturb(learner, seed=2)
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce())
    task = {k: v[0] for k, v in episode.items()}
    expected = reference_query_losses(learner, task, 4)
    results = learner.evaluate_tasks(episode, steps=[1, 2, 3, 4])
    np.testing.assert_allclose(results["loss"][0], expected, rtol=1e-9)
    assert learner.evaluate(episode, verbose=0, return_dict=True)["loss"] == pytest.approx(
        expected[-1], rel=1e-9)


def test_adapt_and_export_adaptive_use_the_learned_state(float64, tmp_path):
    episode = helpers.classification_episode(meta_batch=1, n_way=3, k=2, q=3, seed=7)
    learner = plus_plus(helpers.small_convnet(seed=4), inner_steps=2, eval_inner_steps=3,
                        transductive_batch_norm=False)
    perturb(learner, seed=3)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=helpers.sparse_ce())
    learner.train_on_batch(episode)
    predicted = learner.predict(episode, verbose=0)
    support_x, support_y = episode["support_x"][0], episode["support_y"][0]
    adapted = learner.adapt(support_x, support_y)
    # Support statistics: the plain model predicts what the learner does.
    np.testing.assert_allclose(adapted.predict(episode["query_x"][0], verbose=0), predicted,
                               rtol=1e-9, atol=1e-12)
    # Its BatchNorm weights are the last step's set (3 steps: set 1 of 2).
    bn = [v for v in adapted.trainable_variables if "gamma" in v.path or "beta" in v.path]
    for got, want in zip(bn, learner._batch_norm_steps[-1]):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    # Without the learned state the predictions differ.
    plain = km.MAML(learner.model, inner_learning_rate=0.2, inner_steps=2, eval_inner_steps=3,
                    transductive_batch_norm=False)
    plain.compile(loss=helpers.sparse_ce())
    assert np.abs(plain.predict(episode, verbose=0) - predicted).max() > 1e-4
    path = km.export_adaptive(learner, str(tmp_path / "served"))
    served = tf.saved_model.load(path)
    out = served.adapt_and_predict(support_x, support_y, episode["query_x"][0])
    np.testing.assert_allclose(out.numpy(), predicted, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------
# Saving and resuming.


def test_keras_file_keeps_rates_batch_norm_sets_and_epoch(tmp_path):
    episode = helpers.classification_episode(meta_batch=2, dtype="float32", seed=4)
    learner = plus_plus(helpers.small_convnet(seed=11), inner_steps=2)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=helpers.sparse_ce())
    learner.train_on_batch(episode)
    learner._epoch.assign(3)
    path = str(tmp_path / "plus_plus.keras")
    learner.save(path)
    loaded = keras.saving.load_model(path)
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(json.dumps(learner.get_config()))
    for a, b in zip(loaded.learned_variables + [loaded._epoch], learner.learned_variables + [learner._epoch]):
        assert a.path == b.path
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert len(loaded.optimizer.variables) == len(learner.optimizer.variables)
    la = learner.train_on_batch(episode, return_dict=True)
    lb = loaded.train_on_batch(episode, return_dict=True)
    assert la == pytest.approx(lb, rel=1e-6)
    for a, b in zip(learner.meta_variables, loaded.meta_variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("simulated interruption")


def _train(backup_dir, callbacks=()):
    learner = km.MetaSGD(km.models.mlp(hidden_units=(8, 8), seed=0), inner_learning_rate=0.01, inner_steps=2,
                         multi_step_loss=True, multi_step_loss_epochs=2)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    # The same meta-batch every step: the resumed run cannot differ by where a
    # stream restarts, only by what BackupAndRestore restores.
    episode = helpers.regression_episode(meta_batch=2, k=5, q=5, features=1, dtype="float32")
    episodes = tf.data.Dataset.from_tensors(episode).repeat()
    history = learner.fit(episodes, steps_per_epoch=2, epochs=3, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(backup_dir), *callbacks])
    return learner, history


def test_backup_and_restore_resumes_rates_and_msl_epoch(tmp_path):
    reference, history = _train(str(tmp_path / "a"))
    # The logged weights follow the epochs: uniform, halfway, last step only.
    np.testing.assert_allclose(history.history["msl_weight_step_2"],
                               [msl_weights_reference(e, 2, 2)[1] for e in range(3)], rtol=1e-6)
    assert float(reference._epoch) == 2.0
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _train(str(tmp_path / "b"), [Interrupt()])
    resumed, history = _train(str(tmp_path / "b"))
    assert history.history["msl_weight_step_2"] == pytest.approx([1.0])
    assert float(resumed._epoch) == 2.0
    for a, b in zip(reference.meta_variables + reference.optimizer.variables,
                    resumed.meta_variables + resumed.optimizer.variables):
        np.testing.assert_array_equal(np.array(a), np.array(b))


# ----------------------------------------------------------------------
# ANIL's head and bad arguments.


def test_anil_learns_head_rates_only():
    learner = km.ANIL(helpers.small_convnet(), inner_learning_rate=0.3, inner_steps=2,
                      learned_inner_learning_rates="per_layer_per_step", multi_step_loss=True)
    rates = learner.inner_learning_rates
    assert [r is None for r in rates] == [True, True, True, True, False, False]
    assert all(tuple(r.shape) == (2,) for r in rates[4:])
    learner.compile(optimizer=keras.optimizers.SGD(1.0), loss=helpers.sparse_ce())
    before = [np.array(r) for r in rates[4:]]
    learner.train_on_batch(helpers.classification_episode(meta_batch=2, dtype="float32"))
    assert all(np.all(np.array(r) != b) for r, b in zip(rates[4:], before))


def test_anil_head_rates_vectorized_equal_sequential(float64):
    """The batched tape (vectorized ANIL) and per-task gradients agree, rates included."""
    episode = helpers.regression_episode(meta_batch=3, seed=9)
    updates = []
    for execution in ("vectorized", "sequential"):
        learner = km.ANIL(helpers.tanh_mlp(seed=5), inner_learning_rate=0.2, inner_steps=2,
                          learned_inner_learning_rates="per_parameter", multi_step_loss=True,
                          task_execution=execution)
        learner.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        before = [np.array(v) for v in learner.meta_variables]
        learner.train_on_batch(episode)
        updates.append([b - np.array(v) for b, v in zip(before, learner.meta_variables)])
    assert len(updates[0]) == 6 + 2
    for a, b in zip(*updates):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert np.abs(updates[0][-1]).sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`learned_inner_learning_rates` must be one of"):
        km.MAML(helpers.tanh_mlp(), learned_inner_learning_rates="per_layer")
    with pytest.raises(ValueError, match="`per_step_batch_norm=True` needs a model with BatchNorm"):
        km.MAML(helpers.tanh_mlp(), per_step_batch_norm=True)
    with pytest.raises(ValueError, match="`multi_step_loss_epochs` must be a positive integer"):
        km.MAML(helpers.tanh_mlp(), multi_step_loss=True, multi_step_loss_epochs=0)
    with pytest.raises(ValueError, match="`multi_step_loss` must be True or False"):
        km.MAML(helpers.tanh_mlp(), multi_step_loss="yes")


@pytest.mark.large
def test_the_omniglot_comparison_scores_equal_steps_and_equal_time(tmp_path):
    """examples/maml_plus_plus_omniglot.py --equal_budget at tiny sizes: MAML++
    first, the others for its time, each scored at its number of meta-steps
    (a snapshot) and at the end."""
    import subprocess
    import sys

    from tests.docs_fixtures import REPO, make_omniglot

    make_omniglot(tmp_path / "omniglot")
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "maml_plus_plus_omniglot.py"),
         f"--data_dir={tmp_path / 'omniglot'}", "--n_way=3", "--filters=4", "--meta_batch_size=2",
         "--q_query=2", "--eval_q_query=2", "--meta_steps=2", "--steps_per_epoch=1",
         "--learners=maml,maml_pp", "--transductive=true", "--equal_budget", "--clock=cpu",
         "--maml_pp_steps=2", "--eval_inner_steps=2", "--eval_tasks=4", "--eval_batch_size=2",
         "--adapt_check_tasks=1", f"--output={out}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["learner"], r["equal"]) for r in rows] == [
        ("maml_pp", "meta-steps"), ("maml", "meta-steps"), ("maml", "time")]
    assert rows[0]["meta_steps"] == rows[1]["meta_steps"] == 2
    assert rows[2]["meta_steps"] >= 2  # MAML's 1 inner step is cheaper than MAML++'s 2
    for row in rows:
        assert len(row["learner_accuracy"]) == len(row["steps"]) == 3  # 0, 1, 2 steps
        assert all(0 <= a <= 1 for a in row["learner_accuracy"] + row["adapt_accuracy"])


def test_the_tables_script_averages_seeds(tmp_path):
    """examples/maml_plus_plus_tables.py on two seeds' files: means, intervals, ranges."""
    import subprocess
    import sys

    from tests.docs_fixtures import REPO

    def row(learner, equal, steps, cpu, accuracy):
        return {"learner": learner, "transductive_batch_norm": False, "equal": equal,
                "meta_steps": steps, "train_cpu_seconds": cpu, "steps": [0, 1, 10],
                "learner_accuracy": [0.2, accuracy - 0.1, accuracy], "learner_interval": [0.01] * 3,
                "adapt_accuracy": [0.2, accuracy - 0.1, accuracy], "adapt_interval": [0.01] * 3}

    for seed, accuracy in ((0, 0.60), (1, 0.70)):
        rows = [row("maml_pp", "meta-steps", 50, 80.0, accuracy),
                row("maml", "meta-steps", 50, 20.0, accuracy - 0.2),
                row("maml", "time", 300, 80.0, accuracy + 0.1)]
        (tmp_path / f"5way_seed{seed}_false.json").write_text(
            json.dumps({"flags": {"n_way": 5, "seed": seed}, "results": rows}))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "maml_plus_plus_tables.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("| MAML++ | support statistics | meta-steps | 0,1 | 50 | 80 | 55.0 ± 1.0 (50.0–60.0) | "
            "65.0 ± 1.0 (60.0–70.0) | 65.0 ± 1.0 (60.0–70.0) |") in result.stdout
    assert "| MAML | support statistics | time | 0,1 | 300 | 80 | 65.0 ± 1.0" in result.stdout
    assert "| MAML | support statistics | meta-steps | 0,1 | 50 | 20 | 35.0 ± 1.0" in result.stdout


def test_the_tables_script_refuses_to_average_different_runs(tmp_path):
    """The tables script stops on files of different settings, a repeated run, or no files;
    it reads files named without the BatchNorm suffix (the papers'-protocol command)."""
    import subprocess
    import sys

    from tests.docs_fixtures import REPO

    def tables():
        return subprocess.run([sys.executable, str(REPO / "examples" / "maml_plus_plus_tables.py"),
                               str(tmp_path)], capture_output=True, text=True, timeout=60)

    result = tables()
    assert result.returncode != 0 and "no <way>way_seed<seed>" in result.stderr

    def write(name, seed, rate):
        row = {"learner": "maml_pp", "transductive_batch_norm": True, "equal": "meta-steps",
               "meta_steps": 50, "train_cpu_seconds": 40.0, "steps": [0, 1, 10],
               "learner_accuracy": [0.2, 0.3, 0.4], "learner_interval": [0.01] * 3,
               "adapt_accuracy": [0.2, 0.3, 0.4], "adapt_interval": [0.01] * 3}
        flags = {"n_way": 20, "seed": seed, "maml_pp_lr": rate, "transductive": ["true"]}
        (tmp_path / name).write_text(json.dumps({"flags": flags, "results": [row]}))

    write("20way_seed0.json", 0, 0.1)
    write("20way_seed1_true.json", 1, 0.1)
    result = tables()
    assert result.returncode == 0, result.stderr
    assert "| MAML++ | transductive | meta-steps | 0,1 | 50 | 40 | 30.0 ± 1.0 (30.0–30.0)" in result.stdout
    write("20way_seed2_true.json", 2, 0.4)
    result = tables()
    assert result.returncode != 0 and "differ in maml_pp_lr" in result.stderr
    write("20way_seed2_true.json", 1, 0.1)  # seed 1 again, under another name
    result = tables()
    assert result.returncode != 0 and "both hold maml_pp" in result.stderr
