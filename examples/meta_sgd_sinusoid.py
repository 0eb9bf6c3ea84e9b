"""Sinusoid regression, K-shot: MAML vs Meta-SGD, query MSE after one inner step.

Meta-trains `km.MAML` and `km.MetaSGD` (the MAML sinusoid network, 40-40
ReLU, MSE) from the same initial weights on the same task stream (amplitude
in [0.1, 5], phase in [0, pi], x in [-5, 5]; K support and K query points;
one inner step at `--inner_learning_rate`, Meta-SGD's per-parameter rates
initialised there; Adam `--meta_learning_rate`), each for `--meta_steps`
meta-batches of `--meta_batch_size` tasks, then reports the query MSE on
`--eval_tasks` held-out tasks (100 query points each) before adaptation and
after 1 and 10 inner steps (mean +- 1.96 std / sqrt(n)).

    python examples/meta_sgd_sinusoid.py --meta_steps 5000
"""

import json
import time

from absl import app, flags

import keras_meta as km

import keras  # noqa: E402  (after keras_meta, which selects TensorFlow)
import numpy as np  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("meta_steps", 5000, "Meta-training steps (meta-batches) per learner.")
flags.DEFINE_integer("k_shot", 10, "Support (and training query) points per task.")
flags.DEFINE_integer("meta_batch_size", 25, "Tasks per meta-batch.")
flags.DEFINE_float("inner_learning_rate", 0.01, "MAML's step size; Meta-SGD's initial rates.")
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of the meta-update.")
flags.DEFINE_integer("eval_tasks", 600, "Held-out tasks for the report.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the task stream.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")

STEPS = [0, 1, 10]


def evaluate(learner):
    episodes = km.data.sinusoid(k_shot=FLAGS.k_shot, q_query=100, meta_batch_size=100,
                                seed=FLAGS.seed + 1000)
    losses = [learner.evaluate_tasks(episode, steps=STEPS)["loss"]
              for episode in episodes.take(-(-FLAGS.eval_tasks // 100))]
    losses = np.concatenate(losses)[: FLAGS.eval_tasks]
    return losses.mean(axis=0), 1.96 * losses.std(axis=0) / np.sqrt(len(losses))


def main(_):
    report = {}
    for name, cls in (("maml", km.MAML), ("meta_sgd", km.MetaSGD)):
        keras.utils.set_random_seed(FLAGS.seed)
        learner = cls(km.models.mlp(seed=FLAGS.seed), inner_learning_rate=FLAGS.inner_learning_rate,
                      inner_steps=1)
        learner.compile(optimizer=keras.optimizers.Adam(FLAGS.meta_learning_rate), loss="mse")
        stream = km.data.sinusoid(k_shot=FLAGS.k_shot, q_query=FLAGS.k_shot,
                                  meta_batch_size=FLAGS.meta_batch_size, seed=FLAGS.seed)
        start, cpu = time.perf_counter(), time.process_time()
        learner.fit(stream, steps_per_epoch=FLAGS.meta_steps, epochs=1, verbose=0)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        mean, interval = evaluate(learner)
        report[name] = {"meta_steps": FLAGS.meta_steps, "train_seconds": seconds,
                        "train_cpu_seconds": cpu, "steps": STEPS, "mse": mean.tolist(),
                        "interval": interval.tolist(), "tasks": FLAGS.eval_tasks}
        extra = ""
        if name == "meta_sgd":
            rates = np.concatenate([np.ravel(r) for r in learner.inner_learning_rates])
            extra = (f"; learned rates: median {np.median(rates):.4f}, "
                     f"range [{rates.min():.4f}, {rates.max():.4f}]")
            report[name]["rates_median"] = float(np.median(rates))
        print(f"{name}: {FLAGS.meta_steps} meta-steps in {seconds:.0f} s ({cpu:.0f} CPU s); "
              "query MSE " + ", ".join(f"{s} steps {m:.3f} +- {c:.3f}"
                                       for s, m, c in zip(STEPS, mean, interval)) + extra,
              flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in (
                "meta_steps", "k_shot", "meta_batch_size", "inner_learning_rate",
                "meta_learning_rate", "eval_tasks", "seed")}, "results": report}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
