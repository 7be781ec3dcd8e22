"""On JAX, keras_ewc runs without TensorFlow: importing it, `EWCModel` fit / consolidate /
`.keras` and `.weights.h5` files, and the Fisher (diagonal and Kronecker factors) of arrays.

A child process imports keras_ewc (TensorFlow must not be imported by then, installed or
not), then sets `sys.modules["tensorflow"] = None`, so any later import of TensorFlow, by
keras_ewc or by Keras, raises ImportError there; it writes what it computed to a file.
This process recomputes the Fisher on the child's weights through a `tf.data.Dataset`
when TensorFlow is installed (the loop's input before arrays were batched in NumPy on
JAX), and through the brute-force oracle (tests/oracle_jax.py). Tolerances: between the
two loops (the same batches in the same order, the same compiled step, another process),
1e-6 relative for the diagonal and 1e-6 of each Kronecker factor's largest entry; against
the oracle (float64 sums), 1e-5 of each variable's largest entry, as
tests/test_fisher_jax.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

# Slow: a child process (about 20 s of the module's 30 on two busy CPU cores).
pytestmark = [
    pytest.mark.jax_only,
    pytest.mark.slow,
]

import keras_ewc  # noqa: E402
from tests import oracle_jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, sys

    import keras, numpy as np
    import keras_ewc

    # Installed or not, TensorFlow was not imported; from here on, importing it fails.
    imported = "tensorflow" in sys.modules
    sys.modules["tensorflow"] = None

    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 6)).astype("float32")
    y = rng.integers(0, 4, 37).astype("int32")
    w = rng.uniform(0.0, 2.0, 37).astype("float32")
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(4)])
    model = keras_ewc.EWCModel(net, strength=50.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    weights = net.get_weights()
    exact = keras_ewc.fisher_diagonal(net, x, estimator="exact", likelihood="categorical",
                                      batch_size=16, verbose=0)
    weighted = keras_ewc.fisher_diagonal(net, (x, y, w), estimator="empirical",
                                         likelihood="categorical", batch_size=16, steps=2,
                                         verbose=0)
    factors = keras_ewc.kronecker_factors(net, x, likelihood="categorical", batch_size=16,
                                          verbose=0)
    try:  # an error of the loop is the library's, not an ImportError of TensorFlow
        keras_ewc.fisher_diagonal(net, x, estimator="empirical", likelihood="categorical",
                                  verbose=0)
        error = None
    except ValueError as caught:
        error = str(caught)
    model.consolidate((x, y), estimator="exact", verbose=0)
    model.consolidate((x, y), estimator="empirical", batch_size=10, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    penalty = float(model.penalty())
    model.save(out + "/model.keras")
    loaded = keras.models.load_model(out + "/model.keras")
    model.save_weights(out + "/model.weights.h5")
    again = keras_ewc.EWCModel(keras.models.clone_model(net), strength=50.0)
    again.load_weights(out + "/model.weights.h5")
    arrays = {f"weights{i}": v for i, v in enumerate(weights)}
    arrays.update({f"exact{i}": np.asarray(f) for i, f in enumerate(exact)})
    arrays.update({f"weighted{i}": np.asarray(f) for i, f in enumerate(weighted)})
    for i, (key, (a, g)) in enumerate(sorted(factors.items())):
        arrays[f"factor{i}_A"], arrays[f"factor{i}_G"] = np.asarray(a), np.asarray(g)
    np.savez(out + "/child.npz", x=x, y=y, w=w, **arrays)
    print("REPORT" + json.dumps({
        "imported": imported, "tensorflow": sys.modules["tensorflow"] is not None,
        "penalty": penalty, "loaded_penalty": float(loaded.penalty()),
        "weights_penalty": float(again.penalty()),
        "tasks": int(np.asarray(loaded.regularizer.tasks.numpy())),
        "factors": len(factors), "error": error}))
""")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no_tensorflow")
    script = folder / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(folder)], env=env, cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("REPORT")][-1]
    with np.load(folder / "child.npz") as arrays:
        return json.loads(line[len("REPORT"):]), dict(arrays)


def _net(arrays):
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(4)])
    net.set_weights([arrays[f"weights{i}"] for i in range(4)])
    return net


def _listed(arrays, name):
    return [arrays[f"{name}{i}"] for i in range(4)]


def test_fit_consolidate_save_load_run_with_tensorflow_unimportable(child):
    report, _ = child
    assert report["imported"] is False and report["tensorflow"] is False
    assert "needs the true labels" in report["error"]
    assert report["tasks"] == 2 and report["factors"] == 2
    assert report["penalty"] > 0.0
    np.testing.assert_allclose(report["loaded_penalty"], report["penalty"], rtol=1e-6)
    np.testing.assert_allclose(report["weights_penalty"], report["penalty"], rtol=1e-6)


def test_the_fisher_of_arrays_without_tensorflow_matches_the_oracle(child):
    _, arrays = child
    net = _net(arrays)
    x, y, w = arrays["x"], arrays["y"], arrays["w"]
    for name, expected in (
        ("exact", oracle_jax.categorical(net, x)),
        # steps=2 of batches of 16: the first 32 examples.
        ("weighted", oracle_jax.categorical(net, x[:32], y[:32], weights=w[:32])),
    ):
        for got, want in zip(_listed(arrays, name), expected):
            scale = max(float(np.max(np.abs(want))), 1e-12)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_the_fisher_of_arrays_equals_the_one_of_a_tf_data_dataset(child):
    # The same batches through tf.data (still accepted on JAX when TensorFlow is
    # installed): the NumPy batching changes nothing, ragged last batch and steps included.
    tf = pytest.importorskip("tensorflow")
    _, arrays = child
    net = _net(arrays)
    x, y, w = arrays["x"], arrays["y"], arrays["w"]
    exact = keras_ewc.fisher_diagonal(net, tf.data.Dataset.from_tensor_slices(x).batch(16),
                                      likelihood="categorical", verbose=0)
    weighted = keras_ewc.fisher_diagonal(
        net, tf.data.Dataset.from_tensor_slices((x, y, w)).batch(16),
        estimator="empirical", likelihood="categorical", steps=2, verbose=0)
    factors = keras_ewc.kronecker_factors(
        net, tf.data.Dataset.from_tensor_slices(x).batch(16), likelihood="categorical",
        verbose=0)
    for name, fisher in (("exact", exact), ("weighted", weighted)):
        for got, want in zip(_listed(arrays, name), fisher):
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=0,
                                       err_msg=name)
    # The factors' off-diagonal entries cancel (a few are ~1e-3 of the largest), and two
    # processes' compiled steps may sum in another order: 1e-6 of each factor's largest.
    for i, (_, pair) in enumerate(sorted(factors.items())):
        for name, want in zip("AG", pair):
            want = np.asarray(want)
            np.testing.assert_allclose(arrays[f"factor{i}_{name}"], want, rtol=0,
                                       atol=1e-6 * float(np.max(np.abs(want))))
