"""The Fisher on JAX against one batched gradient pass, side by side in one process.

Run: `KERAS_BACKEND=jax python benchmarks/jax_fisher_speed.py [--examples N]`. Prints, for
the paper MLP (784-1000-1000-10), the wall and CPU time of `fisher_diagonal` (empirical,
sampled, exact; as a user calls it, on arrays) over the time of one jitted batched
gradient of the mean loss over the same examples (what one training pass costs), medians
of `--repeats` calls after a first (compiling) one.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ewc  # noqa: E402


def timed(fn, repeats):
    fn()  # compile
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"
    net = keras.Sequential([keras.Input((784,)), keras.layers.Dense(1000, activation="relu"),
                            keras.layers.Dense(1000, activation="relu"), keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 784)).astype("float32")
    y = rng.integers(0, 10, args.examples)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fixed = [v.value for v in net.non_trainable_variables]

    @jax.jit
    def grad(values, x, y):
        def loss(values):
            out, _ = net.stateless_call(values, fixed, x, training=False)
            return loss_fn(y, out)
        return jax.grad(loss)(values)

    values = [v.value for v in net.trainable_variables]
    base = timed(lambda: jax.block_until_ready(grad(values, x, y)), args.repeats)
    print(f"MLP 784-1000-1000-10, {args.examples} examples, jax {jax.__version__}, "
          f"keras {keras.__version__}, load {os.getloadavg()[0]:.1f}")
    print(f"gradient pass: {base[0] * 1e3:.1f} ms wall, {base[1] * 1e3:.1f} ms CPU")
    for estimator in ("empirical", "sampled", "exact"):
        data = (x, y) if estimator == "empirical" else x

        def run(estimator=estimator, data=data):
            f = keras_ewc.fisher_diagonal(net, data, estimator=estimator,
                                          likelihood="categorical", verbose=0, seed=1)
            jax.block_until_ready(f)

        wall, cpu = timed(run, args.repeats)
        print(f"{estimator:9s}: {wall / base[0]:.2f}x wall, {cpu / base[1]:.2f}x CPU "
              f"({wall * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
