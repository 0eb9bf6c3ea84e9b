"""keras_meta callbacks, and Keras' own callbacks around every meta-learner."""

import csv
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from tests import helpers
from tests.test_conformance import ALGORITHMS, LATER_ALGORITHMS, LEARNERS


_sce = helpers.sparse_ce


def _episodes(seed, meta_batch=2):
    """A seeded, repeating stream of small 3-way classification episodes."""
    batches = [helpers.classification_episode(meta_batch=meta_batch, dtype="float32", seed=seed + i)
               for i in range(3)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return tf.data.Dataset.from_tensor_slices(stacked).repeat()


def _learner(name="maml", seed=11):
    learner = LEARNERS[name](helpers.small_convnet(seed=seed))
    learner.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_sce(), metrics=["accuracy"])
    return learner


def test_meta_evaluation_logs_accuracy_and_interval():
    learner = _learner()
    evaluation = km.callbacks.MetaEvaluation(_episodes(100), num_episodes=5, prefix="meta_val")
    history = learner.fit(_episodes(0), steps_per_epoch=2, epochs=2, callbacks=[evaluation], verbose=0)
    for key in ("meta_val_accuracy", "meta_val_accuracy_ci95", "meta_val_loss", "meta_val_loss_ci95"):
        assert len(history.history[key]) == 2
    # The logged values are the protocol's: mean and 1.96 std / sqrt(n) over tasks.
    results = km.evaluation.evaluate_episodes(learner, _episodes(100), 5)
    accuracy = results["accuracy"][:, -1]
    assert accuracy.shape == (5,) and np.all((accuracy >= 0) & (accuracy <= 1))
    assert history.history["meta_val_accuracy"][-1] == pytest.approx(accuracy.mean())
    assert history.history["meta_val_accuracy_ci95"][-1] == pytest.approx(
        1.96 * accuracy.std() / np.sqrt(5))
    # accuracy from predictions, by hand, for the first meta-batch
    episode = next(iter(_episodes(100)))
    predictions = learner.predict(tf.data.Dataset.from_tensors(episode), verbose=0)
    by_hand = (predictions.argmax(-1).reshape(2, -1) == np.array(episode["query_y"])).mean(-1)
    np.testing.assert_allclose(by_hand, accuracy[:2])


def test_meta_evaluation_regression_logs_loss_only_and_every_n_epochs():
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    evaluation = km.callbacks.MetaEvaluation(km.data.sinusoid(meta_batch_size=10, seed=5),
                                             num_episodes=20, every_n_epochs=2)
    history = maml.fit(km.data.sinusoid(meta_batch_size=4, seed=0), steps_per_epoch=2, epochs=4,
                       callbacks=[evaluation], verbose=0)
    assert "meta_test_accuracy" not in history.history
    assert len(history.history["meta_test_loss"]) == 2  # epochs 2 and 4 only


def test_meta_evaluation_runs_out_of_episodes_with_a_clear_error():
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    evaluation = km.callbacks.MetaEvaluation(km.data.sinusoid(meta_batch_size=10, seed=5).take(2),
                                             num_episodes=600)
    with pytest.raises(ValueError, match="ran out after 20 tasks; `num_tasks=600`"):
        maml.fit(km.data.sinusoid(meta_batch_size=4, seed=0), steps_per_epoch=1, epochs=1,
                 callbacks=[evaluation], verbose=0)


def test_callbacks_refuse_plain_models():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    with pytest.raises(TypeError, match="works with keras_meta meta-learners"):
        model.fit(np.zeros((4, 1)), np.zeros((4, 1)), verbose=0,
                  callbacks=[km.callbacks.MetaEvaluation(_episodes(0))])


def test_adaptation_curve_logs_every_step_and_plots(tmp_path):
    learner = _learner()
    curve = km.callbacks.AdaptationCurve(_episodes(50), max_steps=4, num_episodes=4)
    history = learner.fit(_episodes(0), steps_per_epoch=2, epochs=2, callbacks=[curve], verbose=0)
    for step in range(5):
        assert len(history.history[f"adaptation_loss_step_{step}"]) == 2
        assert len(history.history[f"adaptation_accuracy_step_{step}"]) == 2
    assert [c["epoch"] for c in curve.curves] == [1, 2]
    # step 0 of the curve is the pre-adaptation loss that evaluate() reports
    logs = learner.evaluate(_episodes(50).take(2), verbose=0, return_dict=True)
    assert curve.curves[-1]["loss"][0] == pytest.approx(logs["pre_adaptation_loss"], rel=1e-5)
    path = curve.plot(str(tmp_path / "curve.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_adaptation_curve_reads_the_meta_evaluation(monkeypatch, tmp_path):
    """One evaluation of the validation tasks per epoch for both callbacks, and a CSV
    history without empty columns when the prefix is Keras' `val`."""
    calls = []
    real = km.callbacks.evaluate_episodes

    def counting(learner, episodes, num_tasks, steps=None, verbose=0):
        calls.append((num_tasks, list(steps)))
        return real(learner, episodes, num_tasks, steps, verbose=verbose)

    monkeypatch.setattr(km.callbacks, "evaluate_episodes", counting)
    learner = _learner()
    evaluation = km.callbacks.MetaEvaluation(_episodes(100), num_episodes=4, inner_steps=2,
                                             prefix="val")
    curve = km.callbacks.AdaptationCurve(evaluation, max_steps=3)
    history = learner.fit(_episodes(0), steps_per_epoch=2, epochs=2, verbose=0, callbacks=[
        evaluation, curve, keras.callbacks.CSVLogger(str(tmp_path / "history.csv"))]).history
    assert calls == [(4, [0, 1, 2, 3])] * 2  # once per epoch, along every step either needs
    assert history["val_accuracy"] == pytest.approx(history["adaptation_accuracy_step_2"])
    assert history["val_loss"] == pytest.approx(history["adaptation_loss_step_2"])
    separate = real(learner, _episodes(100), 4, steps=[0, 1, 2, 3])
    np.testing.assert_allclose(curve.curves[-1]["loss"], separate["loss"].mean(axis=0), rtol=1e-6)
    assert curve.num_episodes == 4 and curve.episodes is evaluation.episodes
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "val_val_loss" not in rows[0]
    assert all(value != "" for row in rows for value in row.values())
    # Without the MetaEvaluation in the list, the curve still evaluates through it.
    calls.clear()
    curve = km.callbacks.AdaptationCurve(
        km.callbacks.MetaEvaluation(_episodes(100), num_episodes=4), max_steps=1)
    learner.fit(_episodes(0), steps_per_epoch=1, epochs=1, callbacks=[curve], verbose=0)
    assert calls == [(4, sorted({0, 1, learner.adaptation_steps}))] and len(curve.curves) == 1


def test_adaptation_curve_takes_its_task_count_from_the_meta_evaluation():
    evaluation = km.callbacks.MetaEvaluation(_episodes(100), num_episodes=4)
    with pytest.raises(ValueError, match=r"`num_episodes` is the MetaEvaluation's when `episodes` "
                                         r"is a MetaEvaluation: leave it unset\. Received: "
                                         r"num_episodes=5, MetaEvaluation num_episodes=4"):
        km.callbacks.AdaptationCurve(evaluation, num_episodes=5)


def test_evaluations_show_progress_bars_when_verbose(capsys):
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    episodes = km.data.sinusoid(meta_batch_size=10, seed=5)
    km.evaluation.evaluate_episodes(maml, episodes, 20, verbose=0)
    quiet = km.callbacks.MetaEvaluation(episodes, num_episodes=20)
    quiet.set_model(maml)
    quiet.evaluate()
    assert capsys.readouterr().out == ""
    km.evaluation.evaluate_episodes(maml, episodes, 20, verbose=1)
    assert "20/20" in capsys.readouterr().out
    loud = km.callbacks.MetaEvaluation(episodes, num_episodes=20, verbose=1)
    loud.set_model(maml)
    values = loud.evaluate()
    out = capsys.readouterr().out
    assert "20/20" in out and f"meta_test_loss: {values['meta_test_loss']:.4f}" in out
    # Inside fit with its progress bar the values go to fit's logs, not a print.
    maml.fit(km.data.sinusoid(meta_batch_size=4, seed=0), steps_per_epoch=1, epochs=1, verbose=1,
             callbacks=[loud])
    out = capsys.readouterr().out
    assert "20/20" in out and "meta_test_loss:" in out and " - meta_test_loss" in out
    assert out.count("meta_test_loss:") == 1


def test_derivative_order_annealing_switches_the_compiled_step():
    def run(callbacks, first_order):
        learner = km.MAML(helpers.small_convnet(seed=4), inner_learning_rate=0.5, first_order=first_order)
        learner.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sce())
        history = learner.fit(_episodes(0), steps_per_epoch=2, epochs=2, callbacks=callbacks, verbose=0)
        return learner, history

    annealed, history = run([km.callbacks.DerivativeOrderAnnealing(second_order_from_epoch=1)], True)
    assert history.history["second_order"] == [0.0, 1.0]
    assert annealed.first_order is False
    # Reference: epoch 0 first order, epoch 1 second order, by hand.
    reference = km.MAML(helpers.small_convnet(seed=4), inner_learning_rate=0.5, first_order=True)
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sce())
    data = iter(_episodes(0))
    for step in range(4):
        if step == 2:
            reference.first_order = False
            reference.make_train_function(force=True)
        reference.train_on_batch(next(data))
    first_order_only, _ = run([], True)
    for a, b, c in zip(annealed.model.get_weights(), reference.model.get_weights(),
                       first_order_only.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - c).max() for a, c in zip(annealed.model.get_weights(),
                                                   first_order_only.model.get_weights())) > 1e-5


def test_derivative_order_annealing_argument_check():
    with pytest.raises(ValueError, match="`second_order_from_epoch` must be a non-negative integer"):
        km.callbacks.DerivativeOrderAnnealing(-1)


@pytest.mark.parametrize("name", [  # iMAML's vectorized trace is the slowest: large
    name if name != "imaml" else pytest.param(name, marks=pytest.mark.large) for name in ALGORITHMS]
    + [pytest.param(name, marks=pytest.mark.large) for name in LATER_ALGORITHMS])
def test_keras_callbacks_work_with_every_learner(name, tmp_path):
    learner = _learner(name)
    evaluation = km.callbacks.MetaEvaluation(_episodes(100), num_episodes=4, prefix="meta_val")
    log_dir = str(tmp_path / "tb")
    callbacks = [
        evaluation,  # first: the loggers below see its values
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="meta_val_accuracy",
                                        mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.weights.h5"), save_weights_only=True),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False),
        keras.callbacks.EarlyStopping(monitor="meta_val_loss", mode="min", patience=0, min_delta=1e9),
        keras.callbacks.TensorBoard(log_dir),
        keras.callbacks.CSVLogger(str(tmp_path / "history.csv")),
        keras.callbacks.TerminateOnNaN(),
    ]
    history = learner.fit(_episodes(0), steps_per_epoch=2, epochs=5, callbacks=callbacks, verbose=0)
    # EarlyStopping (min_delta too large to improve) stopped after patience+1 epochs.
    assert len(history.history["loss"]) == 2
    # ModelCheckpoint: the best learner reloads as a learner; weights files per epoch.
    best = keras.saving.load_model(str(tmp_path / "best.keras"))
    assert type(best) is type(learner)
    assert {"epoch1.weights.h5", "epoch2.weights.h5"} <= set(os.listdir(tmp_path))
    restored = _learner(name)
    restored.load_weights(str(tmp_path / "epoch2.weights.h5"))
    for a, b in zip(restored.model.get_weights(), learner.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # BackupAndRestore wrote its state.
    with open(tmp_path / "backup" / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 2
    # CSVLogger has the meta-evaluation columns.
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[-1]["meta_val_accuracy"]) == pytest.approx(
        history.history["meta_val_accuracy"][-1])
    # TensorBoard has the scalars (train run).
    tags = set()
    for event_file in glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in event.summary.value)
    assert {"epoch_loss", "epoch_meta_val_accuracy"} <= tags
    # TerminateOnNaN stops at the first NaN loss (after a clean first batch: fit checks
    # that one's values before tracing).
    good = helpers.classification_episode(meta_batch=2, dtype="float32")
    bad = helpers.classification_episode(meta_batch=2, dtype="float32")
    bad["query_x"][:] = np.nan
    stream = tf.data.Dataset.from_tensors(good).concatenate(
        tf.data.Dataset.from_tensors(bad).repeat())
    history = learner.fit(stream, steps_per_epoch=5, epochs=3,
                          callbacks=[keras.callbacks.TerminateOnNaN()], verbose=0)
    assert learner.stop_training and len(history.history["loss"]) == 1


def test_time_budget_stops_fit_and_counts_the_steps():
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
    maml.compile(optimizer="sgd", loss="mse")
    budget = km.callbacks.TimeBudget(0.0, clock="cpu")  # spent after the first step
    maml.fit(km.data.sinusoid(meta_batch_size=2, seed=0), steps_per_epoch=50, epochs=3,
             callbacks=[budget], verbose=0)
    assert budget.steps == 1 and int(maml.optimizer.iterations) == 1
    with pytest.raises(ValueError, match="`clock` must be 'wall' or 'cpu'"):
        km.callbacks.TimeBudget(10, clock="gpu")
