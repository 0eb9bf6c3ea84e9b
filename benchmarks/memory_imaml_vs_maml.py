"""Peak memory of one meta-training step: second-order MAML vs iMAML, as inner steps grow.

The PEERS.md M1 benchmark (../shared/bench): `km.models.conv4(5)` (strided,
BatchNorm), 5-way 1-shot tasks with 15 queries per class, meta-batch 4,
Adam(1e-3); MAML second order with inner step 0.4, iMAML (B5 settings) with
inner step 0.1, lambda 2 and exactly 5 CG iterations; inner steps 1, 5, 10,
20, 40 for both. Synthetic Omniglot-like tasks as in PEERS.md (a random binary
28x28 glyph per class, every sample the glyph with 5% of its pixels flipped).

Each configuration runs in a fresh subprocess: it builds the learner, runs
warm-up steps (the first traces the step), gives freed heap back to the OS
(`malloc_trim`), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`
= 5) and runs the measured steps. `step peak` is VmHWM over the measured steps,
`pre` the RSS at the reset, so `step peak - pre` is what a steady-state step
adds; `process peak` includes start-up and tracing.

    python benchmarks/memory_imaml_vs_maml.py                      # the table
    python benchmarks/memory_imaml_vs_maml.py --steps 1,40 --task-execution vectorized
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

ALGORITHMS = ("maml", "imaml")


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def episodes(meta_batch, n_way=5, k_shot=1, q_query=15, pool=4, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pool):
        glyphs = rng.random((meta_batch, n_way, 28, 28)) < 0.2

        def sample(per_class):
            flips = rng.random((meta_batch, n_way, per_class, 28, 28)) < 0.05
            images = np.logical_xor(glyphs[:, :, None], flips).astype("float32")
            return images.reshape(meta_batch, n_way * per_class, 28, 28, 1)

        labels = lambda per_class: np.tile(  # noqa: E731
            np.repeat(np.arange(n_way, dtype="int32"), per_class), (meta_batch, 1)
        )
        out.append({
            "support_x": sample(k_shot), "support_y": labels(k_shot),
            "query_x": sample(q_query), "query_y": labels(q_query),
        })
    return out


def child(args):
    import keras_meta as km

    import keras  # noqa: E402

    idle = status_mb("VmRSS")
    model = km.models.conv4(5, seed=0)
    if args.algo == "maml":
        learner = km.MAML(model, inner_learning_rate=0.4, inner_steps=args.inner_steps,
                          task_execution=args.task_execution)
    else:
        learner = km.IMAML(model, inner_learning_rate=0.1, inner_steps=args.inner_steps,
                           l2_regularization=2.0, cg_iterations=5, cg_tolerance=0.0,
                           task_execution=args.task_execution)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = episodes(args.meta_batch)
    t0 = time.perf_counter()
    learner.train_on_batch(batches[0])
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        learner.train_on_batch(batches[i % len(batches)])
    process_peak = status_mb("VmHWM")
    pre = status_mb("VmRSS")
    reset = reset_peak()
    pre_trimmed = status_mb("VmRSS")
    times, logs = [], {}
    for i in range(args.measured):
        t0 = time.perf_counter()
        logs = learner.train_on_batch(batches[(args.warmup + i) % len(batches)], return_dict=True)
        times.append(time.perf_counter() - t0)
    step_peak = status_mb("VmHWM") if reset else float("nan")
    print(json.dumps({
        "algo": args.algo, "inner_steps": args.inner_steps, "task_execution": args.task_execution,
        "meta_batch": args.meta_batch, "idle_rss_mb": round(idle, 1),
        "pre_steps_rss_mb": round(pre_trimmed, 1), "pre_trim_rss_mb": round(pre, 1),
        "step_peak_rss_mb": round(step_peak, 1),
        "step_adds_mb": round(step_peak - pre_trimmed, 1),
        "process_peak_rss_mb": round(max(process_peak, step_peak), 1),
        "first_step_s": round(first, 2), "median_step_s": round(statistics.median(times), 3),
        "loss": float(logs.get("loss", float("nan"))),
        "cg_residual": float(logs["cg_residual"]) if "cg_residual" in logs else None,
    }), flush=True)


def parent(args):
    rows = []
    for algo in args.algos.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            command = [sys.executable, os.path.abspath(__file__), "--child", "--algo", algo,
                       "--inner-steps", str(steps), "--task-execution", args.task_execution,
                       "--meta-batch", str(args.meta_batch), "--warmup", str(args.warmup),
                       "--measured", str(args.measured)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                print(f"{algo} inner_steps={steps}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(lines[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows, args)


def print_table(rows, args):
    print(f"\nconv4(5), 5-way 1-shot, 15 queries/class, meta-batch {args.meta_batch}, "
          f"task_execution={args.task_execution}, float32, CPU; one fresh process per row")
    print("| algorithm | inner steps | pre-step RSS MB | step peak RSS MB | step adds MB | "
          "process peak MB | median step s | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name = "MAML (2nd order)" if row["algo"] == "maml" else "iMAML (5 CG)"
        print(f"| {name} | {row['inner_steps']} | {row['pre_steps_rss_mb']:.0f} | "
              f"{row['step_peak_rss_mb']:.0f} | {row['step_adds_mb']:.0f} | "
              f"{row['process_peak_rss_mb']:.0f} | {row['median_step_s']:.2f} | {row['first_step_s']:.1f} |")
    for algo in ALGORITHMS:
        mine = sorted((r for r in rows if r["algo"] == algo), key=lambda r: r["inner_steps"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            print(f"{algo}: step peak {lo['inner_steps']} -> {hi['inner_steps']} inner steps: "
                  f"{lo['step_peak_rss_mb']:.0f} -> {hi['step_peak_rss_mb']:.0f} MB "
                  f"({100 * (hi['step_peak_rss_mb'] / lo['step_peak_rss_mb'] - 1):+.1f}%); "
                  f"step adds {lo['step_adds_mb']:.0f} -> {hi['step_adds_mb']:.0f} MB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="maml,imaml")
    parser.add_argument("--steps", default="1,5,10,20,40", help="inner steps, comma separated")
    parser.add_argument("--task-execution", default="sequential", choices=["sequential", "vectorized"])
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--measured", type=int, default=3)
    parser.add_argument("--out", help="append the JSON rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algo", choices=ALGORITHMS, help=argparse.SUPPRESS)
    parser.add_argument("--inner-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
