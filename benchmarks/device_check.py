"""One-command device check: what keras_meta does on this machine's accelerator.

Run it once when a GPU is at hand; it writes one JSON file that holds every
measurement, rewritten after each one (a run stopped early still leaves data):

    python benchmarks/device_check.py --out=device_check.json     # <= 8 min on a GPU
    python benchmarks/device_check.py --quick --out=check.json    # CPU smoke run, < 60 s

Sections of the JSON (each with `status`, `wall_s`, `budget_s` and its jobs'
errors, so that a part that fails is recorded and the rest still runs):

- `environment`: TensorFlow, Keras, CUDA/cuDNN (build and driver), Python and
  NumPy versions, the device's name and compute capability, the device kind,
  the CPU thread pools, TF32, the git commit.
- `placement`: for a meta-training step of conv4 MAML, ANIL and iMAML (Keras'
  train function, what `fit` runs), where TensorFlow's placer put every op
  (the partitioned graphs of the run metadata), per device; the floating-point
  ops that are not on the accelerator (`off_device_ops`: a host fallback),
  apart from the input pipeline's and integer bookkeeping (listed apart), and
  the cross-device transfers (`_Send`/`_Recv`, and per direction: the episode's
  tensors go host->device once; more, or device->host->device, is a round trip). Steps that
  XLA compiles run as one cluster: its device is recorded. On a CPU-only
  machine "every op on the accelerator" is vacuous: the per-device counts are
  still recorded.
- `gradients`: per learner, the meta-gradient of one meta-batch on the device
  against the CPU's for the same float32 weights and episode (TF32 off), and
  both against float64 on the CPU (relative errors of the whole gradient and
  the worst tensor); on a GPU also with TF32 on.
- `benchmarks`: B1-B5 (the benchmark specs of `benchmarks/run.py`: sinusoid
  MAML; Omniglot-like conv4 MAML, first-order MAML, ANIL and iMAML) for
  `task_execution` vectorized vs sequential and XLA on vs off: median
  meta-steps/s and the first step (trace + compile + run).
- `memory`: M1, the device's peak memory (`tf.config.experimental.
  get_memory_info`) during one meta-step of second-order MAML and of iMAML as
  the inner steps grow 1, 5, 10, 20, 40 (meta-batch 4).
- `rules`: the `"auto"` rules of `keras_meta.devices` for this device kind
  (published practice until measured) and the rules the benchmarks measured
  (`keras_meta.devices.measured_rules`).

Every measurement runs in a worker process, one job at a time; a job past its
time limit or a crashed worker is recorded and a fresh worker takes the next
job. `--budget_s` caps each section (`placement=60,benchmarks=200`),
`--total_budget_s` the whole run. The data are random (fixed seeds), the
weights Keras' initialisers: nothing outside the repository is needed.
"""

import datetime
import importlib.util
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SECTIONS = ("environment", "placement", "gradients", "benchmarks", "memory")
LEARNERS = ("maml", "anil", "imaml")
BENCHES = ("B1", "B2", "B3", "B4", "B5")
# The whole run's limit (a GPU run: 8 minutes with worker starts; the quick CPU
# run: under a minute on 2 cores) and each section's share of it. A section's
# time left over goes to the sections after it, in proportion to their shares.
TOTAL_BUDGET_S = {"full": 470.0, "quick": 57.0}
SHARES = {
    "full": {"environment": 0.08, "placement": 0.14, "gradients": 0.14, "benchmarks": 0.46,
             "memory": 0.18},
    "quick": {"environment": 0.18, "placement": 0.22, "gradients": 0.2, "benchmarks": 0.25,
              "memory": 0.15},
}
# Longest single job (a compile that runs away is cut, the next job runs in a
# fresh worker). Quick mode has none but the section's: there a restart costs
# more than waiting.
JOB_TIMEOUTS_S = {"environment": 60, "placement": 45, "gradients": 60, "benchmarks": 60,
                  "memory": 40}
PROTOCOL = "@@KMCHECK "

flags.DEFINE_string("out", "device_check.json", "Where the JSON goes (rewritten after each job).")
flags.DEFINE_bool("quick", False, "Tiny sizes and a reduced matrix: a CPU smoke run in < 60 s.")
flags.DEFINE_list("sections", list(SECTIONS), "Sections to run.")
flags.DEFINE_list("budget_s", [], "Per-section budgets in seconds, `section=seconds`, "
                  "instead of the section's share of the total (shares: full "
                  + ", ".join(f"{k}={v}" for k, v in SHARES["full"].items()) + "; quick "
                  + ", ".join(f"{k}={v}" for k, v in SHARES["quick"].items()) + ").")
flags.DEFINE_float("total_budget_s", None, "The whole run's limit in seconds (default: "
                   f"{TOTAL_BUDGET_S['full']:.0f}, quick {TOTAL_BUDGET_S['quick']:.0f}).")
flags.DEFINE_list("benches", list(BENCHES), "Benches of the `benchmarks` section.")
flags.DEFINE_list("m1_steps", ["1", "5", "10", "20", "40"], "M1: inner steps (quick: 1,2).")
flags.DEFINE_bool("full_matrix", False, "--quick: every (task execution, XLA) pair on every "
                  "bench, as the full run does (slower: a test marked large).")
flags.DEFINE_string("worker", None, "Internal: run jobs read from stdin (mode quick|full).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------
# Specs: the benchmark specs of benchmarks/run.py (sinusoid MAML B1, conv4
# B2-B5, memory scan M1), re-stated so that the check needs only this
# repository. Quick mode shrinks them (fewer filters, smaller images, fewer
# tasks and steps) but keeps every code path.

FULL_SPECS = {
    "B1": dict(model="mlp", algo="maml", meta_batch=25, inner_steps=1, inner_lr=0.01,
               k_support=10, k_query=10),
    "B2": dict(model="conv4", algo="maml", meta_batch=32, inner_steps=1, inner_lr=0.4),
    "B3": dict(model="conv4", algo="fomaml", meta_batch=32, inner_steps=1, inner_lr=0.4),
    "B4": dict(model="conv4", algo="anil", meta_batch=32, inner_steps=5, inner_lr=0.4),
    "B5": dict(model="conv4", algo="imaml", meta_batch=32, inner_steps=16, inner_lr=0.1),
    "M1-maml": dict(model="conv4", algo="maml", meta_batch=4, inner_steps=1, inner_lr=0.4),
    "M1-imaml": dict(model="conv4", algo="imaml", meta_batch=4, inner_steps=16, inner_lr=0.1),
}
CONV_DEFAULTS = dict(n_way=5, k_shot=1, q_query=15, filters=64, image=28, imaml_lam=2.0,
                     cg_steps=5)
QUICK_CHANGES = {
    "B1": dict(meta_batch=4, k_support=5, k_query=5),
    "B2": dict(meta_batch=2), "B3": dict(meta_batch=2), "B4": dict(meta_batch=2, inner_steps=2),
    "B5": dict(meta_batch=2, inner_steps=3, cg_steps=2),
    "M1-maml": dict(meta_batch=2), "M1-imaml": dict(meta_batch=2, inner_steps=3, cg_steps=2),
}
QUICK_CONV = dict(n_way=2, k_shot=1, q_query=2, filters=8, image=14)
# The bench whose spec a learner's placement and gradient checks use.
LEARNER_BENCH = {"maml": "B2", "anil": "B4", "imaml": "B5"}
# Quick mode: B2's and B5's specs equal M1's (1 and 3 inner steps), so the
# placement jobs give those M1 rows; the memory section adds MAML at 2 steps.
QUICK_M1_FROM_PLACEMENT = {"maml": 1, "imaml": 3}
QUICK_M1_STEPS = {"maml": 2}


def spec_for(name, quick, **changes):
    spec = dict(FULL_SPECS[name])
    if spec["model"] == "conv4":
        spec = {**CONV_DEFAULTS, **spec}
    if quick:
        spec.update(QUICK_CHANGES.get(name, {}))
        if spec["model"] == "conv4":
            spec.update(QUICK_CONV)
    spec.update(changes)
    spec["name"] = name
    return spec


# ----------------------------------------------------------------------
# The parent: sections, jobs, budgets, the JSON.


def _jobs(section, quick, full_matrix):
    """The jobs of a section, most informative first (a budget cut keeps those)."""
    if section == "environment":
        return [{"kind": "environment"}]
    if section == "placement":
        configs = [("auto", "auto")] if quick else [("auto", "auto"), ("sequential", False),
                                                    ("vectorized", False)]
        return [{"kind": "placement", "learner": learner, "task_execution": te, "jit_compile": jit}
                for te, jit in configs for learner in LEARNERS]
    if section == "gradients":
        return [{"kind": "gradients", "learner": learner} for learner in LEARNERS]
    if section == "benchmarks":
        benches = [b for b in FLAGS.benches if b]
        # The CPU rules' choice and the accelerators' published practice first.
        pairs = [("sequential", False), ("vectorized", True), ("vectorized", False),
                 ("sequential", True)]
        quick_b1 = pairs[:3]  # one XLA compile fewer
        jobs = []
        measured_by_placement = set(LEARNER_BENCH.values()) if "placement" in FLAGS.sections else ()
        for te, jit in pairs:
            for bench in benches:
                if quick and not full_matrix and (
                        (te, jit) not in quick_b1 if bench == "B1"
                        else (te, jit) != pairs[0] or bench in measured_by_placement):
                    continue
                jobs.append({"kind": "bench", "bench": bench, "task_execution": te,
                             "jit_compile": jit})
        if "B1" in benches and not quick:
            jobs.append({"kind": "bench", "bench": "B1", "task_execution": "auto",
                         "jit_compile": "auto", "steps_per_execution": 25})
        return jobs
    if section == "memory":
        if quick and not FLAGS["m1_steps"].present:
            return [{"kind": "memory", "algo": algo, "inner_steps": k}
                    for algo, k in QUICK_M1_STEPS.items()]
        steps = [int(s) for s in FLAGS.m1_steps if s]
        return [{"kind": "memory", "algo": algo, "inner_steps": k}
                for k in steps for algo in ("maml", "imaml")]
    raise ValueError(f"unknown section {section!r}")


class Worker:
    """A worker process that runs one job at a time (request and reply on its pipes)."""

    def __init__(self, mode, startup_timeout):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={mode}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            bufsize=1, start_new_session=True, cwd=REPO,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")))
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.startup = self._reply(startup_timeout)
        if self.startup == "timeout":
            self.kill()
            raise TimeoutError(f"the worker did not start within {startup_timeout:.0f} s")
        if not isinstance(self.startup, dict) or self.startup.get("status") != "ready":
            error = self.failure("the worker did not start")
            self.kill()
            raise RuntimeError(error)

    def _read(self):
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                self.lines.put(json.loads(line[len(PROTOCOL):]))
        self.lines.put(None)

    def _reply(self, timeout):
        try:
            return self.lines.get(timeout=max(timeout, 0.1))
        except queue.Empty:
            return "timeout"

    def run(self, job, timeout):
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        reply = self._reply(timeout)
        if reply == "timeout":
            self.kill()
            return {"status": "timeout", "error": f"no result within {timeout:.0f} s "
                    "(the worker was stopped; a fresh one takes the next job)"}
        if reply is None:
            self.process.wait()
            return {"status": "error", "error": self.failure("the worker died")}
        return reply

    def failure(self, what):
        code = self.process.poll()
        self.stderr.seek(0)
        tail = self.stderr.read()[-1500:]
        return f"{what} (exit code {code}); its stderr ends: {tail}"

    def alive(self):
        return self.process.poll() is None

    def kill(self):
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        self.process.wait()

    def close(self):
        if self.alive():
            try:
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                pass
        self.kill()


def _fixed_budgets():
    budgets = {}
    for item in FLAGS.budget_s:
        name, _, value = item.partition("=")
        try:
            budgets[name] = float(value)
        except ValueError:
            name = None
        if name not in SECTIONS:
            raise app.UsageError(f"--budget_s takes section=seconds with a section of "
                                 f"{SECTIONS}. Received: {item!r}")
    return budgets


def _section_budget(name, mode, remaining_s, fixed):
    """This section's seconds: fixed, or its share of what is left."""
    if name in fixed:
        return min(fixed[name], remaining_s)
    later = [s for s in SECTIONS[SECTIONS.index(name):] if s in FLAGS.sections
             and s not in fixed]
    share = SHARES[mode][name] / sum(SHARES[mode][s] for s in later)
    reserved = sum(fixed.get(s, 0.0) for s in SECTIONS[SECTIONS.index(name) + 1:]
                   if s in FLAGS.sections)
    return max(remaining_s - reserved, 0.0) * share


def _sanitize(value):
    """Non-finite floats as None (strict JSON), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def _write(path, report):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".device_check.")
    with os.fdopen(fd, "w") as f:
        json.dump(_sanitize(report), f, indent=1)
    os.replace(tmp, path)


def _load_devices_module():
    """keras_meta/devices.py without importing keras_meta (and TensorFlow) here."""
    spec = importlib.util.spec_from_file_location(
        "_km_devices", os.path.join(REPO, "keras_meta", "devices.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_facts():
    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "cpu_count": os.cpu_count(), "argv": sys.argv}
    try:
        facts["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                  if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name, command in (("git_commit", ["git", "rev-parse", "HEAD"]),
                          ("git_dirty_files", ["git", "status", "--porcelain"]),
                          ("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,"
                                          "memory.total,compute_cap", "--format=csv,noheader"])):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
            if out.returncode == 0:
                text = out.stdout.strip()
                facts[name] = len(text.splitlines()) if name == "git_dirty_files" else text
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        facts["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return facts


def _summarise_section(section):
    jobs = section["jobs"]
    states = [j["status"] for j in jobs]
    section["status"] = ("ok" if states and all(s == "ok" for s in states)
                         else "error" if states and all(s != "ok" for s in states)
                         else "partial")
    section["errors"] = [{"job": j["job"], "status": j["status"], "error": j.get("error")}
                         for j in jobs if j["status"] != "ok"]


def _rules(report, devices):
    environment = report.get("environment", {})
    kind = environment.get("device_kind", "cpu")
    rows = report.get("benchmarks", {}).get("rows", [])
    try:
        measured = devices.measured_rules({"environment": {"device_kind": kind},
                                           "benchmarks": {"rows": rows}})
    except Exception as error:  # recorded, never fatal
        return {"status": "error", "error": f"{type(error).__name__}: {error}"}
    return {"status": "ok", "device_kind": kind, "defaults": devices.DEFAULT_RULES.get(kind),
            "measured": measured.get(kind, {}),
            "note": "`defaults` is what \"auto\" does now (GPU/TPU: published practice, "
                    "unmeasured); `measured` is the best (task execution, XLA) pair of this "
                    "run per family of networks (dense: B1; conv: B2-B5)."}


def orchestrate():
    mode = "quick" if FLAGS.quick else "full"
    fixed = _fixed_budgets()
    total = FLAGS.total_budget_s or TOTAL_BUDGET_S[mode]
    start = time.perf_counter()
    deadline = start + total
    unknown = [s for s in FLAGS.sections if s not in SECTIONS]
    if unknown:
        raise app.UsageError(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    report = {"schema": 1, "mode": mode,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "host": _host_facts(), "total_budget_s": total}
    devices = _load_devices_module()
    worker = None
    for name in SECTIONS:
        if name not in FLAGS.sections:
            report[name] = {"status": "skipped", "reason": "not in --sections", "jobs": []}
            continue
        section_start = time.perf_counter()
        budget = _section_budget(name, mode, deadline - section_start, fixed)
        section = report[name] = {"status": "running", "budget_s": budget, "jobs": []}
        section_deadline = min(section_start + budget, deadline)
        if name in ("benchmarks", "memory"):  # rows measured by the quick placement jobs
            section["rows"] = report.pop(f"_early_{name}", [])
        if name == "memory" and not FLAGS.quick and worker is not None:
            worker.close()  # the memory scan in a fresh process
            worker = None
        for job in _jobs(name, FLAGS.quick, FLAGS.full_matrix):
            job_name = "/".join(str(v) for k, v in job.items() if k != "kind") or job["kind"]
            now = time.perf_counter()
            if now >= section_deadline - 0.5:
                section["jobs"].append({"job": job_name, "status": "skipped",
                                        "error": "section budget spent"})
                continue
            result = None
            if worker is None or not worker.alive():
                # Importing TensorFlow and starting CUDA may take longer than a
                # small section's budget: a start may use up to 90 s of the run's.
                # A start does not count against the section (only the run's total).
                startup = min(deadline - now, max(section_deadline - now, 90.0))
                try:
                    worker = Worker(mode, startup)
                    section_deadline = min(section_deadline + time.perf_counter() - now, deadline)
                except TimeoutError as error:
                    worker, result = None, {"status": "timeout", "error": str(error)}
                except RuntimeError as error:
                    worker, result = None, {"status": "error", "error": str(error)}
            if result is None:
                # The full run cuts a job at its section's budget or its own
                # limit. The quick run lets a started job finish within the
                # run's total (a restart costs more than the overrun); the
                # sections after it get less.
                if FLAGS.quick:
                    timeout = deadline - time.perf_counter()
                else:
                    timeout = min(section_deadline - time.perf_counter(), JOB_TIMEOUTS_S[name])
                result = worker.run(job, timeout)
            result = {"job": job_name, **job, **result}
            section["jobs"].append(result)
            section["wall_s"] = time.perf_counter() - section_start
            _absorb(report, name, result)
            _write(FLAGS.out, report)
            print(f"[{time.perf_counter() - start:6.1f} s] {name} {job_name}: {result['status']}"
                  + (f" ({result.get('error', '')[:200]})" if result["status"] != "ok" else ""),
                  file=sys.stderr, flush=True)
        section["wall_s"] = time.perf_counter() - section_start
        _summarise_section(section)
        _write(FLAGS.out, report)
    if worker is not None:
        worker.close()
    report.pop("_early_benchmarks", None)
    report.pop("_early_memory", None)
    report["rules"] = _rules(report, devices)
    report["wall_s"] = time.perf_counter() - start
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    _write(FLAGS.out, report)
    _print_summary(report)
    return report


def _absorb(report, name, result):
    """Section-level views of the jobs' payloads."""
    section = report[name]
    if result["status"] != "ok":
        return
    if name == "environment":
        section.update({k: v for k, v in result.items() if k not in ("job", "kind", "status")})
        report["environment"]["device_kind"] = result.get("device_kind", "cpu")
    elif name == "benchmarks":
        section.setdefault("rows", []).append(result)
    elif name == "memory":
        section.setdefault("rows", []).append(result)
    else:
        for key, target in (("bench_row", "_early_benchmarks"), ("memory_row", "_early_memory")):
            row = result.pop(key, None)
            if row is not None:
                report.setdefault(target, []).append(row)
        section.setdefault("results", []).append(result)
        if name == "placement":
            section["all_on_device"] = all(r.get("all_on_device") for r in section["results"])
            section["target_device"] = result.get("target_device")


def _print_summary(report):
    env = report.get("environment", {})
    print(f"device check ({report['mode']}): {env.get('device_name') or env.get('device_kind')}, "
          f"TensorFlow {env.get('tensorflow')}, {report['wall_s']:.1f} s -> {FLAGS.out}")
    for name in SECTIONS:
        section = report.get(name, {})
        print(f"  {name}: {section.get('status')} ({section.get('wall_s', 0):.1f} s)")
    for r in report.get("placement", {}).get("results", []):
        print(f"    placement {r['learner']} {r['resolved']}: on device {r['all_on_device']}, "
              f"off device {r['off_device_ops'] or '-'}, transfers {r['transfers'] or '-'}")
    for r in report.get("gradients", {}).get("results", []):
        print(f"    gradients {r['learner']}: device vs CPU {r['rel_error_device_vs_cpu']:.2e}, "
              f"device vs float64 {r['rel_error_device_vs_float64']:.2e}, "
              f"CPU vs float64 {r['rel_error_cpu_vs_float64']:.2e}")
    for r in report.get("benchmarks", {}).get("rows", []):
        print(f"    {r['bench']} {r['variant']}: {r['steps_per_s']['median']:.3g} steps/s, "
              f"first step {r['first_step_s']:.1f} s")
    for r in report.get("memory", {}).get("rows", []):
        print(f"    M1 {r['algo']} {r['inner_steps']} steps: peak {r['peak_mb']:.0f} MB "
              f"(+{r['step_added_mb']:.0f} MB over before the step)")
    rules = report.get("rules", {})
    print(f"  rules: {rules.get('measured') or rules.get('error') or 'none measured'}")


# ----------------------------------------------------------------------
# The worker: TensorFlow lives here.


class Context:
    """What every job of a worker shares: the modules and the target device."""

    def __init__(self, mode):
        import keras
        import numpy as np
        import tensorflow as tf

        import keras_meta as km

        self.tf, self.keras, self.np, self.km = tf, keras, np, km
        self.cache = {}  # learner -> its placement job's first-step gradient
        self.quick = mode == "quick"
        self.kind = km.devices.device_kind()
        gpus = tf.config.list_physical_devices("GPU")
        self.device = "/device:GPU:0" if gpus else "/device:CPU:0"
        self.device_short = "GPU:0" if gpus else "CPU:0"
        # Start the runtime and the device's libraries (cuBLAS, cuDNN) here,
        # outside every timed first step.
        with tf.device(self.device):
            x = tf.random.normal((8, 8, 8, 1))
            float(tf.reduce_sum(tf.nn.conv2d(x, tf.ones((3, 3, 1, 2)), 1, "SAME")))
            float(tf.reduce_sum(tf.matmul(tf.ones((8, 8)), tf.ones((8, 8)))))


def _learner(ctx, spec, task_execution="auto", jit_compile="auto", optimizer=None,
             steps_per_execution=1, dtype=None, weights=None, run_eagerly=False):
    km, keras = ctx.km, ctx.keras
    if spec["model"] == "mlp":
        model = km.models.mlp(dtype=dtype, seed=0)
        loss = "mse"
    else:
        model = km.models.conv4(spec["n_way"], filters=spec["filters"],
                                input_shape=(spec["image"], spec["image"], 1), dtype=dtype,
                                seed=0)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if weights is not None:
        model.set_weights([w.astype(dtype or "float32") for w in weights])
    common = dict(inner_learning_rate=spec["inner_lr"], inner_steps=spec["inner_steps"],
                  task_execution=task_execution)
    algo = spec["algo"]
    if algo in ("maml", "fomaml"):
        learner = km.MAML(model, first_order=algo == "fomaml", **common)
    elif algo == "anil":
        learner = km.ANIL(model, head=1, **common)
    else:
        learner = km.IMAML(model, l2_regularization=spec["imaml_lam"],
                           cg_iterations=spec["cg_steps"], **common)
    learner.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss=loss,
                    jit_compile=jit_compile, steps_per_execution=steps_per_execution,
                    run_eagerly=run_eagerly)
    return learner


def _episodes(ctx, spec, pool=4, seed=1):
    """`pool` meta-batches of random tasks (sinusoids; noisy binary glyphs, as the specs)."""
    np = ctx.np
    rng = np.random.default_rng(seed)
    out = []
    t = spec["meta_batch"]
    for _ in range(pool):
        if spec["model"] == "mlp":
            amp = rng.uniform(0.1, 5.0, (t, 1, 1))
            phase = rng.uniform(0.0, np.pi, (t, 1, 1))
            xs = rng.uniform(-5, 5, (t, spec["k_support"], 1))
            xq = rng.uniform(-5, 5, (t, spec["k_query"], 1))
            episode = {"support_x": xs, "support_y": amp * np.sin(xs - phase),
                       "query_x": xq, "query_y": amp * np.sin(xq - phase)}
            out.append({k: v.astype("float32") for k, v in episode.items()})
            continue
        n, k, q, size = spec["n_way"], spec["k_shot"], spec["q_query"], spec["image"]
        glyphs = rng.random((t, n, size, size)) < 0.2

        def sample(per_class):
            flips = rng.random((t, n, per_class, size, size)) < 0.05
            images = np.logical_xor(glyphs[:, :, None], flips).astype("float32")
            return images.reshape(t, n * per_class, size, size, 1)

        out.append({"support_x": sample(k), "query_x": sample(q),
                    "support_y": np.repeat(np.arange(n, dtype="int32"), k)[None].repeat(t, 0),
                    "query_y": np.repeat(np.arange(n, dtype="int32"), q)[None].repeat(t, 0)})
    return out


def _dataset(ctx, episodes):
    tf, np = ctx.tf, ctx.np
    stacked = {k: np.stack([e[k] for e in episodes]) for k in episodes[0]}
    return tf.data.Dataset.from_tensor_slices(stacked).repeat()


def _resolved(learner):
    return {"resolved_task_execution": learner.resolved_task_execution,
            "resolved_jit_compile": bool(learner.jit_compile),
            "resolved": learner.resolved_task_execution + ("+xla" if learner.jit_compile else "")}


def _first_step(learner, dataset):
    start = time.perf_counter()
    history = learner.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - start, float(history.history["loss"][-1])


def _clear(ctx):
    import gc

    ctx.keras.backend.clear_session()
    gc.collect()


def job_environment(ctx, job):
    tf, keras, km, np = ctx.tf, ctx.keras, ctx.km, ctx.np
    build = dict(tf.sysconfig.get_build_info())
    facts = {"tensorflow": tf.__version__, "keras": keras.__version__,
             "keras_meta": km.__version__, "numpy": np.__version__,
             "python": platform.python_version(), "device_kind": ctx.kind,
             "target_device": ctx.device_short,
             "cuda_build": build.get("cuda_version"), "cudnn_build": build.get("cudnn_version"),
             "is_cuda_build": build.get("is_cuda_build"),
             "cuda_compute_capabilities_built": build.get("cuda_compute_capabilities"),
             "physical_devices": [f"{d.device_type}:{d.name}" for d in
                                  tf.config.list_physical_devices()],
             "logical_devices": [d.name for d in tf.config.list_logical_devices()],
             "tensor_float_32": ctx.tf32_default,  # TensorFlow's default here
             "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
             "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
             "keras_meta_threads_at_import": km.threads.import_time_configuration(),
             "env": {k: v for k, v in os.environ.items()
                     if k.startswith(("TF_", "XLA_", "CUDA_", "KERAS_"))}}
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        facts["device_name"] = details.get("device_name")
        facts["compute_capability"] = details.get("compute_capability")
    else:
        facts["device_name"] = "CPU"
    return facts


# Ops of the input pipeline and of the function's boundary: on the host by
# design (the iterator is a host resource), not a fallback.
HOST_BY_DESIGN = {"_Arg", "_Retval", "IteratorGetNext", "IteratorGetNextAsOptional",
                  "OptionalGetValue", "OptionalHasValue", "OptionalFromValue", "OptionalNone",
                  "NoOp", "_DeviceArg", "_DeviceRetval"}
TRANSFERS = {"_Send", "_Recv", "_HostSend", "_HostRecv"}


def _short_device(name):
    return name.rsplit("device:", 1)[-1] if name else "(unplaced)"


# DataType enum values of floating-point tensors (float, double, half, bfloat16).
FLOAT_TYPES = {1, 2, 19, 14}
DTYPE_ATTRS = ("T", "dtype", "DstT", "SrcT", "out_type", "output_type", "element_dtype", "Tout")


def _is_float_op(node):
    """Whether a node computes on floating-point tensors (by its dtype attributes)."""
    for key in DTYPE_ATTRS:
        value = node.attr.get(key)
        if value is None:
            continue
        types = [value.type] if value.type else list(value.list.type)
        if any(t in FLOAT_TYPES for t in types):
            return True
    return False


def analyse_placement(run_metadata, target):
    """Per-device op counts, off-device ops and transfers of the partitioned graphs.

    Ops not on `target` are sorted into the input pipeline's (`host_by_design_ops`),
    integer or shape bookkeeping (`host_integer_ops`: loop counters, shapes,
    which TensorFlow keeps in host memory) and floating-point work
    (`off_device_ops`: a host fallback inside the step).
    """
    per_device, off_device, integer, host_by_design, transfers, xla = {}, {}, {}, {}, {}, []
    directions = {}
    for function_graph in run_metadata.function_graphs:
        for graph in function_graph.partition_graphs:
            for node in graph.node:
                device = _short_device(node.device)
                per_device[device] = per_device.get(device, 0) + 1
                if node.op in TRANSFERS:
                    transfers[node.op] = transfers.get(node.op, 0) + 1
                    if node.op in ("_Send", "_HostSend"):  # one per transferred tensor
                        way = (f"{_short_device(node.attr['send_device'].s.decode())}->"
                               f"{_short_device(node.attr['recv_device'].s.decode())}")
                        directions[way] = directions.get(way, 0) + 1
                    continue  # counted as transfers, wherever they sit
                must_compile = node.attr.get("_XlaMustCompile")
                if must_compile is not None and must_compile.b:
                    xla.append(device)
                if device == target:
                    continue
                bucket = (host_by_design if node.op in HOST_BY_DESIGN
                          else off_device if _is_float_op(node) else integer)
                bucket[node.op] = bucket.get(node.op, 0) + 1
    return {"ops_per_device": per_device, "off_device_ops": off_device,
            "host_integer_ops": integer, "host_by_design_ops": host_by_design,
            "transfers": transfers, "transfers_by_direction": directions,
            "xla_compiled_calls_on": xla,
            "function_graphs": len(run_metadata.function_graphs),
            "all_on_device": not off_device and all(d == target for d in xla)}


def _learner_spec(ctx, learner_name):
    """The spec of a learner's placement and gradient checks (its bench's, smaller)."""
    spec = spec_for(LEARNER_BENCH[learner_name], ctx.quick,
                    **({} if ctx.quick else {"meta_batch": 4}))
    if learner_name == "imaml" and not ctx.quick:
        spec.update(inner_steps=4)
    return spec


def _adam_gradient(learner):
    """The first step's meta-gradient, from Adam's first moment m = (1 - beta_1) g.

    Reads Keras 3's Adam state (`_momentums`, one per trainable variable);
    the check's gradient errors would show if that ever changed.
    """
    import numpy as np

    optimizer = learner.optimizer
    if int(optimizer.iterations.numpy()) != 1:
        raise RuntimeError(f"expected one optimizer step, found {int(optimizer.iterations)} "
                           "(a non-finite step skips its update)")
    gradient = []
    for m in optimizer._momentums:
        m = m.numpy()
        factor = float(np.asarray(1 - optimizer.beta_1, dtype=m.dtype))
        gradient.append(m.astype("float64") / factor)
    return gradient


def job_placement(ctx, job):
    from tensorflow.python.eager import context

    spec = _learner_spec(ctx, job["learner"])
    learner = _learner(ctx, spec, job["task_execution"], job["jit_compile"])
    weights = learner.model.get_weights()
    episodes = _episodes(ctx, spec)
    dataset = _dataset(ctx, episodes)
    runtime = context.context()
    runtime.enable_run_metadata()  # before the step function is instantiated
    try:
        first, loss = _first_step(learner, dataset)  # on episodes[0]
        metadata = runtime.export_run_metadata()
    finally:
        runtime.disable_run_metadata()
    result = analyse_placement(metadata, ctx.device_short)
    result.update(_resolved(learner), target_device=ctx.device_short, first_step_s=first,
                  loss=loss, spec=spec,
                  note=None if ctx.kind != "cpu" else
                  "CPU-only machine: every op is on the CPU by construction; the counts "
                  "show the check works")
    if (job["task_execution"], job["jit_compile"]) == ("auto", "auto"):
        # The learner's defaults on the device: the gradients section's device run.
        ctx.cache[job["learner"]] = {"spec": spec, "weights": weights, "episode": episodes[0],
                                     "gradient": _adam_gradient(learner), "loss": loss,
                                     "resolved": _resolved(learner)}
    if ctx.quick:  # the same learner gives the bench's row (one trace fewer)
        row = _timed_row(ctx, learner, dataset, spec, spec["name"], first, 1)
        row["note"] = "measured by the placement job (its first step recorded run metadata)"
        result["bench_row"] = row
        if job["learner"] in QUICK_M1_FROM_PLACEMENT:  # the quick M1 spec is this one
            row = _memory_row(ctx, learner, dataset, spec, job["learner"], first)
            row["note"] = "measured by the placement job (same spec as quick M1)"
            result["memory_row"] = row
    _clear(ctx)
    return result


def _first_step_gradient(ctx, spec, episode, weights, device, dtype="float32", tf32=False,
                         eager=False):
    """`(meta-gradient, loss, resolved)` of one meta-batch from `weights` on `device`.

    `eager`: the step runs eagerly, tasks one by one, no XLA (the references).
    """
    tf, keras = ctx.tf, ctx.keras
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
    previous = keras.config.floatx(), keras.config.dtype_policy()
    if dtype == "float64":
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
    try:
        with tf.device(device):
            learner = _learner(ctx, spec, "sequential" if eager else "auto",
                               False if eager else "auto", dtype=dtype, weights=weights,
                               run_eagerly=eager)
            batch = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in episode.items()}
            logs = learner.train_on_batch(batch, return_dict=True)
            gradient = _adam_gradient(learner)
        resolved = _resolved(learner)
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])
        tf.config.experimental.enable_tensor_float_32_execution(False)
    return gradient, float(logs["loss"]), resolved


def _relative(a, b):
    """Relative error of gradient `a` against `b`: whole, and the worst tensor."""
    import numpy as np

    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(np.sum(y ** 2)) for y in b))
    worst = 0.0
    for x, y in zip(a, b):
        norm = float(np.linalg.norm(y))
        if norm > 1e-6 * den:  # skip tensors whose gradient is ~0 (conv biases before BN)
            worst = max(worst, float(np.linalg.norm(x - y)) / norm)
    return num / den if den else float("nan"), worst


def job_gradients(ctx, job):
    spec = _learner_spec(ctx, job["learner"])
    cpu = "/device:CPU:0"
    cached = ctx.cache.pop(job["learner"], None)
    if cached is not None and cached["spec"] == spec:  # the placement job's first step
        weights, episode = cached["weights"], cached["episode"]
        device, loss_device, resolved_device = (cached["gradient"], cached["loss"],
                                                cached["resolved"])
        source = "the placement job's first step (fit)"
    else:
        weights = _learner(ctx, spec).model.get_weights()  # seeded: the same every time
        episode = _episodes(ctx, spec)[0]
        device, loss_device, resolved_device = _first_step_gradient(
            ctx, spec, episode, weights, ctx.device)
        source = "train_on_batch"
    reference, loss_cpu, _ = _first_step_gradient(ctx, spec, episode, weights, cpu, eager=True)
    f64, loss_f64, _ = _first_step_gradient(ctx, spec, episode, weights, cpu, "float64",
                                            eager=True)
    result = {"spec": spec, "device": ctx.device_short, "device_run": resolved_device,
              "device_run_source": source,
              "cpu_run": "eager, tasks one by one, no XLA", "float64_run": "the same in float64",
              "method": "Adam's first moment after one step from the same weights and episode, "
                        "divided by (1 - beta_1)",
              "tf32": False, "loss_device": loss_device, "loss_cpu": loss_cpu,
              "loss_float64": loss_f64,
              "gradient_norm_float64": math.sqrt(sum(float((g ** 2).sum()) for g in f64))}
    for label, a, b in (("device_vs_cpu", device, reference), ("device_vs_float64", device, f64),
                        ("cpu_vs_float64", reference, f64)):
        result[f"rel_error_{label}"], result[f"worst_tensor_rel_error_{label}"] = _relative(a, b)
    if ctx.kind == "gpu":
        tf32, _, _ = _first_step_gradient(ctx, spec, episode, weights, ctx.device, tf32=True)
        result["rel_error_device_tf32_vs_float64"], _ = _relative(tf32, f64)
    else:
        result["note"] = ("CPU-only machine: the device run is the CPU's compiled step "
                          "(the learner's defaults) against the eager CPU reference")
    _clear(ctx)
    return result


def job_bench(ctx, job):
    spec = spec_for(job["bench"], ctx.quick)
    spe = job.get("steps_per_execution", 1)
    learner = _learner(ctx, spec, job["task_execution"], job["jit_compile"],
                       steps_per_execution=spe)
    dataset = _dataset(ctx, _episodes(ctx, spec))
    first, _ = _first_step(learner, dataset)
    row = _timed_row(ctx, learner, dataset, spec, job["bench"], first, spe)
    _clear(ctx)
    return row


def _timed_row(ctx, learner, dataset, spec, bench, first, spe):
    """Meta-steps/s of `learner` after its first step (warm-up, then timed steps)."""
    iterator = iter(dataset)
    step = lambda: float(learner.train_function(iterator)["loss"])  # noqa: E731
    dense = spec["model"] == "mlp"
    warmup, most, seconds = (1, 3, 1.0) if ctx.quick else (2, 100 if dense else 20,
                                                           4.0 if dense else 8.0)
    for _ in range(warmup):
        step()
    times = []
    started = time.perf_counter()
    while len(times) < most and (len(times) < 3 or time.perf_counter() - started < seconds):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    rates = sorted(spe / t for t in times)
    return {"bench": bench, "algo": spec["algo"], "spec": spec,
           "task_execution": learner.resolved_task_execution,
           "jit_compile": bool(learner.jit_compile), "steps_per_execution": spe,
           "variant": learner.resolved_task_execution + ("+xla" if learner.jit_compile else "")
           + (f"+spe{spe}" if spe > 1 else ""),
           "steps_per_s": {"min": rates[0], "median": rates[len(rates) // 2], "max": rates[-1]},
           "timed_steps": len(times) * spe, "first_step_s": first, "last_loss": loss,
           "tensor_float_32": ctx.tf.config.experimental.tensor_float_32_execution_enabled(),
           "loadavg_1m": os.getloadavg()[0]}


def _status_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_hwm_mb():
    return _status_mb("VmHWM")


def _rss_mb():
    return _status_mb("VmRSS")


def _malloc_trim():
    """Hands freed heap pages back (glibc), so that RSS growth shows the step's own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def job_memory(ctx, job):
    spec = spec_for(f"M1-{job['algo']}", ctx.quick, inner_steps=job["inner_steps"])
    learner = _learner(ctx, spec)
    dataset = _dataset(ctx, _episodes(ctx, spec, pool=2))
    first, _ = _first_step(learner, dataset)
    row = _memory_row(ctx, learner, dataset, spec, job["algo"], first)
    _clear(ctx)
    return row


def _memory_row(ctx, learner, dataset, spec, algo, first):
    """Peak memory of one meta-step of `learner`, after its first step."""
    tf = ctx.tf
    iterator = iter(dataset)
    float(learner.train_function(iterator)["loss"])
    __import__("gc").collect()
    _malloc_trim()
    tf.config.experimental.reset_memory_stats(ctx.device_short)
    before = tf.config.experimental.get_memory_info(ctx.device_short)["current"]
    try:  # the process's peak RSS too (Linux): what the allocator stats miss on a CPU
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_reset = True
    except OSError:
        rss_reset = False
    rss_before = _rss_mb()
    start = time.perf_counter()
    loss = float(learner.train_function(iterator)["loss"])
    step_s = time.perf_counter() - start
    info = tf.config.experimental.get_memory_info(ctx.device_short)
    row = {"algo": algo, "inner_steps": spec["inner_steps"], "spec": spec,
           "device": ctx.device_short, **_resolved(learner),
           "allocator_peak_mb": info["peak"] / 2**20, "allocator_before_step_mb": before / 2**20,
           "process_peak_rss_mb": _rss_hwm_mb() if rss_reset else None,
           "process_rss_before_step_mb": rss_before,
           "first_step_s": first, "step_s": step_s, "loss": loss}
    if ctx.kind == "gpu" or not rss_reset:
        row.update(source="tf.config.experimental.get_memory_info", peak_mb=row["allocator_peak_mb"],
                   step_added_mb=row["allocator_peak_mb"] - row["allocator_before_step_mb"])
    else:  # TensorFlow's CPU allocator stats miss the step functions' buffers
        row.update(source="process RSS (VmHWM reset before the step)",
                   peak_mb=row["process_peak_rss_mb"],
                   step_added_mb=row["process_peak_rss_mb"] - rss_before)
    return row


JOBS = {"environment": job_environment, "placement": job_placement, "gradients": job_gradients,
        "bench": job_bench, "memory": job_memory}


def _reply(payload):
    sys.stdout.write(PROTOCOL + json.dumps(_sanitize(payload), default=str) + "\n")
    sys.stdout.flush()


def work(mode):
    """Worker: reads one job per line on stdin, answers one line each on stdout."""
    try:
        ctx = Context(mode)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        _reply({"status": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
    # TensorFlow's default (on where the GPU has TF32): what users get, and
    # what the benchmarks and memory jobs run with; numerics jobs turn it off.
    tf32_default = ctx.tf32_default = (
        ctx.tf.config.experimental.tensor_float_32_execution_enabled())
    _reply({"status": "ready"})
    for line in sys.stdin:
        job = json.loads(line)
        ctx.tf.config.experimental.enable_tensor_float_32_execution(
            tf32_default if job["kind"] in ("bench", "memory") else False)
        start = time.perf_counter()
        try:
            payload = JOBS[job["kind"]](ctx, job)
            payload["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - a failed part is recorded
            payload = {"status": "error", "error": f"{type(error).__name__}: {error}"[:3000],
                       "traceback": traceback.format_exc()[-3000:]}
            try:
                _clear(ctx)
            except Exception:  # noqa: BLE001
                pass
        payload["wall_s"] = time.perf_counter() - start
        _reply(payload)


def main(argv):
    del argv
    if FLAGS.worker:
        return work(FLAGS.worker)
    report = orchestrate()
    # Exit 1 when a job raised or a worker crashed; a job cut by its time
    # limit or a section's budget is recorded but is no failure.
    failed = [e for s in SECTIONS for e in report.get(s, {}).get("errors", [])
              if e["status"] == "error"]
    if report.get("rules", {}).get("status") == "error":
        failed.append(report["rules"])
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
