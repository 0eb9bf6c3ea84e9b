"""The command line: a full sinusoid run, bad flags, and resuming a killed run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
QUICK = ["--epochs=2", "--steps_per_epoch=5", "--eval_tasks=20", "--val_tasks=10",
         "--eval_inner_steps=3", "--verbose=0"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "keras_meta", *args], env=ENV, timeout=timeout,
                          capture_output=True, text=True)


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
    assert {"history.csv", "evaluation.json", "config.json", "learning_curves.png",
            "adaptation_curve.png", "learner.keras", "adapted_model", "adaptive_model"} <= names
    assert "backup" not in names  # removed once training completed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["tasks"] == 20 and evaluation["inner_steps"] == 3
    assert evaluation["loss"] > 0 and evaluation["loss_ci95"] > 0
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert "meta_val_loss" in rows[0] and "adaptation_loss_step_3" in rows[0]
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == algorithm
    assert config["intra_op_threads"] == 1  # read from TensorFlow: the pools were set
    assert "Held-out tasks after 3 inner steps: loss" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--algorithm=reptile"], "value should be one of <maml|fomaml|anil|imaml>"),
    (["--inner_steps=0"], "flag --inner_steps=0: 0 is not a positive integer"),
    (["--n_way=8"], "--n_way is for --dataset=omniglot"),
    (["--dataset=omniglot", "--data_dir=/nonexistent/omniglot"], "is not a directory"),
    (["--epochs=1", "positional"], "unexpected arguments"),
    (["--intra_op_threads=-1"], "flag --intra_op_threads=-1: -1 is not"),
])
def test_bad_flags_get_a_message_not_a_traceback(tmp_path, args, message):
    result = _cli(*args, f"--output_dir={tmp_path}", "--verbose=0", timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.large
def test_killed_run_resumes_from_its_backup(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "keras_meta", "--epochs=4", "--steps_per_epoch=300",
            "--eval_tasks=20", "--val_tasks=10", "--verbose=0", f"--output_dir={out}"]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "history.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    # the epochs logged before the kill, then the rest: every epoch once
    assert epochs[-2:] == [2, 3] and sorted(set(epochs)) == [0, 1, 2, 3]
    import keras_meta  # noqa: F401  (registers the learner classes)
    import keras

    learner = keras.saving.load_model(out / "learner.keras")
    assert int(learner.optimizer.iterations) == 4 * 300
