"""What Kronecker-factored EWC costs: factors, the training step, and memory.

Measured side by side in one run; each ratio is the median over `--repeats` rounds of the
ratio within a round (load from other processes drifts over seconds and cancels out):

1. Factors against the exact diagonal Fisher, on the MLP of benchmarks/fisher_speed.py
   (784-1000-1000-10), N examples, batch 128: the per-batch traced functions
   (`keras_ewc.fisher.kronecker.build_factor_sums`, the factors as summed a batch, against
   `keras_ewc.fisher.engine.build_sum_squared_grads`) and the functions users call
   (`kronecker_factors` against `fisher_diagonal`, fresh calls after a first one).
2. The `fit` step on MLP 784-400-400-10 (batch 128, Adam) with the Kronecker penalty
   against plain Keras: online (one pair a layer) and separate with 1 and 5 tasks
   consolidated; the diagonal EWCModel for reference.
3. State size a task (floats, MiB) of that MLP.

Run: `PYTHONPATH=. python benchmarks/kronecker_speed.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

import keras_ewc
from keras_ewc.fisher import engine, likelihoods
from keras_ewc.fisher import kronecker as kfac


def _mlp(widths, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    for w in widths[1:-1]:
        layers.append(keras.layers.Dense(w, activation="relu"))
    layers.append(keras.layers.Dense(widths[-1]))
    return keras.Sequential(layers)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    for t in tf.nest.flatten(out):
        np.asarray(t)
    return time.perf_counter() - start


def factors(n, batch_size, repeats, estimators):
    model = _mlp((784, 1000, 1000, 10))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 784)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    noise = rng.uniform(size=(n, 1, 10)).astype("float32")
    lik = likelihoods.Categorical(from_logits=True)
    variables = model.trainable_variables
    layers = kfac.factored_layers(model)
    extras = {"exact": None, "sampled": noise, "empirical": y}

    def batches(extra, weighted=False):
        out = []
        for s in range(0, n, batch_size):
            xb = tf.constant(x[s:s + batch_size])
            eb = None if extra is None else tf.constant(extra[s:s + batch_size])
            if weighted:  # the factors' contract: (weights,) or (weights, target)
                w = tf.ones([xb.shape[0]])
                eb = (w,) if eb is None else (w, eb)
            out.append((xb, eb))
        return out

    rows = []
    for e in estimators:
        def terms(outputs, extra, e=e):
            return lik.terms(e, outputs, extra)

        diag_fn = engine.build_sum_squared_grads(model, variables, terms)
        kron_fn = kfac.build_factor_sums(model, layers, terms)
        data = batches(extras[e])
        kron_data = batches(extras[e], weighted=True)
        labelled = (x, y)

        def run_diag(data=data, fn=diag_fn):
            return [fn(*b) for b in data]

        def run_kron(data=kron_data, fn=kron_fn):
            return [fn(*b) for b in data]

        def user_diag(e=e, data=labelled):
            return keras_ewc.fisher_diagonal(model, data, e, "categorical",
                                             batch_size=batch_size, seed=0, verbose=0)

        def user_kron(e=e, data=labelled):
            return list(keras_ewc.kronecker_factors(model, data, e, "categorical",
                                                    batch_size=batch_size, seed=0,
                                                    verbose=0).values())

        for f in (run_diag, run_kron, user_diag, user_kron):
            f()  # warm-up: traces
        kernel, user, t_diag, t_kron = [], [], [], []
        for _ in range(repeats):
            d, k = _timed(run_diag), _timed(run_kron)
            kernel.append(k / d)
            t_diag.append(d)
            t_kron.append(k)
            d, k = _timed(user_diag), _timed(user_kron)
            user.append(k / d)
        rows.append((e, min(t_diag), min(t_kron), float(np.median(kernel)),
                     float(np.median(user))))
    return rows


def fit_steps(steps, repeats, separate_tasks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 784)).astype("float32")
    y = rng.integers(0, 10, 2048).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(128)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make(kind):
        net = _mlp((784, 400, 400, 10))
        if kind == "plain":
            model = net
        elif kind == "diagonal (1 task)":
            model = keras_ewc.EWCModel(net, strength=10.0)
        elif kind == "kronecker online":
            model = keras_ewc.EWCModel(net, strength=10.0, structure="kronecker",
                                       mode="online")
        else:
            model = keras_ewc.EWCModel(net, strength=10.0, structure="kronecker",
                                       max_tasks=max(separate_tasks))
        model.compile(keras.optimizers.Adam(1e-3), loss)
        return model

    kinds = ["plain", "diagonal (1 task)", "kronecker online"] + [
        f"kronecker separate, {t} tasks" for t in separate_tasks]
    models = {k: make(k) for k in kinds}
    for kind, model in models.items():
        if kind != "plain":
            count = int(kind.split(", ")[1].split()[0]) if "separate" in kind else 1
            for t in range(count):
                model.consolidate((x[:256] + t, y[:256]), verbose=0)
        model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0)  # traces
    ratios = {k: [] for k in kinds}
    best = {k: float("inf") for k in kinds}
    for _ in range(repeats):
        times = {}
        for kind, model in models.items():
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
            times[kind] = (time.perf_counter() - start) / steps
            best[kind] = min(best[kind], times[kind])
        for kind in kinds:
            ratios[kind].append(times[kind] / times["plain"])
    return [(k, best[k], float(np.median(ratios[k]))) for k in kinds], models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--estimators", default="exact,sampled,empirical")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.repeats, args.steps = 256, 1, 5
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}")
    print(f"\n1. Factors vs exact-diagonal Fisher, MLP 784-1000-1000-10, N={args.examples}, "
          f"batch {args.batch_size}")
    print("| estimator | diagonal (s) | Kronecker factors (s) | ratio, traced per batch "
          "| ratio, as users call them |")
    print("|---|---|---|---|---|")
    for e, d, k, kernel, user in factors(args.examples, args.batch_size, args.repeats,
                                         args.estimators.split(",")):
        print(f"| {e} | {d:.3f} | {k:.3f} | {kernel:.2f} | {user:.2f} |", flush=True)
    rows, models = fit_steps(args.steps, args.repeats, (1, 5))
    print("\n2. fit step, MLP 784-400-400-10, batch 128, Adam")
    print("| model | ms a step (best) | × plain Keras (median) |")
    print("|---|---|---|")
    for kind, t, ratio in rows:
        print(f"| {kind} | {1000 * t:.2f} | {ratio:.2f} |", flush=True)
    size = models["kronecker online"].regularizer.state_size()
    weights = sum(int(np.prod(v.shape)) for v in models["plain"].trainable_variables)
    print("\n3. State, MLP 784-400-400-10 "
          f"({weights} weights; diagonal EWC keeps 2 floats a weight, {2 * weights} in all)")
    print(f"Kronecker: {size['per_task']} floats a task slot "
          f"({size['per_task'] * 4 / 2**20:.1f} MiB; factors and anchor), "
          f"{size['diagonal']} diagonal; online keeps one slot, separate `max_tasks`.")


if __name__ == "__main__":
    main()
