"""Where a keras_meta meta-step spends its time: TensorFlow op self-times per bench.

Builds a bench of `benchmarks/run.py` (the peers' specs, weights and data),
runs a few warm-up steps, records `--profile_steps` meta-steps with the
TensorFlow profiler, and prints the op types by total self-time (host CPU), with
their share of the profiled time, their count per meta-step and the mean time of
one op. The last line sums the time by kind (convolutions and their gradients,
matmuls, elementwise and reductions, data movement, control flow), so a user can
see whether a step is arithmetic or per-kernel overhead.

    python benchmarks/profile.py --bench=B5 --intra_op_threads=1
    python benchmarks/profile.py --bench=B3 --top=25 --trace_dir=/tmp/km_trace

The raw trace stays in `--trace_dir` (TensorBoard's profile plugin opens it).
"""

import glob
import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the benches' setup and its flags)

flags.DEFINE_integer("profile_steps", 3, "Meta-steps recorded by the profiler.")
flags.DEFINE_integer("top", 20, "Op types listed.")
flags.DEFINE_string("trace_dir", None, "Where the trace goes (default: a temporary folder).")
FLAGS = flags.FLAGS

KINDS = {
    "convolution": ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "_FusedConv2D",
                    "DepthwiseConv2dNative"),
    "matmul": ("MatMul", "_MklMatMul", "BatchMatMulV2", "BatchMatMulV3", "_FusedMatMul"),
    "control flow and copies": ("While", "StatelessWhile", "TensorListPushBack",
                                "TensorListPopBack", "TensorListStack", "TensorListFromTensor",
                                "TensorListGetItem", "TensorListSetItem", "TensorListReserve",
                                "Identity", "IdentityN", "Enter", "Exit", "NextIteration",
                                "Merge", "Switch", "LoopCond", "PartitionedCall",
                                "StatefulPartitionedCall", "_Send", "_Recv"),
    "data movement": ("Reshape", "Transpose", "ConcatV2", "Pack", "Unpack", "StridedSlice",
                      "StridedSliceGrad", "Slice", "Pad", "Tile", "BroadcastTo", "GatherV2",
                      "Cast", "Fill", "ZerosLike", "OnesLike", "Shape", "ShapeN"),
}


def kind_of(op_type):
    for kind, types in KINDS.items():
        if op_type in types:
            return kind
    return "elementwise, reductions and the rest"


def op_stats(trace_dir):
    """Rows `{type, self_us, count}` from the profiler's framework op stats."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"no profiler trace (*.xplane.pb) under {trace_dir}")
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(
        [max(paths, key=os.path.getmtime)], "framework_op_stats", {})
    if not ok:
        raise RuntimeError("the profiler could not convert the trace")
    rows = {}
    for table in json.loads(data):  # Google visualisation tables
        columns = [c["id"] for c in table["cols"]]
        for row in table.get("rows", []):
            values = dict(zip(columns, (c.get("v") if c else None for c in row["c"])))
            if values.get("host_or_device") != "Host" or values.get("type") in (None, "IDLE"):
                continue
            entry = rows.setdefault(values["type"], {"type": values["type"], "self_us": 0.0, "count": 0})
            entry["self_us"] += float(values["total_self_time"] or 0)
            entry["count"] += int(values["occurrences"] or 0)
    return sorted(rows.values(), key=lambda r: -r["self_us"])


def main(argv):
    del argv
    import tensorflow as tf

    threads = int(FLAGS.intra_op_threads[0])
    spec, learner, iterator = run.build(FLAGS.bench.split(",")[0], threads)
    for _ in range(max(FLAGS.warmup, 2)):
        float(learner.train_function(iterator)["loss"])
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="km_profile_")
    tf.profiler.experimental.start(trace_dir)
    start = time.perf_counter()
    for _ in range(FLAGS.profile_steps):
        float(learner.train_function(iterator)["loss"])
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    rows = op_stats(trace_dir)
    total = sum(r["self_us"] for r in rows)
    steps = FLAGS.profile_steps
    print(f"{spec.bench} ({spec.algo}, {learner.resolved_task_execution}"
          f"{', one thread per kernel' if threads == 1 else ''}): {steps} meta-steps in "
          f"{wall:.2f} s wall; op self-time {total / 1e6 / steps:.2f} s per step summed over "
          f"threads (trace: {trace_dir})")
    print("| op type | share | s per step | ops per step | µs per op |\n|---|---|---|---|---|")
    for r in rows[: FLAGS.top]:
        print(f"| {r['type']} | {100 * r['self_us'] / total:.1f}% | {r['self_us'] / 1e6 / steps:.3f} | "
              f"{r['count'] / steps:.0f} | {r['self_us'] / max(r['count'], 1):.1f} |")
    kinds = {}
    for r in rows:
        k = kinds.setdefault(kind_of(r["type"]), [0.0, 0])
        k[0] += r["self_us"]
        k[1] += r["count"]
    print("\nby kind: " + "; ".join(
        f"{k} {100 * v[0] / total:.0f}% ({v[1] / steps:.0f} ops/step, {v[0] / max(v[1], 1):.0f} µs/op)"
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])))
    print(json.dumps({"bench": spec.bench, "threads": threads, "wall_s_per_step": wall / steps,
                      "ops_per_step": sum(r["count"] for r in rows) / steps,
                      "by_kind": {k: v[0] / total for k, v in kinds.items()}}))


if __name__ == "__main__":
    app.run(main)
