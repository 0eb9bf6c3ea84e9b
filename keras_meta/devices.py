"""What `"auto"` means on each kind of device: CPU, GPU or TPU.

The learners' `task_execution="auto"` and `compile(jit_compile="auto")` choose
by the kind of device the meta-step runs on. The functions here are the rules,
pure functions of what they are given, so that they can be tested, printed and
replaced by measurements:

- On a **CPU** they are measured (docs/performance.md, 2-core Intel Xeon and
  AMD EPYC machines): task by task (`tf.map_fn`) for networks with
  convolutions, whose per-task filter gradients TensorFlow's vectorizer cannot
  batch, vectorized otherwise; XLA for networks without convolutions (a
  meta-step of hundreds of small ops that XLA fuses), not for conv nets
  (XLA:CPU is slow for convolutions inside loops) nor under a `tf.distribute`
  strategy.
- On a **GPU** or a **TPU** they are **not measured yet**: they follow
  published practice for accelerators, tasks batched into single kernels
  (`jax.vmap` over tasks in the JAX MAML implementations) and XLA (Keras' own
  rule on accelerators), except under a `tf.distribute` strategy, where Keras
  turns XLA off. `benchmarks/device_check.py` measures every combination on
  the device; `measured_rules` reads its output and `auto_task_execution` /
  `auto_jit_compile` take the result as `rules=` (docs/gpu.md).
"""

import json

DEVICE_KINDS = ("cpu", "gpu", "tpu")
TASK_EXECUTIONS = ("vectorized", "sequential")
# Which benches of the device check stand for which kind of network.
DENSE_BENCHES = ("B1",)
CONV_BENCHES = ("B2", "B3", "B4", "B5")

# The rules without measurements on the device: {kind: {family: choice}}, the
# family being "conv" (the network has convolution layers) or "dense".
DEFAULT_RULES = {
    "cpu": {
        "conv": {"task_execution": "sequential", "jit_compile": False, "measured": True},
        "dense": {"task_execution": "vectorized", "jit_compile": True, "measured": True},
    },
    "gpu": {
        "conv": {"task_execution": "vectorized", "jit_compile": True, "measured": False},
        "dense": {"task_execution": "vectorized", "jit_compile": True, "measured": False},
    },
    "tpu": {
        "conv": {"task_execution": "vectorized", "jit_compile": True, "measured": False},
        "dense": {"task_execution": "vectorized", "jit_compile": True, "measured": False},
    },
}


def device_kind(physical_devices=None):
    """The kind of device TensorFlow's steps run on: `"tpu"`, `"gpu"` or `"cpu"`.

    A TPU wins over a GPU, a GPU over the CPU, as TensorFlow's placer does.
    Listing physical devices does not start TensorFlow's runtime (thread pools
    and GPU memory settings can still be changed afterwards).

    Args:
        physical_devices: a list of `tf.config.PhysicalDevice` (or of objects
            with a `device_type`); default: `tf.config.list_physical_devices()`.

    Returns:
        One of `DEVICE_KINDS`.

    Example:

    >>> device_kind([])
    'cpu'
    """
    if physical_devices is None:
        import tensorflow as tf

        physical_devices = tf.config.list_physical_devices()
    types = {getattr(device, "device_type", "").upper() for device in physical_devices}
    if "TPU" in types:
        return "tpu"
    if "GPU" in types:
        return "gpu"
    return "cpu"


def _check_kind(kind):
    if kind not in DEVICE_KINDS:
        raise ValueError(
            f"`device_kind` must be one of {DEVICE_KINDS}. Received: device_kind={kind!r}"
        )
    return kind


def _rule(has_convolutions, kind, rules):
    kind = _check_kind(kind)
    family = "conv" if has_convolutions else "dense"
    measured = (rules or {}).get(kind, {}).get(family)
    return measured or DEFAULT_RULES[kind][family]


def auto_task_execution(has_convolutions, device_kind="cpu", rules=None):
    """What `task_execution="auto"` resolves to: `"vectorized"` or `"sequential"`.

    Args:
        has_convolutions: whether the wrapped network has convolution layers.
        device_kind: `"cpu"`, `"gpu"` or `"tpu"` (see `device_kind()`).
        rules: optional measured rules, `{kind: {"conv"|"dense": {...}}}`
            as `measured_rules` returns; kinds and families they lack keep
            `DEFAULT_RULES`.

    Returns:
        `"vectorized"` (`tf.vectorized_map`) or `"sequential"` (`tf.map_fn`).

    Example:

    >>> auto_task_execution(True, "cpu")
    'sequential'
    >>> auto_task_execution(True, "gpu")
    'vectorized'
    """
    return _rule(has_convolutions, device_kind, rules)["task_execution"]


def auto_jit_compile(has_convolutions, device_kind="cpu", distributed=False, rules=None):
    """Whether `compile(jit_compile="auto")` turns XLA on for a learner.

    The learner still checks that its layers support XLA (Keras'
    `model_supports_jit`): this says only what the device prefers.

    Args:
        has_convolutions: whether the wrapped network has convolution layers.
        device_kind: `"cpu"`, `"gpu"` or `"tpu"` (see `device_kind()`).
        distributed: whether a `tf.distribute` strategy runs the steps; then
            XLA stays off, as in Keras.
        rules: optional measured rules (see `auto_task_execution`).

    Returns:
        A bool.

    Example:

    >>> auto_jit_compile(False, "cpu"), auto_jit_compile(True, "cpu")
    (True, False)
    >>> auto_jit_compile(True, "gpu"), auto_jit_compile(True, "gpu", distributed=True)
    (True, False)
    """
    if distributed:
        _check_kind(device_kind)
        return False
    return bool(_rule(has_convolutions, device_kind, rules)["jit_compile"])


def _median_rate(row):
    rate = (row.get("steps_per_s") or {}).get("median")
    return rate if isinstance(rate, (int, float)) and rate > 0 else None


def measured_rules(check, min_benches=1):
    """Rules for one device from a device check's output (`device_check.py --out`).

    For each family of networks (`"dense"`: bench B1; `"conv"`: B2-B5) the
    (task execution, XLA) combination with the highest geometric mean of
    meta-steps/s over the family's benches is chosen (rows of one meta-step
    per train-function call); a combination that failed or ran out of time on
    a bench that another one ran is not chosen. A family with fewer than `min_benches`
    such benches is left out (its default rule stays).

    Args:
        check: the device check's JSON, as a dict or a path to the file.
        min_benches: benches a family needs for a measured rule.

    Returns:
        `{kind: {family: {"task_execution", "jit_compile", "measured": True,
        "benches", "geometric_mean_steps_per_s"}}}` for the check's device
        kind; empty when the check holds no usable benchmark rows.

    Example:

    >>> measured_rules({"environment": {"device_kind": "gpu"}, "benchmarks": {"rows": []}})
    {}
    """
    if isinstance(check, (str, bytes)) or hasattr(check, "__fspath__"):
        with open(check) as f:
            check = json.load(f)
    kind = _check_kind((check.get("environment") or {}).get("device_kind", "cpu"))
    rows = (check.get("benchmarks") or {}).get("rows") or []
    result = {}
    for family, benches in (("dense", DENSE_BENCHES), ("conv", CONV_BENCHES)):
        rates = {}  # (task_execution, jit) -> {bench: rate}
        for row in rows:
            rate = _median_rate(row)
            if row.get("bench") not in benches or rate is None:
                continue
            if row.get("steps_per_execution", 1) != 1:  # another setting, not the rule's
                continue
            key = (row.get("task_execution"), bool(row.get("jit_compile")))
            if key[0] not in TASK_EXECUTIONS:
                continue
            rates.setdefault(key, {})[row["bench"]] = rate
        if not rates:
            continue
        # A combination that failed or ran out of time on a bench loses to
        # those that ran it: compare the complete ones over every bench.
        benches_run = set.union(*(set(r) for r in rates.values()))
        complete = {k: r for k, r in rates.items() if set(r) == benches_run}
        if complete:
            rates, common = complete, benches_run
        else:
            common = set.intersection(*(set(r) for r in rates.values()))
        if len(common) < min_benches:
            continue
        best, best_mean = None, 0.0
        for key, by_bench in sorted(rates.items()):
            product = 1.0
            for bench in common:
                product *= by_bench[bench]
            mean = product ** (1.0 / len(common))
            if mean > best_mean:
                best, best_mean = key, mean
        result.setdefault(kind, {})[family] = {
            "task_execution": best[0],
            "jit_compile": best[1],
            "measured": True,
            "benches": sorted(common),
            "geometric_mean_steps_per_s": best_mean,
        }
    return result


# The measured rules the learners' "auto" choices consult (`use_measured_rules`).
_ACTIVE_RULES = {}


def use_measured_rules(rules):
    """Makes the learners' `"auto"` choices follow measured rules from now on.

    Learners resolve `task_execution="auto"` when they trace their steps and
    `jit_compile="auto"` in `compile()`: call this before building them.

    Args:
        rules: a device check's output (a path or its JSON as a dict: the
            rules are `measured_rules(check)`), a rules dict as
            `measured_rules` returns, or `None` to go back to `DEFAULT_RULES`.

    Returns:
        The rules now in use (`{kind: {family: rule}}`; empty for the defaults).

    Example:

    >>> use_measured_rules({"gpu": {"conv": {"task_execution": "sequential",
    ...                                      "jit_compile": True, "measured": True}}})["gpu"]["conv"]["task_execution"]
    'sequential'
    >>> use_measured_rules(None)
    {}
    """
    global _ACTIVE_RULES
    if rules is None:
        _ACTIVE_RULES = {}
        return {}
    if isinstance(rules, (str, bytes)) or hasattr(rules, "__fspath__") or (
        isinstance(rules, dict) and ("environment" in rules or "benchmarks" in rules)
    ):
        rules = measured_rules(rules)
    if not isinstance(rules, dict):
        raise ValueError(
            "`rules` must be a device check's output (path or dict), the dict "
            f"`measured_rules` returns, or None. Received: {type(rules).__name__}"
        )
    for kind, families in rules.items():
        _check_kind(kind)
        for family, rule in families.items():
            if family not in ("conv", "dense"):
                raise ValueError(f"Rule families are 'conv' and 'dense'. Received: {family!r}")
            if rule.get("task_execution") not in TASK_EXECUTIONS or not isinstance(
                rule.get("jit_compile"), bool
            ):
                raise ValueError(
                    f"The {kind}/{family} rule needs task_execution in {TASK_EXECUTIONS} "
                    f"and a bool jit_compile. Received: {rule!r}"
                )
    _ACTIVE_RULES = {kind: dict(families) for kind, families in rules.items()}
    return active_rules()


def active_rules():
    """The measured rules in use (`use_measured_rules`); `{}` means `DEFAULT_RULES`."""
    return {kind: dict(families) for kind, families in _ACTIVE_RULES.items()}


def resolve(has_convolutions, distributed=False, kind=None):
    """`(task_execution, jit_compile)` that `"auto"` means here, now.

    On this machine's device kind (`device_kind()`, or `kind`), with the
    rules in use (`use_measured_rules`, else `DEFAULT_RULES`).
    """
    kind = device_kind() if kind is None else kind
    return (auto_task_execution(has_convolutions, kind, _ACTIVE_RULES),
            auto_jit_compile(has_convolutions, kind, distributed, _ACTIVE_RULES))
