"""MAML vs Meta-SGD vs the MAML++ recipe on Omniglot, alphabets held out for testing.

Meta-trains, from the same initial conv4 weights and on the same stream of
training episodes, each learner of `--learners` (any of `maml`, `meta_sgd`,
`maml_pp`) with each BatchNorm setting of `--transductive` (`true`: every
batch normalised with its own statistics, the reference MAML's; `false`:
the query set normalised with the support set's moments, as the plain model
`adapt()` returns does), for `--meta_steps` meta-steps or until
`--budget_s` seconds of wall-clock or (`--clock cpu`) CPU time, whichever
comes first. Then it reports test accuracy on `--eval_tasks` tasks of the
held-out alphabets after 0, 1, `--train_steps` and `--eval_inner_steps` inner
steps (mean +- 1.96 std / sqrt(n)), twice:

- the learner's own predictions (`evaluate_tasks`, its BatchNorm setting);
- the predictions of `adapt()`'s plain Keras models, which normalise with
  the support set's statistics. They equal the predictions of the same
  weights under `transductive_batch_norm=False`, which is how they are
  computed for all tasks (batched); the script checks that equality against
  real `adapt()` models on `--adapt_check_tasks` tasks (the same classes but
  for near-ties within float32 rounding, or it stops).

Learners (mean cross-entropy inner loss; Adam 1e-3 outer):

- `maml`: MAML, `--maml_steps` inner steps (1, MAML's Omniglot setting) at
  `--maml_lr`;
- `meta_sgd`: Meta-SGD, the same steps, rates initialised at `--maml_lr`;
- `maml_pp`: the MAML++ recipe: `--maml_pp_steps` steps (5), LSLR rates
  initialised at `--maml_pp_lr` (0.1), multi-step loss annealed over
  `--msl_epochs` epochs, per-step BatchNorm, derivative-order annealing
  (first order before `--da_epochs`), cosine decay of the outer rate to
  `--min_learning_rate` over the meta-steps.

Data: a local Omniglot folder (`<alphabet>/<character>/*.png`) or TFDS; the
characters of `--test_alphabets` are the test classes, all others train;
rotations by multiples of 90 degrees are extra classes.

    python examples/maml_plus_plus_omniglot.py --data_dir omniglot --n_way 5 \
        --clock cpu --budget_s 180 --meta_steps 100000 --steps_per_epoch 20
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
flags.DEFINE_list("test_alphabets", ["Korean", "Tagalog"], "Alphabets held out for testing.")
flags.DEFINE_integer("n_way", 5, "Classes per task.")
flags.DEFINE_integer("k_shot", 1, "Support examples per class.")
flags.DEFINE_integer("q_query", 5, "Query examples per class in meta-training.")
flags.DEFINE_integer("eval_q_query", 15, "Query examples per class at test time.")
flags.DEFINE_integer("meta_batch_size", 8, "Tasks per meta-batch (MAML++ Omniglot: 8).")
flags.DEFINE_integer("filters", 64, "conv4 filters.")
flags.DEFINE_integer("meta_steps", 2000, "Most meta-steps per learner.")
flags.DEFINE_float("budget_s", 1e9, "Most seconds of training per learner (see --clock).")
flags.DEFINE_enum("clock", "wall", ["wall", "cpu"], "What --budget_s counts.")
flags.DEFINE_integer("steps_per_epoch", 50, "Meta-steps per Keras epoch (MSL/DA count epochs).")
flags.DEFINE_list("learners", ["maml", "meta_sgd", "maml_pp"], "maml, meta_sgd, maml_pp.")
flags.DEFINE_list("transductive", ["true"], "BatchNorm settings to train with: true, false.")
flags.DEFINE_integer("maml_steps", 1, "Inner steps of maml and meta_sgd in training.")
flags.DEFINE_float("maml_lr", 0.4, "Inner rate of maml (initial rates of meta_sgd).")
flags.DEFINE_integer("maml_pp_steps", 5, "Inner steps of maml_pp in training.")
flags.DEFINE_float("maml_pp_lr", 0.1, "Initial LSLR rates of maml_pp.")
flags.DEFINE_integer("msl_epochs", 10, "maml_pp: multi-step loss annealing epochs.")
flags.DEFINE_integer("da_epochs", 0, "maml_pp: first-order epochs before second order.")
flags.DEFINE_float("min_learning_rate", 1e-5, "maml_pp: the cosine schedule's floor.")
flags.DEFINE_integer("eval_inner_steps", 10, "Inner steps at test time.")
flags.DEFINE_integer("eval_tasks", 600, "Test tasks in the report.")
flags.DEFINE_integer("eval_batch_size", 50, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("adapt_check_tasks", 10, "Tasks checked against real adapt() models.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_bool("equal_budget", False, "Train maml_pp first; then each other learner "
                  "trains for maml_pp's time (--clock) and is scored twice: at maml_pp's number "
                  "of meta-steps (a snapshot of the same run) and at the end of the budget.")
flags.DEFINE_integer("intra_op_threads", 0, "n > 0: km.configure_cpu_threads(intra_op=n) "
                     "(one thread per kernel for n = 1; two runs side by side on 2 cores).")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def sources():
    everything = km.data.omniglot("train", class_split={"train": 1.0}, data_dir=FLAGS.data_dir)
    names = everything.base_class_names
    alphabets = sorted({name.split("/")[0] for name in names})
    missing = sorted(set(FLAGS.test_alphabets) - set(alphabets))
    if missing:
        raise ValueError(f"--test_alphabets {missing} not among {alphabets}")
    test = [n for n in names if n.split("/")[0] in FLAGS.test_alphabets]
    train = [n for n in names if n.split("/")[0] not in FLAGS.test_alphabets]
    rotations = (0, 90, 180, 270)
    return (everything.subset(train, name="train").with_rotations(rotations),
            everything.subset(test, name="test").with_rotations(rotations), alphabets)


def make_learner(name, model, transductive):
    common = dict(eval_inner_steps=FLAGS.eval_inner_steps, transductive_batch_norm=transductive,
                  task_execution="sequential")
    if name == "maml":
        return km.MAML(model, inner_learning_rate=FLAGS.maml_lr, inner_steps=FLAGS.maml_steps,
                       **common)
    if name == "meta_sgd":
        return km.MetaSGD(model, inner_learning_rate=FLAGS.maml_lr, inner_steps=FLAGS.maml_steps,
                          **common)
    return km.MAML(model, inner_learning_rate=FLAGS.maml_pp_lr, inner_steps=FLAGS.maml_pp_steps,
                   learned_inner_learning_rates="per_layer_per_step", multi_step_loss=True,
                   multi_step_loss_epochs=FLAGS.msl_epochs, per_step_batch_norm=True,
                   first_order=FLAGS.da_epochs > 0, **common)


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def accuracies(learner, episodes, steps):
    out = []
    for episode in episodes:
        results = learner.evaluate_tasks(episode, steps=steps)
        predicted = results["predictions"].argmax(-1)  # [tasks, steps, queries]
        out.append(np.mean(predicted == episode["query_y"].numpy()[:, None], axis=-1))
    return np.concatenate(out)[: FLAGS.eval_tasks]


def support_statistics_twin(learner):
    """The same weights under `transductive_batch_norm=False`: adapt()'s predictions."""
    config = dict(learner.get_config(), transductive_batch_norm=False)
    twin = type(learner).from_config(config)
    twin.set_weights(learner.get_weights())
    twin.compile(loss=loss())
    return twin


def check_adapt(learner, twin, episode, steps):
    """Real `adapt()` models predict as the twin does (argmax), task by task."""
    twin_predictions = twin.predict({k: episode[k] for k in ("support_x", "support_y", "query_x")},
                                    verbose=0)
    queries = episode["query_x"].shape[1]
    for t in range(min(FLAGS.adapt_check_tasks, episode["support_x"].shape[0])):
        adapted = learner.adapt(episode["support_x"][t], episode["support_y"][t], steps=steps)
        plain = adapted.predict(episode["query_x"][t], verbose=0)
        expected = twin_predictions[t * queries:(t + 1) * queries]
        # Float32 rounding of two evaluation orders (one task eagerly, all
        # tasks batched), amplified by 10 inner steps: about 1e-2 relative on
        # 20-way logits. The classes agree but where the twin's two best
        # logits are that close.
        tolerance = 2e-2 * np.abs(expected).max()
        np.testing.assert_allclose(plain, expected, rtol=2e-2, atol=tolerance)
        rows = np.arange(len(plain))
        gap = expected[rows, expected.argmax(-1)] - expected[rows, plain.argmax(-1)]
        if np.any(gap > tolerance):
            raise AssertionError(f"adapt() task {t}: predictions differ from the twin's")
    return min(FLAGS.adapt_check_tasks, episode["support_x"].shape[0])


def summary(accuracy):
    mean = accuracy.mean(axis=0)
    interval = 1.96 * accuracy.std(axis=0) / np.sqrt(len(accuracy))
    return mean, interval


class Snapshot(keras.callbacks.Callback):
    """The learner's weights after `step` meta-steps (`None` if it stopped earlier)."""

    def __init__(self, step):
        super().__init__()
        self.step, self.count, self.weights = step, 0, None

    def on_train_begin(self, logs=None):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1
        if self.count == self.step:
            self.weights = self.model.get_weights()
            # The time to here, as the run's own rows count it.
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start


def score(learner, twin, eval_episodes, steps):
    """(learner's accuracy, adapt()'s accuracy, tasks checked against real adapt() models)."""
    own = summary(accuracies(learner, eval_episodes, steps))
    checked = check_adapt(learner, twin, eval_episodes[0], FLAGS.eval_inner_steps)
    plain = own if twin is learner else summary(accuracies(twin, eval_episodes, steps))
    return own, plain, checked


def main(_):
    if FLAGS.intra_op_threads > 0:
        km.configure_cpu_threads(intra_op=FLAGS.intra_op_threads)
    tf.get_logger().setLevel("ERROR")
    train, test, alphabets = sources()
    print(f"alphabets: {alphabets}; test: {FLAGS.test_alphabets}\ntrain: {train}\ntest: {test}")
    steps = sorted({0, 1, FLAGS.maml_steps, FLAGS.maml_pp_steps, FLAGS.eval_inner_steps})
    eval_episodes = list(km.data.episodes(
        test, FLAGS.n_way, FLAGS.k_shot, FLAGS.eval_q_query, FLAGS.eval_batch_size,
        seed=FLAGS.seed + 2).take(-(-FLAGS.eval_tasks // FLAGS.eval_batch_size)))
    learners = list(FLAGS.learners)
    if FLAGS.equal_budget:
        if "maml_pp" not in learners:
            raise app.UsageError("--equal_budget measures the budget of maml_pp: add it to --learners")
        learners = ["maml_pp"] + [name for name in learners if name != "maml_pp"]
    report = []
    for transductive in [t.lower() == "true" for t in FLAGS.transductive]:
        reference = None  # maml_pp's (seconds by --clock, meta-steps) under --equal_budget
        for name in learners:
            keras.utils.set_random_seed(FLAGS.seed)
            model = km.models.conv4(FLAGS.n_way, filters=FLAGS.filters, seed=FLAGS.seed)
            learner = make_learner(name, model, transductive)
            meta_steps, budget_s = FLAGS.meta_steps, FLAGS.budget_s
            if reference is not None:
                budget_s, meta_steps = reference[0], 1000 * FLAGS.meta_steps
            timer = km.callbacks.TimeBudget(budget_s, FLAGS.clock)
            snapshot = Snapshot(reference[1] if reference is not None else 0)
            rate, callbacks = 1e-3, [timer, snapshot]
            if name == "maml_pp":
                rate = keras.optimizers.schedules.CosineDecay(
                    1e-3, decay_steps=FLAGS.meta_steps, alpha=FLAGS.min_learning_rate / 1e-3)
                if FLAGS.da_epochs > 0:
                    callbacks.append(km.callbacks.DerivativeOrderAnnealing(FLAGS.da_epochs))
            learner.compile(optimizer=keras.optimizers.Adam(rate), loss=loss(),
                            metrics=["accuracy"])
            stream = km.data.episodes(train, FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query,
                                      FLAGS.meta_batch_size, seed=FLAGS.seed)
            start, cpu_start = time.perf_counter(), time.process_time()
            learner.fit(stream, epochs=-(-meta_steps // FLAGS.steps_per_epoch),
                        steps_per_epoch=FLAGS.steps_per_epoch, verbose=0, callbacks=callbacks)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if FLAGS.equal_budget and name == "maml_pp":
                reference = (cpu_seconds if FLAGS.clock == "cpu" else seconds, timer.steps)
            scored = [("time" if reference is not None and name != "maml_pp" else "meta-steps",
                       timer.steps, learner.get_weights(), seconds, cpu_seconds)]
            if snapshot.weights is not None:
                scored.insert(0, ("meta-steps", snapshot.step, snapshot.weights,
                                  snapshot.seconds, snapshot.cpu_seconds))
            # One twin per learner (built and traced once), given each scored weights.
            twin = learner if not transductive else support_statistics_twin(learner)
            for budget, trained, weights, at_s, at_cpu_s in scored:
                learner.set_weights(weights)
                twin.set_weights(weights)
                own, plain, checked = score(learner, twin, eval_episodes, steps)
                row = {"learner": name, "transductive_batch_norm": transductive,
                       "equal": budget, "meta_steps": trained, "train_seconds": at_s,
                       "train_cpu_seconds": at_cpu_s, "steps": steps,
                       "learner_accuracy": own[0].tolist(), "learner_interval": own[1].tolist(),
                       "adapt_accuracy": plain[0].tolist(), "adapt_interval": plain[1].tolist(),
                       "adapt_checked_tasks": checked, "tasks": FLAGS.eval_tasks}
                report.append(row)
                print(f"{name} (transductive={transductive}, equal {budget}): {trained} "
                      f"meta-steps in {at_s:.0f} s ({at_cpu_s:.0f} CPU s)", flush=True)
                for label, (mean, interval) in (("learner", own), ("adapt()", plain)):
                    print(f"  {label:8s} " + ", ".join(
                        f"{s} steps {100 * m:.2f} +- {100 * c:.2f}"
                        for s, m, c in zip(steps, mean, interval)), flush=True)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in _OWN_FLAGS}, "results": report},
                      f, indent=1)


_OWN_FLAGS = (
    "data_dir", "test_alphabets", "n_way", "k_shot", "q_query", "eval_q_query", "meta_batch_size",
    "filters", "meta_steps", "budget_s", "clock", "steps_per_epoch", "learners", "transductive",
    "maml_steps", "maml_lr", "maml_pp_steps", "maml_pp_lr", "msl_epochs", "da_epochs",
    "min_learning_rate", "eval_inner_steps", "eval_tasks", "eval_batch_size", "seed",
    "equal_budget", "intra_op_threads",
)

if __name__ == "__main__":
    app.run(main)
