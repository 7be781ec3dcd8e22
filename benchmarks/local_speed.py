"""The layer-local path's speed: `fisher_diagonal` as a multiple of one batched gradient pass.

Models whose variables no kernel covers: an MLP with LayerScale-style elementwise scales
and a gated custom layer, a ConvNeXt-like convolutional block with a LayerScale; and
LSTM / GRU text classifiers (masked, padded sequences), layer-local until the recurrent
kernel (`keras_ewc/fisher/kernels/recurrent.py`) covered them. For each, as a user calls it
(a `tf.data.Dataset` of (x, y) in batches of `--batch-size`, a fresh call after a first
one that traces), the ratio of CPU time (`time.process_time`, which other processes'
load disturbs less than the wall clock) of `fisher_diagonal` to one batched gradient
pass over the same dataset, measured side by side in one process, median over
`--repeats` rounds; the first call's wall time beside it.

Run with the package on the path: `PYTHONPATH=. python benchmarks/local_speed.py`.
Before the layer-local path existed, the same script measured the whole-network
per-example reference path (it uses only `fisher_diagonal`).
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import fisher_diagonal
from keras_ewc.fisher import likelihoods

L = keras.layers
CLASSES = 4


class LayerScale(L.Layer):
    """y = x * γ, elementwise (ConvNeXt's LayerScale)."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.gamma


class Gated(L.Layer):
    """y = tanh(x A) * sigmoid(x + b): two variables and a nonlinearity."""

    def build(self, input_shape):
        d = input_shape[-1]
        self.a = self.add_weight(shape=(d, d), initializer="glorot_uniform")
        self.b = self.add_weight(shape=(d,), initializer="zeros")

    def call(self, x):
        return tf.tanh(x @ self.a) * tf.sigmoid(x + self.b)


def custom(n, rng):
    model = keras.Sequential([
        keras.Input((64,)), L.Dense(256, activation="gelu"), LayerScale(),
        L.Dense(256, activation="gelu"), LayerScale(), L.Dense(32), Gated(),
        L.Dense(CLASSES)])
    return model, rng.normal(size=(n, 64)).astype("float32")


def conv_scale(n, rng):
    """A ConvNeXt-like residual block: convolutions, LayerNorm and a LayerScale."""
    inputs = keras.Input((32, 32, 3))
    h = L.Conv2D(32, 4, strides=4)(inputs)
    h = L.LayerNormalization()(h)
    branch = L.Conv2D(32, 3, padding="same", activation="gelu")(h)
    h = L.Add()([h, LayerScale()(L.Conv2D(32, 1)(branch))])
    outputs = L.Dense(CLASSES)(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs), rng.normal(size=(n, 32, 32, 3)).astype("float32")


def depthwise(n, rng):
    """MobileNet-like: depthwise and pointwise convolutions (no kernel on main)."""
    model = keras.Sequential([
        keras.Input((32, 32, 3)), L.Conv2D(16, 3, strides=2, activation="relu"),
        L.DepthwiseConv2D(3, activation="relu"), L.Conv2D(32, 1, activation="relu"),
        L.DepthwiseConv2D(3, strides=2, activation="relu"), L.Conv2D(32, 1),
        L.GlobalAveragePooling2D(), L.Dense(CLASSES)])
    return model, rng.normal(size=(n, 32, 32, 3)).astype("float32")


def text(kind):
    def build(n, rng):
        model = keras.Sequential([
            keras.Input((32,), dtype="int32"), L.Embedding(1000, 32, mask_zero=True),
            kind(32), L.Dense(CLASSES)])
        x = rng.integers(1, 1000, size=(n, 32)).astype("int32")
        lengths = rng.integers(8, 33, n)
        x[np.arange(32)[None, :] >= lengths[:, None]] = 0  # padded sequences, masked
        return model, x
    return build


MODELS = {"custom": custom, "conv_scale": conv_scale, "depthwise": depthwise,
          "lstm": text(L.LSTM), "gru": text(L.GRU)}


def ratios(model, x, y, batch_size, repeats, estimators):
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
                                       likelihood="categorical", verbose=0)

    fns = {"unit": unit, **{e: call(e) for e in estimators}}
    first = {}
    for key, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - start
    cpu = {e: [] for e in estimators}
    for _ in range(repeats):
        spent = {}
        for key, fn in fns.items():
            start = time.process_time()
            for t in tf.nest.flatten(fn(), expand_composites=True):
                t.numpy()  # (an embedding's gradient: its IndexedSlices' parts)
            spent[key] = time.process_time() - start
        for e in estimators:
            cpu[e].append(spent[e] / spent["unit"])
    return {e: (float(np.median(cpu[e])), first[e], first["unit"]) for e in estimators}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimators", default="empirical,exact")
    args = parser.parse_args()
    estimators = args.estimators.split(",")
    print(f"{'model':8} {'estimator':10} {'cpu ratio':>9} {'first call':>10} "
          f"{'first gradient pass':>19}")
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        model, x = MODELS[name](args.examples, rng)
        y = rng.integers(0, CLASSES, args.examples)
        found = ratios(model, x, y, args.batch_size, args.repeats, estimators)
        for e, (ratio, first, first_unit) in found.items():
            print(f"{name:8} {e:10} {ratio:9.2f} {first:9.1f}s {first_unit:18.1f}s",
                  flush=True)


if __name__ == "__main__":
    main()
