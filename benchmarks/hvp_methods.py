"""Times the Hessian-vector product methods of `keras_meta.linalg`.

On `km.models.conv4(5)` (Omniglot's strided conv4 with BatchNorm), the support
loss of 5-way 1-shot tasks (5 images each) at the meta-parameters, in a
`tf.function`: one product, and a conjugate-gradient solve of
`(I + H / 2) v = g` with 5 iterations (iMAML's meta-gradient), for one task
or for a meta-batch of tasks under `tf.vectorized_map` (as `km.IMAML` runs
them). The methods are timed interleaved in one process, so that other load
on the machine hits them alike; prints medians and ratios.

    python benchmarks/hvp_methods.py [--repeats 30] [--tasks 4] [--jit]
"""

import argparse
import statistics
import time

import keras_meta as km

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_meta import inner_loop, linalg  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=1, help="tasks, vectorized if > 1")
    parser.add_argument("--cg-iterations", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="compile with XLA")
    args = parser.parse_args()

    model = km.models.conv4(5, seed=0)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(1)
    xs = tf.constant((rng.random((args.tasks, 5, 28, 28, 1)) < 0.2).astype("float32"))
    ys = tf.constant(np.tile(np.arange(5, dtype="int32"), (args.tasks, 1)))
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    vector = [tf.constant(rng.normal(size=p.shape).astype("float32")) for p in params]

    def task_fn(compute, method):
        def fn(task):
            x, y = task

            def loss_fn(p):
                y_pred, _, _ = inner_loop.forward(model, p, non_trainable, x, True)
                return loss_object(y, y_pred)

            hvp = linalg.hessian_vector_product_fn(loss_fn, params, method=method)
            if compute == "product":
                return hvp(vector)
            return linalg.conjugate_gradient(
                lambda v: [a + b / 2.0 for a, b in zip(v, hvp(v))],
                vector,
                args.cg_iterations,
                tolerance=0.0,
                early_exit=False,
            ).solution

        return fn

    def run(compute, method):
        fn = task_fn(compute, method)
        if args.tasks == 1:
            return fn((xs[0], ys[0]))
        return tf.vectorized_map(fn, (xs, ys))

    methods = linalg.HVP_METHODS
    computations = ("product", "cg")
    labels = {"product": "one product", "cg": f"CG, {args.cg_iterations} iterations"}
    results = {}
    for compute in computations:
        compiled, first, times, outputs = {}, {}, {}, {}
        for method in methods:
            compiled[method] = tf.function(
                lambda m=method, c=compute: run(c, m), jit_compile=args.jit
            )
            t0 = time.perf_counter()
            try:
                compiled[method]()
            except Exception as error:  # noqa: BLE001 - reported in the table
                compiled[method] = None
                first[method] = f"fails: {type(error).__name__}"
                continue
            first[method] = time.perf_counter() - t0
            times[method] = []
        for _ in range(args.repeats):
            for method in methods:
                if compiled[method] is None:
                    continue
                t0 = time.perf_counter()
                outputs[method] = [o.numpy() for o in compiled[method]()]
                times[method].append(time.perf_counter() - t0)
        reference = outputs.get(methods[0])
        for method in methods:
            if compiled[method] is None:
                results[(compute, method)] = (None, first[method], None)
                continue
            difference = None
            if reference is not None:
                num = np.sqrt(sum(np.sum((u - v) ** 2) for u, v in zip(outputs[method], reference)))
                den = np.sqrt(sum(np.sum(u**2) for u in reference))
                difference = num / den
            results[(compute, method)] = (statistics.median(times[method]), first[method], difference)

    print(
        f"\nconv4(5), {args.tasks} task(s) of 5 support images, float32, "
        f"jit_compile={args.jit}, median of {args.repeats} (interleaved)"
    )
    print(f"| computation | method | median ms | first call s | ratio to {methods[0]} | rel. diff. to {methods[0]} |")
    print("|---|---|---|---|---|---|")
    for (compute, method), (median, first, difference) in results.items():
        if median is None:
            print(f"| {labels[compute]} | {method} | – | {first} | – | – |")
            continue
        base = results[(compute, methods[0])][0]
        ratio = f"{median / base:.2f}" if base else "–"
        diff = "–" if difference is None else f"{difference:.1e}"
        print(f"| {labels[compute]} | {method} | {1e3 * median:.1f} | {first:.1f} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
