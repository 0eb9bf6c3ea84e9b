"""Few-shot adaptation on the device: Omniglot ANIL as a TensorFlow Lite file.

Meta-trains `km.ANIL` (conv4 body, dense head adapted) on Omniglot 5-way
1-shot episodes of the training characters for `--budget_s` seconds
(`--clock cpu`: of CPU time, fairer on a shared machine), exports it with
`km.export_tflite` as float32, dynamic-range and float16 files, and adapts to
`--eval_tasks` tasks of held-out characters inside `tf.lite.Interpreter`
(one thread), printing per file its accuracy (mean +- 1.96 std / sqrt(n)),
the median per-task latency of `adapt_and_predict` over `--latency_tasks`
tasks, and its size. The same weights wrapped in `km.MAML` (every weight
adapted, the same inner steps) are exported too, for MAML's latency and size
on the device. Data: a local Omniglot folder (`<alphabet>/<character>/*.png`
at any depth), the MAML character split (proportional on a subset),
rotations as extra classes.

    python examples/on_device_omniglot.py --data_dir /tmp/omniglot --budget_s 300 --clock cpu
"""

import json
import os
import tempfile
import time
import warnings

from absl import app, flags, logging

import keras_meta as km

import keras  # noqa: E402  (after keras_meta, which selects TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder of Omniglot images (required: runs offline).")
flags.DEFINE_float("budget_s", 300.0, "ANIL's meta-training budget, in seconds.")
flags.DEFINE_enum("clock", "wall", ["wall", "cpu"],
                  "What the budget counts: wall-clock time or the process's CPU time.")
flags.DEFINE_integer("filters", 64, "conv4 filters per block.")
flags.DEFINE_integer("meta_batch_size", 16, "Tasks per meta-batch.")
flags.DEFINE_integer("q_query", 5, "Query examples per class (training and test tasks).")
flags.DEFINE_float("inner_learning_rate", 0.4, "Inner step size (mean CE).")
flags.DEFINE_integer("inner_steps", 5, "ANIL's inner steps in meta-training.")
flags.DEFINE_integer("eval_inner_steps", 10, "Inner steps on the device (ANIL and MAML).")
flags.DEFINE_integer("eval_tasks", 600, "Held-out tasks for the accuracies.")
flags.DEFINE_integer("latency_tasks", 100, "Tasks timed for the median latency.")
flags.DEFINE_string("output_dir", None, "Where the .tflite files go (default: a temp folder).")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")


def test_tasks(source, count):
    """`count` held-out 5-way 1-shot tasks as numpy dicts (no meta-batch axis)."""
    episodes = km.data.episodes(source, 5, 1, FLAGS.q_query, 50, seed=FLAGS.seed + 2)
    tasks = []
    for episode in episodes:
        episode = {k: v.numpy() for k, v in episode.items()}
        for i in range(len(episode["support_x"])):
            tasks.append({k: v[i] for k, v in episode.items()})
        if len(tasks) >= count:
            return tasks[:count]
    return tasks


def run_file(path, tasks, latency_tasks):
    """(per-task accuracies, median adapt_and_predict seconds) in the Interpreter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=path, num_threads=1)
    adapt = interpreter.get_signature_runner("adapt_and_predict")
    accuracies, seconds = [], []
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        logits = adapt(support_x=task["support_x"], support_y=task["support_y"].astype(np.int32),
                       query_x=task["query_x"])["predictions"]
        if i < latency_tasks:
            seconds.append(time.perf_counter() - start)
        accuracies.append(np.mean(logits.argmax(-1) == task["query_y"]))
    return np.array(accuracies), float(np.median(seconds))


def summary(accuracies):
    return 100 * accuracies.mean(), 100 * 1.96 * accuracies.std() / np.sqrt(len(accuracies))


def main(_):
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)  # SavedModel writing's INFO lines
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir (a local Omniglot folder) is required")
    load = dict(data_dir=FLAGS.data_dir, rotations=(0, 90, 180, 270))
    train = km.data.omniglot("train", **load)
    test = km.data.omniglot("test", **load)
    print(f"train: {train}\ntest: {test}")
    keras.utils.set_random_seed(FLAGS.seed)
    model = km.models.conv4(5, filters=FLAGS.filters, seed=FLAGS.seed)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    anil = km.ANIL(model, head="head", inner_learning_rate=FLAGS.inner_learning_rate,
                   inner_steps=FLAGS.inner_steps, eval_inner_steps=FLAGS.eval_inner_steps)
    anil.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ce, metrics=["accuracy"])
    budget = km.callbacks.TimeBudget(FLAGS.budget_s, FLAGS.clock)
    stream = km.data.episodes(train, 5, 1, FLAGS.q_query, FLAGS.meta_batch_size, seed=FLAGS.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    anil.fit(stream, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[budget])
    print(f"ANIL: {budget.steps} meta-steps in {time.perf_counter() - start:.0f} s "
          f"({time.process_time() - cpu_start:.0f} CPU s)", flush=True)

    # The same meta-learned weights, every one adapted (MAML's on-device cost).
    maml = km.MAML(model, inner_learning_rate=FLAGS.inner_learning_rate,
                   eval_inner_steps=FLAGS.eval_inner_steps)
    maml.compile(optimizer="adam", loss=ce)

    tasks = test_tasks(test, FLAGS.eval_tasks)
    support_shape, query_shape = tasks[0]["support_x"].shape, tasks[0]["query_x"].shape
    # The learner itself on the same tasks, as the reference.
    batch = {k: np.stack([t[k] for t in tasks]) for k in tasks[0]}
    predictions = anil.predict({k: v for k, v in batch.items() if k != "query_y"},
                               batch_size=50, verbose=0)
    keras_accuracy = np.mean(
        predictions.reshape(len(tasks), -1, 5).argmax(-1) == batch["query_y"], axis=1
    )
    print("ANIL in Keras (learner.predict): accuracy %.2f +- %.2f %%" % summary(keras_accuracy))

    folder = FLAGS.output_dir or tempfile.mkdtemp(prefix="on_device_")
    files = {
        "anil float32": (anil, None), "anil dynamic_range": (anil, "dynamic_range"),
        "anil float16": (anil, "float16"), "maml float32": (maml, None),
        "maml dynamic_range": (maml, "dynamic_range"),
    }
    report = {"keras_anil_accuracy": summary(keras_accuracy), "files": {}}
    for name, (learner, quantize) in files.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".tflite")
        start = time.perf_counter()
        km.export_tflite(learner, path, support_shape, query_shape, quantize=quantize)
        export_seconds = time.perf_counter() - start
        # MAML's accuracy is not the point (its weights are ANIL's): time it only.
        count = len(tasks) if name.startswith("anil") else FLAGS.latency_tasks
        accuracies, latency = run_file(path, tasks[:count], FLAGS.latency_tasks)
        mean, interval = summary(accuracies)
        size = os.path.getsize(path)
        report["files"][name] = {"accuracy": mean, "interval": interval, "tasks": count,
                                 "median_latency_ms": 1e3 * latency, "bytes": size,
                                 "export_seconds": export_seconds}
        accuracy = f"{mean:.2f} +- {interval:.2f} % ({count} tasks)" if name.startswith(
            "anil") else "-"
        print(f"{name:20s} accuracy {accuracy:28s} median latency {1e3 * latency:8.2f} ms "
              f"size {size / 1024:8.1f} KiB (export {export_seconds:.0f} s)", flush=True)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in _OWN_FLAGS}, "results": report},
                      f, indent=1)


_OWN_FLAGS = (
    "data_dir", "budget_s", "clock", "filters", "meta_batch_size", "q_query",
    "inner_learning_rate", "inner_steps", "eval_inner_steps", "eval_tasks", "latency_tasks",
    "seed",
)

if __name__ == "__main__":
    app.run(main)
