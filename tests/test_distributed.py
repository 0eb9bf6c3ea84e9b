"""tf.distribute: MirroredStrategy on two logical CPUs and two-worker MultiWorkerMirroredStrategy."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.test_conformance import LATER_ALGORITHMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)

MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import keras_meta as km
    from tests import helpers
    from tests.test_conformance import LEARNERS

    episode = helpers.classification_episode(meta_batch=4, dtype="float32", seed=3)

    def make(name):
        learner = LEARNERS[name](helpers.small_convnet(seed=5))
        learner.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"],
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return learner

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}
    for name in sys.argv[1:]:
        single = make(name)
        initial = single.model.get_weights()
        single_logs = single.fit(tf.data.Dataset.from_tensors(episode), verbose=0).history
        with strategy.scope():
            mirrored = make(name)
            mirrored.model.set_weights(initial)
        logs = mirrored.fit(tf.data.Dataset.from_tensors(episode), verbose=0).history
        report[name] = {
            "weights": max(float(np.abs(a - b).max()) for a, b in
                           zip(single.model.get_weights(), mirrored.model.get_weights())),
            "logs": {k: [single_logs[k][0], logs[k][0]] for k in single_logs},
            "evaluate": [single.evaluate(episode, verbose=0), mirrored.evaluate(episode, verbose=0)],
        }
    if "maml" in sys.argv[1:]:
        with strategy.scope():
            uneven = make("maml")
        try:
            uneven.fit(tf.data.Dataset.from_tensors(helpers.classification_episode(meta_batch=3, dtype="float32")),
                       verbose=0)
            report["uneven"] = "no error"
        except ValueError as error:
            report["uneven"] = str(error)
    print("REPORT" + json.dumps(report))
""")


def _report(result):
    assert result.returncode == 0, result.stderr[-4000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("name", [
    "maml",  # one per algorithm; ANIL's batched tape and iMAML's CG under Mirrored: large
    pytest.param("anil", marks=pytest.mark.large),
    pytest.param("imaml", marks=pytest.mark.large),
    # The learners added on the same hooks (LSLR + per-step BatchNorm, Reptile, BOIL, ProtoNet).
    *[pytest.param(name, marks=pytest.mark.large) for name in LATER_ALGORITHMS],
])
def test_mirrored_step_equals_single_device_step_for_every_learner(name):
    result = subprocess.run([sys.executable, "-c", MIRRORED, name], env=ENV, capture_output=True,
                            text=True, timeout=900)
    report = _report(result)
    if name == "maml":
        uneven = report.pop("uneven")
        assert "must split evenly across the 2 replicas" in uneven and "[2, 1]" in uneven
    assert set(report) == {name}
    failures = {}
    for name, values in report.items():
        logs_agree = all(mirrored == pytest.approx(single, rel=1e-5, abs=1e-6)  # aggregated
                         for single, mirrored in values["logs"].values())
        evaluate_agrees = np.allclose(values["evaluate"][1], values["evaluate"][0], rtol=1e-5)
        if values["weights"] > 1e-5 or not logs_agree or not evaluate_agrees:
            failures[name] = values
    assert not failures, {name: values["weights"] for name, values in failures.items()}


WORKER = textwrap.dedent("""
    import json, os, sys
    index, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    if index >= 0:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}})
    import tensorflow as tf
    import keras, numpy as np
    import keras_meta as km

    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if index >= 0
                else tf.distribute.get_strategy())
    with strategy.scope():
        maml = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.05, inner_steps=2)
        maml.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    sizes = []
    train_step = maml.train_step
    def recording_train_step(data):
        sizes.append(int(data["support_x"].shape[0]))  # at trace time: local tasks per replica
        return train_step(data)
    maml.train_step = recording_train_step
    history = maml.fit(km.data.sinusoid(meta_batch_size=4, seed=0), epochs=1, steps_per_epoch=3,
                       verbose=0)
    np.savez(out, *maml.model.get_weights())
    print("REPORT" + json.dumps({"loss": history.history["loss"][0], "local_tasks": sizes}))
""")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_match_a_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = ",".join(map(str, _free_ports(2)))
    workers = [subprocess.Popen([sys.executable, str(script), str(i), ports, str(tmp_path / f"w{i}.npz")],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:  # always reaped, even on timeout
            if w.poll() is None:
                w.kill()
            w.wait()
    reports = []
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-4000:]
        reports.append(json.loads([l for l in out.splitlines() if l.startswith("REPORT")][-1][6:]))
    single = subprocess.run([sys.executable, str(script), "-1", ports, str(tmp_path / "s.npz")],
                            env=ENV, capture_output=True, text=True, timeout=300)
    single_report = _report(single)
    # Each worker's replica adapted 2 of the 4 tasks of each global meta-batch.
    assert [r["local_tasks"] for r in reports] == [[2], [2]] and single_report["local_tasks"] == [4]
    w0, w1, s = (np.load(tmp_path / f"{n}.npz") for n in ("w0", "w1", "s"))
    for key in s.files:
        np.testing.assert_array_equal(w0[key], w1[key])  # the workers agree exactly
        np.testing.assert_allclose(w0[key], s[key], rtol=1e-5, atol=1e-6)
    assert reports[0]["loss"] == pytest.approx(single_report["loss"], rel=1e-5)
