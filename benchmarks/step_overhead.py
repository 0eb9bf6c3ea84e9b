"""Where the time of a small meta-step goes: B1 (sinusoid MAML, XLA) split into its parts.

One process, the variants interleaved round by round (robust to a machine
whose load drifts), medians of `--rounds` blocks of `--block` calls each, every
call blocked on its loss:

- `keras_meta train_function`: what `fit` calls (Keras' train function in
  keras_meta's guard: memory optimizer off, label checks read from the logs);
- `Keras train_function`: the same function without keras_meta's guard;
- `next(iterator) + XLA step`: one `tf.function` that fetches the meta-batch
  and calls the XLA-compiled `train_step` (no Keras wrapper);
- `XLA step on a tensor`: the compiled `train_step` on a meta-batch already
  in memory (no `tf.data`);
- `next(iterator)`: the fetch alone;
- `step without the finite-update cond`: the Keras train function of a
  learner whose update is applied unconditionally (what the skip of
  non-finite steps costs).

    python benchmarks/step_overhead.py --peers_dir=../shared/bench
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (benchmarks/run.py: the B1 spec, weights, data; its flags)

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 40, "Rounds; each times a block of calls of every variant.")
flags.DEFINE_integer("block", 25, "Calls per timed block.")


def main(argv):
    del argv
    import tensorflow as tf

    spec, learner, iterator = run.build("B1")
    guarded = learner.train_function
    keras_function = next(
        cell.cell_contents for cell in guarded.__closure__
        if callable(cell.cell_contents) and getattr(cell.cell_contents, "__name__", "") != "guarded"
    )
    batch = next(iterator)
    xla_step = tf.function(learner.train_step, jit_compile=True)

    @tf.function
    def fetch_and_step(it):
        return xla_step(next(it))

    @tf.function
    def fetch(it):
        return next(it)

    _, unconditional, iterator_2 = run.build("B1")

    def apply_always(gradients, non_finite_tasks):
        unconditional.non_finite_tasks_tracker.update_state(non_finite_tasks)
        unconditional.optimizer.apply_gradients(
            zip(gradients, unconditional.model.trainable_variables))

    unconditional.apply_meta_gradients = apply_always
    unconditional.make_train_function(force=True)

    variants = {
        "keras_meta train_function": lambda: float(guarded(iterator)["loss"]),
        "Keras train_function": lambda: float(keras_function(iterator)["loss"]),
        "next(iterator) + XLA step": lambda: float(fetch_and_step(iterator)["loss"]),
        "XLA step on a tensor": lambda: float(xla_step(batch)["loss"]),
        "next(iterator)": lambda: float(fetch(iterator)["support_x"][0, 0, 0]),
        "step without the finite-update cond": lambda: float(
            unconditional.train_function(iterator_2)["loss"]),
    }
    for call in variants.values():  # warm up (traces, compiles)
        for _ in range(30):
            call()
    times = {name: [] for name in variants}
    for _ in range(FLAGS.rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            for _ in range(FLAGS.block):
                call()
            times[name].append((time.perf_counter() - start) / FLAGS.block)
    reference = statistics.median(times["keras_meta train_function"])
    print(f"B1 ({spec.meta_batch} tasks, {spec.inner_steps} inner step), medians of "
          f"{FLAGS.rounds} blocks of {FLAGS.block} calls:")
    print("| variant | ms per call | speed vs keras_meta train_function |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.3f} | {reference / median:.2f} |")


if __name__ == "__main__":
    app.run(main)
