"""One test per bad input of the command line and of resuming: each asserts its one-line message.

In-process (`keras_meta.cli.run_command`), on tiny sinusoid runs: one trained
run is shared by the tests that need one, and most cases fail before any
TensorFlow work.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

import keras_meta as km
from keras_meta import cli
from keras_meta.algorithms import base

TINY = ["--algorithm=fomaml", "--epochs=2", "--steps_per_epoch=2", "--meta_batch_size=4",
        "--eval_tasks=4", "--val_tasks=4", "--eval_inner_steps=1", "--verbose=0",
        "--intra_op_threads=0"]


def _run(capsys, *args):
    """Exit code and the one error line (None if none) of `keras-meta args`, stdout too."""
    code = cli.run_command(list(args))
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, err
    assert "Traceback" not in err
    return code, (errors[0] if errors else None), out


def _fails(capsys, match, *args, code=2):
    import re

    received, error, _ = _run(capsys, *args)
    assert received == code, (received, error)
    assert error is not None and re.search(match, error), error
    return error


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch sinusoid run (TINY), trained once for this file."""
    out = tmp_path_factory.mktemp("cli_edges") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "AUTO_XLA_ON_CPU", False)  # as the autouse fixture does
        assert cli.run_command([*TINY, f"--output_dir={out}"]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run that a test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# Flags.

@pytest.mark.parametrize("args, match", [
    (["--meta_learning_rate=0"], r"flag --meta_learning_rate=0\.0: the meta step size must be > 0"),
    (["--meta_learning_rate=-0.1"], r"flag --meta_learning_rate=-0\.1: the meta step size must be > 0"),
    (["--inner_learning_rate=0"], r"flag --inner_learning_rate=0\.0: the inner step size must be > 0"),
    (["--l2_regularization=0", "--algorithm=imaml"],
     r"flag --l2_regularization=0\.0: the proximal strength must be > 0"),
    (["--intra_op_threads=100000"],
     r"flag --intra_op_threads=100000: 100000 is not an integer in the range \[0, 1024\]"),
    (["--verbose=3"], r"flag --verbose=3: 3 is not an integer in the range \[0, 2\]"),
    (["--mode=predict"], r"flag --mode=predict: value should be one of <train\|evaluate\|export>"),
    (["--steps_per_epoch=0"], r"flag --steps_per_epoch=0: 0 is not a positive integer"),
    (["--no_such_flag=1"], r"Unknown command line flag 'no_such_flag'"),
])
def test_bad_flag_values(capsys, tmp_path, args, match):
    _fails(capsys, match, *args, f"--output_dir={tmp_path}")


@pytest.mark.parametrize("args, match", [
    (["--cg_damping=0.5"], r"--cg_damping is for --algorithm=imaml\. Received: --algorithm=maml"),
    (["--algorithm=anil", "--noproximal_pull_back", "--eval_l2_regularization=1"],
     r"--proximal_pull_back, --eval_l2_regularization are for --algorithm=imaml\. "
     r"Received: --algorithm=anil"),
    (["--learner=x.keras"], r"--learner is for --mode=evaluate or --mode=export; .* "
                            r"Received: --learner=x\.keras"),
    (["--mode=evaluate", "--epochs=3", "--algorithm=maml"],
     r"--algorithm, --epochs are for --mode=train; .* Received: --mode=evaluate"),
    (["--n_way=8"], r"--n_way is for --dataset=omniglot"),
    (["--data_dir=/tmp"], r"--data_dir is for --dataset=omniglot"),
    (["--dataset=omniglot", "--data_dir=/nonexistent/omniglot"],
     r"--data_dir='/nonexistent/omniglot' is not a directory"),
    (["positional"], r"unexpected arguments \['positional'\]"),
])
def test_bad_flag_combinations(capsys, tmp_path, args, match):
    _fails(capsys, match, *args, f"--output_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out" / "run.json").exists()


# --output_dir.

def test_output_dir_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    _fails(capsys, r"--output_dir=.*/file is a file, not a folder", f"--output_dir={path}")


def test_output_dir_below_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    _fails(capsys, r"--output_dir=.*/file/run/a cannot be created: .*/file is a file",
           f"--output_dir={tmp_path / 'file' / 'run' / 'a'}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_not_writable(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _fails(capsys, r"--output_dir=.*/locked/run is not a writable folder \(Permission denied\)",
               f"--output_dir={locked / 'run'}")
    finally:
        locked.chmod(0o700)


# Training that diverges.

@pytest.mark.parametrize("args", [["--inner_learning_rate=1e4", "--inner_steps=3"],
                                  ["--meta_learning_rate=1e8"]])
def test_diverging_run_fails_and_saves_nothing(capsys, tmp_path, args):
    out = tmp_path / "run"
    _fails(capsys, r"training diverged: the loss is nan at meta-step \d of epoch 1; nothing was "
                   r"saved, nothing was evaluated or exported\. Lower --meta_learning_rate",
           *TINY, *args, f"--output_dir={out}", code=1)
    names = set(os.listdir(out))
    assert not names & {"learner.keras", "backup", "evaluation.json", "adapted_model",
                        "adaptive_model"}, names
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


# Resuming.

def test_rerunning_a_finished_run_trains_nothing(capsys, trained):
    history = (trained / "history.csv").read_text()
    code, error, out = _run(capsys, *TINY, f"--output_dir={trained}")
    assert (code, error) == (0, None)
    assert "holds a finished run of 2 epochs with these settings: nothing to train" in out
    assert (trained / "history.csv").read_text() == history


@pytest.mark.parametrize("flag, message", [
    ("--algorithm=imaml", r"--algorithm=fomaml \(now imaml\), --inner_steps=1 \(now 16\), "
                          r"--inner_learning_rate=0\.01 \(now 0\.1\)"),
    ("--inner_learning_rate=0.02", r"--inner_learning_rate=0\.01 \(now 0\.02\)"),
    ("--meta_learning_rate=0.01", r"--meta_learning_rate=0\.001 \(now 0\.01\)"),
    ("--seed=3", r"--seed=0 \(now 3\)"),
    ("--k_shot=5", r"--k_shot=10 \(now 5\)"),
    ("--steps_per_epoch=3", r"--steps_per_epoch=2 \(now 3\)"),
])
def test_resume_refuses_other_settings(capsys, trained, flag, message):
    error = _fails(capsys, r"--output_dir=.* holds a run with other settings: " + message,
                   *TINY, flag, f"--output_dir={trained}")
    assert "Rerun with the same flags to resume it, pass a new --output_dir, or add --restart" in error


def test_restart_discards_the_old_run(capsys, run_copy):
    # Another learning rate is accepted with --restart: the old run is deleted first.
    code, error, _ = _run(capsys, *TINY, "--epochs=1", "--meta_learning_rate=0.002", "--restart",
                          f"--output_dir={run_copy}")
    assert (code, error) == (0, None)
    state = json.loads((run_copy / "run.json").read_text())
    assert state["settings"]["meta_learning_rate"] == 0.002 and state["epochs"] == 1
    assert (run_copy / "history.csv").read_text().count("\n") == 2  # header and one epoch


def test_truncated_backup(capsys, run_copy):
    backup = run_copy / "backup" / "latest.weights.h5"
    backup.write_bytes(backup.read_bytes()[:2000])
    _fails(capsys, r"the backup .*/backup/latest\.weights\.h5 cannot be read \(.*\): it is "
                   r"truncated or corrupt\. Pass --restart to start over, or a new --output_dir",
           *TINY, "--epochs=3", f"--output_dir={run_copy}")


def test_corrupt_run_json(capsys, run_copy):
    (run_copy / "run.json").write_text('{"settings": {"algori')
    _fails(capsys, r".*/run\.json cannot be read \(.*\): it is truncated or corrupt\. Pass "
                   r"--restart", *TINY, f"--output_dir={run_copy}")


def test_leftovers_without_run_json(capsys, run_copy):
    (run_copy / "run.json").unlink()
    _fails(capsys, r"--output_dir=.* holds config\.json, history\.csv, evaluation\.json, "
                   r"learner\.keras, .*, backup, adapted_model, adaptive_model but no run\.json "
                   r"\(.*\): pass a new --output_dir, or --restart", *TINY, f"--output_dir={run_copy}")


def test_missing_backup_with_a_history(capsys, run_copy):
    shutil.rmtree(run_copy / "backup")
    _fails(capsys, r".*/backup/latest\.weights\.h5 is missing while history\.csv records 2 epochs",
           *TINY, "--epochs=3", f"--output_dir={run_copy}")


def test_more_epochs_continue_a_finished_run(capsys, run_copy):
    # test_resume.py checks that a resumed run ends where an uninterrupted one does.
    code, error, out = _run(capsys, *TINY, "--epochs=3", f"--output_dir={run_copy}")
    assert (code, error) == (0, None) and f"Resuming {run_copy} after epoch 2 of 3" in out
    assert [line.split(",")[0] for line in
            (run_copy / "history.csv").read_text().splitlines()[1:]] == ["0", "1", "2"]
    assert int(keras.saving.load_model(run_copy / "learner.keras").optimizer.iterations) == 6
    assert json.loads((run_copy / "run.json").read_text())["epochs"] == 3


# Saved learners (--mode=evaluate / export).

def test_evaluate_without_a_learner(capsys, tmp_path):
    _fails(capsys, r"--learner=.*/learner\.keras does not exist: train one first",
           "--mode=evaluate", "--intra_op_threads=0", f"--output_dir={tmp_path}")


def test_evaluate_a_file_that_is_not_a_learner(capsys, tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    _fails(capsys, r"--learner=.*/junk\.keras cannot be loaded \(.*\): it is truncated, corrupt",
           "--mode=evaluate", "--intra_op_threads=0", f"--learner={junk}",
           f"--output_dir={tmp_path}")
    (tmp_path / "run.json").write_text("{}")
    _fails(capsys, r"--learner=.*/run\.json is not a \.keras file", "--mode=export",
           "--intra_op_threads=0", f"--learner={tmp_path / 'run.json'}", f"--output_dir={tmp_path}")


def test_evaluate_a_plain_keras_model(capsys, tmp_path):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.save(tmp_path / "plain.keras")
    _fails(capsys, r"--learner=.*/plain\.keras holds a Sequential, not a keras_meta meta-learner",
           "--mode=evaluate", "--intra_op_threads=0", f"--learner={tmp_path / 'plain.keras'}",
           f"--output_dir={tmp_path}")


def test_evaluate_a_learner_with_nan_weights(capsys, trained, tmp_path):
    learner = keras.saving.load_model(trained / "learner.keras")
    learner.model.weights[0].assign(np.full(learner.model.weights[0].shape, np.nan))
    keras.Model.save(learner, tmp_path / "nan.keras")  # learners themselves refuse to
    _fails(capsys, r"--learner=.*/nan\.keras holds non-finite weights \(.*kernel.*\): it cannot be "
                   r"evaluated or exported", "--mode=export", "--intra_op_threads=0",
           f"--learner={tmp_path / 'nan.keras'}",
           f"--output_dir={tmp_path}")
    assert not (tmp_path / "adapted_model").exists()


def test_evaluate_a_learner_on_the_wrong_task_family(capsys, trained, tmp_path):
    # A 5-way conv4 learner on 3-way tasks; the sinusoid MLP on images.
    learner = km.ANIL(km.models.conv4(5, seed=0), inner_learning_rate=0.4)
    learner.compile(optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    learner.optimizer.build(learner.model.trainable_variables)
    learner.save(tmp_path / "conv4.keras")
    data = _tiny_omniglot(tmp_path / "omniglot")
    common = ["--mode=evaluate", "--dataset=omniglot", f"--data_dir={data}", "--eval_tasks=2",
              "--k_shot=1", "--q_query=1", f"--output_dir={tmp_path}", "--verbose=0",
              "--intra_op_threads=0"]
    _fails(capsys, r"--learner=.*/conv4\.keras predicts 5 classes; --n_way=3 tasks need 3: pass "
                   r"--n_way=5", *common, "--n_way=3", f"--learner={tmp_path / 'conv4.keras'}")
    _fails(capsys, r"--learner=.*/learner\.keras takes inputs of shape \(1,\); the "
                   r"--dataset=omniglot tasks have inputs of shape \(28, 28, 1\)",
           *common, f"--learner={trained / 'learner.keras'}")


def _tiny_omniglot(root):
    """A few fake characters in the Omniglot folder layout: enough for the test split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for alphabet in range(2):
        for character in range(15):  # the MAML split scaled to 30: 8 test characters
            folder = root / f"Alphabet_{alphabet}" / f"character{character:02d}"
            folder.mkdir(parents=True)
            for drawer in range(2):
                pixels = (rng.random((28, 28)) > 0.5).astype("uint8") * 255
                Image.fromarray(pixels).save(folder / f"{character:02d}_{drawer:02d}.png")
    return root
