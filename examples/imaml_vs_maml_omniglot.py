"""iMAML vs MAML on Omniglot 5-way 1-shot under the same wall-clock budget.

Meta-trains `km.MAML` (second order) and `km.IMAML` from the same initial
conv4 weights, each on its own copy of the same seeded stream of
training-class episodes, for `--budget_s` seconds of training-step wall-clock
time each. The learners take turns in chunks of `--chunk_s` seconds, so that
other load on a shared machine falls on both alike. Then both are evaluated
on the same `--eval_tasks` test-class tasks (mean +- 1.96 std / sqrt(n)):
MAML after `--maml_eval_inner_steps` steps, iMAML after
`--imaml_eval_inner_steps` steps with its own lambda and, as the official
iMAML code evaluates, with lambda = 0; and iMAML in the official code's
configuration (`imaml_official`), which evaluates with lambda = 0. Data: a local Omniglot folder
(`<alphabet>/<character>/*.png` at any depth) or TFDS, the MAML character
split (proportional on a subset), rotations as extra classes.

    python examples/imaml_vs_maml_omniglot.py --data_dir /tmp/omniglot --budget_s 900
"""

import json
import os
import time

from absl import app, flags

import keras_meta as km

import keras  # noqa: E402  (after keras_meta, which selects TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder of Omniglot images; default: TFDS `omniglot`.")
flags.DEFINE_float("budget_s", 900.0, "Wall-clock training budget of each learner.")
flags.DEFINE_float("chunk_s", 60.0, "Seconds a learner trains before the other takes a turn.")
flags.DEFINE_integer("meta_batch_size", 16, "Tasks per meta-batch.")
flags.DEFINE_integer("q_query", 15, "Query examples per class.")
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of both meta-updates.")
flags.DEFINE_float("maml_inner_learning_rate", 0.4, "MAML's inner step size (mean CE).")
flags.DEFINE_integer("maml_inner_steps", 1, "MAML's inner steps in meta-training.")
flags.DEFINE_integer("maml_eval_inner_steps", 10, "MAML's inner steps at test time.")
flags.DEFINE_float("imaml_inner_learning_rate", 0.1, "iMAML's inner step size (mean CE).")
flags.DEFINE_integer("imaml_inner_steps", 16, "iMAML's inner steps in meta-training.")
flags.DEFINE_integer("imaml_eval_inner_steps", 16, "iMAML's inner steps at test time.")
flags.DEFINE_float("l2_regularization", 2.0, "iMAML's lambda.")
flags.DEFINE_integer("cg_iterations", 5, "iMAML's CG iterations.")
flags.DEFINE_float("cg_damping", 0.0, "iMAML's cg_damping (official code: 1.0).")
flags.DEFINE_float("cg_l2_damping", 0.0, "iMAML's cg_l2_damping (official code: 10.0).")
flags.DEFINE_list("algorithms", ["maml", "imaml", "imaml_official"],
                  "Which learners to train: maml, imaml (the paper's method with the flags "
                  "above), imaml_official (the official code's variant: pull-back step, "
                  "cg_damping=1, cg_l2_damping=10, lambda=0 at test time).")
flags.DEFINE_enum("task_execution", "sequential", ["sequential", "vectorized"],
                  "How the tasks of a meta-batch run (sequential is faster for conv4 on CPU).")
flags.DEFINE_integer("eval_tasks", 600, "Test-class tasks in the report.")
flags.DEFINE_integer("eval_batch_size", 50, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_integer("intra_op_threads", 0, "If > 0: km.configure_cpu_threads(intra_op=...) first "
                     "(1 = one thread per kernel, faster task by task on CPU; docs/performance.md).")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def make_learner(algorithm, model, **overrides):
    if algorithm == "maml":
        learner = km.MAML(model, inner_learning_rate=FLAGS.maml_inner_learning_rate,
                          inner_steps=FLAGS.maml_inner_steps,
                          eval_inner_steps=FLAGS.maml_eval_inner_steps,
                          task_execution=FLAGS.task_execution)
    else:
        arguments = dict(
            inner_learning_rate=FLAGS.imaml_inner_learning_rate,
            inner_steps=FLAGS.imaml_inner_steps, eval_inner_steps=FLAGS.imaml_eval_inner_steps,
            l2_regularization=FLAGS.l2_regularization, cg_iterations=FLAGS.cg_iterations,
            cg_damping=FLAGS.cg_damping, cg_l2_damping=FLAGS.cg_l2_damping,
            task_execution=FLAGS.task_execution)
        if algorithm == "imaml_official":
            arguments.update(cg_damping=1.0, cg_l2_damping=10.0, proximal_pull_back=True,
                             eval_l2_regularization=0.0)
        arguments.update(overrides)
        learner = km.IMAML(model, **arguments)
    learner.compile(optimizer=keras.optimizers.Adam(FLAGS.meta_learning_rate),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    return learner


def main(_):
    if FLAGS.intra_op_threads:
        km.configure_cpu_threads(intra_op=FLAGS.intra_op_threads)
    tf.get_logger().setLevel("ERROR")  # pfor's "uses a while_loop" notes
    load = dict(data_dir=FLAGS.data_dir, rotations=(0, 90, 180, 270))
    train = km.data.omniglot("train", **load)
    test = km.data.omniglot("test", **load)
    print(f"train: {train}\ntest: {test}", flush=True)

    # Same initial weights, same episode stream, for every learner.
    learners, streams, seconds, steps, logs = {}, {}, {}, {}, {}
    for algorithm in FLAGS.algorithms:
        keras.utils.set_random_seed(FLAGS.seed)
        learners[algorithm] = make_learner(algorithm, km.models.conv4(5, seed=FLAGS.seed))
        streams[algorithm] = iter(km.data.episodes(train, 5, 1, FLAGS.q_query,
                                                   FLAGS.meta_batch_size, seed=FLAGS.seed))
        seconds[algorithm], steps[algorithm], logs[algorithm] = 0.0, 0, []
        # The first step traces the train function: not counted in the budget.
        learners[algorithm].train_on_batch(next(streams[algorithm]))
        steps[algorithm] = 1

    # Take turns until every learner has used its budget.
    while any(seconds[a] < FLAGS.budget_s for a in FLAGS.algorithms):
        for algorithm in FLAGS.algorithms:
            turn = min(FLAGS.chunk_s, FLAGS.budget_s - seconds[algorithm])
            start = time.perf_counter()
            while time.perf_counter() - start < turn:
                episode = next(streams[algorithm])
                logs[algorithm].append(
                    learners[algorithm].train_on_batch(episode, return_dict=True))
                steps[algorithm] += 1
            seconds[algorithm] += time.perf_counter() - start
        print("  " + ", ".join(
            f"{a}: {steps[a]} steps, {seconds[a]:.0f} s, train acc "
            f"{np.mean([l['accuracy'] for l in logs[a][-20:]]):.3f}"
            + (f", cg residual {np.mean([l['cg_residual'] for l in logs[a][-20:]]):.2f}"
               if a.startswith("imaml") else "")
            for a in FLAGS.algorithms if logs[a]), flush=True)

    report = {}
    evaluations = [(a, learners[a]) for a in FLAGS.algorithms]
    for algorithm in FLAGS.algorithms:
        if algorithm == "imaml":
            # The official protocol: adapt without the proximal term (lambda = 0).
            evaluations.append((f"{algorithm}:lambda0", make_learner(
                algorithm, learners[algorithm].model, eval_l2_regularization=0.0)))
    for name, learner in evaluations:
        episodes = km.data.episodes(test, 5, 1, FLAGS.q_query, FLAGS.eval_batch_size,
                                    seed=FLAGS.seed + 2)
        results = km.evaluation.evaluate_episodes(
            learner, episodes, FLAGS.eval_tasks, steps=[0, 1, learner.adaptation_steps])
        mean, interval = km.evaluation.mean_and_ci95(results["accuracy"])
        algorithm = name.split(":")[0]
        report[name] = {
            "meta_steps": steps[algorithm], "train_seconds": seconds[algorithm],
            "final_train_accuracy": float(np.mean([l["accuracy"] for l in logs[algorithm][-20:]])),
            "steps": results["steps"].tolist(), "accuracy": np.ravel(mean).tolist(),
            "interval": np.ravel(interval).tolist(), "tasks": int(results["accuracy"].shape[0]),
        }
        print(f"{name}: {steps[algorithm]} meta-steps in {seconds[algorithm]:.0f} s; test accuracy "
              + ", ".join(f"{s} steps {100 * m:.2f} +- {100 * c:.2f} %" for s, m, c in
                          zip(results["steps"], np.ravel(mean), np.ravel(interval))), flush=True)
    for name in report:
        if name != "maml" and "maml" in report:
            gap = 100 * (report[name]["accuracy"][-1] - report["maml"]["accuracy"][-1])
            print(f"{name} - maml (each after its own test-time steps): {gap:+.2f} points")
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in _OWN_FLAGS}, "results": report},
                      f, indent=1)


_OWN_FLAGS = (
    "data_dir", "budget_s", "chunk_s", "meta_batch_size", "q_query", "meta_learning_rate",
    "maml_inner_learning_rate", "maml_inner_steps", "maml_eval_inner_steps",
    "imaml_inner_learning_rate", "imaml_inner_steps", "imaml_eval_inner_steps",
    "l2_regularization", "cg_iterations", "cg_damping", "cg_l2_damping", "algorithms",
    "task_execution", "eval_tasks", "eval_batch_size", "seed", "intra_op_threads",
)

if __name__ == "__main__":
    app.run(main)
