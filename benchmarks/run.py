"""keras_meta on the peers' benchmark specs (B1-B5), with the peers in the same invocation.

The specs, data, initial weights and timing method come from the peer suite
(`../shared/bench`: `common.py`): same shapes, same math, float32, a pool of 4
meta-batches cycled, each timed step blocked on its result, the first step (trace
+ compile) reported apart. keras_meta runs through its public API: a learner
compiled with Adam(1e-3) and its Keras train function.

    python benchmarks/run.py                              # keras_meta, B1-B5
    python benchmarks/run.py --bench=B2,B4 --peers=jax    # + the JAX reference
    python benchmarks/run.py --peers=jax,torch-func,learn2learn --json=out.jsonl
    python benchmarks/run.py --bench=M1 --peers=jax,torch-func  # memory scan, 1..40 inner steps

Peers run in their own venvs (`$PEERS_VENVS`, built by `../shared/bench/run_peers.sh`).
The table: median meta-steps/s (min-max), first step s, peak RSS MB, achieved GFLOP/s
(analytic FLOPs of one meta-step, see `flops_per_step`) next to this machine's
measured float32 matmul peak, and the ratios to JAX and to the best PyTorch peer.
M1 prints its own table: per inner-step count, the peak RSS during the timed steps,
what one step adds over the RSS before it, and the whole-process peak.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
flags.DEFINE_string("bench", "B1,B2,B3,B4,B5", "Benches (B1..B5, M1).")
flags.DEFINE_string("m1_steps", "1,5,10,20,40", "M1: the inner steps scanned.")
flags.DEFINE_string("algo", None, "Internal (M1 worker): maml or imaml.")
flags.DEFINE_string("peers", "", "Peers to run too: jax, torch-func, learn2learn, higher, torchopt.")
flags.DEFINE_string("peers_dir", os.path.join(HERE, "..", "..", "shared", "bench"), "The peer suite.")
flags.DEFINE_integer("steps", 8, "Timed meta-steps per run (B1: x25).")
flags.DEFINE_integer("warmup", 3, "Warm-up steps including the first.")
flags.DEFINE_integer("inner_steps", None, "Override the bench's inner steps.")
flags.DEFINE_string("task_execution", "auto", "keras_meta task execution (auto/vectorized/sequential).")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "keras_meta's compile(jit_compile=...): auto is the learners' default (XLA for "
                  "dense networks on CPU).")
flags.DEFINE_list("intra_op_threads", ["0"], "keras_meta: one row per value; n > 0 runs "
                  "`km.configure_cpu_threads(intra_op=n)` (one kernel per core at once), 0 keeps "
                  "TensorFlow's default pools.")
flags.DEFINE_list("b1_steps_per_execution", [], "B1: also run keras_meta with these "
                  "steps_per_execution values (extra rows).")
flags.DEFINE_integer("steps_per_execution", 1, "keras_meta: meta-steps per train-function call "
                     "(Keras' compile argument; amortises per-call overhead on tiny steps).")
flags.DEFINE_string("json", None, "Append result rows (JSON lines) to this file.")
flags.DEFINE_string("worker", None, "Internal: run one keras_meta bench in this process.")
FLAGS = flags.FLAGS

TORCH_PEERS = ("torch-func", "learn2learn", "higher", "torchopt")
# The benches each peer implements (PEERS.md).
PEER_BENCHES = {"jax": "B1 B2 B3 B4 B5", "torch-func": "B1 B2 B3 B4 B5", "learn2learn": "B1 B2 B3 B4",
                "higher": "B1 B2", "torchopt": "B5"}


def _common():
    sys.path.insert(0, os.path.abspath(FLAGS.peers_dir))
    import common  # noqa: E402  (the peer suite's specs and timing)

    return common


def forward_flops(spec):
    """FLOPs of one forward pass of one example (multiply-add = 2)."""
    if spec.model == "mlp":
        return 2 * (1 * 40 + 40 * 40 + 40 * 1)
    flops, size, cin = 0, 28, 1
    for _ in range(4):
        size = (size + 1) // 2
        flops += 2 * size * size * 64 * 9 * cin
        cin = 64
    return flops + 2 * 256 * spec.n_way


def flops_per_step(spec):
    """Analytic FLOPs of one meta-step (convolutions and matmuls only).

    Units of one example's forward pass F: a backward pass costs 2F. Per task,
    each inner step is a support forward+backward (3F per example); the query
    loss at the adapted weights is 3F per example; second order adds a
    backward through every inner step's gradient (about 2 x 3F per support
    example per step); ANIL runs the body once per example (3F for the body,
    the head is negligible); iMAML adds its CG Hessian-vector products
    (about 4F per support example each: forward-over-reverse).
    """
    f = forward_flops(spec)
    if spec.model == "mlp":
        support, query = spec.k_support, spec.k_query
    else:
        support, query = spec.n_way * spec.k_shot, spec.n_way * spec.q_query
    steps = spec.inner_steps
    if spec.algo == "anil":
        per_task = 3 * f * (support + query)
    elif spec.algo == "imaml":
        per_task = 3 * f * support * steps + 3 * f * query + 4 * f * support * spec.cg_steps
    else:
        per_task = 3 * f * support * steps + 3 * f * query
        if spec.algo == "maml":
            per_task += 6 * f * support * steps
    return per_task * spec.meta_batch


def matmul_peak_gflops():
    """This machine's measured float32 matmul throughput (TensorFlow, 2048^3)."""
    import tensorflow as tf

    a = tf.random.normal((2048, 2048))
    f = tf.function(lambda x: tf.matmul(x, x))
    f(a).numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        f(a).numpy()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times) / 1e9


def _learner(spec, km, keras):
    if spec.model == "mlp":
        model = km.models.mlp()
        loss = "mse"
    else:
        model = km.models.conv4(spec.n_way)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    common = dict(inner_learning_rate=spec.inner_lr, inner_steps=spec.inner_steps,
                  task_execution=FLAGS.task_execution)
    if spec.algo in ("maml", "fomaml"):
        learner = km.MAML(model, first_order=spec.algo == "fomaml", **common)
    elif spec.algo == "anil":
        learner = km.ANIL(model, head=1, **common)
    else:
        learner = km.IMAML(model, l2_regularization=spec.imaml_lam, cg_iterations=spec.cg_steps,
                           **common)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss,
                    jit_compile={"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile],
                    steps_per_execution=FLAGS.steps_per_execution)
    return learner


def _set_weights(learner, weights, spec):
    """The peers' initial weights (Keras layouts) into the keras_meta model."""
    names = ([("dense_0", "dense0"), ("dense_1", "dense1"), ("output", "dense2")] if spec.model == "mlp"
             else [(f"conv{i}", f"conv{i}") for i in range(4)] + [("head", "dense")])
    for ours, theirs in names:
        layer = learner.model.get_layer(ours)
        layer.kernel.assign(weights[f"{theirs}/kernel"])
        layer.bias.assign(weights[f"{theirs}/bias"])
    if spec.model != "mlp":
        for i in range(4):
            layer = learner.model.get_layer(f"bn{i}")
            layer.gamma.assign(weights[f"bn{i}/gamma"])
            layer.beta.assign(weights[f"bn{i}/beta"])


def build(bench, threads=0):
    """`(spec, learner, iterator)`: the bench's learner with the peers' initial
    weights, its train function made, and an iterator over the meta-batches."""
    common = _common()
    import keras
    import tensorflow as tf

    import keras_meta as km

    if threads:
        km.configure_cpu_threads(intra_op=threads)
    else:  # TensorFlow's own pools (keras_meta may set one thread per kernel at import)
        km.threads.use_default_cpu_threads()
    spec = common.make_spec(bench, inner_steps=FLAGS.inner_steps, algo=FLAGS.algo)
    learner = _learner(spec, km, keras)
    _set_weights(learner, common.init_weights(spec), spec)
    batches = [dict(zip(("support_x", "support_y", "query_x", "query_y"), b))
               for b in common.make_batches(spec)]
    if spec.model != "mlp":
        for b in batches:
            b["support_y"] = b["support_y"].astype("int32")
            b["query_y"] = b["query_y"].astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}).repeat()
    learner._maybe_symbolic_build(data_batch=batches[0])
    learner.make_train_function()
    return spec, learner, iter(dataset)


def worker(bench):
    common = _common()
    threads = int(FLAGS.intra_op_threads[0])
    spec, learner, iterator = build(bench, threads)
    step = lambda i: learner.train_function(iterator)  # noqa: E731
    scale = max(1, (25 if spec.model == "mlp" else 1) // FLAGS.steps_per_execution)
    result = common.run_timed(step, FLAGS.warmup, FLAGS.steps * scale,
                              sync=lambda logs: float(logs["loss"]))
    rates = [FLAGS.steps_per_execution / t for t in result["times"]]
    record = {"bench": bench, "impl": "keras_meta", "algo": spec.algo,
              "pre_steps_rss_mb": result["pre_steps_rss_mb"], "idle_rss_mb": result["idle_rss_mb"],
              "variant": learner.resolved_task_execution + ("+xla" if learner.jit_compile else "")
              + (f"+spe{FLAGS.steps_per_execution}" if FLAGS.steps_per_execution > 1 else "")
              + (f"+intra{threads}" if threads else ""),
              "inner_steps": spec.inner_steps, "flops_per_step": flops_per_step(spec),
              "steps_per_s": {"min": min(rates), "median": sorted(rates)[len(rates) // 2],
                              "max": max(rates)},
              "first_step_s": result["first"], "peak_rss_mb": result["process_peak_rss_mb"],
              "step_peak_rss_mb": result["step_peak_rss_mb"], "contention": result["contention"],
              "last_loss": result["last"]}
    print("RESULT" + json.dumps(record, default=float))


def _run_keras_meta(bench, algo=None, inner_steps=None, steps_per_execution=None, threads=0):
    inner_steps = inner_steps or FLAGS.inner_steps
    steps_per_execution = steps_per_execution or FLAGS.steps_per_execution
    steps, warmup = (min(FLAGS.steps, 3), 2) if bench == "M1" else (FLAGS.steps, FLAGS.warmup)
    args = [sys.executable, os.path.abspath(__file__), f"--worker={bench}", f"--steps={steps}",
            f"--warmup={warmup}", f"--task_execution={FLAGS.task_execution}",
            f"--jit_compile={FLAGS.jit_compile}", f"--peers_dir={FLAGS.peers_dir}",
            f"--steps_per_execution={steps_per_execution}", f"--intra_op_threads={threads}"]
    if inner_steps:
        args.append(f"--inner_steps={inner_steps}")
    if algo:
        args.append(f"--algo={algo}")
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][6:])


def _run_peer(peer, bench, algo=None, inner_steps=None):
    inner_steps = inner_steps or FLAGS.inner_steps
    venvs = os.environ.get("PEERS_VENVS", os.path.expanduser("~/.cache/keras-meta-peers"))
    python = os.path.join(venvs, "jax" if peer == "jax" else "torch", "bin", "python")
    if not os.path.exists(python):
        print(f"(peer {peer}: no venv at {python}; build it with run_peers.sh)", file=sys.stderr)
        return None
    steps, warmup = (min(FLAGS.steps, 3), 2) if bench == "M1" else (FLAGS.steps, FLAGS.warmup)
    args = [python, "peers.py", "--peer", peer, "--bench", bench, "--steps", str(steps),
            "--warmup", str(warmup)]
    if inner_steps:
        args += ["--inner-steps", str(inner_steps)]
    if algo:
        args += ["--algo", algo]
    if peer == "torch-func":  # the faster mode per bench (PEERS.md)
        args += ["--mode", "vmap" if bench in ("B1", "B5") else "loop"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=os.path.abspath(FLAGS.peers_dir))
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            record = json.loads(line)
            record["impl"] = peer
            return record
    print(f"(peer {peer} {bench} failed: {out.stderr[-500:]})", file=sys.stderr)
    return None


def _median(record):
    sps = record.get("steps_per_s", {})
    return sps.get("median") if isinstance(sps, dict) else sps


M1_PEERS = ("jax", "torch-func")  # the peers with both MAML and iMAML


def run_m1(peers):
    """PEERS.md M1: peak RSS of one meta-step, 2nd-order MAML vs iMAML, meta-batch 4."""
    rows = []
    for steps in [int(k) for k in FLAGS.m1_steps.split(",")]:
        for algo in ("maml", "imaml"):
            for impl in ["keras_meta"] + [p for p in peers if p in M1_PEERS]:
                record = (_run_keras_meta("M1", algo, steps, threads=int(FLAGS.intra_op_threads[0]))
                          if impl == "keras_meta"
                          else _run_peer(impl, "M1", algo, steps))
                if record:
                    record.update(bench="M1", algo=algo, inner_steps=steps)
                    rows.append(record)
                    print(f"  M1 {impl} {algo} {steps}: step peak {record['step_peak_rss_mb']:.0f} MB",
                          file=sys.stderr)
    return rows


def print_m1(rows):
    """One row per inner-step count; cells: step peak / growth over pre-step RSS / process peak (MB)."""
    columns = sorted({(r["impl"], r["algo"]) for r in rows}, key=lambda c: (c[0] != "keras_meta", c))
    by = {(r["impl"], r["algo"], r["inner_steps"]): r for r in rows}
    print("\nM1 (meta-batch 4): peak RSS during the timed steps / what a step adds over the RSS "
          "before it / whole-process peak incl. tracing and compilation, MB")
    print("| inner steps | " + " | ".join(f"{i} {a}" for i, a in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for steps in sorted({r["inner_steps"] for r in rows}):
        cells = []
        for impl, algo in columns:
            r = by.get((impl, algo, steps))
            cells.append("-" if r is None else
                         f"{r['step_peak_rss_mb']:.0f} / +{r['step_peak_rss_mb'] - r['pre_steps_rss_mb']:.0f}"
                         f" / {r['peak_rss_mb']:.0f}")
        print(f"| {steps} | " + " | ".join(cells) + " |")
    for impl, algo in columns:
        series = sorted((r["inner_steps"], r["step_peak_rss_mb"]) for r in rows
                        if r["impl"] == impl and r["algo"] == algo)
        if len(series) > 1:
            print(f"{impl} {algo}: step peak {series[0][1]:.0f} -> {series[-1][1]:.0f} MB from "
                  f"{series[0][0]} to {series[-1][0]} inner steps "
                  f"({100 * (series[-1][1] / series[0][1] - 1):+.1f}%)")


def main(_):
    if FLAGS.worker:
        return worker(FLAGS.worker)
    peak = matmul_peak_gflops()
    rows = []
    benches = [b for b in FLAGS.bench.split(",") if b and b != "M1"]
    peers = [p for p in FLAGS.peers.split(",") if p]
    memory_rows = run_m1(peers) if "M1" in FLAGS.bench.split(",") else []
    for bench in benches:
        runs = [("keras_meta", None, int(t)) for t in FLAGS.intra_op_threads]
        if bench == "B1":
            runs += [("keras_meta", int(k), 0) for k in FLAGS.b1_steps_per_execution]
        runs += [(p, None, 0) for p in peers if bench in PEER_BENCHES.get(p, "")]
        for impl, spe, threads in runs:
            record = (_run_keras_meta(bench, steps_per_execution=spe, threads=threads)
                      if impl == "keras_meta" else _run_peer(impl, bench))
            if record:
                record["bench"] = bench
                rows.append(record)
                print(f"  {bench} {impl}: {_median(record):.3g} steps/s", file=sys.stderr)
    print(f"\nfloat32 matmul peak of this machine (TensorFlow, 2048^3): {peak:.0f} GFLOP/s")
    header = ("bench", "implementation", "steps/s median (min-max)", "first step s", "peak RSS MB",
              "GFLOP/s", "vs jax", "vs best torch")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for bench in benches:
        group = [r for r in rows if r["bench"] == bench]
        jax = next((_median(r) for r in group if r["impl"] == "jax"), None)
        torch = max((_median(r) for r in group if r["impl"] in TORCH_PEERS), default=None)
        flops = next((r["flops_per_step"] for r in group if "flops_per_step" in r), None)
        for r in group:
            sps = r["steps_per_s"]
            gflops = f"{flops * _median(r) / 1e9:.1f}" if flops else "-"
            print(f"| {bench} | {r['impl']} {r.get('variant', '')} | {sps['median']:.3g} "
                  f"({sps['min']:.3g}-{sps['max']:.3g}) | {r.get('first_step_s', float('nan')):.1f} | "
                  f"{r.get('peak_rss_mb', float('nan')):.0f} | {gflops} | "
                  f"{_median(r) / jax if jax else float('nan'):.2f} | "
                  f"{_median(r) / torch if torch else float('nan'):.2f} |")
    if memory_rows:
        print_m1(memory_rows)
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            for r in rows + memory_rows:
                f.write(json.dumps(r, default=float) + "\n")


if __name__ == "__main__":
    app.run(main)
