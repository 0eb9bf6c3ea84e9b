"""An interrupted run resumed with BackupAndRestore ends exactly where an uninterrupted one does."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_meta as km


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("simulated interruption")


def _train(backup_dir, extra_callbacks=()):
    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01, inner_steps=2)
    maml.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    # The stream starts at the learner's step count: 0 on a fresh run, the
    # restored count after BackupAndRestore.
    episodes = km.data.sinusoid(meta_batch_size=4, seed=0, start_step=maml.optimizer.iterations)
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir), *extra_callbacks]
    maml.fit(episodes, steps_per_epoch=4, epochs=3, callbacks=callbacks, verbose=0)
    return maml


def _state(maml):
    return [np.array(v) for v in maml.model.weights] + [np.array(v) for v in maml.optimizer.variables]


EXCEPTION_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    import test_resume as t
    from keras_meta.algorithms import base
    base.AUTO_XLA_ON_CPU = False  # as the suite's autouse fixture does (compile time)

    reference = t._state(t._train(sys.argv[1] + "/uninterrupted"))
    try:
        t._train(sys.argv[1] + "/interrupted", [t.Interrupt(epoch=1, batch=2)])
    except RuntimeError as error:
        assert "simulated interruption" in str(error)
    else:
        raise AssertionError("the interruption did not happen")
    resumed = t._train(sys.argv[1] + "/interrupted")
    assert int(resumed.optimizer.iterations) == 12, int(resumed.optimizer.iterations)
    np.savez(sys.argv[1] + "/reference.npz", *reference)
    np.savez(sys.argv[1] + "/resumed.npz", *t._state(resumed))
""")


def test_interrupted_run_resumes_exactly(tmp_path):
    # In a fresh interpreter: at the end of a full in-process suite run this
    # comparison failed twice on one machine (the resumed weights 0.1 apart,
    # as if the stream had restarted), while passing in isolation and in
    # every smaller group of test files; the note of that session records it.
    script = tmp_path / "resume.py"
    script.write_text(EXCEPTION_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), os.path.dirname(os.path.abspath(__file__))],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, resumed = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
    assert reference.files == resumed.files
    for key in reference.files:
        np.testing.assert_array_equal(reference[key], resumed[key])  # exact: same steps, same episodes


def test_without_start_step_the_stream_restarts(tmp_path):
    """What the docs warn about: a stream that does not resume differs."""
    def train(backup, callbacks=()):
        maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
        maml.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        maml.fit(km.data.sinusoid(meta_batch_size=4, seed=0), steps_per_epoch=4, epochs=3,
                 callbacks=[keras.callbacks.BackupAndRestore(backup), *callbacks], verbose=0)
        return _state(maml)

    reference = train(str(tmp_path / "a"))
    with pytest.raises(RuntimeError):
        train(str(tmp_path / "b"), [Interrupt(epoch=1, batch=2)])
    resumed = train(str(tmp_path / "b"))
    assert any(not np.array_equal(a, b) for a, b in zip(reference, resumed))


SCRIPT = textwrap.dedent("""
    import os, sys, numpy as np, keras, keras_meta as km

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if sys.argv[2] == "kill" and (self.epoch, batch) == (1, 2):
                os._exit(9)  # no cleanup, no exception handling: a killed process

    maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01, inner_steps=2)
    maml.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    episodes = km.data.sinusoid(meta_batch_size=4, seed=0, start_step=maml.optimizer.iterations)
    maml.fit(episodes, steps_per_epoch=4, epochs=3, verbose=0,
             callbacks=[keras.callbacks.BackupAndRestore(sys.argv[1]), Kill()])
    np.savez(sys.argv[1] + ".npz", *[np.array(v) for v in maml.model.weights + maml.optimizer.variables])
""")


@pytest.mark.large
def test_killed_process_resumes_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def run(backup, mode):
        return subprocess.run([sys.executable, str(script), str(backup), mode], env=env,
                              timeout=600, capture_output=True, text=True)

    for backup, mode, expected in (("ref", "run", 0), ("job", "kill", 9), ("job", "run", 0)):
        result = run(tmp_path / backup, mode)
        assert result.returncode == expected, (backup, mode, result.returncode, result.stderr[-3000:])
    ref, job = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "job.npz")
    for key in ref.files:
        np.testing.assert_array_equal(ref[key], job[key])


# The command line: resuming after an interruption at the moments where a naive backup goes
# wrong. In-process (`cli.run_command`); test_cli.py and the large test below kill processes.

CLI_RUN = ["--algorithm=fomaml", "--epochs=3", "--steps_per_epoch=3", "--meta_batch_size=4",
           "--eval_tasks=4", "--val_tasks=4", "--eval_inner_steps=1", "--verbose=0",
           "--intra_op_threads=0"]


def _cli_state(out):
    learner = keras.saving.load_model(os.path.join(out, "learner.keras"))
    return [np.asarray(v) for v in learner.weights + learner.optimizer.variables]


def _epochs_logged(out):
    with open(os.path.join(out, "history.csv")) as f:
        return [line.split(",")[0] for line in f.read().splitlines()[1:]]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    from keras_meta import cli
    from keras_meta.algorithms import base

    out = str(tmp_path_factory.mktemp("cli_reference"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "AUTO_XLA_ON_CPU", False)  # as the autouse fixture does
        assert cli.run_command([*CLI_RUN, f"--output_dir={out}"]) == 0
    return _cli_state(out), _epochs_logged(out)


@pytest.mark.parametrize("moment", [
    "mid-epoch",  # epoch 2, after its second meta-step
    "between learner.keras and the backup",  # epoch 2's learner saved, its backup not
    pytest.param("after the last backup",  # epoch 3 backed up, the run's end not reached
                 marks=pytest.mark.large),
])
def test_cli_resumes_exactly_after_an_interruption(tmp_path, monkeypatch, capsys, cli_reference,
                                                   moment):
    from keras_meta import cli

    out = str(tmp_path / "run")
    state = {"epoch": 0}
    write = cli._atomic_write

    def interrupting_write(path, writer):
        write(path, writer)
        done = state["epoch"] + 1
        if moment == "between learner.keras and the backup" and done == 2 and \
                path.endswith("learner.keras"):
            raise KeyboardInterrupt
        if moment == "after the last backup" and done == 3 and path.endswith(cli.BACKUP):
            raise KeyboardInterrupt

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            state["epoch"] = epoch

        def on_train_batch_end(self, batch, logs=None):
            if moment == "mid-epoch" and (state["epoch"], batch) == (1, 1):
                raise KeyboardInterrupt

    real_callbacks = cli._callbacks

    def with_clock(*args):
        guard, curve, callbacks = real_callbacks(*args)
        return guard, curve, [Clock(), *callbacks]

    with monkeypatch.context() as patch:
        patch.setattr(cli, "_callbacks", with_clock)
        patch.setattr(cli, "_atomic_write", interrupting_write)
        assert cli.run_command([*CLI_RUN, f"--output_dir={out}"]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert cli.run_command([*CLI_RUN, f"--output_dir={out}"]) == 0
    reference, logged = cli_reference
    assert _epochs_logged(out) == logged == ["0", "1", "2"]  # every epoch once
    for a, b in zip(reference, _cli_state(out)):
        np.testing.assert_array_equal(a, b)  # exact: same meta-steps on the same episodes


@pytest.mark.large
def test_cli_more_epochs_equal_a_longer_run(tmp_path, cli_reference):
    from keras_meta import cli

    out = str(tmp_path / "run")
    two = [arg if arg != "--epochs=3" else "--epochs=2" for arg in CLI_RUN]
    assert cli.run_command([*two, f"--output_dir={out}"]) == 0
    assert cli.run_command([*CLI_RUN, f"--output_dir={out}"]) == 0  # extends the finished run
    reference, logged = cli_reference
    assert _epochs_logged(out) == logged
    for a, b in zip(reference, _cli_state(out)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.large
def test_sigkilled_cli_runs_resume_exactly(tmp_path):
    """ANIL on Omniglot images, 3 epochs of 40 meta-steps of 2 tasks: runs SIGKILLed at
    seeded moments (mid-epoch, and just after an epoch's history row, where the saves are)
    and restarted end bit-identical to an uninterrupted run, with every epoch logged once."""
    import random
    import signal
    import time

    from tests.test_omniglot import OMNIGLOT_ZIPS

    import zipfile

    zips = sorted(OMNIGLOT_ZIPS.glob("images_background_small*.zip"))
    if not zips:
        pytest.skip(f"Omniglot zips not found in {OMNIGLOT_ZIPS}")
    data = tmp_path / "omniglot"
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(data)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = [sys.executable, "-m", "keras_meta", "--algorithm=anil", "--dataset=omniglot",
            f"--data_dir={data}", "--epochs=3", "--steps_per_epoch=40", "--meta_batch_size=2",
            "--eval_tasks=10", "--val_tasks=10", "--verbose=0"]

    def finish(out):
        result = subprocess.run([*args, f"--output_dir={out}"], env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    finish(tmp_path / "reference")
    reference = _cli_state(tmp_path / "reference")
    rng = random.Random(0)
    kills = []
    for trial in range(6):
        out = tmp_path / f"killed{trial}"
        rows = rng.choice([0, 1, 2, 3])  # 0: mid-epoch, at a random time
        delay = rng.uniform(0.0, 0.4) if rows else rng.uniform(8.0, 25.0)
        process = subprocess.Popen([*args, f"--output_dir={out}"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        history = out / "history.csv"
        deadline = time.time() + 600
        try:
            while rows and process.poll() is None and time.time() < deadline:
                if history.exists() and len(history.read_text().splitlines()) > rows:
                    break
                time.sleep(0.01)
            time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills.append((trial, rows, round(delay, 2)))
        finally:
            process.kill()
            process.wait()
        finish(out)
        assert _epochs_logged(out) == ["0", "1", "2"], trial
        for a, b in zip(reference, _cli_state(out)):
            np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}: {rows} rows, {delay} s")
    print("SIGKILLed (trial, history rows, delay s):", kills)
    assert len(kills) >= 4, kills
