"""Permuted-task EWC under MirroredStrategy, on every GPU there is (or 2 CPU replicas).

Three tasks share one teacher but see the inputs through different permutations. The
model learns them one after the other, consolidating after each; every replica trains
on its share of each global batch and computes the Fisher on its share of the data.
It learns them once by plain fine-tuning (the baseline: strength 0) and once with EWC,
prints after each task the accuracy on every task seen so far (tasks numbered from 1),
then both side by side in a table; it writes no files.

    python examples/multi_gpu.py [--tasks 3] [--strength 10]
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="number of permuted tasks")
    parser.add_argument("--strength", type=float, default=10.0, help="EWC strength λ")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs a task")
    # No default shown: the flag is absent unless given (hidden logs are the default).
    parser.add_argument("--tf-logs", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's start-up logs, which are hidden otherwise")
    return parser.parse_args(argv)


def make_strategy():
    """Mirrors over the GPUs; with none, splits the CPU into two logical devices."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def permuted_tasks(count, n=4000, d=32, classes=4, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(d, classes))
    tasks = []
    for t in range(count):
        perm = np.arange(d) if t == 0 else rng.permutation(d)
        x = rng.normal(size=(n, d)).astype("float32")
        y = np.argmax(x[:, perm] @ teacher, axis=1).astype("int32")
        tasks.append(((x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4:], y[n * 3 // 4:])))
    return tasks


def learn(strategy, tasks, strength, epochs, label):
    """Trains the tasks in turn with `strength` (0: plain fine-tuning, no penalty) and
    returns their `ContinualResults` (accuracy on every task after each one)."""
    import keras

    import keras_ewc
    from keras_ewc import continual

    keras.utils.set_random_seed(0)  # the same initial weights and batches for both
    with strategy.scope():
        net = keras.Sequential([keras.Input((32,)), keras.layers.Dense(128, activation="relu"),
                                keras.layers.Dense(4)])
        model = keras_ewc.EWCModel(net, strength=strength)
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    nan = float("nan")
    matrix = []
    for t, ((x, y), _) in enumerate(tasks):
        model.fit(x, y, batch_size=64 * strategy.num_replicas_in_sync, epochs=epochs,
                  verbose=0)
        if strength:
            model.consolidate(x[:1000], verbose=0)
        accuracies = [model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
                      for _, (xt, yt) in tasks[: t + 1]]
        print(f"{label}, after task {t + 1}: "
              + "  ".join(f"task {i + 1} {a:.3f}" for i, a in enumerate(accuracies)),
              flush=True)
        matrix.append(accuracies + [nan] * (len(tasks) - t - 1))
    return continual.ContinualResults(matrix, label=label)


def main(argv=None):
    args = parse_args(argv)
    # Imported after the arguments are read, so that --help answers at once; keras_ewc
    # first, so that TensorFlow starts quietly (--tf-logs shows its logs).
    from keras_ewc import continual

    strategy = make_strategy()  # before Keras touches a device
    print(f"{strategy.num_replicas_in_sync} replicas: "
          f"{[d for d in strategy.extended.worker_devices]}")
    tasks = permuted_tasks(args.tasks)
    # Fine-tuning first, as a baseline: on its own, EWC's final accuracies on the
    # earlier tasks say nothing about what it kept.
    results = [learn(strategy, tasks, 0.0, args.epochs, "fine-tuning"),
               learn(strategy, tasks, args.strength, args.epochs,
                     f"EWC (λ={args.strength:g})")]
    print()
    print(continual.results_table(results, footnote=True))


if __name__ == "__main__":
    main()
