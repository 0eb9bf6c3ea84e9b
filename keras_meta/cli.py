"""`keras-meta` (or `python -m keras_meta`): meta-train, evaluate and export few-shot learners.

Modes (--mode):
  train     meta-train a learner built from the flags, evaluate it on held-out
            tasks and export it (the default). Running the same command again
            resumes an interrupted run, or says that it is finished.
  evaluate  score a saved learner (--learner, default OUTPUT_DIR/learner.keras)
            on held-out tasks of --dataset: OUTPUT_DIR/evaluation.json.
  export    adapt a saved learner to one held-out task and write SavedModels:
            OUTPUT_DIR/adapted_model/ and OUTPUT_DIR/adaptive_model/.

Examples:
  keras-meta --algorithm=maml --dataset=sinusoid --output_dir=runs/sinusoid
  keras-meta --algorithm=anil --dataset=omniglot --data_dir=~/omniglot \\
      --output_dir=runs/anil
  keras-meta --mode=evaluate --dataset=omniglot --data_dir=~/omniglot \\
      --output_dir=runs/anil --seed=7

A training run writes into --output_dir: run.json (its settings and status),
config.json, history.csv, learner.keras (every epoch), backup/ (weights and
optimizer state of the last completed epoch), evaluation.json,
learning_curves.png, adaptation_curve.png, adapted_model/ and adaptive_model/.

Exit codes: 0 done (or nothing left to do), 1 training failed (a loss or a
weight became NaN or infinite; nothing of that epoch is saved), 2 bad flags,
paths or saved files, 130 interrupted (rerun the command to resume).
"""

import csv
import json
import os
import sys
import tempfile
import time

import keras
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

MODES = ("train", "evaluate", "export")
ALGORITHMS = ("maml", "fomaml", "anil", "imaml")
DATASETS = ("sinusoid", "omniglot")
MAX_INTRA_OP_THREADS = 1024

flags.DEFINE_enum("mode", "train", MODES,
                  "train: meta-train, evaluate and export; evaluate: score a saved learner on "
                  "held-out tasks; export: adapt a saved learner to one held-out task and write "
                  "SavedModels.")
flags.DEFINE_string("output_dir", "runs/keras_meta", "Where everything is written (created if missing).")
flags.DEFINE_string("learner", None,
                    "--mode=evaluate/export: the saved learner (.keras); default "
                    "OUTPUT_DIR/learner.keras.")
flags.DEFINE_bool("restart", False,
                  "Delete what an earlier run left in --output_dir (run.json, backup/, history.csv, "
                  "learner.keras, ...) and train from scratch.")
# Tasks.
flags.DEFINE_enum("dataset", "sinusoid", DATASETS, "Task family.")
flags.DEFINE_string("data_dir", None, "Local folder of Omniglot images (default: TFDS, downloads).")
flags.DEFINE_integer("n_way", 5, "Classes per task (omniglot).", lower_bound=2)
flags.DEFINE_integer("k_shot", None, "Support examples per class (default: 10 sinusoid, 1 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("q_query", None, "Query examples per class (default: 10 sinusoid, 15 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0,
                     "Seed of the weights and of the training, validation (seed + 1) and test "
                     "(seed + 2) task streams.", lower_bound=0)
# Algorithm.
flags.DEFINE_enum("algorithm", "maml", ALGORITHMS, "Meta-learning algorithm.")
flags.DEFINE_integer("inner_steps", None,
                     "Inner steps during meta-training (default: 1; anil 5; imaml 16).", lower_bound=1)
flags.DEFINE_float("inner_learning_rate", None,
                   "Inner step size (default: 0.01 sinusoid, 0.4 omniglot; imaml 0.1).")
flags.DEFINE_integer("eval_inner_steps", None,
                     "Inner steps at evaluation and in the exported models (default: 10; imaml 16; "
                     "--mode=evaluate/export: the learner's).", lower_bound=1)
flags.DEFINE_float("l2_regularization", 2.0, "imaml: the proximal strength lambda.")
flags.DEFINE_float("cg_damping", 1.0,
                   "imaml: d of the damped operator (1 + d) I + H / (lambda + delta) "
                   "(the official code's 1.0; 0: the paper's I + H / lambda).", lower_bound=0.0)
flags.DEFINE_float("cg_l2_damping", 10.0, "imaml: delta of the damped operator (official code: 10).",
                   lower_bound=0.0)
flags.DEFINE_bool("proximal_pull_back", True,
                  "imaml: the official inner loop (SGD on the support loss, then one step "
                  "towards the meta-parameters); --noproximal_pull_back: gradient descent on "
                  "the proximal objective, as in the paper.")
flags.DEFINE_float("eval_l2_regularization", 0.0,
                   "imaml: lambda at evaluation and in the exported models (official "
                   "evaluation: 0, plain gradient descent from the meta-parameters).",
                   lower_bound=0.0)
# Training.
flags.DEFINE_integer("meta_batch_size", None, "Tasks per meta-batch (default: 25 sinusoid, 32 omniglot).",
                     lower_bound=1)
flags.DEFINE_float("meta_learning_rate", 1e-3, "Adam learning rate of the meta-update (> 0).")
flags.DEFINE_integer("epochs", 5, "Epochs (a finished run continues when this grows).", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Meta-steps per epoch (default: 1000 sinusoid, 100 omniglot).",
                     lower_bound=1)
flags.DEFINE_integer("val_tasks", 100, "Validation tasks evaluated after every epoch.", lower_bound=1)
# Evaluation.
flags.DEFINE_integer("eval_tasks", 600, "Held-out test tasks of the final evaluation.", lower_bound=1)
# Runtime.
flags.DEFINE_integer("verbose", 1, "0 silent, 1 progress bars, 2 one line per epoch.",
                     lower_bound=0, upper_bound=2)
flags.DEFINE_integer("intra_op_threads", 1,
                     "Threads one TensorFlow kernel may use, with one kernel per core at once "
                     "(km.configure_cpu_threads); 1, the default, measured 1.1-1.7x faster for "
                     f"conv nets on 2-core CPUs; 0 keeps TensorFlow's default pools; at most "
                     f"{MAX_INTRA_OP_THREADS}.", lower_bound=0, upper_bound=MAX_INTRA_OP_THREADS)

flags.register_validator("meta_learning_rate", lambda value: value > 0,
                         message="the meta step size must be > 0")
flags.register_validator("inner_learning_rate", lambda value: value is None or value > 0,
                         message="the inner step size must be > 0")
flags.register_validator("l2_regularization", lambda value: value > 0,
                         message="the proximal strength must be > 0")

FLAG_GROUPS = (
    ("Mode and files", ("mode", "output_dir", "learner", "restart")),
    ("Tasks", ("dataset", "data_dir", "n_way", "k_shot", "q_query", "seed")),
    ("Algorithm", ("algorithm", "inner_steps", "inner_learning_rate", "eval_inner_steps")),
    ("iMAML (--algorithm=imaml)", ("l2_regularization", "cg_damping", "cg_l2_damping",
                                   "proximal_pull_back", "eval_l2_regularization")),
    ("Training", ("meta_batch_size", "meta_learning_rate", "epochs", "steps_per_epoch",
                  "val_tasks")),
    ("Evaluation", ("eval_tasks",)),
    ("Runtime", ("verbose", "intra_op_threads")),
)
IMAML_FLAGS = ("l2_regularization", "cg_damping", "cg_l2_damping", "proximal_pull_back",
               "eval_l2_regularization")
TRAIN_ONLY_FLAGS = ("restart", "algorithm", "inner_steps", "inner_learning_rate",
                    "meta_batch_size", "meta_learning_rate", "epochs", "steps_per_epoch",
                    "val_tasks") + IMAML_FLAGS
# What a training run leaves in --output_dir (what --restart deletes).
ARTIFACTS = ("run.json", "config.json", "history.csv", "evaluation.json", "learner.keras",
             "learning_curves.png", "adaptation_curve.png", "backup", "adapted_model",
             "adaptive_model")
BACKUP = os.path.join("backup", "latest.weights.h5")


class UsageError(Exception):
    """A bad flag, path or saved file: exit code 2, one line, no traceback."""


class TrainingFailed(Exception):
    """Training produced a non-finite loss or weight: exit code 1."""


# ----------------------------------------------------------------------
# Settings.


def _pick(value, default):
    return default if value is None else value


def _settings():
    """What defines a training run's computation (its fingerprint): the flags, defaults resolved.

    Two runs with equal settings compute the same meta-steps; a backup is only
    resumed with equal settings. `--epochs` is not part of it (a run can be
    extended), nor are the evaluation and runtime flags.
    """
    sinusoid = FLAGS.dataset == "sinusoid"
    algorithm = FLAGS.algorithm
    settings = {"algorithm": algorithm, "dataset": FLAGS.dataset}
    if not sinusoid:
        settings["data_dir"] = (os.path.abspath(os.path.expanduser(FLAGS.data_dir))
                                if FLAGS.data_dir else None)
        settings["n_way"] = FLAGS.n_way
    settings.update(
        k_shot=_pick(FLAGS.k_shot, 10 if sinusoid else 1),
        q_query=_pick(FLAGS.q_query, 10 if sinusoid else 15),
        meta_batch_size=_pick(FLAGS.meta_batch_size, 25 if sinusoid else 32),
        inner_steps=_pick(FLAGS.inner_steps, {"anil": 5, "imaml": 16}.get(algorithm, 1)),
        inner_learning_rate=_pick(
            FLAGS.inner_learning_rate, 0.1 if algorithm == "imaml" else 0.01 if sinusoid else 0.4),
        meta_learning_rate=FLAGS.meta_learning_rate,
        steps_per_epoch=_pick(FLAGS.steps_per_epoch, 1000 if sinusoid else 100),
        seed=FLAGS.seed,
    )
    if algorithm == "imaml":
        settings.update({name: FLAGS[name].value for name in IMAML_FLAGS[:-1]})
    return settings


def _task_settings():
    """The flags that define the tasks of --mode=evaluate/export."""
    sinusoid = FLAGS.dataset == "sinusoid"
    return {"k_shot": _pick(FLAGS.k_shot, 10 if sinusoid else 1),
            "q_query": _pick(FLAGS.q_query, 10 if sinusoid else 15)}


def _eval_inner_steps(algorithm):
    return _pick(FLAGS.eval_inner_steps, 16 if algorithm == "imaml" else 10)


def _check_flag_combinations():
    present = lambda name: FLAGS[name].present  # noqa: E731
    if FLAGS.dataset == "sinusoid":
        if present("n_way"):
            raise UsageError("--n_way is for --dataset=omniglot; sinusoid tasks are regressions.")
        if FLAGS.data_dir:
            raise UsageError("--data_dir is for --dataset=omniglot; sinusoid tasks are generated.")
    if FLAGS.mode == "train":
        if FLAGS.learner is not None:
            raise UsageError(f"--learner is for --mode=evaluate or --mode=export; training builds "
                             f"its learner from the flags. Received: --learner={FLAGS.learner}")
        if FLAGS.algorithm != "imaml":
            given = [f"--{name}" for name in IMAML_FLAGS if present(name)]
            if given:
                raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                                 f"--algorithm=imaml. Received: --algorithm={FLAGS.algorithm}")
    else:
        given = [f"--{name}" for name in TRAIN_ONLY_FLAGS if present(name)]
        if given:
            raise UsageError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --mode=train; the "
                f"saved learner carries its algorithm and training settings. Received: "
                f"--mode={FLAGS.mode}")
    if FLAGS.data_dir:
        data_dir = os.path.expanduser(FLAGS.data_dir)
        if not os.path.isdir(data_dir):
            raise UsageError(f"--data_dir={FLAGS.data_dir!r} is not a directory.")


# ----------------------------------------------------------------------
# Files.


def _prepare_output_dir(path):
    """Creates --output_dir if missing; one-line errors when it cannot be a writable folder."""
    if not path:
        raise UsageError("--output_dir must name a folder. Received: --output_dir=''")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir={path} is a file, not a folder: pass a folder (it is "
                         "created if missing).")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"--output_dir={path} cannot be created: {ancestor} is a file, not a "
                         "folder.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"--output_dir={path} is not a writable folder ({error.strerror}): pass "
                         "a folder you can write to.") from None


def _atomic_write(path, write):
    """`write(tmp_path)`, then renames: a killed process leaves the old file or the new one."""
    base, name = os.path.split(path)
    stem, dot, ext = name.partition(".")
    tmp = os.path.join(base, f"{stem}.tmp-{os.getpid()}{dot}{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, value):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, default=str)
    _atomic_write(path, write)


def _read_run(out):
    """run.json of an earlier run in `out`, or None."""
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        if (not isinstance(state.get("settings"), dict) or "status" not in state
                or not isinstance(state.get("epochs"), int)):
            raise ValueError("no settings, status or epochs")
    except (ValueError, OSError, AttributeError) as error:
        raise UsageError(f"{path} cannot be read ({_first_line(error)}): it is truncated or "
                         "corrupt. Pass --restart to start over, or a new --output_dir.") from None
    return state


def _write_run(out, settings, status, epochs):
    _write_json(os.path.join(out, "run.json"),
                {"settings": settings, "status": status, "epochs": epochs})


def _discard(out):
    import shutil

    for name in ARTIFACTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _differences(before, now):
    """`--flag=old (now new)` for every setting in both that differs."""
    return [f"--{key}={before[key]} (now {now[key]})"
            for key in now if key in before and before[key] != now[key]]


def _history_rows(path):
    if not os.path.exists(path):
        return None, []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames
    try:
        [int(row["epoch"]) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path} is not a history written by keras-meta (no integer 'epoch' "
                         "column): pass --restart to start over, or a new --output_dir.") from None
    return fields, rows


def _truncate_history(path, epochs):
    """Keeps the rows of the first `epochs` epochs: what the backup holds."""
    fields, rows = _history_rows(path)
    if fields is None:
        return
    kept = [row for row in rows if int(row["epoch"]) < epochs]
    if not kept:
        os.remove(path)
        return
    if len(kept) == len(rows):
        return

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    _atomic_write(path, write)


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------
# Data, learners, checks.


def _data(settings, start_step, splits=("train", "validation", "test")):
    import keras_meta as km

    k_shot, q_query = settings["k_shot"], settings["q_query"]
    batch = settings.get("meta_batch_size")
    seeds = {"train": FLAGS.seed, "validation": FLAGS.seed + 1, "test": FLAGS.seed + 2}
    if FLAGS.dataset == "sinusoid":
        return {split: km.data.sinusoid(
            k_shot=k_shot, q_query=q_query, meta_batch_size=batch if split == "train" else 100,
            seed=seeds[split], start_step=start_step if split == "train" else 0)
            for split in splits}, {}
    data_dir = os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else None
    sources = {split: km.data.omniglot(split, data_dir=data_dir,
                                       rotations=(0, 90, 180, 270) if split == "train" else None)
               for split in splits}
    streams = {split: km.data.episodes(
        source, n_way=FLAGS.n_way, k_shot=k_shot, q_query=q_query,
        meta_batch_size=batch if split == "train" else 20, seed=seeds[split],
        start_step=start_step if split == "train" else 0)
        for split, source in sources.items()}
    metadata = {split: {"classes": len(source.class_names), **source.metadata}
                for split, source in sources.items()}
    return streams, metadata


def _learner(settings):
    import keras_meta as km

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.dataset == "sinusoid":
        model = km.models.mlp(seed=FLAGS.seed)
        loss, metrics = "mse", []
    else:
        model = km.models.conv4(FLAGS.n_way, seed=FLAGS.seed)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["accuracy"]
    algorithm = settings["algorithm"]
    common = dict(inner_learning_rate=settings["inner_learning_rate"],
                  inner_steps=settings["inner_steps"],
                  eval_inner_steps=_eval_inner_steps(algorithm))
    if algorithm in ("maml", "fomaml"):
        learner = km.MAML(model, first_order=algorithm == "fomaml", **common)
    elif algorithm == "anil":
        learner = km.ANIL(model, head=1, **common)
    else:
        learner = km.IMAML(model, l2_regularization=settings["l2_regularization"],
                           cg_damping=settings["cg_damping"],
                           cg_l2_damping=settings["cg_l2_damping"],
                           proximal_pull_back=settings["proximal_pull_back"],
                           eval_l2_regularization=FLAGS.eval_l2_regularization, **common)
    learner.compile(optimizer=keras.optimizers.Adam(settings["meta_learning_rate"]), loss=loss,
                    metrics=metrics)
    return learner


def _non_finite_variables(learner):
    """Paths of the learner's variables (weights, optimizer state) holding NaN or inf."""
    variables = list(learner.weights)
    if getattr(learner, "optimizer", None) is not None:
        variables += list(learner.optimizer.variables)
    return [getattr(v, "path", v.name) for v in variables
            if not np.all(np.isfinite(np.asarray(v, dtype="float64")))]


def _load_learner(path):
    import keras_meta as km

    if not os.path.exists(path):
        raise UsageError(f"--learner={path} does not exist: train one first (--mode=train writes "
                         "OUTPUT_DIR/learner.keras) or pass the path of a saved learner.")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise UsageError(f"--learner={path} is not a .keras file: pass the learner.keras a "
                         "training run wrote.")
    try:
        learner = keras.saving.load_model(path)
    except Exception as error:  # zip, h5 and deserialization errors of every kind
        raise UsageError(f"--learner={path} cannot be loaded ({_first_line(error)}): it is "
                         "truncated, corrupt or not a keras-meta learner.") from None
    if not isinstance(learner, km.MetaLearner):
        raise UsageError(f"--learner={path} holds a {type(learner).__name__}, not a keras_meta "
                         "meta-learner (MAML, ANIL, IMAML).")
    bad = _non_finite_variables(learner)
    if bad:
        raise UsageError(f"--learner={path} holds non-finite weights ({bad[0]} and "
                         f"{len(bad) - 1} more): it cannot be evaluated or exported.")
    return learner


def _check_learner_fits(learner, path, episode):
    model = learner.model
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    received = tuple(episode["support_x"].shape[2:])
    if expected is not None and expected != received:
        raise UsageError(f"--learner={path} takes inputs of shape {expected}; the "
                         f"--dataset={FLAGS.dataset} tasks have inputs of shape {received}: pass "
                         "the --dataset the learner was trained on.")
    if FLAGS.dataset == "omniglot":
        units = model.outputs[0].shape[-1]
        if units != FLAGS.n_way:
            raise UsageError(f"--learner={path} predicts {units} classes; --n_way={FLAGS.n_way} "
                             f"tasks need {FLAGS.n_way}: pass --n_way={units}.")


# ----------------------------------------------------------------------
# Callbacks of a training run.


def _callbacks(out, validation, settings, verbose):
    import keras_meta as km

    guard = _NonFiniteGuard()

    def unless_failed(base):
        class Guarded(base):
            def on_epoch_end(self, epoch, logs=None):
                if guard.failure is None:
                    super().on_epoch_end(epoch, logs)
        Guarded.__name__ = base.__name__
        return Guarded

    # One evaluation of the validation tasks per epoch: the curve reads it.
    evaluation = unless_failed(km.callbacks.MetaEvaluation)(
        validation, num_episodes=FLAGS.val_tasks, prefix="val", verbose=verbose)
    curve = unless_failed(km.callbacks.AdaptationCurve)(
        evaluation, max_steps=_eval_inner_steps(settings["algorithm"]))
    callbacks = [
        guard,  # first: the others see its verdict in the same on_epoch_end
        evaluation,
        curve,
        # Before the backup: a process killed between the two rewrites this
        # row on resume (the history is cut back to the backup's epochs).
        unless_failed(keras.callbacks.CSVLogger)(os.path.join(out, "history.csv"), append=True),
        unless_failed(_Backup)(out),
    ]
    return guard, curve, callbacks


class _NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, skipped task or weight.

    A stand-in for `keras.callbacks.TerminateOnNaN` that also records why and
    when, checks every weight and optimizer variable at the end of each epoch,
    and counts tasks that a learner reports as non-finite
    (`non_finite_tasks` in its logs).
    """

    def __init__(self):
        super().__init__()
        self.failure = None
        self.failed_epoch = None  # epochs completed (and saved) before the failure
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        where = f"meta-step {batch + 1} of epoch {self.epoch + 1}"
        loss = logs.get("loss")
        skipped = logs.get("non_finite_tasks")
        if loss is not None and not np.isfinite(float(loss)):
            self.fail(f"the loss is {float(loss)} at {where}")
        elif skipped is not None and float(skipped) > 0:
            self.fail(f"{int(float(skipped))} task(s) had a non-finite loss or meta-gradient "
                      f"by {where}")

    def on_epoch_end(self, epoch, logs=None):
        if self.failure is None:
            bad = _non_finite_variables(self.model)
            if bad:
                self.fail(f"{bad[0]} (and {len(bad) - 1} more variables) is not finite after "
                          f"epoch {epoch + 1}")

    def fail(self, why):
        if self.failure is None:
            self.failure = why
            self.failed_epoch = self.epoch
            self.model.stop_training = True


class _Backup(keras.callbacks.Callback):
    """After every epoch, `learner.keras` and `backup/latest.weights.h5` (weights and
    optimizer state), each written to a temporary file and renamed into place, so a
    killed process leaves the previous epoch's file or the new one, never a torn one."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(os.path.join(self.out, "backup"), exist_ok=True)
        _atomic_write(os.path.join(self.out, "learner.keras"), self.model.save)
        _atomic_write(os.path.join(self.out, BACKUP), self.model.save_weights)


# ----------------------------------------------------------------------
# Modes.


def _train():
    out = FLAGS.output_dir
    settings = _settings()
    state = None if FLAGS.restart else _read_run(out)
    if FLAGS.restart:
        _discard(out)
    elif state is None:
        leftovers = [name for name in ARTIFACTS if os.path.lexists(os.path.join(out, name))]
        if leftovers:
            raise UsageError(
                f"--output_dir={out} holds {', '.join(leftovers)} but no run.json (not a run of "
                "this version of keras-meta): pass a new --output_dir, or --restart to delete "
                "those files and start over.")
    else:
        differences = _differences(state["settings"], settings)
        if differences:
            raise UsageError(
                f"--output_dir={out} holds a run with other settings: {', '.join(differences)}. "
                "Rerun with the same flags to resume it, pass a new --output_dir, or add "
                "--restart to delete it and start over.")
        if state["status"] == "finished" and state["epochs"] >= FLAGS.epochs:
            print(f"{out} holds a finished run of {state['epochs']} epochs with these settings: "
                  "nothing to train. Score it with --mode=evaluate, train it further with a "
                  "larger --epochs, or start over with --restart.")
            return None

    learner = _learner(settings)
    initial_epoch = _restore(learner, out, settings) if state is not None else 0
    _truncate_history(os.path.join(out, "history.csv"), initial_epoch)
    _write_run(out, settings, "training", initial_epoch)
    streams, metadata = _data(settings, learner.optimizer.iterations)
    config = {"mode": "train", **settings, "epochs": FLAGS.epochs,
              "eval_inner_steps": _eval_inner_steps(settings["algorithm"]),
              "eval_tasks": FLAGS.eval_tasks, "val_tasks": FLAGS.val_tasks,
              # What TensorFlow runs with (0: its default pools), not the flag.
              "intra_op_threads": _intra_op_threads(),
              "class_splits": metadata}
    if settings["algorithm"] == "imaml":
        config["eval_l2_regularization"] = FLAGS.eval_l2_regularization
    _write_json(os.path.join(out, "config.json"), config)

    guard, curve, callbacks = _callbacks(out, streams["validation"], settings, FLAGS.verbose)
    start = time.time()
    if initial_epoch < FLAGS.epochs:
        if initial_epoch:
            print(f"Resuming {out} after epoch {initial_epoch} of {FLAGS.epochs}.")
        learner.fit(streams["train"], initial_epoch=initial_epoch, epochs=FLAGS.epochs,
                    steps_per_epoch=settings["steps_per_epoch"], callbacks=callbacks,
                    verbose=FLAGS.verbose)
    train_seconds = time.time() - start
    if guard.failure is None:
        bad = _non_finite_variables(learner)
        if bad:
            guard.failure = f"{bad[0]} is not finite after training"
    if guard.failure is not None:
        completed = (guard.failed_epoch if guard.failed_epoch is not None
                     else int(learner.optimizer.iterations) // settings["steps_per_epoch"])
        _write_run(out, settings, "failed", completed)
        saved = (f"learner.keras and backup/ hold epoch {completed}" if completed
                 else "nothing was saved")
        raise TrainingFailed(
            f"training diverged: {guard.failure}; {saved}, nothing was evaluated or exported. "
            "Lower --meta_learning_rate or --inner_learning_rate and start over with --restart "
            "(or a new --output_dir).")
    _atomic_write(os.path.join(out, "learner.keras"), learner.save)

    evaluation = _evaluate(learner, streams["test"], _eval_inner_steps(settings["algorithm"]))
    evaluation["train_seconds"] = round(train_seconds, 1)
    _write_json(os.path.join(out, "evaluation.json"), evaluation)
    _plot_history(os.path.join(out, "history.csv"), os.path.join(out, "learning_curves.png"))
    if curve.curves:
        curve.plot(os.path.join(out, "adaptation_curve.png"))
    _export(learner, streams["test"], out)
    _write_run(out, settings, "finished", FLAGS.epochs)
    print(f"Held-out tasks after {evaluation['inner_steps']} inner steps: {_summary(evaluation)}")
    print(f"Wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    return evaluation


def _restore(learner, out, settings):
    """Loads the backup into `learner`; returns the epochs it holds."""
    path = os.path.join(out, BACKUP)
    history = os.path.join(out, "history.csv")
    if not os.path.exists(path):
        _, rows = _history_rows(history)
        if rows:
            raise UsageError(f"{path} is missing while history.csv records {len(rows)} epochs: "
                             "pass --restart to start over, or a new --output_dir.")
        return 0  # killed during the first epoch
    learner.optimizer.build(learner.meta_variables)
    try:
        learner.load_weights(path)
    except Exception as error:  # h5py and Keras raise several kinds
        raise UsageError(f"the backup {path} cannot be read ({_first_line(error)}): it is "
                         "truncated or corrupt. Pass --restart to start over, or a new "
                         "--output_dir.") from None
    iterations = int(learner.optimizer.iterations)
    epochs, rest = divmod(iterations, settings["steps_per_epoch"])
    if rest:
        raise UsageError(f"the backup {path} holds {iterations} meta-steps, not a whole number "
                         f"of epochs of {settings['steps_per_epoch']} steps: it does not belong "
                         "to this run. Pass --restart to start over, or a new --output_dir.")
    bad = _non_finite_variables(learner)
    if bad:
        raise UsageError(f"the backup {path} holds non-finite weights ({bad[0]}): pass --restart "
                         "to start over, or a new --output_dir.")
    return epochs


def _evaluate(learner, episodes, inner_steps):
    import keras_meta as km

    print(f"Evaluating on {FLAGS.eval_tasks} held-out tasks ...")
    results = km.evaluation.evaluate_episodes(
        learner, episodes, FLAGS.eval_tasks, steps=[0, inner_steps], verbose=FLAGS.verbose)
    evaluation = {"tasks": FLAGS.eval_tasks, "inner_steps": inner_steps}
    for name in ("loss", "accuracy"):
        if name in results:
            mean, ci95 = km.evaluation.mean_and_ci95(results[name])
            evaluation[f"{name}_before_adaptation"] = float(mean[0])
            evaluation[name] = float(mean[-1])
            evaluation[f"{name}_ci95"] = float(ci95[-1])
    return evaluation


def _export(learner, episodes, out, steps=None):
    """adapted_model/ (adapted to the first task of `episodes`) and adaptive_model/;
    `steps` inner steps (default the learner's)."""
    import keras_meta as km

    bad = _non_finite_variables(learner)
    if bad:
        raise TrainingFailed(f"{bad[0]} is not finite: nothing exported.")
    episode = next(iter(episodes))
    adapted = learner.adapt(episode["support_x"][0], episode["support_y"][0], steps=steps)
    adapted.export(os.path.join(out, "adapted_model"), verbose=False)
    km.export_adaptive(learner, os.path.join(out, "adaptive_model"), steps=steps)


def _summary(evaluation):
    return ", ".join(f"{k} {evaluation[k]:.4f} +- {evaluation[k + '_ci95']:.4f}"
                     for k in ("accuracy", "loss") if k in evaluation)


def _saved_learner_mode():
    out = FLAGS.output_dir
    path = FLAGS.learner or os.path.join(out, "learner.keras")
    learner = _load_learner(path)
    settings = _task_settings()
    streams, _ = _data(settings, 0, splits=("test",))
    episodes = streams["test"]
    _check_learner_fits(learner, path, next(iter(episodes)))
    if FLAGS.mode == "export":
        _export(learner, episodes, out, steps=FLAGS.eval_inner_steps)
        print(f"Exported {path}, adapted to one held-out --dataset={FLAGS.dataset} task: "
              f"{os.path.join(out, 'adapted_model')}, {os.path.join(out, 'adaptive_model')}")
        return {}
    inner_steps = _pick(FLAGS.eval_inner_steps, learner.adaptation_steps)
    evaluation = {"learner": os.path.abspath(path), "dataset": FLAGS.dataset, **settings,
                  "seed": FLAGS.seed, **_evaluate(learner, episodes, inner_steps)}
    if FLAGS.dataset == "omniglot":
        evaluation["n_way"] = FLAGS.n_way
    _write_json(os.path.join(out, "evaluation.json"), evaluation)
    print(f"{path} on held-out tasks after {inner_steps} inner steps: {_summary(evaluation)}")
    print(f"Wrote {os.path.join(out, 'evaluation.json')}")
    return evaluation


def _intra_op_threads():
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads()


def _plot_history(history_csv, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, rows = _history_rows(history_csv)
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    panels = [("loss", ["loss", "val_loss"])]
    if "val_accuracy" in rows[0]:
        panels.append(("accuracy", ["accuracy", "val_accuracy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    labels = {"loss": "train query loss", "accuracy": "train query accuracy",
              "val_loss": "validation loss (after adaptation)",
              "val_accuracy": "validation accuracy (after adaptation)"}
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if key in rows[0]:
                ax.plot(epochs, [float(r[key]) for r in rows], "o-", label=labels[key])
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run():
    """Runs the parsed flags' mode; returns the evaluation (None when nothing was left to do)."""
    _check_flag_combinations()
    _prepare_output_dir(FLAGS.output_dir)
    import keras_meta as km

    if FLAGS.intra_op_threads:
        # The CLI owns its process: set the pools before TensorFlow's runtime starts.
        km.configure_cpu_threads(intra_op=FLAGS.intra_op_threads)
    elif not km.threads.runtime_started():
        # 0: TensorFlow's own pools, whatever importing keras_meta chose.
        km.threads.use_default_cpu_threads()
    if FLAGS.mode == "train":
        return _train()
    return _saved_learner_mode()


def main(argv):
    """absl's main: runs the parsed flags; returns the exit code."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # absl's app.run defaults to INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value",
              file=sys.stderr)
        return 2
    try:
        run()
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume after the last completed "
              "epoch.", file=sys.stderr)
        return 130
    return 0


def help_text():
    """What `--help` prints: usage, then keras-meta's own flags by group."""
    import textwrap

    lines = [__doc__.strip(), "", "Flags (absl's own: --helpfull):"]
    for title, names in FLAG_GROUPS:
        lines += ["", f"{title}:"]
        for name in names:
            flag = FLAGS[name]
            shown = f"--[no]{name}" if flag.boolean else f"--{name}"
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines += textwrap.wrap(f"{shown}: {flag.help}{default}", width=88,
                                   initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def _parse_flags(argv):
    """absl's parser with keras-meta's --help and one-line errors (exit code 2)."""
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error} (keras-meta --help lists the flags)", file=sys.stderr)
        sys.exit(2)


def run_command(args):
    """Runs `keras-meta` with the argument list `args` in this process; returns the exit code.

    For tests and notebooks: flags are parsed as on the command line and reset
    afterwards. TensorFlow's thread pools cannot change once it has started, so
    pass `--intra_op_threads=0` in a process that has already used it.
    """
    try:
        try:
            argv = _parse_flags(["keras-meta", *args])
        except SystemExit as exit_:
            return exit_.code
        return main(argv)
    finally:
        FLAGS.unparse_flags()


def entry_point():
    """The `keras-meta` console script and `python -m keras_meta`."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry_point()
