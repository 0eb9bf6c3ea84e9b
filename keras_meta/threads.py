"""CPU thread pools for meta-learning on CPUs."""

import os

import tensorflow as tf

from keras_meta.validation import check_positive_int


def configure_cpu_threads(intra_op=1, inter_op=None):
    """Sets TensorFlow's CPU thread pools; call it before any TensorFlow work.

    With tasks run one by one (`task_execution="sequential"`, what `"auto"`
    picks for conv nets) a meta-step is many small kernels: one task's 5-image
    convolutions gain little from splitting each kernel over threads, while
    `tf.map_fn` can run several tasks at once. One thread per kernel
    (`intra_op=1`) and one kernel per core (`inter_op` = the cores) measured
    1.5-1.7x faster on 2 cores than TensorFlow's default (both pools sized to
    the cores): conv4 MAML (PEERS.md B2) 2.09-2.13 vs 1.21-1.40 meta-steps/s,
    iMAML (B5) 0.52-0.69 vs 0.37-0.41, alternating runs of
    `benchmarks/run.py` on an Intel Xeon; on an AMD EPYC 1.1-1.3x for B2-B5.
    Vectorized work with large batched kernels (`task_execution="vectorized"`
    on conv nets) preferred the default pools (B4: 1.49 vs 1.89), and the pools
    are process-wide, hence a function to call, not something importing
    keras_meta does; docs/benchmarks.md has the figures.

    The pools are process-wide and TensorFlow fixes them when its runtime
    starts (the first op, model or dataset), so call this right after the
    imports. Equivalent to the environment variables
    `TF_NUM_INTRAOP_THREADS` and `TF_NUM_INTEROP_THREADS`.

    Args:
        intra_op: threads one kernel may use.
        inter_op: kernels run at once; default: the cores this process may
            use.

    Returns:
        `(intra_op, inter_op)` as set.

    Raises:
        RuntimeError: TensorFlow's runtime has already started.

    Example:

    >>> import keras_meta as km
    >>> km.configure_cpu_threads()  # doctest: +SKIP
    (1, 2)
    """
    intra_op = check_positive_int("intra_op", intra_op)
    if inter_op is None:
        inter_op = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    inter_op = check_positive_int("inter_op", inter_op)
    current = (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )
    if current == (intra_op, inter_op):
        return intra_op, inter_op
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as error:
        raise RuntimeError(
            "configure_cpu_threads() must run before TensorFlow's runtime starts "
            "(before the first model, tensor or dataset is created); TensorFlow "
            f"said: {error}. Call it right after the imports, or set "
            "TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS in the environment."
        ) from error
    return intra_op, inter_op
