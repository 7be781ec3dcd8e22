"""The cost of a `fit` step of an EWCModel against a plain Keras model, side by side.

MLP 784-400-400-10, batch 128, Adam, on CPU (where Keras does not use XLA). Four models
with the same weights train in turns: plain Keras, and an EWCModel with 0, 1 and 20
consolidated tasks (random Fisher diagonals: the step's cost does not depend on their
values). Each round times one epoch of `--steps` steps for each model in a rotating
order; the ratio to the plain model is taken within each round (so the machine's drift
cancels) and the median over rounds is printed, with the ratio of each model's fastest
round to the plain model's fastest (other processes only ever add time), for wall time
and for the process's CPU time (less sensitive to other processes on a shared machine;
with `--threads 1` it is the work a step costs).

A second copy of the plain model is a control: its ratio to the first shows how far two
identical models differ in this run (on a shared 2-core machine, several percent).

Two more rows are floors, not EWC: the same plain model with a bare quadratic penalty
added to its loss, as cheap as TensorFlow's separate elementwise ops allow. "floor,
gradient only" adds just the gradient `P (θ − m)` (a subtract, a multiply, and the add to
the loss's gradient; its value is taken as 0, which no real penalty can do); "floor,
gradient and value" also computes the value `½ Σ P (θ − m)²`. No penalty a step can
cost less than these without fusing elementwise ops (XLA, which Keras does not use on
CPU, measured slower for the penalty alone). On JAX the floors are the plain expression,
which XLA fuses; the EWC rows with tasks should match "gradient and value" (what is left
over a plain step is reading P and m: in the optimizer's update and for the value).

    python benchmarks/train_step_speed.py [--rounds 15] [--steps 50] [--threads 1]
    KERAS_BACKEND=jax python benchmarks/train_step_speed.py    (the same on JAX, where
                                                                the step is jitted by XLA)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def mlp():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(400, activation="relu"),
                             keras.layers.Dense(400, activation="relu"),
                             keras.layers.Dense(10)])


class BarePenalty(keras.Model):
    """`network` with the least a quadratic penalty `½ Σ P (θ − m)²` costs a step."""

    def __init__(self, network, value=True):
        super().__init__()
        self.network = network
        self.value = value

    def build(self, input_shape=None):
        rng = np.random.default_rng(1)
        self.network.build(input_shape)
        self.precision = [self.add_weight(shape=v.shape, trainable=False,
                                          initializer=keras.initializers.Constant(
                                              rng.gamma(0.5, 1e-3, size=v.shape)))
                          for v in self.network.trainable_variables]
        self.anchors = [self.add_weight(shape=v.shape, trainable=False,
                                        initializer=keras.initializers.Constant(v.numpy()))
                        for v in self.network.trainable_variables]

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                    training=training)
        if keras.backend.backend() != "tensorflow":
            # JAX: the plain expression; XLA fuses it and its gradient. "Gradient only"
            # is the same value with its forward part stopped.
            theta = self.network.trainable_variables
            value = 0.5 * sum(keras.ops.sum(p * keras.ops.square(t - m))
                              for p, t, m in zip(self.precision, theta, self.anchors))
            if not self.value:
                value = value - keras.ops.stop_gradient(value)
            return loss + value
        import tensorflow as tf

        precision = [tf.convert_to_tensor(p) for p in self.precision]
        anchors = [tf.convert_to_tensor(m) for m in self.anchors]

        @tf.custom_gradient
        def penalty(*theta):
            scaled = [p * (t - m) for p, t, m in zip(precision, theta, anchors)]
            if self.value:
                value = 0.5 * tf.add_n([tf.reduce_sum(s * (t - m))
                                        for s, t, m in zip(scaled, theta, anchors)])
            else:
                value = tf.zeros(())
            return value, lambda upstream: scaled

        return loss + penalty(*[tf.convert_to_tensor(v)
                                for v in self.network.trainable_variables])


def models(weights):
    import keras_ewc

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {}
    for name in ("plain", "plain, a second copy"):
        plain = mlp()
        plain.set_weights(weights)
        plain.compile(keras.optimizers.Adam(1e-4), loss)
        out[name] = plain
    rng = np.random.default_rng(0)
    for tasks in (0, 1, 20):
        net = mlp()
        net.set_weights(weights)
        model = keras_ewc.EWCModel(net, strength=100.0)
        model.compile(keras.optimizers.Adam(1e-4), loss)
        for _ in range(tasks):
            fisher = [rng.gamma(0.5, 1e-3, size=v.shape).astype("float32")
                      for v in model.regularised_variables]
            model.regularizer.consolidate(fisher)
        out[f"ewc, {tasks} tasks"] = model
    for label, value in (("floor, gradient only", False), ("floor, gradient and value", True)):
        net = mlp()
        net.set_weights(weights)
        model = BarePenalty(net, value=value)
        model.build((None, 784))
        model.compile(keras.optimizers.Adam(1e-4), loss)
        out[label] = model
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's "
                             "default)")
    args = parser.parse_args(argv)
    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128 * args.steps, 784)).astype("float32")
    y = rng.integers(0, 10, len(x))
    candidates = models(mlp().get_weights())
    for model in candidates.values():  # warm-up: tracing
        model.fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0)
    names = list(candidates)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            candidates[name].fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"MLP 784-400-400-10, batch 128, Adam, {args.steps} steps a round, "
          f"{args.rounds} rounds, threads {args.threads or 'default'}")
    for label, times in (("wall", wall), ("cpu", cpu)):
        plain = np.array(times["plain"])
        print(f"[{label}] plain Keras: {1e3 * np.median(plain) / args.steps:.2f} ms a step "
              "(median)")
        for name in names[1:]:
            ratio = np.array(times[name]) / plain
            fastest = np.min(times[name]) / np.min(plain)
            print(f"[{label}] {name:>25}: {np.median(ratio):.3f}x a plain step (median; "
                  f"quartiles {np.percentile(ratio, 25):.3f}-"
                  f"{np.percentile(ratio, 75):.3f}); fastest rounds {fastest:.3f}x")


if __name__ == "__main__":
    main()
