"""Fisher cost with and without the depthwise/separable/transposed/group-norm kernels.

For each model: `fisher_diagonal` (exact and empirical) as a user calls it, as a multiple
of one batched gradient pass over the same dataset (wall-clock and CPU-time ratios,
medians over rounds of the ratio measured within a round), and the first call (tracing
included). "after" uses the registered kernels; "before" removes the registrations of
this module's kernel layer classes from the registry in the same process, so that those
layers take the per-example reference path, as before the kernels existed.

    PYTHONPATH=. python benchmarks/conv_kernels_speed.py --examples 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import fisher_diagonal
from keras_ewc.fisher import likelihoods
from keras_ewc.fisher.kernels import _registry

L = keras.layers
NEW = (L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D,
       L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose, L.GroupNormalization)
ESTIMATORS = ("empirical", "exact")


def mobilenet():
    return keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=10,
        classifier_activation=None), (64, 64, 3)


def separable_transpose():
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        L.SeparableConv2D(16, 3, strides=2, padding="same", activation="relu"),
        L.DepthwiseConv2D(3, padding="same", activation="relu"),
        L.SeparableConv2D(32, 3, strides=2, padding="same", activation="relu"),
        L.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu"),
        L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu"),
        L.GlobalAveragePooling2D(), L.Dense(10)]), (32, 32, 3)


def conv3d():
    return keras.Sequential([
        keras.Input((16, 16, 16, 1)), L.Conv3D(8, 3, activation="relu"),
        L.Conv3D(16, 3, strides=2, activation="relu"), L.GlobalAveragePooling3D(),
        L.Dense(10)]), (16, 16, 16, 1)


def group_norm():
    return keras.Sequential([
        keras.Input((16, 16, 3)), L.Conv2D(16, 3, activation="relu"),
        L.GroupNormalization(4), L.Conv2D(32, 3, strides=2, activation="relu"),
        L.GroupNormalization(8), L.GlobalAveragePooling2D(), L.Dense(10)]), (16, 16, 3)


MODELS = {"mobilenet_v2_0.35": mobilenet, "separable_transpose": separable_transpose,
          "conv3d": conv3d, "group_norm": group_norm}


def ratios(model, x, y, batch_size, repeats):
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    lik = likelihoods.Categorical(from_logits=True)
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def grad(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(lik.nll(model(xb, training=False), yb))
        return tape.gradient(loss, variables)

    def unit():
        return [grad(xb, yb) for xb, yb in dataset][-1]

    def call(estimator):
        return lambda: fisher_diagonal(model, dataset, estimator=estimator,
                                       likelihood=lik, verbose=0)

    fns = {"unit": unit, **{e: call(e) for e in ESTIMATORS}}
    first = {}
    for key, fn in fns.items():
        start = time.perf_counter()
        for t in tf.nest.flatten(fn()):
            t.numpy()
        first[key] = time.perf_counter() - start
    wall = {e: [] for e in ESTIMATORS}
    cpu = {e: [] for e in ESTIMATORS}
    for _ in range(repeats):
        times, cpus = {}, {}
        for key, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for t in tf.nest.flatten(fn()):
                t.numpy()
            times[key] = time.perf_counter() - start
            cpus[key] = time.process_time() - start_cpu
        for e in ESTIMATORS:
            wall[e].append(times[e] / times["unit"])
            cpu[e].append(cpus[e] / cpus["unit"])
    _, paths = fisher_diagonal(model, dataset, estimator="empirical", likelihood=lik,
                               verbose=0, return_paths=True)
    slow = sum(p == "reference" for p in paths.values())
    return {e: (float(np.median(wall[e])), float(np.median(cpu[e])), first[e])
            for e in ESTIMATORS}, first["unit"], slow, len(paths)


def without_new_kernels():
    """Removes this module's kernel classes from the registry (the cache retraces)."""
    for cls in NEW:
        _registry._REGISTRY.pop(cls, None)
    _registry._VERSION[0] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--after-only", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",")
    built = {}
    for name in names:
        keras.utils.set_random_seed(0)
        model, shape = MODELS[name]()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.examples, *shape)).astype("float32")
        y = rng.integers(0, 10, size=args.examples).astype("int32")
        built[name] = (model, x, y)
    print("| model | kernels | reference vars | estimator | × gradient (wall) "
          "| × gradient (CPU) | first call (s) | gradient first call (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for label in ("after", "before"):
        if label == "before":
            if args.after_only:
                break
            without_new_kernels()
        for name in names:
            model, x, y = built[name]
            found, unit_first, slow, total = ratios(model, x, y, args.batch_size, args.repeats)
            for e, (wall, cpu, first) in found.items():
                print(f"| {name} | {label} | {slow}/{total} | {e} | {wall:.2f} | {cpu:.2f} "
                      f"| {first:.1f} | {unit_first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
