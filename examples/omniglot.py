"""Meta-trains MAML with conv4 on Omniglot N-way K-shot and reports test accuracy.

The MAML paper's protocol: characters split into disjoint train / validation /
test classes (`--class_split maml`: 1100 / 100 / 423, seeded), rotations by
multiples of 90 degrees as extra classes, meta-training on train-class
episodes, then accuracy on 600 test-class episodes after `eval_inner_steps`
inner steps, reported as mean +- 1.96 std / sqrt(600).

Data come from TensorFlow Datasets (downloads Omniglot on first use) or from
a local folder of images with `--data_dir` (`<alphabet>/<character>/*.png`
at any depth). The defaults are the paper's 5-way 1-shot settings (60,000
meta-steps: hours on a GPU); a CPU-sized run on a few alphabets:

    python examples/omniglot.py --data_dir /tmp/omniglot --meta_steps 400 \
        --meta_batch_size 16 --epochs 4

Long runs survive interruptions. After every epoch the script writes
`<output_dir>/learner.keras` (the meta-learner with its optimizer state,
`keras.callbacks.ModelCheckpoint`) and `<output_dir>/backup/`
(`keras.callbacks.BackupAndRestore`): running the same command again after a
crash or a kill resumes after the last completed epoch, with the episode
stream continuing at the first meta-batch not yet trained on
(`start_step=learner.optimizer.iterations`), so the 60,000-step paper run can
be spread over several sessions. Once training is complete, the same command
restores the final state, trains nothing and evaluates again; the saved
learner can also be scored or exported later from the shell:

    keras-meta --mode=evaluate --dataset=omniglot --data_dir /tmp/omniglot \
        --learner outputs/omniglot/learner.keras --output_dir outputs/omniglot/eval

(`--k_shot`, `--n_way` as trained; see docs/cli.md). Change the flags that
define the computation (steps, batch, learning rates, seed) only with a new
`--output_dir`: the backup holds no record of them.

See docs/data.md for settings and measured results.
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
flags.DEFINE_string("tfds_data_dir", None, "TFDS data folder (default TFDS's own).")
flags.DEFINE_string("class_split", "maml", "Character split: `maml` (1100/100/423) or `imaml`.")
flags.DEFINE_bool("rotations", True, "Rotations by 0/90/180/270 degrees as extra classes.")
flags.DEFINE_integer("n_way", 5, "Classes per task.")
flags.DEFINE_integer("k_shot", 1, "Support examples per class.")
flags.DEFINE_integer("q_query", 15, "Query examples per class (training and test).")
flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-batch.")
flags.DEFINE_integer("meta_steps", 60000, "Meta-training steps (meta-batches).")
flags.DEFINE_integer("epochs", 60, "Keras epochs the meta-steps are spread over.")
flags.DEFINE_float("inner_learning_rate", 0.4,
                   "Inner step size on the mean cross-entropy (see docs/data.md).")
flags.DEFINE_integer("inner_steps", 1, "Inner steps during meta-training.")
flags.DEFINE_integer("eval_inner_steps", 10, "Inner steps at test time.")
flags.DEFINE_bool("first_order", False, "First-order MAML.")
flags.DEFINE_enum("task_execution", "auto", ["auto", "sequential", "vectorized"],
                  "How the tasks of a meta-batch run (`auto`: sequential for conv4).")
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of the meta-update.")
flags.DEFINE_integer("eval_tasks", 600, "Test-class tasks in the final report.")
flags.DEFINE_integer("eval_batch_size", 50, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("validation_tasks", 100, "Validation-class tasks after each epoch.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_string("output_dir", "outputs/omniglot", "Where the class lists and results go.")


def accuracies(learner, source, steps, num_tasks, batch_size, seed):
    """Per-task query accuracy after each number of inner steps: [tasks, steps]."""
    episodes = km.data.episodes(source, FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query,
                                batch_size, seed=seed)
    results = []
    for episode in episodes.take(-(-num_tasks // batch_size)):
        out = learner.evaluate_tasks(episode, steps=steps)
        predicted = out["predictions"].argmax(-1)  # [tasks, steps, queries]
        results.append(np.mean(predicted == episode["query_y"].numpy()[:, None], axis=-1))
    return np.concatenate(results)[:num_tasks]


def main(_):
    tf.get_logger().setLevel("ERROR")  # pfor's "uses a while_loop" notes
    keras.utils.set_random_seed(FLAGS.seed)
    rotations = (0, 90, 180, 270) if FLAGS.rotations else None
    load = dict(class_split=FLAGS.class_split, data_dir=FLAGS.data_dir,
                tfds_data_dir=FLAGS.tfds_data_dir, rotations=rotations)
    start = time.time()
    splits = {"train": km.data.omniglot("train", **load)}
    if FLAGS.class_split == "maml":
        splits["validation"] = km.data.omniglot("validation", **load)
    splits["test"] = km.data.omniglot("test", **load)
    print(f"Loaded Omniglot in {time.time() - start:.0f} s: "
          f"{splits['train'].metadata['available_characters']} characters, split "
          f"{splits['train'].metadata['split_counts']} (class_split={FLAGS.class_split!r}, "
          f"seed {splits['train'].metadata['split_seed']}).")
    for source in splits.values():
        print(f"  {source}")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "classes.json"), "w") as f:
        json.dump({name: list(s.base_class_names) for name, s in splits.items()}, f, indent=1)

    learner = km.MAML(
        km.models.conv4(FLAGS.n_way, seed=FLAGS.seed),
        inner_learning_rate=FLAGS.inner_learning_rate,
        inner_steps=FLAGS.inner_steps,
        eval_inner_steps=FLAGS.eval_inner_steps,
        first_order=FLAGS.first_order,
        task_execution=FLAGS.task_execution,
    )
    learner.compile(
        optimizer=keras.optimizers.Adam(FLAGS.meta_learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # The stream starts at the learner's step count: 0 on a fresh run, the
    # restored count when BackupAndRestore resumes an interrupted one.
    train = km.data.episodes(splits["train"], FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query,
                             FLAGS.meta_batch_size, seed=FLAGS.seed,
                             start_step=learner.optimizer.iterations)
    validation = {}
    if "validation" in splits and FLAGS.validation_tasks:
        batch = min(FLAGS.eval_batch_size, FLAGS.validation_tasks)
        validation = dict(
            validation_data=km.data.episodes(
                splits["validation"], FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query, batch,
                seed=FLAGS.seed + 1, num_tasks=FLAGS.validation_tasks),
            validation_steps=-(-FLAGS.validation_tasks // batch),
        )
    print(f"\nMeta-training MAML: {FLAGS.n_way}-way {FLAGS.k_shot}-shot, "
          f"{FLAGS.meta_steps} meta-batches of {FLAGS.meta_batch_size} tasks, "
          f"{FLAGS.inner_steps} inner step(s) of {FLAGS.inner_learning_rate}.")
    learner_path = os.path.join(FLAGS.output_dir, "learner.keras")
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(learner_path),
        # Kept after the last epoch: rerunning the command restores the final
        # state instead of training again.
        keras.callbacks.BackupAndRestore(os.path.join(FLAGS.output_dir, "backup"),
                                         delete_checkpoint=False),
    ]
    start = time.time()
    learner.fit(train, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.meta_steps // FLAGS.epochs,
                verbose=1, callbacks=callbacks, **validation)
    print(f"Meta-training took {time.time() - start:.0f} s "
          f"({int(learner.optimizer.iterations)} meta-steps in all).")
    if learner.stop_training:
        raise SystemExit("Training stopped at a non-finite loss: nothing evaluated. Lower "
                         "--meta_learning_rate or --inner_learning_rate and use a new --output_dir.")
    learner.save(learner_path)  # the final state, also when it was restored, not trained

    steps = sorted({0, 1, FLAGS.eval_inner_steps})
    result = accuracies(learner, splits["test"], steps, FLAGS.eval_tasks,
                        FLAGS.eval_batch_size, seed=FLAGS.seed + 2)
    mean = result.mean(axis=0)
    interval = 1.96 * result.std(axis=0) / np.sqrt(len(result))
    print(f"\nTest accuracy on {len(result)} {FLAGS.n_way}-way {FLAGS.k_shot}-shot tasks "
          f"from {splits['test'].num_classes} test classes (mean +- 1.96 std/sqrt(n)):")
    for s, m, c in zip(steps, mean, interval):
        print(f"  after {s:2d} inner step(s): {100 * m:.2f} +- {100 * c:.2f} %")
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump({"flags": {k: FLAGS[k].value for k in FLAGS if k in _OWN_FLAGS},
                   "steps": steps, "accuracy": mean.tolist(), "interval": interval.tolist(),
                   "tasks": len(result)}, f, indent=1)


_OWN_FLAGS = (
    "data_dir", "class_split", "rotations", "n_way", "k_shot", "q_query", "meta_batch_size",
    "meta_steps", "epochs", "inner_learning_rate", "inner_steps", "eval_inner_steps",
    "first_order", "task_execution", "meta_learning_rate", "eval_tasks", "seed",
)

if __name__ == "__main__":
    app.run(main)
