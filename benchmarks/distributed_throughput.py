"""Meta-training throughput with 1 vs N replicas (tf.distribute.MirroredStrategy).

Each replica count runs in its own process. On a CPU-only machine the replicas are
logical CPU devices sharing the same cores (so this measures overhead, not
speed-up); with GPUs the same script uses one GPU per replica.

    python benchmarks/distributed_throughput.py --replicas=1,2 --bench=conv4 --steps=10

Prints, per replica count, the median meta-steps/s and tasks/s (after warm-up), the
first step's time (trace), and the ratio to 1 replica.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("replicas", "1,2", "Comma-separated replica counts.")
flags.DEFINE_enum("bench", "conv4", ["conv4", "sinusoid"], "conv4: 5-way 1-shot 15-query MAML; sinusoid: MLP.")
flags.DEFINE_integer("meta_batch_size", 32, "Global meta-batch (tasks per step).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after the first.")
flags.DEFINE_integer("worker", 0, "Internal: replica count of a worker process.")
FLAGS = flags.FLAGS


def worker(replicas):
    import time

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        devices = [f"/gpu:{i}" for i in range(replicas)]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        devices = [f"/cpu:{i}" for i in range(replicas)]
    import keras
    import numpy as np

    import keras_meta as km

    strategy = tf.distribute.MirroredStrategy(devices) if replicas > 1 else tf.distribute.get_strategy()
    rng = np.random.default_rng(1)
    with strategy.scope():
        if FLAGS.bench == "conv4":
            model = km.models.conv4(5, seed=0)
            learner = km.MAML(model, inner_learning_rate=0.4)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            b = FLAGS.meta_batch_size
            episode = {
                "support_x": rng.random((b, 5, 28, 28, 1), dtype=np.float32),
                "support_y": np.tile(np.arange(5, dtype=np.int32), (b, 1)),
                "query_x": rng.random((b, 75, 28, 28, 1), dtype=np.float32),
                "query_y": np.tile(np.repeat(np.arange(5, dtype=np.int32), 15), (b, 1)),
            }
        else:
            learner = km.MAML(km.models.mlp(seed=0), inner_learning_rate=0.01)
            loss = "mse"
            episode = {k: np.array(v) for k, v in
                       next(iter(km.data.sinusoid(meta_batch_size=FLAGS.meta_batch_size, seed=1))).items()}
        learner.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    dataset = tf.data.Dataset.from_tensors(episode).repeat()
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the step
            times.append(time.perf_counter() - self.start)

    learner.fit(dataset, steps_per_epoch=1 + FLAGS.warmup + FLAGS.steps, callbacks=[Timer()], verbose=0)
    timed = np.array(times[1 + FLAGS.warmup:])
    print("RESULT" + json.dumps({
        "replicas": replicas, "devices": devices, "first_step_s": times[0],
        "steps_per_s": float(np.median(1 / timed)), "min": float((1 / timed).min()),
        "max": float((1 / timed).max()),
        "tasks_per_s": float(np.median(FLAGS.meta_batch_size / timed))}))


def main(_):
    if FLAGS.worker:
        return worker(FLAGS.worker)
    rows = []
    for replicas in [int(r) for r in FLAGS.replicas.split(",")]:
        if FLAGS.meta_batch_size % replicas:
            sys.exit(f"--meta_batch_size={FLAGS.meta_batch_size} is not divisible by {replicas} replicas")
        out = subprocess.run([sys.executable, __file__, f"--worker={replicas}", f"--bench={FLAGS.bench}",
                              f"--meta_batch_size={FLAGS.meta_batch_size}", f"--steps={FLAGS.steps}",
                              f"--warmup={FLAGS.warmup}"], capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
        if not lines:
            sys.exit(out.stderr[-3000:])
        rows.append(json.loads(lines[-1][6:]))
    base = rows[0]["steps_per_s"]
    print(f"{FLAGS.bench}, global meta-batch {FLAGS.meta_batch_size}")
    print(f"{'replicas':>8} {'devices':>24} {'steps/s (min-max)':>24} {'tasks/s':>9} {'first step s':>12} {'vs 1':>6}")
    for r in rows:
        print(f"{r['replicas']:>8} {','.join(r['devices']):>24} "
              f"{r['steps_per_s']:>8.3f} ({r['min']:.3f}-{r['max']:.3f}) {r['tasks_per_s']:>9.1f} "
              f"{r['first_step_s']:>12.1f} {r['steps_per_s'] / base:>6.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
