"""Computes the numbers tests/test_distribute.py asserts on, in a fresh process.

Two logical CPU devices must be configured before TensorFlow initialises its devices,
which the pytest process (where other test modules already ran TensorFlow) cannot do.
This script configures them, runs every check, and prints one JSON object on its last
line: check name -> measured values (relative errors and the like).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_ewc  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]


def rel_err(a, b) -> float:
    """max |a − b| / max |b| over a list of tensors (0 when both are 0)."""
    a = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in a])
    b = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in b])
    scale = max(np.max(np.abs(b)), 1e-30)
    return float(np.max(np.abs(a - b)) / scale)


def data(n=96, d=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, classes))
    x = rng.normal(size=(n, d)).astype("float32")
    return x, np.argmax(x @ w, axis=1).astype("int32")


def net(d=10, classes=3):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(classes)])


def ewc(weights, strength=20.0, lr=0.1):
    model = keras_ewc.EWCModel(net(), strength=strength)
    model.compile(keras.optimizers.SGD(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.network.set_weights(weights)
    return model


def state(model):
    reg = model.regularizer
    return ([v.numpy() for v in reg.precision] + [v.numpy() for v in reg.anchors]
            + [reg.offset.numpy()])


def run_tasks(strategy, weights):
    """Consolidates on task A, trains on task B; returns what the tests compare."""
    xa, ya = data(seed=1)
    xb, yb = data(seed=2)
    with strategy.scope():
        model = ewc(weights)
    fisher = model.consolidate((xa, ya), batch_size=20, verbose=0)  # ragged last batch
    for v in model.network.trainable_variables:  # away from the anchors: a real penalty
        v.assign(v + 0.05)
    penalty0 = float(model.penalty())
    logs = model.fit(xb, yb, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    model.consolidate((xb, yb), batch_size=32, verbose=0)
    return {
        "fisher": [np.asarray(f) for f in fisher],
        "penalty0": penalty0,
        "logged": logs["ewc_penalty"],
        "weights": model.network.get_weights(),
        "state": state(model),
        "replicas": strategy.num_replicas_in_sync,
        "state_is_mirrored": isinstance(
            model.regularizer.precision[0].value, tf.distribute.DistributedValues
        ) if hasattr(model.regularizer.precision[0], "value") else None,
    }


def check_mirrored_training():
    weights = net().get_weights()
    one = run_tasks(tf.distribute.get_strategy(), weights)
    two = run_tasks(tf.distribute.MirroredStrategy(DEVICES), weights)
    return {
        "replicas": two["replicas"],
        "fisher": rel_err(two["fisher"], one["fisher"]),
        "penalty0": abs(two["penalty0"] - one["penalty0"]) / one["penalty0"],
        "logged": rel_err(two["logged"], one["logged"]),
        "weights": rel_err(two["weights"], one["weights"]),
        "state": rel_err(two["state"], one["state"]),
        "penalty_positive": one["penalty0"] > 0,
        "weights_moved": rel_err(one["weights"], weights),
    }


def check_gradient_once():
    """The all-reduced gradient of the training loss equals the one-device gradient."""
    weights = net().get_weights()
    x, y = data(n=32, seed=3)
    one = ewc(weights, strength=500.0)
    one.consolidate(x, verbose=0)
    shifted = [w + 0.1 for w in weights]
    one.network.set_weights(shifted)
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        two = ewc(weights, strength=500.0)
    two.regularizer.assign_state(*[[v.numpy() for v in vs] for vs in
                                   (one.regularizer.precision, one.regularizer.anchors)],
                                 one.regularizer.offset.numpy(), 1)
    two.network.set_weights(shifted)

    def grads(model, xs, ys):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=xs, y=ys, y_pred=model(xs, training=True))
        return tape.gradient(loss, model.network.trainable_variables)

    reference = grads(one, x, y)
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    xs, ys = next(iter(dist))
    per_replica = strategy.run(tf.function(lambda a, b: grads(two, a, b)), args=(xs, ys))
    summed = [strategy.reduce("SUM", g, axis=None) for g in per_replica]
    return {"gradient": rel_err(summed, reference)}


def check_consolidate_estimators():
    """Every per-example estimator, even and ragged batches, 1 vs 2 replicas."""
    weights = net().get_weights()
    x, y = data(n=41, seed=4)
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    model = net()
    model.set_weights(weights)
    with strategy.scope():
        mirrored = net()
    mirrored.set_weights(weights)
    out = {}
    for estimator in ("exact", "sampled", "empirical"):
        for batch in (8, 41, 1):  # ragged last batch of 1; one batch; batches of 1
            kwargs = dict(estimator=estimator, likelihood="categorical", batch_size=batch,
                          seed=7 if estimator == "sampled" else None, verbose=0)
            a = keras_ewc.fisher_diagonal(model, (x, y), **kwargs)
            b = keras_ewc.fisher_diagonal(mirrored, (x, y), strategy=strategy, **kwargs)
            out[f"{estimator}/{batch}"] = rel_err(b, a)
    return out


def check_validation_under_strategy():
    """NaN data and bad labels still raise, and the state is left as it was."""
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    x, y = data(n=16, seed=5)
    with strategy.scope():
        model = ewc(net().get_weights())
    model.consolidate(x, verbose=0)
    before = state(model)
    errors = {}
    bad = x.copy()
    bad[3, 2] = np.nan
    for name, args in {"nan": (bad,), "labels": ((x, y + 10),), "empty": (x[:0],)}.items():
        try:
            model.consolidate(*args, estimator="empirical" if name == "labels" else "exact",
                              verbose=0)
            errors[name] = "no error"
        except ValueError as error:
            errors[name] = str(error)[:80]
    return {"errors": errors, "unchanged": rel_err(state(model), before) == 0.0,
            "tasks": int(model.regularizer.tasks.numpy())}


def check_mixed_precision():
    out = {}
    x, y = data(n=40, seed=6)
    weights = net().get_weights()
    reference = net()
    reference.set_weights(weights)
    exact = keras_ewc.fisher_diagonal(reference, x, likelihood="categorical", verbose=0)
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        try:
            model = keras_ewc.EWCModel(net(), strength=10.0)
            optimizer = keras.optimizers.SGD(0.05)
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            model.compile(optimizer,
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.network.set_weights(weights)
            reg = model.regularizer
            # A tiny Fisher must survive in the state (float16 would flush it to 0).
            reg.consolidate([np.full(v.shape, 1e-12, "float32") for v in reg.targets])
            tiny_precision = [v.numpy() for v in reg.precision]
            size = sum(int(np.prod(v.shape)) for v in reg.targets)
            model.network.set_weights([w + 1.0 for w in weights])
            tiny_penalty = float(model.penalty()) / (10.0 * 0.5 * 1e-12 * size)
            reg.reset()
            model.network.set_weights(weights)
            fisher = model.consolidate(x, verbose=0)
            model.network.set_weights([w + 1.0 for w in weights])
            penalty = model.penalty()
            history = model.fit(x, y, batch_size=20, epochs=1, verbose=0).history
            out[policy] = {
                "fisher_dtypes": sorted({f.dtype.name for f in fisher}),
                "fisher_err": rel_err(fisher, exact),
                "state_dtypes": sorted({v.dtype for v in reg.precision + reg.anchors}
                                       | {reg.offset.dtype}),
                "tiny_precision": [float(np.min(tiny_precision[0])),
                                   float(np.max(tiny_precision[-1]))],
                "tiny_penalty_ratio": tiny_penalty,
                "penalty_dtype": penalty.dtype.name,
                "penalty": float(penalty),
                "loss_finite": bool(np.isfinite(history["loss"][0])),
                "logged_penalty": history["ewc_penalty"][0],
                "compute_dtype": model.network.layers[0].compute_dtype,
            }
        finally:
            keras.config.set_dtype_policy("float32")
    return out


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items()
          if name.startswith("check_")}


def two_cpu_devices():
    """Splits the CPU into two logical devices (before TensorFlow initialises them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def main(names):
    two_cpu_devices()
    results = {}
    for name in names or sorted(CHECKS):
        keras.utils.set_random_seed(1234)
        try:
            results[name] = CHECKS[name]()
        except Exception as error:  # reported to the test, which fails with the message
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        keras.backend.clear_session()
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main(sys.argv[1:])
