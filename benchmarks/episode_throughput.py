"""Episode pipeline throughput against what a conv4 MAML train step consumes.

Two settings (`--dataset`):

`omniglot` (the default). Builds 5-way 1-shot 15-query meta-batches of 32 tasks from real Omniglot
images (the MAML split of the characters found under `--data_dir`, rotations
as classes) and reports, in one process:

1. the one-off cost of decoding the PNGs into memory;
2. meta-batches per second delivered by `km.data.episodes` (median of
   `--repeats` timed runs of `--batches` meta-batches, after a warm-up);
3. the median time of one conv4 MAML train step on such a meta-batch
   (`km.MAML(km.models.conv4(5), inner_learning_rate=0.4, inner_steps=1)`,
   Adam, sparse categorical cross-entropy on logits; `train_on_batch` on
   meta-batches already in memory, after a warm-up that traces the step),
   with the tasks run one after the other and vectorised;
4. the ratio of the pipeline's rate to the fastest step's (the target is >=
   10: the pipeline must never be the bottleneck);
5. with `--fit_steps`, `model.fit` seconds per step fed by the pipeline
   against fed by one meta-batch already in memory (end to end; medians of
   three alternated fits).

    python benchmarks/episode_throughput.py
    python benchmarks/episode_throughput.py --data_dir /path/to/omniglot --repeats 7

`--data_dir` is a folder of Omniglot images (`<alphabet>/<character>/*.png`
at any depth) or a folder of zips of such folders, unzipped to a temporary
folder first.

`mini_imagenet`. The MAML paper's mini-ImageNet setting: 84x84x3 images,
5-way 1-shot and 5-shot, 15 queries, meta-batches of 4, and a conv4 of 32
filters with max-pooling trained by second-order MAML with 5 inner steps of
0.01. The source is the pickle layout of `km.data.mini_imagenet` (compact:
uint8 read from disk and converted per episode), from `--data_dir`, or
generated (`--generated_per_class` random images for each of the 64 train
classes, 600 by default: the full-size train split, 3.3 GB as float32, 0.8 GB
here, on disk). For each shot count it reports the pipeline's meta-batches
per second without and with `km.data.Augmentation()` (crop, flip, colour
jitter), the median MAML step, and the ratio (target >= 10).

    python benchmarks/episode_throughput.py --dataset mini_imagenet
    python benchmarks/episode_throughput.py --dataset mini_imagenet --data_dir /data/mini-imagenet
"""

import argparse
import os
import pickle
import statistics
import tempfile
import time
import zipfile

import numpy as np

import keras_meta as km

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

N_WAY, K_SHOT, Q_QUERY = 5, 1, 15


def image_folder(data_dir, scratch):
    """`data_dir` itself, or its zips unzipped into `scratch`."""
    zips = sorted(f for f in os.listdir(data_dir) if f.endswith(".zip"))
    if not zips:
        return data_dir
    for name in zips:
        with zipfile.ZipFile(os.path.join(data_dir, name)) as archive:
            archive.extractall(scratch)
    return scratch


def pipeline_rate(source, meta_batch_size, batches, repeats, k_shot=K_SHOT):
    """Median meta-batches per second over `repeats` runs of `batches`."""
    iterator = iter(km.data.episodes(source, N_WAY, k_shot, Q_QUERY, meta_batch_size, seed=0))
    for _ in range(20):  # warm-up: tracing, thread pools, prefetch buffer
        next(iterator)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            element = next(iterator)
        element["query_y"].numpy()  # the last one is materialised
        rates.append(batches / (time.perf_counter() - start))
    return statistics.median(rates), rates


def make_learner(task_execution="sequential", seed=0, mini_imagenet=False):
    keras.utils.set_random_seed(seed)
    if mini_imagenet:  # MAML's mini-ImageNet network and inner loop
        model = km.models.conv4(N_WAY, filters=32, input_shape=(84, 84, 3),
                                downsampling="max_pool", seed=seed)
        learner = km.MAML(model, inner_learning_rate=0.01, inner_steps=5,
                          task_execution=task_execution)
    else:
        learner = km.MAML(km.models.conv4(N_WAY, seed=seed), inner_learning_rate=0.4,
                          inner_steps=1, task_execution=task_execution)
    learner.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return learner


def train_step_time(source, meta_batch_size, steps, warmup, task_execution, k_shot=K_SHOT,
                    mini_imagenet=False):
    """Median seconds of one MAML train step on in-memory meta-batches."""
    batches = list(
        km.data.episodes(source, N_WAY, k_shot, Q_QUERY, meta_batch_size, seed=1).take(4)
    )
    learner = make_learner(task_execution, mini_imagenet=mini_imagenet)
    for i in range(warmup):
        learner.train_on_batch(batches[i % 4])
    times = []
    for i in range(steps):
        start = time.perf_counter()
        learner.train_on_batch(batches[i % 4])  # returns logs: synchronises
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def fit_seconds_per_step(datasets, steps, rounds=3):
    """Median `model.fit` seconds per step for each dataset, rounds alternated.

    One learner per dataset, traced by a first short fit; then `rounds`
    fits of `steps` steps each, alternating between the datasets so that
    both see the same background load.
    """
    learners = {}
    for name, dataset in datasets.items():
        learners[name] = make_learner()
        learners[name].fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    times = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, dataset in datasets.items():
            start = time.perf_counter()
            learners[name].fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def generate_mini_imagenet(folder, per_class, seed=0):
    """The pickle layout's train split: 64 classes of random 84x84x3 images."""
    classes = km.data.published_split("mini_imagenet")["train"]
    images = np.random.default_rng(seed).integers(
        0, 256, (len(classes) * per_class, 84, 84, 3), dtype=np.uint8
    )
    class_dict = {c: list(range(i * per_class, (i + 1) * per_class)) for i, c in enumerate(classes)}
    with open(os.path.join(folder, "mini-imagenet-cache-train.pkl"), "wb") as file:
        pickle.dump({"image_data": images, "class_dict": class_dict}, file, protocol=4)


def mini_imagenet_main(args):
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data_dir
        if folder is None:
            start = time.perf_counter()
            generate_mini_imagenet(scratch, args.generated_per_class)
            folder = scratch
            print(f"Generated the pickle layout ({64 * args.generated_per_class} random "
                  f"84x84x3 images) in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        train = km.data.mini_imagenet("train", folder)
        print(f"Loaded {train} in {time.perf_counter() - start:.2f} s ({train.storage})")
        augmented = train.with_augmentation(km.data.Augmentation())
        meta_batch_size = args.meta_batch_size or 4
        rows = []
        for k_shot in (1, 5):
            plain = pipeline_rate(train, meta_batch_size, args.batches, args.repeats, k_shot)[0]
            jittered = pipeline_rate(augmented, meta_batch_size, args.batches, args.repeats,
                                     k_shot)[0]
            step = None
            for task_execution in args.task_execution:
                median, steps = train_step_time(train, meta_batch_size, args.steps, args.warmup,
                                                task_execution, k_shot, mini_imagenet=True)
                print(f"5-way {k_shot}-shot: conv4(32, max_pool) second-order MAML step, 5 "
                      f"inner steps ({task_execution} tasks): {median * 1000:.0f} ms median of "
                      f"{args.steps} ({', '.join(f'{s * 1000:.0f}' for s in steps)} ms) = "
                      f"{1 / median:.3f} meta-batches/s consumed")
                step = median if step is None else min(step, median)
            for label, rate in (("no augmentation", plain), ("with augmentation", jittered)):
                print(f"5-way {k_shot}-shot {Q_QUERY}-query, meta-batch {meta_batch_size}, "
                      f"{label}: pipeline {rate:.1f} meta-batches/s, step consumes "
                      f"{1 / step:.3f}/s: ratio {rate * step:.0f}x (target >= 10x)")
                rows.append((k_shot, label, rate, 1 / step, rate * step))
        print("\n| setting | pipeline (meta-batches/s) | MAML step consumes (/s) | ratio |")
        print("|---|---|---|---|")
        for k_shot, label, rate, consumed, ratio in rows:
            print(f"| 5-way {k_shot}-shot, {label} | {rate:.1f} | {consumed:.3f} | {ratio:.0f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="omniglot", choices=["omniglot", "mini_imagenet"])
    parser.add_argument("--data_dir", default=None,
                        help="Omniglot image folder, or a folder of zips of them (default "
                             "/work/shared/data/omniglot); for mini_imagenet, a folder of the "
                             "pickle layout (default: generated)")
    parser.add_argument("--generated_per_class", type=int, default=600,
                        help="mini_imagenet: images per class when generating")
    parser.add_argument("--meta_batch_size", type=int, default=None,
                        help="tasks per meta-batch (default 32 for omniglot, 4 for mini_imagenet)")
    parser.add_argument("--batches", type=int, default=200, help="meta-batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed pipeline runs")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps")
    parser.add_argument("--task_execution", nargs="+", default=["sequential", "vectorized"],
                        choices=["sequential", "vectorized"],
                        help="MAML task executions to time (the ratio uses the fastest)")
    parser.add_argument("--fit_steps", type=int, default=0,
                        help="also time model.fit end to end over this many steps")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # pfor's "uses a while_loop" notes

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs visible, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    if args.dataset == "mini_imagenet":
        return mini_imagenet_main(args)
    args.meta_batch_size = args.meta_batch_size or 32
    args.data_dir = args.data_dir or "/work/shared/data/omniglot"
    with tempfile.TemporaryDirectory() as scratch:
        folder = image_folder(args.data_dir, scratch)
        start = time.perf_counter()
        train = km.data.omniglot("train", data_dir=folder, rotations=(0, 90, 180, 270))
        load_seconds = time.perf_counter() - start
    print(f"Decoded {train.metadata['available_characters']} characters in "
          f"{load_seconds:.1f} s; training split: {train}")

    rate, rates = pipeline_rate(train, args.meta_batch_size, args.batches, args.repeats)
    print(f"Pipeline: {rate:.1f} meta-batches/s (median of {args.repeats} runs of "
          f"{args.batches}; runs: {', '.join(f'{r:.0f}' for r in rates)}) = "
          f"{rate * args.meta_batch_size:.0f} tasks/s, {N_WAY}-way {K_SHOT}-shot "
          f"{Q_QUERY}-query, meta-batch {args.meta_batch_size}")

    step = None
    for task_execution in args.task_execution:
        median, steps = train_step_time(
            train, args.meta_batch_size, args.steps, args.warmup, task_execution
        )
        print(f"conv4 MAML train step ({task_execution} tasks): {median * 1000:.0f} ms "
              f"median of {args.steps} (steps: {', '.join(f'{s * 1000:.0f}' for s in steps)}"
              f" ms) = {1 / median:.2f} meta-batches/s consumed")
        step = median if step is None else min(step, median)
    print(f"Ratio pipeline / fastest train step: {rate * step:.0f}x (target >= 10x)")

    if args.fit_steps:
        episodes = km.data.episodes(train, N_WAY, K_SHOT, Q_QUERY, args.meta_batch_size, seed=2)
        in_memory = tf.data.Dataset.from_tensors(next(iter(episodes))).repeat()
        times = fit_seconds_per_step(
            {"pipeline": episodes, "in_memory": in_memory}, args.fit_steps
        )
        fed, cached = times["pipeline"], times["in_memory"]
        print(f"model.fit, median of 3 alternated fits of {args.fit_steps} steps: "
              f"{fed * 1000:.0f} ms/step fed by the pipeline, {cached * 1000:.0f} "
              f"ms/step on one meta-batch in memory (ratio {fed / cached:.2f})")


if __name__ == "__main__":
    main()
