"""Fisher and training throughput on 1 and 2 replicas, side by side in one run.

Uses two GPUs when there are, else splits the CPU into two logical devices (on CPU the
two replicas share the same cores, so expect no speed-up there: the ratio shows the
cost of the distribution machinery). Prints examples/second and the 2-vs-1 ratio.

    python benchmarks/distributed.py [--examples 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def devices():
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return ["/gpu:0", "/gpu:1"], "/gpu:0"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return ["/cpu:0", "/cpu:1"], "/cpu:0"


def best_of(fn, repeats):
    fn()  # warm-up: tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pair, single = devices()
    import keras

    import keras_ewc

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 64)).astype("float32")
    y = rng.integers(0, 10, args.examples).astype("int32")
    strategies = {"1 replica": tf.distribute.OneDeviceStrategy(single),
                  "2 replicas": tf.distribute.MirroredStrategy(pair)}
    results = {}
    for name, strategy in strategies.items():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, "relu"),
                                    keras.layers.Dense(10)])
            model = keras_ewc.EWCModel(net, strength=1.0)
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        fisher = best_of(lambda model=model: model.consolidate(x, batch_size=256, verbose=0),
                         args.repeats)
        train = best_of(lambda model=model: model.fit(x, y, batch_size=256, epochs=1, verbose=0),
                        args.repeats)
        results[name] = (args.examples / fisher, args.examples / train)
        print(f"{name:>10}: Fisher {results[name][0]:9.0f} ex/s   "
              f"training {results[name][1]:9.0f} ex/s")
    (f1, t1), (f2, t2) = results["1 replica"], results["2 replicas"]
    print(f"2 vs 1 replica on {pair}: Fisher x{f2 / f1:.2f}, training x{t2 / t1:.2f}")


if __name__ == "__main__":
    main()
