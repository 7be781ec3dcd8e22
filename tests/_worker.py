"""One process of the multi-worker tests: consolidate task A, fit task B, consolidate B.

Usage: python tests/_worker.py OUT.npz [--backup DIR] [--die-after-epoch K]

With TF_CONFIG set, the process is a worker of a `MultiWorkerMirroredStrategy`;
without, it runs on one device. It writes the final weights and EWC state to OUT.npz.
`--backup DIR` trains with `keras.callbacks.BackupAndRestore(DIR)`; `--die-after-epoch K`
makes the process exit abruptly (no clean-up, exit code 3) at the end of epoch K, as a
crashed worker would.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_ewc  # noqa: E402

EPOCHS = 4


class Die(keras.callbacks.Callback):
    """Exits the process at the end of an epoch, without any clean-up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            os._exit(3)


class FirstEpoch(keras.callbacks.Callback):
    """Records the first epoch this process trains (> 0 when resumed from a backup)."""

    first = None

    def on_epoch_begin(self, epoch, logs=None):
        if FirstEpoch.first is None:
            FirstEpoch.first = epoch


def data(n, seed, d=10, classes=3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, classes))
    x = rng.normal(size=(n, d)).astype("float32")
    return x, np.argmax(x @ w, axis=1).astype("int32")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--backup")
    parser.add_argument("--die-after-epoch", type=int)
    args = parser.parse_args()

    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(1234)  # same initial weights in every process
    with strategy.scope():
        net = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"),
                                keras.layers.Dense(3)])
        model = keras_ewc.EWCModel(net, strength=20.0)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xa, ya = data(96, seed=1)
    xb, yb = data(96, seed=2)
    model.consolidate((xa, ya), batch_size=20, verbose=0)  # ragged last batch
    train = tf.data.Dataset.from_tensor_slices((xb, yb)).batch(32)
    options = tf.data.Options()
    # Every worker reads the same batches; each global batch is split over the replicas.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = train.with_options(options)
    callbacks = [FirstEpoch()]
    if args.backup:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
    if args.die_after_epoch is not None:
        callbacks.append(Die(args.die_after_epoch))
    model.fit(train, epochs=EPOCHS, verbose=0, callbacks=callbacks)
    model.consolidate((xb, yb), batch_size=32, verbose=0)
    reg = model.regularizer
    arrays = {f"w{i}": w for i, w in enumerate(model.network.get_weights())}
    arrays.update({f"p{i}": v.numpy() for i, v in enumerate(reg.precision)})
    arrays.update({f"m{i}": v.numpy() for i, v in enumerate(reg.anchors)})
    arrays["offset"] = reg.offset.numpy()
    arrays["tasks"] = reg.tasks.numpy()
    arrays["first_epoch"] = np.asarray(FirstEpoch.first)
    arrays["replicas"] = np.asarray(strategy.num_replicas_in_sync)
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
