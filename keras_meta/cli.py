"""`python -m keras_meta` / `keras-meta`: meta-train, evaluate and export from the shell.

Example:

```bash
keras-meta --algorithm=maml --dataset=sinusoid --output_dir=runs/sinusoid
keras-meta --algorithm=anil --dataset=omniglot --data_dir=~/omniglot \\
    --n_way=5 --k_shot=1 --inner_learning_rate=0.4 --output_dir=runs/omniglot
```

A run writes into `--output_dir`: `history.csv`, `evaluation.json` (the final
few-shot evaluation on held-out tasks, mean and 95% interval), `config.json`,
`learning_curves.png`, `adaptation_curve.png`, `learner.keras` (the
meta-learner, every epoch), `adapted_model/` (a SavedModel of the model adapted
to one held-out task) and `adaptive_model/` (a SavedModel that adapts at serving
time, `km.export_adaptive`). Running the same command again after an
interruption resumes from the last completed epoch (`backup/`), with the
episode stream continuing where it stopped.
"""

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

ALGORITHMS = ("maml", "fomaml", "anil", "imaml")
DATASETS = ("sinusoid", "omniglot")

flags.DEFINE_enum("algorithm", "maml", ALGORITHMS, "Meta-learning algorithm.")
flags.DEFINE_enum("dataset", "sinusoid", DATASETS, "Task family.")
flags.DEFINE_string("data_dir", None, "Local folder of Omniglot images (default: TFDS, downloads).")
flags.DEFINE_integer("n_way", 5, "Classes per task (omniglot).", lower_bound=2)
flags.DEFINE_integer("k_shot", None, "Support examples per class (default: 10 sinusoid, 1 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("q_query", None, "Query examples per class (default: 10 sinusoid, 15 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("meta_batch_size", None, "Tasks per meta-batch (default: 25 sinusoid, 32 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("inner_steps", None, "Inner steps during meta-training (default: 1; imaml 16).",
                     lower_bound=1)
flags.DEFINE_integer("eval_inner_steps", 10, "Inner steps at evaluation.", lower_bound=1)
flags.DEFINE_float("inner_learning_rate", None,
                   "Inner step size (default: 0.01 sinusoid, 0.4 omniglot; imaml 0.1).")
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of the meta-update.")
flags.DEFINE_float("l2_regularization", 2.0, "iMAML's proximal strength lambda.")
flags.DEFINE_integer("epochs", 5, "Epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Meta-steps per epoch (default: 1000 sinusoid, 100 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("eval_tasks", 600, "Held-out tasks of the final evaluation.", lower_bound=1)
flags.DEFINE_integer("val_tasks", 100, "Held-out tasks evaluated after every epoch.", lower_bound=1)
flags.DEFINE_string("output_dir", "runs/keras_meta", "Where everything is written.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, the episodes and the class split.", lower_bound=0)
flags.DEFINE_integer("verbose", 1, "Keras verbosity (1: progress bar).")
flags.DEFINE_integer("intra_op_threads", 1,
                     "Threads one TensorFlow kernel may use, with one kernel per core at once "
                     "(km.configure_cpu_threads): 1, the default, measured 1.1-1.7x faster for "
                     "conv nets on 2-core CPUs (docs/performance.md); 0 keeps TensorFlow's "
                     "default pools.", lower_bound=0)


class UsageError(Exception):
    """A bad combination of flags, reported without a traceback."""


def _defaults():
    sinusoid = FLAGS.dataset == "sinusoid"
    imaml = FLAGS.algorithm == "imaml"
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {
        "k_shot": pick(FLAGS.k_shot, 10 if sinusoid else 1),
        "q_query": pick(FLAGS.q_query, 10 if sinusoid else 15),
        "meta_batch_size": pick(FLAGS.meta_batch_size, 25 if sinusoid else 32),
        "inner_steps": pick(FLAGS.inner_steps, 16 if imaml else 1),
        "inner_learning_rate": pick(
            FLAGS.inner_learning_rate, (0.1 if imaml else 0.01) if sinusoid else (0.1 if imaml else 0.4)
        ),
        "steps_per_epoch": pick(FLAGS.steps_per_epoch, 1000 if sinusoid else 100),
    }


def _data(settings, start_step):
    import keras_meta as km

    if FLAGS.dataset == "sinusoid":
        if FLAGS.data_dir:
            raise UsageError("--data_dir is for --dataset=omniglot; sinusoid tasks are generated.")
        make = lambda seed, batch, start=0: km.data.sinusoid(  # noqa: E731
            k_shot=settings["k_shot"], q_query=settings["q_query"], meta_batch_size=batch,
            seed=seed, start_step=start)
        return (make(FLAGS.seed, settings["meta_batch_size"], start_step),
                make(FLAGS.seed + 1, 100), make(FLAGS.seed + 2, 100), {})
    data_dir = os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else None
    if data_dir and not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir={FLAGS.data_dir!r} is not a directory.")
    sources = {split: km.data.omniglot(split, data_dir=data_dir, rotations=(0, 90, 180, 270) if split == "train" else None)
               for split in ("train", "validation", "test")}
    make = lambda split, seed, batch, start=0: km.data.episodes(  # noqa: E731
        sources[split], n_way=FLAGS.n_way, k_shot=settings["k_shot"], q_query=settings["q_query"],
        meta_batch_size=batch, seed=seed, start_step=start)
    metadata = {split: {"classes": len(source.class_names), **source.metadata}
                for split, source in sources.items()}
    return (make("train", FLAGS.seed, settings["meta_batch_size"], start_step),
            make("validation", FLAGS.seed + 1, 20), make("test", FLAGS.seed + 2, 20), metadata)


def _learner(settings):
    import keras

    import keras_meta as km

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.dataset == "sinusoid":
        model = km.models.mlp(seed=FLAGS.seed)
        loss, metrics = "mse", []
    else:
        model = km.models.conv4(FLAGS.n_way, seed=FLAGS.seed)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["accuracy"]
    common = dict(inner_learning_rate=settings["inner_learning_rate"],
                  inner_steps=settings["inner_steps"], eval_inner_steps=FLAGS.eval_inner_steps)
    if FLAGS.algorithm in ("maml", "fomaml"):
        learner = km.MAML(model, first_order=FLAGS.algorithm == "fomaml", **common)
    elif FLAGS.algorithm == "anil":
        learner = km.ANIL(model, head=1, **common)
    else:
        learner = km.IMAML(model, l2_regularization=FLAGS.l2_regularization, **common)
    learner.compile(optimizer=keras.optimizers.Adam(FLAGS.meta_learning_rate), loss=loss,
                    metrics=metrics)
    return learner


def _plot_history(history_csv, path):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    panels = [("loss", ["loss", "meta_val_loss"])]
    if "meta_val_accuracy" in rows[0]:
        panels.append(("accuracy", ["accuracy", "meta_val_accuracy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if key in rows[0]:
                label = {"loss": "train query loss", "accuracy": "train query accuracy"}.get(
                    key, key.replace("meta_val_", "held-out ") + " (after adaptation)")
                ax.plot(epochs, [float(r[key]) for r in rows], "o-", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run():
    """Trains, evaluates and exports according to the flags; returns the evaluation."""
    import keras
    import tensorflow as tf

    import keras_meta as km

    if FLAGS.intra_op_threads:
        # The CLI owns its process: set the pools before TensorFlow's runtime starts.
        km.configure_cpu_threads(intra_op=FLAGS.intra_op_threads)
    settings = _defaults()
    if FLAGS.dataset == "sinusoid" and FLAGS["n_way"].present:
        raise UsageError("--n_way is for --dataset=omniglot; sinusoid tasks are regressions.")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    learner = _learner(settings)
    train, validation, test, metadata = _data(settings, learner.optimizer.iterations)
    config = {"algorithm": FLAGS.algorithm, "dataset": FLAGS.dataset, "n_way": FLAGS.n_way,
              "data_dir": FLAGS.data_dir, "epochs": FLAGS.epochs, "seed": FLAGS.seed,
              "eval_inner_steps": FLAGS.eval_inner_steps, "meta_learning_rate": FLAGS.meta_learning_rate,
              # What TensorFlow runs with (0: its default pools), not the flag.
              "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
              **settings, "class_splits": metadata}
    with open(os.path.join(FLAGS.output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)

    curve = km.callbacks.AdaptationCurve(validation, max_steps=FLAGS.eval_inner_steps,
                                         num_episodes=min(FLAGS.val_tasks, 100))
    callbacks = [
        km.callbacks.MetaEvaluation(validation, num_episodes=FLAGS.val_tasks, prefix="meta_val"),
        curve,
        keras.callbacks.BackupAndRestore(os.path.join(FLAGS.output_dir, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(FLAGS.output_dir, "learner.keras")),
        keras.callbacks.CSVLogger(os.path.join(FLAGS.output_dir, "history.csv"), append=True),
        keras.callbacks.TerminateOnNaN(),
    ]
    start = time.time()
    learner.fit(train, epochs=FLAGS.epochs, steps_per_epoch=settings["steps_per_epoch"],
                callbacks=callbacks, verbose=FLAGS.verbose)
    train_seconds = time.time() - start

    print(f"Evaluating on {FLAGS.eval_tasks} held-out tasks ...")
    results = km.evaluation.evaluate_episodes(
        learner, test, FLAGS.eval_tasks, steps=[0, FLAGS.eval_inner_steps], verbose=FLAGS.verbose)
    evaluation = {"tasks": FLAGS.eval_tasks, "inner_steps": FLAGS.eval_inner_steps,
                  "train_seconds": round(train_seconds, 1)}
    for name in ("loss", "accuracy"):
        if name in results:
            mean, ci95 = km.evaluation.mean_and_ci95(results[name])
            evaluation[f"{name}_before_adaptation"] = float(mean[0])
            evaluation[name] = float(mean[-1])
            evaluation[f"{name}_ci95"] = float(ci95[-1])
    with open(os.path.join(FLAGS.output_dir, "evaluation.json"), "w") as f:
        json.dump(evaluation, f, indent=2)

    _plot_history(os.path.join(FLAGS.output_dir, "history.csv"),
                  os.path.join(FLAGS.output_dir, "learning_curves.png"))
    if curve.curves:
        curve.plot(os.path.join(FLAGS.output_dir, "adaptation_curve.png"))

    episode = next(iter(test))
    adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0])
    adapted.export(os.path.join(FLAGS.output_dir, "adapted_model"), verbose=False)
    km.export_adaptive(learner, os.path.join(FLAGS.output_dir, "adaptive_model"))
    summary = ", ".join(
        f"{k} {evaluation[k]:.4f} +- {evaluation[k + '_ci95']:.4f}" for k in ("accuracy", "loss")
        if k in evaluation)
    print(f"Held-out tasks after {FLAGS.eval_inner_steps} inner steps: {summary}")
    print(f"Wrote {FLAGS.output_dir}: " + ", ".join(sorted(os.listdir(FLAGS.output_dir))))
    return evaluation


def main(argv):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # absl's app.run defaults to INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value",
              file=sys.stderr)
        return 2
    try:
        run()
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def entry_point():
    """The `keras-meta` console script."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
