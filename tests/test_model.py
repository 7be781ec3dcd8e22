"""EWCModel: training through fit, consolidation, selection, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc


def mlp(inputs=20, classes=3, hidden=64):
    return keras.Sequential([
        keras.Input((inputs,)), keras.layers.Dense(hidden, activation="relu", name="hidden"),
        keras.layers.Dense(classes, name="head")])


def compiled(net, optimizer="adam", **kwargs):
    model = keras_ewc.EWCModel(net, **kwargs)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def teacher_tasks(seed=0, n=1500, d=20, classes=3):
    """Two tasks that share a teacher but see the inputs through different permutations."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, classes))
    xa = rng.normal(size=(n, d)).astype("float32")
    xb = rng.normal(size=(n, d)).astype("float32")
    perm = rng.permutation(d)
    ya = np.argmax(xa @ w, axis=1)
    yb = np.argmax(xb[:, perm] @ w, axis=1)
    return (xa, ya), (xb, yb)


def test_penalty_is_zero_before_consolidation_and_fit_logs_it():
    (xa, ya), _ = teacher_tasks(n=64)
    model = compiled(mlp(), strength=1e3)
    assert float(model.penalty()) == 0.0
    history = model.fit(xa, ya, epochs=2, batch_size=32, verbose=0).history
    assert history["ewc_penalty"] == [0.0, 0.0]
    model.consolidate((xa, ya), verbose=0)
    model.fit(xa[:, ::-1].copy(), ya, epochs=1, batch_size=32, verbose=0)
    assert float(model.penalty()) > 0.0
    logs = model.evaluate(xa, ya, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["ewc_penalty"], float(model.penalty()), rtol=1e-5)


def test_one_step_adds_the_penalty_gradient_exactly_once():
    (xa, ya), (xb, yb) = teacher_tasks(n=32)
    model = compiled(mlp(hidden=8), optimizer=keras.optimizers.SGD(0.1), strength=50.0)
    model.fit(xa, ya, epochs=1, batch_size=32, shuffle=False, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    for v in model.network.trainable_variables:  # move away from the anchors
        v.assign(v + 0.05)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.network.trainable_variables
    with tf.GradientTape() as tape:
        total = loss_fn(yb, model.network(xb, training=True)) + model.regularizer.penalty()
    grads = tape.gradient(total, variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]
    model.fit(xb, yb, epochs=1, batch_size=32, shuffle=False, verbose=0)
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def test_large_strength_keeps_weights_at_the_anchors():
    (xa, ya), (xb, yb) = teacher_tasks(n=256)
    moved, dropped = {}, {}
    for strength in (0.0, 1e5):
        keras.utils.set_random_seed(0)
        model = compiled(mlp(), strength=strength)
        model.fit(xa, ya, epochs=3, batch_size=32, verbose=0)
        model.consolidate((xa, ya), verbose=0)
        start = model.evaluate(xb, yb, verbose=0, return_dict=True)["loss"]
        model.fit(xb, yb, epochs=3, batch_size=32, verbose=0)
        end = model.evaluate(xb, yb, verbose=0, return_dict=True)["loss"]
        reg = model.regularizer
        moved[strength] = sum(
            float(np.sum(p.numpy() * (v.numpy() - m.numpy()) ** 2))
            for p, m, v in zip(reg.precision, reg.anchors, model.regularised_variables))
        dropped[strength] = start - end
    # Task B pulls hard on the weights (its loss falls when they are free to move) ...
    assert dropped[0.0] > 0.1, dropped  # measured 0.19
    # ... yet a stiff penalty keeps the Fisher-weighted distance to the anchors tiny.
    assert moved[1e5] < 1e-3 * moved[0.0], moved
    assert dropped[1e5] < 0.1 * dropped[0.0], dropped  # measured 0.0002


def test_ewc_forgets_less_than_fine_tuning():
    (xa, ya), (xb, yb) = teacher_tasks(seed=3)
    accuracy = {}
    for strength in (0.0, 30.0):
        keras.utils.set_random_seed(0)
        model = compiled(mlp(), strength=strength)
        model.fit(xa, ya, epochs=8, batch_size=64, verbose=0)
        model.consolidate((xa, ya), verbose=0)
        model.fit(xb, yb, epochs=8, batch_size=64, verbose=0)
        accuracy[strength] = [model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
                              for x, y in ((xa, ya), (xb, yb))]
    # Measured (seed 3): task A 0.94 before B; after B, fine-tuning keeps 0.37 of it and
    # EWC 0.66, while EWC still learns B to 0.63 (chance is 0.33).
    assert accuracy[30.0][0] > accuracy[0.0][0] + 0.2, accuracy
    assert accuracy[30.0][1] > 0.55, accuracy


@pytest.mark.parametrize("options", [{"jit_compile": True}, {"steps_per_execution": 3}])
def test_jit_compile_and_steps_per_execution_train_the_same(options):
    (xa, ya), (xb, yb) = teacher_tasks(n=96)
    results = []
    for opts in ({}, options):
        keras.utils.set_random_seed(0)
        model = keras_ewc.EWCModel(mlp(hidden=8), strength=20.0)
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), **opts)
        model.fit(xa, ya, epochs=1, batch_size=32, shuffle=False, verbose=0)
        model.consolidate((xa, ya), verbose=0)
        history = model.fit(xb, yb, epochs=2, batch_size=32, shuffle=False, verbose=0).history
        results.append(([v.numpy() for v in model.network.weights], history["ewc_penalty"]))
    (w0, p0), (w1, p1) = results
    assert p0[-1] > 0
    np.testing.assert_allclose(p0, p1, rtol=1e-4)
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.backend_neutral
def test_subclassed_and_functional_models_build_their_state():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(5, name="a")
            self.b = keras.layers.Dense(2, name="b")

        def call(self, x, training=False):
            return self.b(tf.nn.relu(self.a(x)))

    model = keras_ewc.EWCModel(Net(), strength=1.0)
    assert not model.regularizer.built
    model.build((None, 4))
    assert len(model.regularizer.precision) == 4
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    wrapped = keras_ewc.EWCModel(functional)
    assert wrapped.built and len(wrapped.regularizer.anchors) == 2


@pytest.mark.backend_neutral
def test_include_and_exclude_select_variables():
    only_head = keras_ewc.EWCModel(mlp(), include=["head"])
    assert [v.path for v in only_head.regularised_variables] == [
        "sequential/head/kernel", "sequential/head/bias"]
    no_bias = keras_ewc.EWCModel(mlp(), exclude=lambda v: v.path.endswith("bias"))
    assert [v.path.split("/")[-1] for v in no_bias.regularised_variables] == ["kernel"] * 2
    with pytest.raises(ValueError, match=r"hold no trainable variable: \['nope'\]"):
        keras_ewc.EWCModel(mlp(), include=["nope"])
    with pytest.raises(ValueError, match="predicate matches no"):
        keras_ewc.EWCModel(mlp(), exclude=lambda v: False)
    with pytest.raises(ValueError, match="leave no variable"):
        keras_ewc.EWCModel(mlp(), include=["head"], exclude=["head"])
    with pytest.raises(ValueError, match="list of layer names"):
        keras_ewc.EWCModel(mlp(), include=3)


def test_bad_input_errors_and_unchanged_state():
    (xa, ya), _ = teacher_tasks(n=40)
    with pytest.raises(ValueError, match="strength >= 0"):
        keras_ewc.EWCModel(mlp(), strength=-1)
    with pytest.raises(ValueError, match=r"gamma in \(0, 1\]"):
        keras_ewc.EWCModel(mlp(), mode="online", gamma=0.0)
    with pytest.raises(ValueError, match="Expected a Keras model"):
        keras_ewc.EWCModel("not a model")
    unbuilt = keras_ewc.EWCModel(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="not built"):
        unbuilt.consolidate(xa, verbose=0)

    model = compiled(mlp(), strength=1.0)
    model.consolidate((xa, ya), verbose=0)
    before = [w.numpy().copy() for w in model.regularizer.weights]
    bad = xa.copy()
    bad[5, 0] = np.inf
    attempts = [
        (dict(data=bad), "NaN or Inf"), (dict(data=xa[:0]), "no examples"),
        (dict(data=xa, estimator="bogus"), "Unknown estimator"),
        (dict(data=(xa, ya + 3), estimator="empirical"), r"labels in \[0, 3\)"),
        (dict(data=xa, likelihood="poisson"), "Unknown likelihood"),
    ]
    for kwargs, message in attempts:
        with pytest.raises(ValueError, match=message):
            model.consolidate(verbose=0, **kwargs)
    for w, b in zip(model.regularizer.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    assert int(model.regularizer.tasks.numpy()) == 1


@pytest.mark.backend_neutral
def test_consolidate_passes_steps_to_the_fisher():
    (xa, ya), _ = teacher_tasks(n=64)
    model = compiled(mlp(hidden=8), strength=1.0)
    endless = tf.data.Dataset.from_tensor_slices((xa, ya)).batch(16).repeat()
    fisher = model.consolidate(endless, steps=2, estimator="empirical",
                               likelihood="categorical", verbose=0)
    expected = keras_ewc.fisher_diagonal(model.network, (xa[:32], ya[:32]),
                                         estimator="empirical", likelihood="categorical",
                                         batch_size=16, verbose=0)
    for f, e in zip(fisher, expected):
        np.testing.assert_allclose(np.asarray(f), np.asarray(e), rtol=1e-5, atol=1e-9)
    assert int(model.regularizer.tasks.numpy()) == 1
