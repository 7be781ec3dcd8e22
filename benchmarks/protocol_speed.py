"""How much longer does a continual run take with EWC than plain fine-tuning?

The protocol: 5 permuted Fashion-MNIST tasks (Domain-IL), 1 epoch each, MLP
784-400-400-10, Adam, batch 128; with EWC, `consolidate` computes the Fisher over all
of the task's training examples after each task. Each round runs plain fine-tuning and
EWC with each estimator back to back (in an order that rotates from round to round),
from the same initial weights and data order; a
ratio is taken within a round (the load of other processes drifts over seconds) and the
median over rounds is reported, with the wall times of the best round split into the
`fit` part and the `consolidate` part; the ratio of the process's CPU time, which other
processes disturb less, is printed beside it.

A last row is a floor, not EWC: plain fine-tuning plus one batched gradient pass over the
task's training examples after each task, in the batches of 2,048 that `consolidate`
re-cuts the data into. Every per-example Fisher estimator needs at least that work (the
forward pass, the backward pass and one product a layer the size of the weight
gradient's), so no EWC run of this protocol on this machine can be faster than that row.

Run: `PYTHONPATH=. python benchmarks/protocol_speed.py` (the bundled subset of
Fashion-MNIST), or `--data /path/to/fashion-mnist` (a directory of the four IDX files)
for the full 60,000 training examples; with `KERAS_BACKEND=jax` the same on JAX (the
floor's gradient pass then a jitted `jax.grad`).
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

import keras_ewc
from keras_ewc.continual import mlp, permuted_sequence

ESTIMATORS = ("empirical", "sampled", "exact")
FLOOR = "floor"


_JAX_STEPS = {}


def gradient_pass(model, dataset):
    """One batched gradient pass over `dataset` (re-cut like the Fisher's batches):
    returns the summed gradients of the loss, a list of tensors."""
    from keras_ewc.fisher.diagonal import AUTO_BATCH_SIZE

    dataset = dataset.rebatch(AUTO_BATCH_SIZE).prefetch(1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if keras.backend.backend() == "jax":
        import jax

        fixed = [v.value for v in model.non_trainable_variables]
        jax_step = _JAX_STEPS.get(id(model))  # compiled once a model, as the Fisher's step
        if jax_step is None:
            @jax.jit
            def jax_step(values, fixed, x, y):
                def loss(values):
                    out, _ = model.stateless_call(values, fixed, x, training=False)
                    return loss_fn(y, out)
                return jax.grad(loss)(values)

            _JAX_STEPS.clear()
            _JAX_STEPS[id(model)] = jax_step
        values = [v.value for v in model.trainable_variables]
        total = None
        for x, y in dataset.as_numpy_iterator():
            grads = jax_step(values, fixed, x, y)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        return total

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return tape.gradient(loss, model.trainable_variables)

    step = tf.function(step).get_concrete_function(*dataset.element_spec)
    total = None
    for x, y in dataset:
        grads = step(x, y)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return total


def run_once(sequence, estimator, batch_size, seed):
    """Trains on every task of `sequence`; returns (fit seconds, consolidate seconds,
    the process's CPU seconds for the whole run)."""
    keras.utils.set_random_seed(seed)
    net = mlp(sequence.input_shape, sequence.num_outputs, hidden=(400, 400), seed=seed)
    ewc = estimator not in (None, FLOOR)
    model = keras_ewc.EWCModel(net, strength=100.0) if ewc else net
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit_time = fisher_time = 0.0
    start_cpu = time.process_time()
    for task in sequence:
        data = task.dataset("train", batch_size, seed=seed + task.index)
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0, shuffle=False)  # the dataset shuffles
        fit_time += time.perf_counter() - start
        if estimator is not None:
            start = time.perf_counter()
            data = task.dataset("train", batch_size, shuffle=False)
            if ewc:
                fisher = model.consolidate(data, estimator=estimator, verbose=0)
            else:
                fisher = gradient_pass(model, data)
            np.asarray(fisher[0])  # waits for the result (JAX dispatches asynchronously)
            fisher_time += time.perf_counter() - start
    return fit_time, fisher_time, time.process_time() - start_cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="a directory of Fashion-MNIST IDX files (default: the "
                             "bundled subset)")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="leave out the floor row (plain + one gradient pass a task)")
    args = parser.parse_args()
    estimators = [e for e in args.estimators.split(",") if e] + [FLOOR] * args.floor
    sequence = permuted_sequence(args.data, num_tasks=args.tasks, scenario="domain",
                                 seed=args.seed)
    examples = len(sequence[0].y_train)
    print(f"{args.tasks} permuted tasks × 1 epoch, {examples} training examples a task, "
          f"batch {args.batch_size}, MLP 784-400-400-10, Adam; backend "
          f"{keras.backend.backend()}, tensorflow {tf.__version__}, keras {keras.__version__}")
    # One untimed run of each first: traces and warms the data pipeline.
    for estimator in [None] + estimators:
        run_once(sequence, estimator, args.batch_size, args.seed)
    ratios = {e: [] for e in estimators}
    cpu_ratios = {e: [] for e in estimators}
    best = {}
    runs = [None] + estimators
    for r in range(args.repeats):
        # A rotating order: no run always follows the same one.
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        times = {e: run_once(sequence, e, args.batch_size, args.seed) for e in order}
        plain = sum(times[None][:2])
        for e in estimators:
            ratios[e].append(sum(times[e][:2]) / plain)
            cpu_ratios[e].append(times[e][2] / times[None][2])
        for key, value in times.items():
            if key not in best or sum(value[:2]) < sum(best[key][:2]):
                best[key] = value
    print("| run | wall time (s) | fit (s) | consolidate (s) | × plain fine-tuning, wall "
          "| × plain, CPU time |")
    print("|---|---|---|---|---|---|")
    print(f"| plain fine-tuning | {sum(best[None][:2]):.1f} | {best[None][0]:.1f} | | 1.00 "
          "| 1.00 |")
    for e in estimators:
        fit, fisher, _ = best[e]
        label = "plain + a gradient pass a task (floor)" if e == FLOOR else f"EWC, {e}"
        print(f"| {label} | {fit + fisher:.1f} | {fit:.1f} | {fisher:.1f} "
              f"| {float(np.median(ratios[e])):.2f} | {float(np.median(cpu_ratios[e])):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
