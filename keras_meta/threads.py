"""CPU thread pools for meta-learning on CPUs.

Importing keras_meta sets TensorFlow's CPU pools to one thread per kernel and
one kernel per core (`configure_cpu_threads()`) when that is safe: see
`configure_at_import`. `KERAS_META_CPU_THREADS=0` in the environment keeps
TensorFlow's own defaults.
"""

import os

import tensorflow as tf

from keras_meta.validation import check_positive_int

# The environment variable that turns the import-time configuration off ("0")
# or on ("1", the default when unset).
OPT_OUT_VARIABLE = "KERAS_META_CPU_THREADS"
# Up to this many usable cores, importing keras_meta configures the pools:
# where it was measured (2-core Intel Xeon and AMD EPYC machines). The pools
# are process-wide: other TensorFlow work in the process loses intra-op
# parallelism too (a plain Keras CNN, batches of 128: 0.70x on 2 cores), a
# loss that can grow with the cores while the gain was measured on 2 only.
# Above it, `cpu_threads_hint()` says what to call.
MAX_CORES_AT_IMPORT = 2
# What importing keras_meta did with the pools (see `configure_at_import`).
_AT_IMPORT = {"configured": False, "reason": "keras_meta.threads imported directly"}


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
    on conv nets) preferred the default pools (B4: 1.49 vs 1.89);
    docs/benchmarks.md has the figures. Importing keras_meta already calls
    this on CPU-only machines of up to 2 cores when it is safe (see
    `configure_at_import`); call it yourself on larger machines, or with
    other values.

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
        inter_op = usable_cores()
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


def usable_cores():
    """The CPU cores this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def runtime_started():
    """Whether TensorFlow's eager runtime has started (its pools are then fixed).

    No public call says it without starting the runtime
    (`tf.config.list_logical_devices` starts it): see
    `keras_meta._internals.runtime_started`.
    """
    from keras_meta import _internals

    return _internals.runtime_started()


def configure_at_import(environ=None, physical_devices=None):
    """What importing keras_meta does: `configure_cpu_threads()` when it is safe.

    The pools are set to one thread per kernel and one kernel per core only
    if all of these hold, and are left as they are otherwise:

    - `KERAS_META_CPU_THREADS` is unset or `"1"` (`"0"` opts out);
    - neither `TF_NUM_INTRAOP_THREADS` nor `TF_NUM_INTEROP_THREADS` is set,
      and `tf.config.threading` has no pool size set (the user chose);
    - TensorFlow's runtime has not started (it fixes the pools; then
      nothing can change them and nothing is touched);
    - no GPU or TPU is visible (measured on CPU-only machines only);
    - the process may use at most `MAX_CORES_AT_IMPORT` (2) cores, where it
      was measured: the pools are process-wide, and other TensorFlow work in
      the process (a plain Keras CNN with large batches) loses intra-op
      parallelism, a loss that can grow with the cores.

    Until TensorFlow's runtime starts, `configure_cpu_threads(...)` and
    `tf.config.threading`'s setters still change the pools.

    Args:
        environ: the environment to read (default: `os.environ`).
        physical_devices: for tests; default `tf.config.list_physical_devices()`
            (which does not start the runtime).

    Returns:
        A dict: `configured` (bool), `reason`, and `intra_op`, `inter_op`
        when configured. `import_time_configuration()` returns it later.

    Raises:
        ValueError: `KERAS_META_CPU_THREADS` is neither `"0"` nor `"1"`.
    """
    from keras_meta import devices

    environ = os.environ if environ is None else environ
    value = environ.get(OPT_OUT_VARIABLE, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(
            f"`{OPT_OUT_VARIABLE}` must be 0 (keep TensorFlow's thread pools) or 1 "
            f"(one thread per kernel, one kernel per core). Received: "
            f"{OPT_OUT_VARIABLE}={environ[OPT_OUT_VARIABLE]!r}"
        )
    status = _decide(environ, value, physical_devices, devices)
    if status is None:
        intra_op, inter_op = configure_cpu_threads()
        status = {"configured": True, "reason": "CPU-only machine, pools not set",
                  "intra_op": intra_op, "inter_op": inter_op}
    _AT_IMPORT.clear()
    _AT_IMPORT.update(status)
    return dict(status)


def _decide(environ, value, physical_devices, devices):
    """Why the pools stay as they are, or None to configure them."""
    if value == "0":
        return {"configured": False, "reason": f"{OPT_OUT_VARIABLE}=0"}
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        if environ.get(name):
            return {"configured": False, "reason": f"{name} is set"}
    current = (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )
    if any(current):
        return {"configured": False,
                "reason": f"pools already set (intra_op={current[0]}, inter_op={current[1]})"}
    if runtime_started():
        return {"configured": False, "reason": "TensorFlow's runtime had already started"}
    kind = devices.device_kind(physical_devices)
    if kind != "cpu":
        return {"configured": False, "reason": f"a {kind.upper()} is visible"}
    cores = usable_cores()
    if cores > MAX_CORES_AT_IMPORT:
        return {"configured": False,
                "reason": f"{cores} cores (more than {MAX_CORES_AT_IMPORT}, not measured)"}
    return None


def import_time_configuration():
    """What importing keras_meta did with the pools (see `configure_at_import`)."""
    return dict(_AT_IMPORT)


def cpu_threads_hint():
    """A one-line note for `fit` when the measured faster pools are not in use.

    `None` when the pools were configured at import, when the user chose
    (`KERAS_META_CPU_THREADS=0`, `TF_NUM_*` variables, explicit pool sizes), or
    when an accelerator is visible. Otherwise (TensorFlow had started before
    keras_meta was imported, or the machine has more than 2 cores) it says
    what the measured gain is and how to get it.
    """
    status = _AT_IMPORT
    reason = status.get("reason", "")
    if status.get("configured") or not (
        reason.startswith("TensorFlow's runtime") or "cores" in reason
    ):
        return None
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == 1:
        return None
    return (
        "keras_meta: TensorFlow's CPU thread pools are its defaults "
        f"({reason}). One thread per kernel and one kernel per core measured "
        "1.1-1.9x faster for conv meta-learning run task by task on 2-core "
        "CPUs (docs/performance.md): call `km.configure_cpu_threads()` right "
        "after the imports, before any TensorFlow work, or set "
        "TF_NUM_INTRAOP_THREADS=1. KERAS_META_CPU_THREADS=0 silences this note."
    )


def use_default_cpu_threads():
    """Gives TensorFlow back its own pool sizes (undoes `configure_cpu_threads`).

    For programs that ask for TensorFlow's defaults explicitly (the command
    line's `--intra_op_threads=0`) after importing keras_meta, which may have
    configured the pools at import. Like `configure_cpu_threads`, it must run
    before TensorFlow's runtime starts.

    Raises:
        RuntimeError: TensorFlow's runtime has already started with other pools.
    """
    current = (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )
    if current == (0, 0):
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(0)
        tf.config.threading.set_inter_op_parallelism_threads(0)
    except RuntimeError as error:
        raise RuntimeError(
            "TensorFlow's default thread pools can only be restored before its "
            f"runtime starts; TensorFlow said: {error}. Set "
            f"{OPT_OUT_VARIABLE}=0 in the environment instead."
        ) from error
