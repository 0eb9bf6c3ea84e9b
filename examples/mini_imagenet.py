"""Meta-trains MAML (or ANIL) on mini-ImageNet, or another image benchmark, and reports test accuracy.

The MAML paper's mini-ImageNet protocol by default (the cbfinn/maml usage
lines): the Ravi-Larochelle split (64 / 16 / 20 classes), 84x84 RGB, 5-way
1-shot with 15 query images per class, meta-batches of 4 tasks, a conv4 of
32 filters with 2x2 max-pooling, 5 inner steps of 0.01 during training and
10 at test, Adam 1e-3 with gradients clipped to [-10, 10], 60,000
meta-steps; then accuracy on 600 test-class tasks as mean +- 1.96 std /
sqrt(600). `--dataset` switches to tiered_imagenet, cifar_fs, fc100 or cub
with the presets of docs/benchmark_datasets.md (any flag given explicitly
wins over the preset).

The data are read from `--data_dir` in the layouts `km.data.mini_imagenet`
(and the other loaders) detect; nothing is downloaded, except CIFAR-100 and
CUB from TFDS when `--data_dir` is not given. A CPU-sized run:

    python examples/mini_imagenet.py --data_dir /data/mini-imagenet \
        --meta_steps 200 --epochs 2 --eval_tasks 100

Long runs survive interruptions as examples/omniglot.py does:
`<output_dir>/learner.keras` and `<output_dir>/backup/` after every epoch,
and the same command resumes where it stopped (the episode stream continues
at the learner's step count).
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
flags.DEFINE_enum("dataset", "mini_imagenet",
                  ["mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100", "cub"],
                  "Benchmark (sets the presets below).")
flags.DEFINE_string("data_dir", None, "Folder holding the benchmark's files (see the loaders).")
flags.DEFINE_string("cache_dir", None, "Keep decoded images here for the next run.")
flags.DEFINE_enum("algorithm", None, ["maml", "anil"], "Meta-learner (preset: maml; fc100: anil).")
flags.DEFINE_integer("n_way", 5, "Classes per task.")
flags.DEFINE_integer("k_shot", 1, "Support examples per class.")
flags.DEFINE_integer("q_query", 15, "Query examples per class (training and test).")
flags.DEFINE_integer("meta_batch_size", None, "Tasks per meta-batch (preset).")
flags.DEFINE_integer("meta_steps", None, "Meta-training steps (preset).")
flags.DEFINE_integer("epochs", 60, "Keras epochs the meta-steps are spread over.")
flags.DEFINE_integer("filters", None, "conv4 filters per block (preset: 32; tiered, fc100, cub: 64).")
flags.DEFINE_float("inner_learning_rate", None, "Inner step size on the mean cross-entropy (preset).")
flags.DEFINE_integer("inner_steps", None, "Inner steps during meta-training (preset).")
flags.DEFINE_integer("eval_inner_steps", None, "Inner steps at test time (preset).")
flags.DEFINE_bool("first_order", False, "First-order MAML.")
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of the meta-update.")
flags.DEFINE_float("clipvalue", None, "Clip meta-gradients to [-c, c] (preset: 10; 0 for none).")
flags.DEFINE_bool("augmentation", False, "Random crop, flip and colour jitter of training episodes.")
flags.DEFINE_integer("eval_tasks", 600, "Test-class tasks in the final report.")
flags.DEFINE_integer("eval_batch_size", 20, "Tasks per evaluation meta-batch.")
flags.DEFINE_integer("validation_tasks", 100, "Validation-class tasks after each epoch.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episode streams.")
flags.DEFINE_string("output_dir", None, "Where results go (default outputs/<dataset>).")

# Presets: what the papers used where they say (docs/benchmark_datasets.md
# lists the sources); the rest are this example's defaults.
PRESETS = {
    "mini_imagenet": dict(algorithm="maml", filters=32, inner_learning_rate=0.01, inner_steps=5,
                          eval_inner_steps=10, meta_batch_size=4, meta_steps=60000,
                          clipvalue=10.0),
    "tiered_imagenet": dict(algorithm="maml", filters=64, inner_learning_rate=0.01,
                            inner_steps=5, eval_inner_steps=10, meta_batch_size=4,
                            meta_steps=60000, clipvalue=10.0),
    "cifar_fs": dict(algorithm="maml", filters=32, inner_learning_rate=0.01, inner_steps=5,
                     eval_inner_steps=10, meta_batch_size=4, meta_steps=60000, clipvalue=10.0),
    "fc100": dict(algorithm="anil", filters=64, inner_learning_rate=0.1, inner_steps=5,
                  eval_inner_steps=5, meta_batch_size=32, meta_steps=1000, clipvalue=0.0),
    "cub": dict(algorithm="maml", filters=64, inner_learning_rate=0.01, inner_steps=5,
                eval_inner_steps=10, meta_batch_size=4, meta_steps=60000, clipvalue=10.0),
}


def setting(name):
    """A flag's value, or the dataset's preset when the flag was not given."""
    value = FLAGS[name].value
    return PRESETS[FLAGS.dataset][name] if value is None else value


def load(split, augmentation=None):
    dataset, data_dir = FLAGS.dataset, FLAGS.data_dir
    if dataset in ("mini_imagenet", "tiered_imagenet") and data_dir is None:
        raise app.UsageError(f"--dataset={dataset} needs --data_dir (see docs/benchmark_datasets.md).")
    if dataset == "mini_imagenet":
        return km.data.mini_imagenet(split, data_dir, cache_dir=FLAGS.cache_dir,
                                     augmentation=augmentation)
    if dataset == "tiered_imagenet":
        return km.data.tiered_imagenet(split, data_dir, cache_dir=FLAGS.cache_dir,
                                       augmentation=augmentation)
    if dataset == "cub":
        return km.data.cub(split, data_dir=data_dir, cache_dir=FLAGS.cache_dir,
                           augmentation=augmentation)
    loader = km.data.cifar_fs if dataset == "cifar_fs" else km.data.fc100
    return loader(split, data_dir=data_dir, augmentation=augmentation)


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
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(FLAGS.seed)
    output_dir = FLAGS.output_dir or os.path.join("outputs", FLAGS.dataset)
    augmentation = km.data.Augmentation(seed=FLAGS.seed) if FLAGS.augmentation else None
    start = time.time()
    splits = {"train": load("train", augmentation), "validation": load("validation"),
              "test": load("test")}
    print(f"Loaded {FLAGS.dataset} in {time.time() - start:.0f} s:")
    for source in splits.values():
        print(f"  {source} ({source.storage})")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "classes.json"), "w") as f:
        json.dump({name: list(s.base_class_names) for name, s in splits.items()}, f, indent=1)

    shape = splits["train"].example_shape
    model = km.models.conv4(FLAGS.n_way, filters=setting("filters"), input_shape=shape,
                            downsampling="max_pool", seed=FLAGS.seed)
    algorithm = setting("algorithm")
    learner_class = km.MAML if algorithm == "maml" else km.ANIL
    learner = learner_class(
        model,
        inner_learning_rate=setting("inner_learning_rate"),
        inner_steps=setting("inner_steps"),
        eval_inner_steps=setting("eval_inner_steps"),
        first_order=FLAGS.first_order,
    )
    clipvalue = setting("clipvalue") or None
    learner.compile(
        optimizer=keras.optimizers.Adam(FLAGS.meta_learning_rate, clipvalue=clipvalue),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    meta_batch_size, meta_steps = setting("meta_batch_size"), setting("meta_steps")
    train = km.data.episodes(splits["train"], FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query,
                             meta_batch_size, seed=FLAGS.seed,
                             start_step=learner.optimizer.iterations)
    validation = {}
    if FLAGS.validation_tasks:
        batch = min(FLAGS.eval_batch_size, FLAGS.validation_tasks)
        validation = dict(
            validation_data=km.data.episodes(
                splits["validation"], FLAGS.n_way, FLAGS.k_shot, FLAGS.q_query, batch,
                seed=FLAGS.seed + 1, num_tasks=FLAGS.validation_tasks),
            validation_steps=-(-FLAGS.validation_tasks // batch),
        )
    print(f"\nMeta-training {algorithm.upper()} on {FLAGS.dataset}: {FLAGS.n_way}-way "
          f"{FLAGS.k_shot}-shot, {meta_steps} meta-batches of {meta_batch_size} tasks, "
          f"conv4({setting('filters')}, max_pool), {setting('inner_steps')} inner step(s) of "
          f"{setting('inner_learning_rate')}, augmentation {'on' if augmentation else 'off'}.")
    learner_path = os.path.join(output_dir, "learner.keras")
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(learner_path),
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup"),
                                         delete_checkpoint=False),
    ]
    epochs = min(FLAGS.epochs, meta_steps)
    start = time.time()
    learner.fit(train, epochs=epochs, steps_per_epoch=meta_steps // epochs, verbose=1,
                callbacks=callbacks, **validation)
    print(f"Meta-training took {time.time() - start:.0f} s "
          f"({int(learner.optimizer.iterations)} meta-steps in all).")
    if learner.stop_training:
        raise SystemExit("Training stopped at a non-finite loss: nothing evaluated.")
    learner.save(learner_path)

    steps = sorted({0, 1, setting("eval_inner_steps")})
    result = accuracies(learner, splits["test"], steps, FLAGS.eval_tasks,
                        FLAGS.eval_batch_size, seed=FLAGS.seed + 2)
    mean = result.mean(axis=0)
    interval = 1.96 * result.std(axis=0) / np.sqrt(len(result))
    print(f"\nTest accuracy on {len(result)} {FLAGS.n_way}-way {FLAGS.k_shot}-shot tasks "
          f"from {splits['test'].num_classes} test classes (mean +- 1.96 std/sqrt(n)):")
    for s, m, c in zip(steps, mean, interval):
        print(f"  after {s:2d} inner step(s): {100 * m:.2f} +- {100 * c:.2f} %")
    settings = {name: setting(name) for name in PRESETS[FLAGS.dataset]}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"dataset": FLAGS.dataset, "settings": settings, "n_way": FLAGS.n_way,
                   "k_shot": FLAGS.k_shot, "q_query": FLAGS.q_query, "steps": steps,
                   "accuracy": mean.tolist(), "interval": interval.tolist(),
                   "tasks": len(result)}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
