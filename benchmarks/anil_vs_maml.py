"""Times one meta-training step of ANIL and of MAML on the same conv4.

The spec of the peer benchmarks B2/B4 (../shared/bench/PEERS.md): Omniglot's
strided `km.models.conv4(5)` with BatchNorm, 5-way 1-shot, 15 queries per
class, meta-batch 32, random Omniglot-like 28x28x1 glyphs (one binary glyph
per class, 5% of its pixels flipped per sample), a pool of 4 meta-batches
cycled, inner step size 0.4, second order, Adam(1e-3). A step is the whole
meta-batch: inner loops, query losses, meta-gradient and update
(`train_on_batch`, whose returned logs synchronise).

For every number of inner steps it prints the first step (trace, compilation
and one execution), the median of the timed steps, steps/s the process's CPU
time per step (all threads; less sensitive than wall time to other work on a
shared machine) and the ANIL/MAML speed ratio, all from one process.

    python benchmarks/anil_vs_maml.py                          # 1 5 10 20 steps
    python benchmarks/anil_vs_maml.py --inner-steps 5 --repeats 8
    python benchmarks/anil_vs_maml.py --maml-max-steps 10      # skip MAML at 20
    python benchmarks/anil_vs_maml.py --anil-task-execution vectorized sequential \
        --anil-jit-compile false true --skip-maml             # ANIL variants only
"""

import argparse
import json
import statistics
import time

import keras_meta as km

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def omniglot_like(meta_batch, n_way=5, k_shot=1, q_query=15, pool=4, seed=1):
    """`pool` episodes of random binary glyphs (the peers' synthetic data)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(pool):
        glyphs = rng.random((meta_batch, n_way, 28, 28)) < 0.2

        def sample(per_class):
            flips = rng.random((meta_batch, n_way, per_class, 28, 28)) < 0.05
            images = np.logical_xor(glyphs[:, :, None], flips).astype("float32")
            return images.reshape(meta_batch, n_way * per_class, 28, 28, 1)

        labels = lambda per_class: np.tile(  # noqa: E731
            np.repeat(np.arange(n_way, dtype="int32"), per_class), (meta_batch, 1)
        )
        episode = {
            "support_x": sample(k_shot),
            "support_y": labels(k_shot),
            "query_x": sample(q_query),
            "query_y": labels(q_query),
        }
        episodes.append({k: tf.constant(v) for k, v in episode.items()})
    return episodes


def time_learner(algorithm, inner_steps, task_execution, jit_compile, episodes, args):
    keras.utils.set_random_seed(0)
    model = km.models.conv4(5, seed=0)
    common = dict(
        inner_learning_rate=args.inner_learning_rate,
        inner_steps=inner_steps,
        first_order=args.first_order,
        task_execution=task_execution,
    )
    if algorithm == "anil":
        learner = km.ANIL(model, head="head", **common)
    else:
        learner = km.MAML(model, **common)
    learner.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    start = time.perf_counter()
    learner.train_on_batch(episodes[0])
    first = time.perf_counter() - start
    for i in range(args.warmup):
        learner.train_on_batch(episodes[(i + 1) % len(episodes)])
    times, cpu_times = [], []
    for i in range(args.repeats):
        episode = episodes[(i + 1 + args.warmup) % len(episodes)]
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = learner.train_on_batch(episode, return_dict=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    assert np.isfinite(logs["loss"]), logs
    return {
        "algorithm": algorithm,
        "inner_steps": inner_steps,
        "task_execution": task_execution,
        "jit_compile": jit_compile,
        "first_step_s": first,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "steps_per_s": 1.0 / statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "repeats": args.repeats,
    }


def _bool(text):
    return {"true": True, "false": False}[text.lower()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-learning-rate", type=float, default=0.4)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--anil-task-execution", nargs="+", default=["vectorized"],
                        choices=["vectorized", "sequential"])
    parser.add_argument("--anil-jit-compile", nargs="+", type=_bool, default=[False],
                        help="true/false (several: try each)")
    parser.add_argument("--maml-task-execution", nargs="+", default=["vectorized"],
                        choices=["vectorized", "sequential"])
    parser.add_argument("--maml-jit-compile", nargs="+", type=_bool, default=[False])
    parser.add_argument("--maml-max-steps", type=int, default=None,
                        help="skip MAML above this many inner steps (it is slow)")
    parser.add_argument("--skip-maml", action="store_true")
    parser.add_argument("--json", default=None, help="append one JSON line per setting")
    args = parser.parse_args()

    episodes = omniglot_like(args.meta_batch)
    print(f"conv4(5), 5-way 1-shot, 15 queries/class, meta-batch {args.meta_batch}, "
          f"{'first' if args.first_order else 'second'} order, median of {args.repeats} "
          f"steps after {1 + args.warmup} untimed; TF {tf.__version__}, Keras {keras.__version__}")
    header = (f"{'algorithm':<6} {'steps':>5} {'execution':<11} {'jit':<5} "
              f"{'first s':>8} {'median s':>9} {'steps/s':>8} {'cpu s':>7}")
    print(header)
    results = []
    for steps in args.inner_steps:
        best = {}
        runs = [("anil", e, j) for e in args.anil_task_execution for j in args.anil_jit_compile]
        if not args.skip_maml and (args.maml_max_steps is None or steps <= args.maml_max_steps):
            runs += [("maml", e, j) for e in args.maml_task_execution for j in args.maml_jit_compile]
        for algorithm, execution, jit in runs:
            result = time_learner(algorithm, steps, execution, jit, episodes, args)
            results.append(result)
            previous = best.get(algorithm)
            if previous is None or result["median_step_s"] < previous["median_step_s"]:
                best[algorithm] = result
            print(f"{algorithm:<6} {steps:>5} {execution:<11} {str(jit):<5} "
                  f"{result['first_step_s']:>8.2f} {result['median_step_s']:>9.3f} "
                  f"{result['steps_per_s']:>8.3f} {result['median_cpu_s']:>7.2f}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")
        if "anil" in best and "maml" in best:
            ratio = best["maml"]["median_step_s"] / best["anil"]["median_step_s"]
            print(f"{'':<6} {steps:>5} best ANIL {best['anil']['steps_per_s']:.3f} steps/s, "
                  f"best MAML {best['maml']['steps_per_s']:.3f} steps/s: "
                  f"ANIL/MAML speed {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
