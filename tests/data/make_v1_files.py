"""Writes the format version 1 files that tests/test_state.py reads.

Run against keras_ewc 0.1 (format version 1), from an empty folder:

    PYTHONPATH=/path/to/keras-ewc-0.1 python tests/data/make_v1_files.py OUT_DIR

It prints the penalty and task count that the files must load back with (kept in
tests/data/v1_expected.json).
"""

import json
import sys

import keras
import numpy as np

import keras_ewc


def main(out):
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh", name="h"),
                            keras.layers.Dense(3, name="out")])
    model = keras_ewc.EWCModel(net, strength=30.0, include=["h"])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, 32)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    model.consolidate((x, y), verbose=0)
    for i, v in enumerate(net.trainable_variables):
        v.assign(v + 0.1 * (i + 1))
    model.save(f"{out}/v1.keras")
    model.save_weights(f"{out}/v1.weights.h5")
    print(json.dumps({"penalty": float(model.penalty()),
                      "tasks": int(model.regularizer.tasks.numpy()),
                      "keras_version": keras.__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
