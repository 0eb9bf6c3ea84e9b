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
