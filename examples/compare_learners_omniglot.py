"""Every keras_meta learner on Omniglot with held-out alphabets, at equal budgets.

Meta-trains the learners named by `--learners` (MAML, ANIL, iMAML, Reptile,
BOIL, ProtoNet, Proto-MAML) one after the other from the same seed on the
same stream of training episodes, each for `--budget_s` seconds (`--clock
cpu`: of the process's CPU time, fairer on a shared machine), then evaluates
each on `--eval_tasks` test tasks (mean +- 1.96 std / sqrt(n)), for every
`--n_way` in `--ways` (1-shot by default).

Split: whole alphabets are held out. The characters of `--test_alphabets` are
the test classes, those of every other alphabet found under `--data_dir` the
training classes, so no test character shares an alphabet with a training
one (harder than the papers' random character splits). Each rotation by 0,
90, 180, 270 degrees of a character is a class of its own (Vinyals et al.).
Images: 28x28, strokes at 1.

Learners (conv4, 64 filters, strided; the settings are flags):

- `maml`: second order, inner SGD 0.4 (mean CE), 1 step.
- `anil`: head only, 0.4, 5 steps.
- `imaml`: lambda 2, 5 CG steps, inner SGD 0.1, `--imaml_inner_steps`.
- `reptile`: inner Adam (beta_1 = 0) 0.001, 5 steps on support + query,
  outer SGD(`--reptile_epsilon`), `--reptile_eval_inner_steps` steps at test
  (the paper's Omniglot settings; its 50 test steps).
- `boil`: body only, 0.4, 1 step.
- `protonet`: the conv4 body (no head), squared Euclidean distance.
- `proto_maml`: `maml` with the head set from the support prototypes.

Every gradient-based learner is evaluated after `--eval_inner_steps` inner
steps (Reptile: `--reptile_eval_inner_steps`), BatchNorm transductive (each
set normalised with its own statistics, the reference MAML's protocol);
query sets of `--eval_q_query` examples per class.

    python examples/compare_learners_omniglot.py --data_dir /path/to/omniglot \
        --budget_s 90 --clock cpu --ways 5 --learners maml,anil,protonet
"""

import json
import os
import time

from absl import app, flags

import keras_meta as km

import keras  # noqa: E402  (after keras_meta, which selects TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

LEARNERS = ("maml", "anil", "imaml", "reptile", "boil", "protonet", "proto_maml")

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder of Omniglot images (<alphabet>/<character>/*.png).")
flags.DEFINE_list("test_alphabets", ["Japanese_(katakana)", "Tagalog"],
                  "Alphabets held out as test classes; every other alphabet trains.")
flags.DEFINE_list("learners", list(LEARNERS), f"Learners to compare, among {list(LEARNERS)}.")
flags.DEFINE_list("ways", ["5", "20"], "n_way of the runs (one run of every learner per value).")
flags.DEFINE_integer("k_shot", 1, "Support examples per class.")
flags.DEFINE_float("budget_s", 600.0, "Meta-training budget of each learner, in seconds.")
flags.DEFINE_enum("clock", "wall", ["wall", "cpu"],
                  "What the budget counts: wall-clock time, or the process's CPU time.")
flags.DEFINE_integer("meta_batch_size", 16, "Tasks per meta-batch.")
flags.DEFINE_integer("q_query", 5, "Query examples per class in meta-training.")
flags.DEFINE_integer("eval_q_query", 1, "Query examples per class in the test tasks.")
flags.DEFINE_integer("eval_inner_steps", 10, "Test-time inner steps of the gradient-based learners.")
flags.DEFINE_integer("imaml_inner_steps", 16, "iMAML's inner steps (paper: 16 for 5-way, 25 for 20-way).")
flags.DEFINE_float("reptile_epsilon", 1.0, "Reptile's outer step size (SGD).")
flags.DEFINE_integer("reptile_eval_inner_steps", 50, "Reptile's test-time inner steps.")
flags.DEFINE_integer("eval_tasks", 600, "Test tasks per learner.")
flags.DEFINE_integer("eval_batch_size", 50, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def sources():
    """(train, test) sources: the test alphabets held out, rotations as classes."""
    characters = km.data.omniglot("all", class_split={"all": 1.0}, data_dir=FLAGS.data_dir)
    names = characters.base_class_names
    alphabets = sorted({name.split("/")[0] for name in names})
    missing = sorted(set(FLAGS.test_alphabets) - set(alphabets))
    if missing:
        raise ValueError(f"--test_alphabets {missing} not found; alphabets: {alphabets}")
    test = [n for n in names if n.split("/")[0] in FLAGS.test_alphabets]
    train = [n for n in names if n.split("/")[0] not in FLAGS.test_alphabets]
    rotations = (0, 90, 180, 270)
    return (characters.subset(train).with_rotations(rotations),
            characters.subset(test).with_rotations(rotations))


def make_learner(name, n_way):
    keras.utils.set_random_seed(FLAGS.seed)
    model = km.models.conv4(n_way, seed=FLAGS.seed)
    steps, optimizer = FLAGS.eval_inner_steps, keras.optimizers.Adam(1e-3)
    if name in ("maml", "proto_maml"):
        learner = km.MAML(model, inner_learning_rate=0.4, inner_steps=1, eval_inner_steps=steps,
                          head_initialization="prototypes" if name == "proto_maml" else None)
    elif name == "anil":
        learner = km.ANIL(model, head="head", inner_learning_rate=0.4, inner_steps=5,
                          eval_inner_steps=steps)
    elif name == "imaml":
        learner = km.IMAML(model, inner_learning_rate=0.1, inner_steps=FLAGS.imaml_inner_steps,
                           l2_regularization=2.0, cg_iterations=5, eval_inner_steps=steps)
    elif name == "reptile":
        learner = km.Reptile(model, inner_learning_rate=1e-3, inner_steps=5,
                             inner_optimizer={"name": "adam", "beta_1": 0.0},
                             use_query_in_inner_loop=True,
                             eval_inner_steps=FLAGS.reptile_eval_inner_steps)
        optimizer = keras.optimizers.SGD(FLAGS.reptile_epsilon)
    elif name == "boil":
        learner = km.BOIL(model, head="head", inner_learning_rate=0.4, inner_steps=1,
                          eval_inner_steps=steps)
    elif name == "protonet":
        body = keras.Model(model.inputs, model.get_layer("flatten").output, name="conv4_body")
        learner = km.ProtoNet(body)
    else:
        raise ValueError(f"--learners: unknown learner {name!r}; choose among {list(LEARNERS)}")
    learner.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    return learner


def test_accuracy(learner, source, n_way):
    episodes = km.data.episodes(source, n_way, FLAGS.k_shot, FLAGS.eval_q_query,
                                FLAGS.eval_batch_size, seed=FLAGS.seed + 2)
    results = []
    for episode in episodes.take(-(-FLAGS.eval_tasks // FLAGS.eval_batch_size)):
        out = learner.evaluate_tasks(episode, steps=[learner.adaptation_steps])
        predicted = out["predictions"][:, -1].argmax(-1)  # [tasks, queries]
        results.append(np.mean(predicted == episode["query_y"].numpy(), axis=-1))
    return np.concatenate(results)[: FLAGS.eval_tasks]


def main(_):
    tf.get_logger().setLevel("ERROR")
    train, test = sources()
    print(f"train: {train}\ntest: {test}", flush=True)
    report = {}
    for n_way in [int(w) for w in FLAGS.ways]:
        for name in FLAGS.learners:
            learner = make_learner(name, n_way)
            budget = km.callbacks.TimeBudget(FLAGS.budget_s, FLAGS.clock)
            stream = km.data.episodes(train, n_way, FLAGS.k_shot, FLAGS.q_query,
                                      FLAGS.meta_batch_size, seed=FLAGS.seed)
            start, cpu_start = time.perf_counter(), time.process_time()
            learner.fit(stream, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[budget])
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            accuracy = test_accuracy(learner, test, n_way)
            mean, interval = accuracy.mean(), 1.96 * accuracy.std() / np.sqrt(len(accuracy))
            report[f"{name}_{n_way}way"] = {
                "learner": name, "n_way": n_way, "meta_steps": budget.steps,
                "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
                "accuracy": float(mean), "interval": float(interval), "tasks": len(accuracy),
            }
            print(f"{n_way}-way {FLAGS.k_shot}-shot {name}: {budget.steps} meta-steps in "
                  f"{seconds:.0f} s ({cpu_seconds:.0f} CPU s); test accuracy "
                  f"{100 * mean:.2f} +- {100 * interval:.2f} % ({len(accuracy)} tasks)", flush=True)
            if FLAGS.output:
                os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
                with open(FLAGS.output, "w") as f:
                    json.dump({"flags": {k: FLAGS[k].value for k in _OWN_FLAGS}, "results": report},
                              f, indent=1)


_OWN_FLAGS = (
    "data_dir", "test_alphabets", "learners", "ways", "k_shot", "budget_s", "clock",
    "meta_batch_size", "q_query", "eval_q_query", "eval_inner_steps", "imaml_inner_steps",
    "reptile_epsilon", "reptile_eval_inner_steps", "eval_tasks", "eval_batch_size", "seed",
)

if __name__ == "__main__":
    app.run(main)
