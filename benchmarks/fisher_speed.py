"""How fast is the Fisher engine? Times as multiples of one batched gradient pass.

For each model, on the same N examples and batch size, measured side by side in one run
(these machines are noisy: each ratio is the median over `--repeats` rounds of the
ratio within a round; times are the best round):

- `grad`: one batched gradient of the mean loss, the unit;
- `exact`, `sampled`, `empirical`: the engine's sums of squared per-example gradients
  (`keras_ewc.fisher.engine.build_sum_squared_grads`), fast path, on prepared batches
  (the raw kernel);
- the same estimators through `keras_ewc.fisher_diagonal` as a user calls it (wall-clock
  ratio, and in parentheses the ratio of the process's CPU time, which the load of other
  processes disturbs less): defaults,
  a `tf.data.Dataset` of (x, y) with its own batches, a fresh call after a first one
  (so the cached trace is reused), against one batched gradient pass over the same
  dataset; once with batches of `--batch-size` and once with `--ragged-batch-size`,
  whose last batch is ragged; `fisher_diagonal` re-cuts the data into batches of up to
  2,048 examples (its default), so the last of these columns divides by a gradient pass
  over those same larger batches instead;
- per-example loops for the same estimator, timed on a few examples and scaled to N:
  `compiled` (a `tf.function` of one example, called N times: the strongest loop) and
  `eager` (one `GradientTape` an example and a term, as most EWC code does).

Run: `PYTHONPATH=. python benchmarks/fisher_speed.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import fisher_diagonal
from keras_ewc.fisher import diagonal, engine, likelihoods

ESTIMATORS = ("exact", "sampled", "empirical")


def mlp():
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(1000, activation="relu"),
        keras.layers.Dense(1000, activation="relu"),
        keras.layers.Dense(10),
    ]), lambda rng, n: rng.normal(size=(n, 784)).astype("float32"), 10


def cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]), lambda rng, n: rng.normal(size=(n, 28, 28, 1)).astype("float32"), 10


def cnn_pooled():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]), lambda rng, n: rng.normal(size=(n, 28, 28, 1)).astype("float32"), 10


def text():
    return keras.Sequential([
        keras.Input((100,), dtype="int32"),
        keras.layers.Embedding(10000, 64),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(4),
    ]), lambda rng, n: rng.integers(0, 10000, size=(n, 100)).astype("int32"), 4


MODELS = {
    "MLP 784-1000-1000-10": mlp,
    "CNN conv32-conv64/2-dense": cnn,
    "Embedding(10k, 64) + Dense": text,
    "CNN with max-pooling": cnn_pooled,
}


def best_time(fn, batches, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for batch in batches:
            out = fn(*batch)
        for t in tf.nest.flatten(out):
            getattr(t, "values", t).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def _terms_fn(lik, estimator):
    return lambda outputs, extra: lik.terms(estimator, outputs, extra)


def run(name, build, n, batch_size, repeats, loop_examples, eager_examples,
        ragged_batch_size):
    keras.utils.set_random_seed(0)
    model, make_x, classes = build()
    rng = np.random.default_rng(0)
    x = make_x(rng, n)
    y = rng.integers(0, classes, size=n).astype("int32")
    noise = rng.uniform(size=(n, 1, classes)).astype("float32")
    variables = model.trainable_variables
    lik = likelihoods.Categorical(from_logits=True)

    @tf.function
    def grad(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(lik.nll(model(xb, training=False), yb))
        return tape.gradient(loss, variables)

    def batches(extra):
        out = []
        for s in range(0, n, batch_size):
            xb = tf.constant(x[s:s + batch_size])
            out.append((xb, None if extra is None else tf.constant(extra[s:s + batch_size])))
        return out

    extras = {"exact": None, "sampled": noise, "empirical": y}
    fns = {e: engine.build_sum_squared_grads(model, variables, _terms_fn(lik, e))
           for e in ESTIMATORS}
    loops = {e: _loop_fn(model, variables, _terms_fn(lik, e)) for e in ESTIMATORS}
    grad_batches = batches(y)
    times = {e: [] for e in ESTIMATORS}
    for _ in range(2):  # warm-up: traces
        grad(*grad_batches[0])
        for e in ESTIMATORS:
            fns[e](*batches(extras[e])[0])
    # Each round times the unit and every estimator back to back; a ratio is taken
    # within a round and the median over rounds is reported, so that load from other
    # processes, which drifts over seconds, cancels out of the ratios.
    units, ratios = [], {e: [] for e in ESTIMATORS}
    for _ in range(repeats):
        unit = best_time(grad, grad_batches, 1)
        units.append(unit)
        for e in ESTIMATORS:
            t = best_time(fns[e], batches(extras[e]), 1)
            times[e].append(t)
            ratios[e].append(t / unit)
    unit = min(units)
    user = {}
    for size in (batch_size, ragged_batch_size):
        user[size] = user_call_ratios(model, lik, x, y, size, repeats)
    rows = []
    for e in ESTIMATORS:
        extra = extras[e]
        singles = [
            (tf.constant(x[i:i + 1]), None if extra is None else tf.constant(extra[i:i + 1]))
            for i in range(loop_examples)
        ]
        loops[e](*singles[0])
        loop = best_time(loops[e], singles, 1) * n / loop_examples
        eager = best_time(loops[e].python_function, singles[:eager_examples], 1)
        eager *= n / eager_examples
        fast = min(times[e])
        rows.append((name, e, fast, float(np.median(ratios[e])),
                     user[batch_size][e], user[ragged_batch_size][e],
                     loop / fast, eager / fast))
    return unit, rows


def user_call_ratios(model, lik, x, y, batch_size, repeats):
    """`fisher_diagonal` as a user calls it, as a multiple of one batched gradient pass
    over the same `tf.data.Dataset` (median over rounds of the ratio within a round)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def grad(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(lik.nll(model(xb, training=False), yb))
        return tape.gradient(loss, variables)

    def unit():
        out = None
        for xb, yb in dataset:
            out = grad(xb, yb)
        return out

    # The Fisher re-cuts the data into batches of up to 2,048 (fisher_diagonal's
    # default): a gradient pass in those batches is the stricter unit.
    recut = dataset.rebatch(diagonal.AUTO_BATCH_SIZE)

    def recut_unit():
        out = None
        for xb, yb in recut:
            out = grad(xb, yb)
        return out

    def call(estimator):
        return lambda: fisher_diagonal(model, dataset, estimator=estimator,
                                       likelihood="categorical", verbose=0)

    fns = {"unit": unit, "recut": recut_unit, **{e: call(e) for e in ESTIMATORS}}
    for fn in fns.values():  # a first call: traces (and is not timed)
        fn()
    ratios = {e: [] for e in ESTIMATORS}
    cpu_ratios = {e: [] for e in ESTIMATORS}
    recut_ratios = {e: [] for e in ESTIMATORS}
    for _ in range(repeats):
        times, cpu = {}, {}
        for key, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for t in tf.nest.flatten(fn()):
                t.numpy()
            times[key] = time.perf_counter() - start
            cpu[key] = time.process_time() - start_cpu
        for e in ESTIMATORS:
            ratios[e].append(times[e] / times["unit"])
            cpu_ratios[e].append(cpu[e] / cpu["unit"])
            recut_ratios[e].append(times[e] / times["recut"])
    return {e: (float(np.median(ratios[e])), float(np.median(cpu_ratios[e])),
                float(np.median(recut_ratios[e])))
            for e in ESTIMATORS}


def _loop_fn(model, variables, terms_fn):
    @tf.function
    def one(xi, ei):
        with tf.GradientTape(persistent=True) as tape:
            terms = tf.reshape(terms_fn(model(xi, training=False), ei), [-1])
            parts = [terms[t] for t in range(int(terms.shape[0]))]
        acc = [tf.zeros(v.shape) for v in variables]
        for part in parts:
            grads = tape.gradient(part, variables)
            acc = [a + tf.square(g) for a, g in zip(acc, grads)]
        return acc

    return one


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ragged-batch-size", type=int, default=96,
                        help="batch size of the second user-call dataset (ragged last batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-examples", type=int, default=128)
    parser.add_argument("--eager-examples", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="0,1,2",
                        help="indices into " + ", ".join(f"{i}: {k}" for i, k in enumerate(MODELS)))
    args = parser.parse_args()
    if args.quick:
        args.examples, args.repeats, args.loop_examples, args.eager_examples = 256, 1, 16, 4
    chosen = [list(MODELS.items())[int(i)] for i in args.models.split(",")]
    print(f"N={args.examples} examples, batch size {args.batch_size}, "
          f"tensorflow {tf.__version__}, keras {keras.__version__}")
    print(f"| model | estimator | kernel time (s) | kernel × batched gradient "
          f"| fisher_diagonal × batched gradient, batches of {args.batch_size} "
          f"| same, batches of {args.ragged_batch_size} (ragged last) "
          f"| same (batches of {args.batch_size}) × gradient in the Fisher's batches "
          "| kernel speed-up vs compiled loop | vs eager loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, build in chosen:
        unit, rows = run(name, build, args.examples, args.batch_size, args.repeats,
                         args.loop_examples, args.eager_examples, args.ragged_batch_size)
        print(f"| {name} | batched gradient | {unit:.3f} | 1.00 | 1.00 | 1.00 | 1.00 | | |")
        for model_name, e, t, ratio, user, ragged, compiled, eager in rows:
            print(f"| {model_name} | {e} | {t:.3f} | {ratio:.2f} "
                  f"| {user[0]:.2f} ({user[1]:.2f}) | {ragged[0]:.2f} ({ragged[1]:.2f}) "
                  f"| {user[2]:.2f} | {compiled:.0f}× | {eager:.0f}× |", flush=True)


if __name__ == "__main__":
    main()
