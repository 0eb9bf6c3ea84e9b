"""The command line through its real entry point: a full sinusoid run, --help, flag errors,
the algorithms' default configurations, saved-learner modes, and (large) Omniglot runs and
resuming a SIGKILLed run. tests/test_cli_edges.py has one test per bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_meta import cli
from tests.test_omniglot import omniglot_dir  # noqa: F401  (fixture)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
QUICK = ["--epochs=2", "--steps_per_epoch=5", "--eval_tasks=20", "--val_tasks=10",
         "--eval_inner_steps=3", "--verbose=0"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "keras_meta", *args], env=ENV, timeout=timeout,
                          capture_output=True, text=True)


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("algorithm", [
    "fomaml",
    pytest.param("maml", marks=pytest.mark.large),
    pytest.param("anil", marks=pytest.mark.large),
    pytest.param("imaml", marks=pytest.mark.large),
])
def test_sinusoid_run_writes_every_artifact(tmp_path, algorithm):
    out = tmp_path / "run"
    result = _cli(*QUICK, f"--output_dir={out}", f"--algorithm={algorithm}")
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(os.listdir(out))
    assert names == {"run.json", "history.csv", "evaluation.json", "config.json",
                     "learning_curves.png", "adaptation_curve.png", "learner.keras", "backup",
                     "adapted_model", "adaptive_model"}
    assert os.listdir(out / "backup") == ["latest.weights.h5"]  # kept: --epochs may grow
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["tasks"] == 20 and evaluation["inner_steps"] == 3
    assert evaluation["loss"] > 0 and evaluation["loss_ci95"] > 0
    rows = _history(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # Meta-validation under Keras' validation names, the curve, and no empty column.
    assert {"loss", "val_loss", "val_loss_ci95", "adaptation_loss_step_0",
            "adaptation_loss_step_3"} <= set(rows[0])
    assert all(value not in ("", "NA") for row in rows for value in row.values()), rows
    # The curve's last step is the validation loss: one evaluation of the same tasks.
    assert float(rows[-1]["adaptation_loss_step_3"]) == pytest.approx(float(rows[-1]["val_loss"]))
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == algorithm
    assert config["intra_op_threads"] == 1  # read from TensorFlow: the pools were set
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "finished" and state["epochs"] == 2
    assert state["settings"]["algorithm"] == algorithm
    assert "Held-out tasks after 3 inner steps: loss" in result.stdout


def test_help_lists_keras_metas_own_flags():
    result = _cli("--help", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--mode: <train|evaluate|export>", "--learner", "--[no]restart", "--algorithm",
                 "--cg_damping", "--[no]proximal_pull_back", "--eval_l2_regularization",
                 "--meta_learning_rate", "--intra_op_threads", "Exit codes:"):
        assert flag in result.stdout, flag
    # absl's flags are not listed (--helpfull has them).
    assert "--[no]logtostderr" not in result.stdout and "--verbosity" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--algorithm=reptile"], "flag --algorithm=reptile: value should be one of "
                              "<maml|fomaml|anil|imaml>"),
    # (tests/test_cli_edges.py checks this one in-process, with the other bad flags)
    pytest.param(["--intra_op_threads=100000"], "flag --intra_op_threads=100000: 100000 is not an "
                 "integer in the range [0, 1024]", marks=pytest.mark.large),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    result = _cli(*args, f"--output_dir={tmp_path}", "--verbose=0", timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _parsed(*args):
    cli.FLAGS(["keras-meta", *args])
    try:
        return cli._settings(), cli._learner(cli._settings()).get_config()
    finally:
        cli.FLAGS.unparse_flags()


def test_imaml_defaults_are_the_configuration_that_learns_on_omniglot():
    # docs/imaml.md: the official code's damped operator and inner loop, evaluated with
    # lambda = 0 and 16 steps.
    settings, config = _parsed("--algorithm=imaml", "--dataset=omniglot")
    assert settings["inner_steps"] == 16 and settings["inner_learning_rate"] == 0.1
    for key, value in {"cg_damping": 1.0, "cg_l2_damping": 10.0, "proximal_pull_back": True,
                       "l2_regularization": 2.0, "eval_l2_regularization": 0.0,
                       "inner_steps": 16, "eval_inner_steps": 16,
                       "inner_learning_rate": 0.1}.items():
        assert config[key] == value, key
    _, config = _parsed("--algorithm=imaml", "--cg_damping=0", "--cg_l2_damping=0",
                        "--noproximal_pull_back", "--eval_l2_regularization=2")
    assert (config["cg_damping"], config["cg_l2_damping"], config["proximal_pull_back"],
            config["eval_l2_regularization"]) == (0.0, 0.0, False, 2.0)


def test_anil_defaults_to_five_inner_steps():
    settings, config = _parsed("--algorithm=anil", "--dataset=omniglot")  # docs/anil.md
    assert settings["inner_steps"] == config["inner_steps"] == 5
    assert config["inner_learning_rate"] == 0.4 and config["eval_inner_steps"] == 10


def test_evaluate_and_export_a_saved_learner(tmp_path, capsys):
    """--mode=evaluate reproduces the training's evaluation with the same seed, and scores new
    tasks with another; --mode=export writes both SavedModels."""
    out = tmp_path / "run"
    tiny = ["--algorithm=fomaml", "--epochs=1", "--steps_per_epoch=2", "--meta_batch_size=4",
            "--eval_tasks=6", "--val_tasks=4", "--eval_inner_steps=2", "--verbose=0",
            "--intra_op_threads=0"]
    assert cli.run_command([*tiny, f"--output_dir={out}"]) == 0
    trained = json.loads((out / "evaluation.json").read_text())
    scores = tmp_path / "scores"
    common = ["--eval_tasks=6", "--verbose=0", "--intra_op_threads=0",
              f"--learner={out / 'learner.keras'}", f"--output_dir={scores}"]
    assert cli.run_command(["--mode=evaluate", "--eval_inner_steps=2", *common]) == 0
    again = json.loads((scores / "evaluation.json").read_text())
    assert again["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert again["learner"] == str(out / "learner.keras") and again["seed"] == 0
    assert cli.run_command(["--mode=evaluate", "--seed=5", *common]) == 0
    other = json.loads((scores / "evaluation.json").read_text())
    assert other["inner_steps"] == 2  # the learner's eval_inner_steps
    assert other["seed"] == 5 and other["loss"] != pytest.approx(trained["loss"], rel=1e-3)
    assert cli.run_command(["--mode=export", *common]) == 0
    assert {"adapted_model", "adaptive_model", "evaluation.json"} == set(os.listdir(scores))
    assert "Exported" in capsys.readouterr().out


@pytest.mark.large
def test_anil_on_omniglot_images_learns(tmp_path, omniglot_dir):  # noqa: F811
    out = tmp_path / "run"
    result = _cli("--algorithm=anil", "--dataset=omniglot", f"--data_dir={omniglot_dir}",
                  "--epochs=2", "--steps_per_epoch=30", "--meta_batch_size=4", "--eval_tasks=40",
                  "--val_tasks=20", "--verbose=0", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["accuracy"] > 0.4  # chance: 0.2
    rows = _history(out / "history.csv")
    assert {"val_accuracy", "adaptation_accuracy_step_10"} <= set(rows[0])


@pytest.mark.large
def test_imaml_defaults_learn_on_omniglot_images(tmp_path, omniglot_dir):  # noqa: F811
    out = tmp_path / "run"
    result = _cli("--algorithm=imaml", "--dataset=omniglot", f"--data_dir={omniglot_dir}",
                  "--epochs=1", "--steps_per_epoch=40", "--meta_batch_size=4", "--eval_tasks=40",
                  "--val_tasks=20", "--verbose=0", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(out / "history.csv")
    assert float(rows[0]["cg_negative_curvature"]) == 0.0  # the damped operator
    assert json.loads((out / "evaluation.json").read_text())["accuracy"] > 0.35


@pytest.mark.large
def test_killed_run_resumes_from_its_backup(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "keras_meta", "--epochs=4", "--steps_per_epoch=300",
            "--eval_tasks=20", "--val_tasks=10", "--verbose=0", f"--output_dir={out}"]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "history.csv"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if history.exists() and len(history.read_text().splitlines()) >= 3:  # 2 epochs
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stdout
    # every epoch once, whatever the moment of the kill
    assert [int(r["epoch"]) for r in _history(history)] == [0, 1, 2, 3]
    learner = keras.saving.load_model(out / "learner.keras")
    assert int(learner.optimizer.iterations) == 4 * 300
    assert all(np.all(np.isfinite(np.asarray(v))) for v in learner.weights)
