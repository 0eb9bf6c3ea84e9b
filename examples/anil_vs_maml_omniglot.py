"""ANIL vs MAML on Omniglot 5-way 1-shot under the same wall-clock budget.

Meta-trains `km.MAML` and `km.ANIL` (the conv4 body, the dense head adapted)
from the same initial weights on the same stream of training-class episodes,
each for `--budget_s` seconds of wall-clock time (`--clock cpu`: of CPU time,
fairer on a shared machine), then reports both test
accuracies on `--eval_tasks` test-class tasks after `--eval_inner_steps`
inner steps (mean +- 1.96 std / sqrt(n)). Data: a local Omniglot folder
(`<alphabet>/<character>/*.png` at any depth) or TFDS, the MAML character
split (proportional on a subset), rotations as extra classes.

    python examples/anil_vs_maml_omniglot.py --data_dir /tmp/omniglot --budget_s 600
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
flags.DEFINE_float("budget_s", 600.0, "Meta-training budget of each learner, in seconds.")
flags.DEFINE_enum("clock", "wall", ["wall", "cpu"],
                  "What the budget counts: wall-clock time, or the process's CPU time "
                  "(fairer on a machine shared with other work).")
flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-batch.")
flags.DEFINE_integer("q_query", 15, "Query examples per class.")
flags.DEFINE_float("maml_inner_learning_rate", 0.4, "MAML's inner step size (mean CE).")
flags.DEFINE_integer("maml_inner_steps", 1, "MAML's inner steps in meta-training.")
flags.DEFINE_float("anil_inner_learning_rate", 0.4, "ANIL's inner step size (mean CE).")
flags.DEFINE_integer("anil_inner_steps", 5, "ANIL's inner steps in meta-training.")
flags.DEFINE_float("head_l2_regularization", 0.0, "ANIL's head L2 (lambda).")
flags.DEFINE_integer("eval_inner_steps", 10, "Inner steps at test time (both).")
flags.DEFINE_list("algorithms", ["maml", "anil"], "Which learners to train.")
flags.DEFINE_integer("eval_tasks", 600, "Test-class tasks in the report.")
flags.DEFINE_integer("eval_batch_size", 50, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def test_accuracy(learner, source, steps):
    episodes = km.data.episodes(source, 5, 1, FLAGS.q_query, FLAGS.eval_batch_size,
                                seed=FLAGS.seed + 2)
    results = []
    for episode in episodes.take(-(-FLAGS.eval_tasks // FLAGS.eval_batch_size)):
        out = learner.evaluate_tasks(episode, steps=steps)
        predicted = out["predictions"].argmax(-1)  # [tasks, steps, queries]
        results.append(np.mean(predicted == episode["query_y"].numpy()[:, None], axis=-1))
    return np.concatenate(results)[: FLAGS.eval_tasks]


def main(_):
    tf.get_logger().setLevel("ERROR")
    load = dict(data_dir=FLAGS.data_dir, rotations=(0, 90, 180, 270))
    train = km.data.omniglot("train", **load)
    test = km.data.omniglot("test", **load)
    print(f"train: {train}\ntest: {test}")
    steps = [0, 1, FLAGS.eval_inner_steps]
    report = {}
    for algorithm in FLAGS.algorithms:
        keras.utils.set_random_seed(FLAGS.seed)
        model = km.models.conv4(5, seed=FLAGS.seed)
        if algorithm == "anil":
            learner = km.ANIL(model, head="head", inner_learning_rate=FLAGS.anil_inner_learning_rate,
                              inner_steps=FLAGS.anil_inner_steps,
                              head_l2_regularization=FLAGS.head_l2_regularization,
                              eval_inner_steps=FLAGS.eval_inner_steps)
        else:
            learner = km.MAML(model, inner_learning_rate=FLAGS.maml_inner_learning_rate,
                              inner_steps=FLAGS.maml_inner_steps,
                              eval_inner_steps=FLAGS.eval_inner_steps, task_execution="sequential")
        learner.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"])
        budget = km.callbacks.TimeBudget(FLAGS.budget_s, FLAGS.clock)
        stream = km.data.episodes(train, 5, 1, FLAGS.q_query, FLAGS.meta_batch_size,
                                  seed=FLAGS.seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        history = learner.fit(stream, epochs=1, steps_per_epoch=10**6, verbose=0,
                              callbacks=[budget])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        accuracy = test_accuracy(learner, test, steps)
        mean = accuracy.mean(axis=0)
        interval = 1.96 * accuracy.std(axis=0) / np.sqrt(len(accuracy))
        report[algorithm] = {
            "meta_steps": budget.steps, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "final_train_accuracy": float(history.history["accuracy"][-1]),
            "steps": steps, "accuracy": mean.tolist(), "interval": interval.tolist(),
            "tasks": len(accuracy),
        }
        print(f"{algorithm.upper()}: {budget.steps} meta-steps in {seconds:.0f} s "
              f"({cpu_seconds:.0f} CPU s); test accuracy "
              + ", ".join(f"{s} steps {100 * m:.2f} +- {100 * c:.2f} %"
                          for s, m, c in zip(steps, mean, interval)), flush=True)
    if len(report) == 2:
        gap = 100 * (report["anil"]["accuracy"][-1] - report["maml"]["accuracy"][-1])
        print(f"ANIL - MAML after {FLAGS.eval_inner_steps} steps: {gap:+.2f} points")
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in _OWN_FLAGS}, "results": report},
                      f, indent=1)


_OWN_FLAGS = (
    "data_dir", "budget_s", "clock", "meta_batch_size", "q_query", "maml_inner_learning_rate",
    "maml_inner_steps", "anil_inner_learning_rate", "anil_inner_steps",
    "head_l2_regularization", "eval_inner_steps", "algorithms", "eval_tasks", "seed",
)

if __name__ == "__main__":
    app.run(main)
