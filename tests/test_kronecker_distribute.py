"""Kronecker EWC under tf.distribute (two replicas = one device) and mixed precision.

Two logical CPU devices must be configured before TensorFlow initialises, so the
distributed check runs this file as a script in a fresh process and asserts on the JSON
it prints; mixed precision runs in the test process.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import keras_ewc  # noqa: E402


def rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in a])
    b = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in b])
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, np.argmax(x @ rng.normal(size=(6, 3)), axis=1).astype("int32")


def net():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.LayerNormalization(),
                             keras.layers.Dense(3)])


def run_tasks(strategy, weights, mode):
    (xa, ya), (xb, yb) = data(seed=1), data(seed=2)
    with strategy.scope():
        model = keras_ewc.EWCModel(net(), strength=30.0, mode=mode, structure="kronecker",
                                   max_tasks=2)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.network.set_weights(weights)
    first = model.consolidate((xa, ya), batch_size=16, verbose=0)  # ragged last batch
    for v in model.network.trainable_variables:
        v.assign(v + 0.05)
    logs = model.fit(xb, yb, batch_size=20, epochs=1, shuffle=False, verbose=0).history
    model.consolidate((xb, yb), batch_size=20, verbose=0)
    return {
        "first": [t for k in sorted(first) for t in tf.nest.flatten(first[k])],
        "logged": logs["ewc_penalty"],
        "weights": model.network.get_weights(),
        "state": [v.numpy() for v in model.regularizer.weights],
        "replicas": strategy.num_replicas_in_sync,
    }


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    keras.utils.set_random_seed(0)
    weights = net().get_weights()
    out = {}
    for mode in ("separate", "online"):
        one = run_tasks(tf.distribute.get_strategy(), weights, mode)
        two = run_tasks(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), weights, mode)
        out[mode] = {k: rel_err(two[k], one[k]) for k in ("first", "logged", "weights",
                                                          "state")}
        out[mode]["replicas"] = two["replicas"]
        out[mode]["penalty_logged"] = float(np.max(one["logged"]))
    print(json.dumps(out))


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_two_replicas_give_the_one_device_factors_state_and_weights(mode, distributed):
    r = distributed[mode]
    assert r["replicas"] == 2 and r["penalty_logged"] > 1e-4
    for key in ("first", "logged", "weights", "state"):
        assert r[key] < 1e-5, (key, r[key])


@pytest.fixture(scope="module")
def distributed():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"The distributed check failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy,tol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_mixed_precision_keeps_float32_state_and_close_factors(policy, tol):
    x, y = data(seed=3)
    reference = net()
    weights = reference.get_weights()
    want = keras_ewc.kronecker_factors(reference, x, likelihood="categorical", verbose=0)
    keras.config.set_dtype_policy(policy)
    try:
        model = keras_ewc.EWCModel(net(), strength=10.0, structure="kronecker")
        optimizer = keras.optimizers.SGD(0.05)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.network.set_weights(weights)
        got = model.consolidate(x, verbose=0)
        model.network.set_weights([w + 0.1 for w in weights])
        penalty = model.penalty()
        history = model.fit(x, y, batch_size=20, epochs=1, verbose=0).history
        dtypes = {v.dtype for v in model.regularizer.weights if v.dtype != "int64"}
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.network.layers[0].compute_dtype != "float32"
    assert dtypes == {"float32"} and penalty.dtype == tf.float32
    assert float(penalty) > 0 and np.isfinite(history["loss"][0])
    assert len(want) == 2
    pairs = [v for v in got.values() if isinstance(v, tuple)]  # the factored layers
    for (a, g), (a16, g16) in zip(want.values(), pairs):
        assert rel_err([a16], [a]) < tol and rel_err([g16], [g]) < tol


if __name__ == "__main__":
    main()
