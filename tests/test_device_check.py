"""The device check (`benchmarks/device_check.py`), the device-aware "auto" rules
(`keras_meta.devices`) and the CPU thread pools set at import (`keras_meta.threads`)."""

import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest

import keras_meta as km
from keras_meta import devices, threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "benchmarks", "device_check.py")
Device = namedtuple("Device", "name device_type")
CPU = Device("/physical_device:CPU:0", "CPU")
GPU = Device("/physical_device:GPU:0", "GPU")
TPU = Device("/physical_device:TPU:0", "TPU")


# ----------------------------------------------------------------------
# keras_meta.devices


def test_device_kind_prefers_tpu_then_gpu_then_cpu():
    assert devices.device_kind([CPU]) == "cpu"
    assert devices.device_kind([]) == "cpu"
    assert devices.device_kind([CPU, GPU]) == "gpu"
    assert devices.device_kind([CPU, GPU, TPU]) == "tpu"
    assert devices.device_kind() == "cpu"  # this machine (CI has no accelerator)


@pytest.mark.auto_xla
def test_cpu_rules_are_the_learners_rules():
    """The CPU rules equal what the learners resolve today (base.py, anil.py)."""
    import keras

    conv = km.models.conv4(2, filters=4, input_shape=(8, 8, 1), seed=0)
    dense = km.models.mlp(seed=0)
    for learner_class in (km.MAML, km.ANIL, km.IMAML):
        for model, has_convolutions in ((conv, True), (dense, False)):
            learner = learner_class(model)
            assert learner.resolved_task_execution == devices.auto_task_execution(
                has_convolutions, "cpu")
    # compile(jit_compile="auto") on this CPU-only machine (the `auto_xla` mark
    # keeps keras_meta's CPU rule on).
    for model, has_convolutions in ((conv, True), (dense, False)):
        learner = km.MAML(model)
        loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                if has_convolutions else "mse")
        learner.compile(optimizer="sgd", loss=loss)
        assert learner.jit_compile == devices.auto_jit_compile(has_convolutions, "cpu")


@pytest.mark.auto_xla
def test_learners_choose_by_device_kind_and_follow_measured_rules(monkeypatch):
    """On a GPU the learners batch tasks and use XLA; measured rules override either."""
    import keras

    conv = km.models.conv4(2, filters=4, input_shape=(8, 8, 1), seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    monkeypatch.setattr(devices, "device_kind", lambda physical_devices=None: "gpu")
    for learner_class in (km.MAML, km.ANIL, km.IMAML):
        learner = learner_class(conv)
        assert learner.resolved_task_execution == "vectorized"
        learner.compile(optimizer="sgd", loss=loss)
        assert learner.jit_compile is True
    try:
        devices.use_measured_rules({"environment": {"device_kind": "gpu"}, "benchmarks": {"rows": [
            {"bench": b, "task_execution": "sequential", "jit_compile": False,
             "steps_per_s": {"median": 2.0}} for b in devices.CONV_BENCHES] + [
            {"bench": b, "task_execution": "vectorized", "jit_compile": True,
             "steps_per_s": {"median": 1.0}} for b in devices.CONV_BENCHES]}})
        assert devices.active_rules()["gpu"]["conv"]["task_execution"] == "sequential"
        learner = km.MAML(conv)
        assert learner.resolved_task_execution == "sequential"
        learner.compile(optimizer="sgd", loss=loss)
        assert learner.jit_compile is False
        # A rule that is not one is refused, naming what it needs.
        with pytest.raises(ValueError, match="task_execution in"):
            devices.use_measured_rules({"gpu": {"conv": {"task_execution": "batched",
                                                         "jit_compile": True}}})
    finally:
        assert devices.use_measured_rules(None) == {}
    assert km.MAML(conv).resolved_task_execution == "vectorized"  # the default again


def test_accelerator_rules_follow_published_practice_and_say_unmeasured():
    for kind in ("gpu", "tpu"):
        for has_convolutions in (True, False):
            assert devices.auto_task_execution(has_convolutions, kind) == "vectorized"
            assert devices.auto_jit_compile(has_convolutions, kind) is True
            assert devices.auto_jit_compile(has_convolutions, kind, distributed=True) is False
            assert devices.DEFAULT_RULES[kind]["conv" if has_convolutions else "dense"][
                "measured"] is False
    assert devices.auto_jit_compile(False, "cpu", distributed=True) is False
    assert devices.auto_task_execution(True, "cpu") == "sequential"
    assert devices.auto_task_execution(False, "cpu") == "vectorized"


def test_rules_reject_unknown_device_kinds():
    with pytest.raises(ValueError, match=r"`device_kind` must be one of \('cpu', 'gpu', "
                                         r"'tpu'\). Received: device_kind='cuda'"):
        devices.auto_task_execution(True, "cuda")
    with pytest.raises(ValueError, match="Received: device_kind='GPU'"):
        devices.auto_jit_compile(True, "GPU", distributed=True)


def _row(bench, task_execution, jit, rate):
    return {"bench": bench, "task_execution": task_execution, "jit_compile": jit,
            "steps_per_s": {"median": rate}}


def test_measured_rules_choose_the_fastest_complete_pair_and_override_defaults(tmp_path):
    rows = [_row("B1", "vectorized", True, 900.0), _row("B1", "sequential", False, 100.0),
            # conv: sequential+XLA is fastest on B2 but never ran B5: not chosen.
            _row("B2", "sequential", True, 50.0), _row("B2", "vectorized", True, 8.0),
            _row("B2", "sequential", False, 4.0), _row("B5", "vectorized", True, 2.0),
            _row("B5", "sequential", False, 1.0),
            _row("B3", "vectorized", True, None),  # a failed row has no rate
            # steps_per_execution=25 is another setting: not compared.
            {**_row("B1", "sequential", False, 5000.0), "steps_per_execution": 25}]
    check = {"environment": {"device_kind": "gpu"}, "benchmarks": {"rows": rows}}
    rules = devices.measured_rules(check)
    assert set(rules) == {"gpu"}
    assert rules["gpu"]["dense"]["task_execution"] == "vectorized"
    assert rules["gpu"]["dense"]["jit_compile"] is True
    conv = rules["gpu"]["conv"]
    assert (conv["task_execution"], conv["jit_compile"]) == ("vectorized", True)
    assert conv["benches"] == ["B2", "B5"]
    assert conv["geometric_mean_steps_per_s"] == pytest.approx(4.0)  # sqrt(8 * 2)
    # A file works as well, and the rules then override the defaults.
    path = tmp_path / "check.json"
    path.write_text(json.dumps(check))
    assert devices.measured_rules(str(path)) == rules
    slow_cpu = {"cpu": {"conv": {"task_execution": "vectorized", "jit_compile": True}}}
    assert devices.auto_task_execution(True, "cpu", rules=slow_cpu) == "vectorized"
    assert devices.auto_task_execution(False, "cpu", rules=slow_cpu) == "vectorized"
    assert devices.auto_jit_compile(True, "cpu", rules=slow_cpu) is True
    assert devices.auto_jit_compile(True, "gpu", rules=slow_cpu) is True  # gpu: defaults
    assert devices.measured_rules({"environment": {"device_kind": "cpu"}}) == {}


# ----------------------------------------------------------------------
# keras_meta.threads: the pools set at import


def _decide(monkeypatch, environ=(), pools=(0, 0), started=False, physical=(CPU,), cores=2):
    monkeypatch.setattr(threads.tf.config.threading, "get_intra_op_parallelism_threads",
                        lambda: pools[0])
    monkeypatch.setattr(threads.tf.config.threading, "get_inter_op_parallelism_threads",
                        lambda: pools[1])
    monkeypatch.setattr(threads, "runtime_started", lambda: started)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    environ = dict(environ)
    return threads._decide(environ, environ.get(threads.OPT_OUT_VARIABLE, "1"),
                           list(physical), devices)


def test_import_time_rule_configures_only_when_safe(monkeypatch):
    assert _decide(monkeypatch) is None  # configure
    assert _decide(monkeypatch, cores=1) is None
    cases = [
        (dict(environ={"KERAS_META_CPU_THREADS": "0"}), "KERAS_META_CPU_THREADS=0"),
        (dict(environ={"TF_NUM_INTRAOP_THREADS": "4"}), "TF_NUM_INTRAOP_THREADS is set"),
        (dict(environ={"TF_NUM_INTEROP_THREADS": "1"}), "TF_NUM_INTEROP_THREADS is set"),
        (dict(pools=(2, 0)), r"pools already set \(intra_op=2, inter_op=0\)"),
        (dict(pools=(0, 3)), r"pools already set \(intra_op=0, inter_op=3\)"),
        (dict(started=True), "TensorFlow's runtime had already started"),
        (dict(physical=(CPU, GPU)), "a GPU is visible"),
        (dict(physical=(CPU, TPU)), "a TPU is visible"),
        (dict(cores=4), r"4 cores \(more than 2, not measured\)"),
    ]
    import re

    for kwargs, reason in cases:
        status = _decide(monkeypatch, **kwargs)
        assert status["configured"] is False
        assert re.fullmatch(reason, status["reason"]), (kwargs, status)


def test_bad_opt_out_value_is_refused():
    with pytest.raises(ValueError, match=r"`KERAS_META_CPU_THREADS` must be 0 \(keep "
                                         r"TensorFlow's thread pools\) or 1 .* Received: "
                                         r"KERAS_META_CPU_THREADS='yes'"):
        threads.configure_at_import(environ={"KERAS_META_CPU_THREADS": "yes"})


def _python(code, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("KERAS_META_CPU_THREADS", "TF_NUM_INTRAOP_THREADS",
                            "TF_NUM_INTEROP_THREADS")}
    environ.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


POOLS = ("import tensorflow as tf; print(km.threads.import_time_configuration()['reason'], "
         "tf.config.threading.get_intra_op_parallelism_threads(), "
         "tf.config.threading.get_inter_op_parallelism_threads(), "
         "km.threads.cpu_threads_hint() is None)")


def test_import_sets_the_pools_on_a_small_cpu_machine_and_they_stay_changeable():
    cores = threads.usable_cores()
    code = "import keras_meta as km; " + POOLS
    if cores <= threads.MAX_CORES_AT_IMPORT:
        expected = f"CPU-only machine, pools not set 1 {cores} True"
    else:
        expected = f"{cores} cores (more than 2, not measured) 0 0 False"
    assert _python(code) == expected
    # Opted out: TensorFlow's defaults, and no note at fit.
    assert _python(code, KERAS_META_CPU_THREADS="0") == "KERAS_META_CPU_THREADS=0 0 0 True"
    # The user's own settings win and can still change after the import.
    changed = ("import keras_meta as km; km.configure_cpu_threads(intra_op=2, inter_op=3); "
               "import tensorflow as tf; tf.constant(1.0); " + POOLS)
    assert _python(changed).endswith(" 2 3 True")


def test_import_after_tensorflow_started_touches_nothing_and_gives_the_hint():
    code = ("import tensorflow as tf; tf.constant(1.0); import keras_meta as km; " + POOLS
            + "; print(km.threads.cpu_threads_hint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "TensorFlow's runtime had already started 0 0 False"
    assert "km.configure_cpu_threads()" in lines[-1]
    assert "KERAS_META_CPU_THREADS=0 silences this note" in lines[-1]


# ----------------------------------------------------------------------
# benchmarks/device_check.py


PLACEMENT_CODE = """
import sys
sys.path.insert(0, "benchmarks")
import device_check as dc
from tensorflow.core.protobuf import config_pb2
metadata = config_pb2.RunMetadata()
graph = metadata.function_graphs.add().partition_graphs.add()
gpu, cpu = ("/job:localhost/replica:0/task:0/device:" + d for d in ("GPU:0", "CPU:0"))
for name, op, device, dtype in [("a", "MatMul", gpu, 1), ("b", "MatMul", cpu, 1),
                                ("c", "Shape", cpu, 3), ("d", "IteratorGetNext", cpu, 0),
                                ("e", "_Recv", gpu, 1), ("f", "Conv2D", cpu, 19),
                                ("g", "_Send", cpu, 1)]:
    node = graph.node.add(name=name, op=op, device=device)
    if dtype:
        node.attr["T"].type = dtype
    if op in ("_Send", "_Recv"):
        node.attr["send_device"].s, node.attr["recv_device"].s = cpu.encode(), gpu.encode()
print(dc.analyse_placement(metadata, "GPU:0"))
"""


def test_placement_analysis_sorts_what_is_off_the_device():
    """On a GPU run: float ops on the host are a fallback; integer and input ops are listed apart."""
    result = subprocess.run([sys.executable, "-c", PLACEMENT_CODE], capture_output=True,
                            text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = eval(result.stdout.strip().splitlines()[-1])  # a dict literal
    assert analysis == {
        "ops_per_device": {"GPU:0": 2, "CPU:0": 5},  # transfers are counted apart
        "off_device_ops": {"MatMul": 1, "Conv2D": 1},  # float32 and float16 work on the host
        "host_integer_ops": {"Shape": 1}, "host_by_design_ops": {"IteratorGetNext": 1},
        "transfers": {"_Recv": 1, "_Send": 1}, "transfers_by_direction": {"CPU:0->GPU:0": 1},
        "xla_compiled_calls_on": [], "function_graphs": 1, "all_on_device": False}


def _run_check(tmp_path, *args, timeout=300):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, CHECK, f"--out={out}", *args], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    with open(out) as f:
        return json.load(f), result


def _assert_report(report, full_matrix=False):
    assert report["schema"] == 1 and report["mode"] == "quick"
    for name in ("environment", "placement", "gradients", "benchmarks", "memory"):
        assert report[name]["status"] == "ok", (name, report[name].get("errors"))
        assert report[name]["wall_s"] > 0
    env = report["environment"]
    assert env["device_kind"] == "cpu" and env["target_device"] == "CPU:0"
    assert env["tensorflow"].startswith("2.") and env["keras"].startswith("3.")
    assert env["tensor_float_32"] is False or env["tensor_float_32"] is True
    assert "cuda_build" in env and "physical_devices" in env
    assert report["host"]["cpu_count"] >= 1

    placement = report["placement"]
    assert sorted(r["learner"] for r in placement["results"]) == ["anil", "imaml", "maml"]
    for r in placement["results"]:
        assert r["all_on_device"] is True and r["off_device_ops"] == {}
        assert set(r["ops_per_device"]) == {"CPU:0"}
        assert r["ops_per_device"]["CPU:0"] > 100  # the whole inlined meta-step
        assert r["transfers"] == {} and r["transfers_by_direction"] == {}

    gradients = report["gradients"]["results"]
    assert sorted(r["learner"] for r in gradients) == ["anil", "imaml", "maml"]
    for r in gradients:
        assert r["gradient_norm_float64"] > 0
        # float32 against float64: about float32 rounding, amplified by the inner loop.
        assert 0 < r["rel_error_cpu_vs_float64"] < 1e-3
        assert 0 <= r["rel_error_device_vs_cpu"] < 1e-3
        assert r["rel_error_device_vs_float64"] < 1e-3

    rows = report["benchmarks"]["rows"]
    assert {r["bench"] for r in rows} == {"B1", "B2", "B3", "B4", "B5"}
    b1 = {(r["task_execution"], r["jit_compile"]) for r in rows if r["bench"] == "B1"}
    assert {("sequential", False), ("vectorized", True), ("vectorized", False)} <= b1
    if full_matrix:
        for bench in ("B1", "B2", "B3", "B4", "B5"):
            pairs = {(r["task_execution"], r["jit_compile"]) for r in rows if r["bench"] == bench}
            assert len(pairs) == 4, (bench, pairs)
    for r in rows:
        assert r["steps_per_s"]["median"] > 0 and r["first_step_s"] > 0
        assert r["steps_per_s"]["min"] <= r["steps_per_s"]["median"] <= r["steps_per_s"]["max"]

    memory = report["memory"]["rows"]
    assert {(r["algo"], r["inner_steps"]) for r in memory} >= {
        ("maml", 1), ("maml", 2), ("imaml", 3)}
    for r in memory:
        assert r["peak_mb"] > 0 and r["step_added_mb"] is not None and r["source"]

    rules = report["rules"]
    assert rules["status"] == "ok" and rules["device_kind"] == "cpu"
    assert rules["defaults"] == json.loads(json.dumps(devices.DEFAULT_RULES["cpu"]))
    assert set(rules["measured"]) <= {"conv", "dense"} and rules["measured"]


def test_quick_check_writes_every_section_with_cpu_figures(tmp_path):
    # The quick run's own limit is 57 s (under a minute on 2 idle cores); a
    # test machine shared with other work gets room, so that no part is cut.
    report, result = _run_check(tmp_path, "--quick", "--total_budget_s=170")
    _assert_report(report)
    assert "device check (quick)" in result.stdout
    assert report["total_budget_s"] == 170 and report["wall_s"] < 175


def test_tensor_float_32_is_off_in_the_tests():
    """conftest.py pins TF32 off, so that float32 tolerances hold on GPUs too."""
    import tensorflow as tf

    assert tf.config.experimental.tensor_float_32_execution_enabled() is False


@pytest.mark.large
def test_quick_check_runs_the_full_matrix(tmp_path):
    """Every (task execution, XLA) pair of the full run, at the quick sizes."""
    report, _ = _run_check(tmp_path, "--quick", "--full_matrix", "--total_budget_s=900",
                           timeout=1200)
    _assert_report(report, full_matrix=True)


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path):
    """A job that cannot finish in its budget is recorded; the JSON still has the rest."""
    report, _ = _run_check(tmp_path, "--quick", "--sections=environment,benchmarks",
                           "--benches=B1", "--budget_s=benchmarks=0.1")
    assert report["environment"]["status"] == "ok"
    assert report["placement"]["status"] == "skipped"
    bench = report["benchmarks"]
    assert bench["status"] == "error"
    assert {e["status"] for e in bench["errors"]} <= {"skipped", "timeout"}
    assert report["rules"]["status"] == "ok"


def test_unknown_section_and_bad_budget_are_refused(tmp_path):
    for args, message in ((["--sections=placement,speed"], "--sections: unknown ['speed']"),
                          (["--budget_s=placement"], "--budget_s takes section=seconds")):
        result = subprocess.run([sys.executable, CHECK, f"--out={tmp_path / 'x.json'}", *args],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
