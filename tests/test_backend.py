"""The training core on every Keras backend: the penalty in `fit`, the state's merges,
files, and the backend seam (`keras_ewc.backend`).

Every test here but the cross-backend ones is marked `backend_neutral`: it runs in the
TensorFlow pass and again under `KERAS_BACKEND=jax python -m pytest`. The Fisher is
given (the engine has its own tests), so these tests are about the core alone.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_ewc
from keras_ewc import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR = 0.1

neutral = pytest.mark.backend_neutral


def net():
    return keras.Sequential([keras.Input((5,)),
                             keras.layers.Dense(6, activation="tanh", name="h"),
                             keras.layers.Dense(3, name="out")])


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def random_state(model, seed=1):
    """A precision and anchors away from the weights, through the public API."""
    rng = np.random.default_rng(seed)
    reg = model.regularizer
    precision = [rng.gamma(0.5, 1.0, size=v.shape).astype("float32") for v in reg.targets]
    anchors = [v.numpy() + rng.normal(scale=0.3, size=v.shape).astype("float32")
               for v in reg.targets]
    reg.assign_state(precision, anchors, 0.25, 1)
    return precision, anchors


def explicit_penalty(strength, precision, anchors, offset, theta):
    """λ (½ Σ P (θ − m)² + c) in float64, written out."""
    return strength * (offset + sum(
        0.5 * np.sum(p.astype("float64") * (t.astype("float64") - m) ** 2)
        for p, m, t in zip(precision, anchors, theta)))


def ewc_and_plain(strength):
    """An EWCModel and a plain copy of its network (the same weights), both with SGD."""
    model = keras_ewc.EWCModel(net(), strength=strength)
    model.compile(keras.optimizers.SGD(LR), LOSS)
    plain = net()
    plain.compile(keras.optimizers.SGD(LR), LOSS)
    return model, plain


def one_step_each(model, plain, x, y):
    """One SGD step of both from the EWCModel's current weights; returns the weights
    before, the EWCModel's after, the plain model's after, and the EWCModel's logs."""
    plain.set_weights(model.network.get_weights())
    before = [v.numpy() for v in model.network.trainable_variables]
    logs = model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0).history
    plain.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    return (before, [v.numpy() for v in model.network.trainable_variables],
            [v.numpy() for v in plain.trainable_variables], logs)


@neutral
def test_one_sgd_step_differs_from_plain_by_exactly_the_penalty_gradient():
    x, y = data()
    model, plain = ewc_and_plain(strength=3.0)
    model.build((None, 5))
    precision, anchors = random_state(model)
    before, after, plain_after, logs = one_step_each(model, plain, x, y)
    for b, a, p, prec, m in zip(before, after, plain_after, precision, anchors):
        # SGD: θ' = θ − lr (∇loss + λ P (θ − m)); the plain step has the first term only.
        np.testing.assert_allclose(a - p, -LR * 3.0 * prec * (b - m), rtol=1e-4, atol=2e-6)
    penalty = explicit_penalty(3.0, precision, anchors, 0.25, before)
    np.testing.assert_allclose(logs["ewc_penalty"], [penalty], rtol=1e-5)


@neutral
def test_the_logged_loss_is_the_plain_loss_plus_the_penalty():
    x, y = data()
    model, plain = ewc_and_plain(strength=2.0)
    model.build((None, 5))
    precision, anchors = random_state(model)
    plain.set_weights(model.network.get_weights())
    expected = (float(LOSS(y, plain.predict(x, verbose=0)))
                + explicit_penalty(2.0, precision, anchors, 0.25,
                                   [v.numpy() for v in model.network.trainable_variables]))
    logs = model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0).history
    np.testing.assert_allclose(logs["loss"], [expected], rtol=1e-5)


@neutral
def test_a_strength_set_between_fits_is_used_by_the_next_step():
    x, y = data()
    model, plain = ewc_and_plain(strength=3.0)
    model.build((None, 5))
    precision, anchors = random_state(model)
    one_step_each(model, plain, x, y)
    model.strength = 40.0
    before, after, plain_after, logs = one_step_each(model, plain, x, y)
    for b, a, p, prec, m in zip(before, after, plain_after, precision, anchors):
        np.testing.assert_allclose(a - p, -LR * 40.0 * prec * (b - m), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(logs["ewc_penalty"],
                               [explicit_penalty(40.0, precision, anchors, 0.25, before)],
                               rtol=1e-5)
    # Zero strength: the EWCModel steps as the plain model does.
    model.strength = 0.0
    _, after, plain_after, logs = one_step_each(model, plain, x, y)
    for a, p in zip(after, plain_after):
        np.testing.assert_allclose(a, p, rtol=1e-6, atol=1e-7)
    assert logs["ewc_penalty"] == [0.0]


@neutral
def test_no_task_no_penalty_and_the_plain_step():
    x, y = data()
    model, plain = ewc_and_plain(strength=1e3)
    model.build((None, 5))
    _, after, plain_after, logs = one_step_each(model, plain, x, y)
    for a, p in zip(after, plain_after):
        np.testing.assert_allclose(a, p, rtol=1e-6, atol=1e-7)
    assert logs["ewc_penalty"] == [0.0] and float(model.penalty()) == 0.0


@neutral
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_merges_of_given_fishers_give_the_penalty_of_their_definition(mode):
    rng = np.random.default_rng(3)
    model = keras_ewc.EWCModel(net(), strength=5.0, mode=mode, gamma=0.5)
    reg = model.regularizer
    shapes = [tuple(v.shape) for v in reg.targets]
    tasks = []
    for _ in range(3):
        theta = [rng.normal(size=s).astype("float32") for s in shapes]
        fisher = [rng.gamma(0.5, 1.0, size=s).astype("float32") for s in shapes]
        fisher[0][..., 0] = 0.0  # a weight no task informs: P' = 0 there
        reg.consolidate(fisher, theta)
        tasks.append((fisher, theta))
    assert int(reg.tasks.numpy()) == 3
    at = [rng.normal(size=s).astype("float32") for s in shapes]
    for v, t in zip(reg.targets, at):
        v.assign(t)
    if mode == "separate":  # Σ_t (λ/2) Σ F_t (θ − θ*_t)²
        expected = sum(explicit_penalty(5.0, f, th, 0.0, at) for f, th in tasks)
    else:  # P = Σ_t γ^(T−t) F_t, anchored at the last weights
        precision = [sum(0.5 ** (2 - t) * tasks[t][0][i] for t in range(3))
                     for i in range(len(shapes))]
        expected = explicit_penalty(5.0, precision, tasks[-1][1], 0.0, at)
    np.testing.assert_allclose(float(model.penalty()), expected, rtol=1e-5)


@neutral
def test_a_state_that_does_not_fit_is_refused_and_nothing_is_assigned():
    model = keras_ewc.EWCModel(net(), strength=1.0)
    precision, anchors = random_state(model)
    reg = model.regularizer
    before = [v.numpy() for v in reg.weights]
    bad = list(precision)
    bad[-1] = np.full(bad[-1].shape, np.nan, "float32")
    with pytest.raises(ValueError, match="not finite; the state is left unchanged"):
        reg.assign_state(bad, anchors, 0.0, 2)
    with pytest.raises(ValueError, match="shape"):
        reg.assign_state(precision[:-1] + [np.ones((7,), "float32")], anchors, 0.0, 2)
    for v, b in zip(reg.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


@neutral
def test_keras_and_weights_files_round_trip_with_the_penalty(tmp_path):
    x, y = data()
    model, _ = ewc_and_plain(strength=7.0)
    random_state(model)
    model.strength = 9.0
    expected = float(model.penalty())
    assert expected > 0.0
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert again.strength == 9.0 and int(again.regularizer.tasks.numpy()) == 1
    assert again.regularizer.keys == model.regularizer.keys
    np.testing.assert_allclose(float(again.penalty()), expected, rtol=1e-6)
    # The reloaded model trains with its penalty.
    logs = again.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0).history
    np.testing.assert_allclose(logs["ewc_penalty"], [expected], rtol=1e-5)

    model.save_weights(tmp_path / "m.weights.h5")
    fresh = keras_ewc.EWCModel(net(), strength=1.0)
    assert float(fresh.penalty()) == 0.0
    fresh.load_weights(tmp_path / "m.weights.h5")
    assert fresh.strength == 9.0
    np.testing.assert_allclose(float(fresh.penalty()), expected, rtol=1e-6)


@neutral
def test_tensorflow_only_features_name_the_backend_and_the_fix(tmp_path):
    if backend.is_tensorflow():
        pytest.skip("On TensorFlow these features work (tests/test_saving.py).")
    model = keras_ewc.EWCModel(net(), strength=1.0)
    with pytest.raises(backend.BackendError,
                       match=r"needs the TensorFlow backend.*'jax'.*model\.keras"):
        model.export(str(tmp_path / "served"))
    with pytest.raises(backend.BackendError, match=r"from_saved_model.*'jax'.*load_model"):
        keras_ewc.EWCModel.from_saved_model(str(tmp_path / "served"), net())


def _psd(rng, n):
    m = rng.normal(size=(n, n + 2))
    return (m @ m.T / (n + 2)).astype("float32")


def kronecker_model(strength=2.0, max_tasks=3):
    """A Kronecker EWCModel (two factored Dense layers, a diagonal LayerNormalization)
    with two tasks consolidated from given factors, and a plain copy of its network."""
    from keras_ewc.kronecker import wbar_shape

    def network():
        return keras.Sequential([keras.Input((5,)),
                                 keras.layers.Dense(6, activation="tanh", name="h"),
                                 keras.layers.LayerNormalization(name="norm"),
                                 keras.layers.Dense(3, name="out")])

    model = keras_ewc.EWCModel(network(), strength=strength, structure="kronecker",
                               max_tasks=max_tasks)
    model.compile(keras.optimizers.SGD(LR), LOSS)
    reg = model.regularizer
    rng = np.random.default_rng(4)
    for _ in range(2):
        theta = [v.numpy() + rng.normal(scale=0.3, size=v.shape).astype("float32")
                 for v in reg.targets]
        reg.consolidate([(_psd(rng, wbar_shape(p)[0]), _psd(rng, wbar_shape(p)[1]))
                         for _, p in reg.factored],
                        [rng.gamma(0.5, 1.0, size=v.shape).astype("float32")
                         for v in reg.rest], theta)
    plain = network()
    plain.compile(keras.optimizers.SGD(LR), LOSS)
    return model, plain


def explicit_kronecker(model):
    """The penalty and its gradient by key, from the stored slots, in float64 NumPy:
    λ (Σ_layers Σ_tasks ½ tr(ΔW̄ᵀ A ΔW̄ G) + ½ Σ P (θ − m)² + c)."""
    reg = model.regularizer
    lam = reg.strength
    value, grads = float(reg.offset.numpy()), {}
    used = int(reg.tasks.numpy())
    for (_, params), trio in zip(reg.factored, reg.kronecker_state):
        kernel = params["kernel"].numpy().astype("float64")
        wbar = np.concatenate([kernel.reshape(-1, kernel.shape[-1]),
                               params["bias"].numpy()[None]])
        total = np.zeros_like(wbar)
        for k in range(used):
            a, g, anchor = (v.numpy()[k].astype("float64") for v in trio)
            m = a @ (wbar - anchor) @ g
            value += 0.5 * np.sum((wbar - anchor) * m)
            total += m
        grads[id(params["kernel"])] = lam * total[:-1].reshape(kernel.shape)
        grads[id(params["bias"])] = lam * total[-1]
    for v, p, m in zip(reg.rest, reg.precision, reg.anchors):
        d = v.numpy().astype("float64") - m.numpy()
        value += 0.5 * np.sum(p.numpy() * d * d)
        grads[id(v)] = lam * p.numpy() * d
    return lam * value, grads


@neutral
def test_a_kronecker_state_trains_with_its_penalty_and_its_file_reloads(tmp_path):
    x, y = data(n=8)
    model, plain = kronecker_model()
    reg = model.regularizer
    assert int(reg.tasks.numpy()) == 2 and [layer.name for layer, _ in reg.factored] == [
        "h", "out"]
    penalty, grads = explicit_kronecker(model)
    np.testing.assert_allclose(float(model.penalty()), penalty, rtol=1e-5)
    _, after, plain_after, logs = one_step_each(model, plain, x, y)
    np.testing.assert_allclose(logs["ewc_penalty"], [penalty], rtol=1e-5)
    for v, a, p in zip(model.network.trainable_variables, after, plain_after):
        np.testing.assert_allclose(a - p, -LR * grads[id(v)], rtol=1e-4, atol=1e-6)
    # Files: the slots, the diagonal part and the count come back.
    expected = float(model.penalty())
    model.save(tmp_path / "k.keras")
    again = keras.models.load_model(tmp_path / "k.keras")
    assert again.structure == "kronecker" and int(again.regularizer.tasks.numpy()) == 2
    np.testing.assert_allclose(float(again.penalty()), expected, rtol=1e-6)


CORE = ["keras_ewc/penalty.py", "keras_ewc/kronecker.py", "keras_ewc/model.py",
        "keras_ewc/saving.py", "keras_ewc/backend/__init__.py"]


@neutral
def test_the_core_names_tensorflow_only_inside_its_backend_folder():
    """The core is written in keras.ops: no module of it imports TensorFlow or calls a
    `tf.` API (docstrings and comments may name them); TensorFlow's pieces live in
    keras_ewc/backend/tensorflow/, imported only when TensorFlow is the backend."""
    import ast

    found = []
    for path in CORE:
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Name) and node.id == "tf":
                names = ["tf"]
            found += [f"{path}:{node.lineno}: {n}" for n in names
                      if n == "tf" or n.split(".")[0] == "tensorflow"]
    assert found == []


# --- files between backends ------------------------------------------------------------

SIDE = textwrap.dedent("""
    import json, sys
    import keras, numpy as np, keras_ewc
    action, folder = sys.argv[1], sys.argv[2]

    def net():
        return keras.Sequential([keras.Input((5,)),
                                 keras.layers.Dense(6, activation="tanh", name="h"),
                                 keras.layers.Dense(3, name="out")])

    def kronecker():
        return keras_ewc.EWCModel(net(), strength=1.0, structure="kronecker",
                                  max_tasks=2)

    def report(model, kmodel):
        x = np.linspace(-1, 1, 10, dtype="float32").reshape(2, 5)
        return {"backend": keras.backend.backend(), "penalty": float(model.penalty()),
                "strength": model.strength, "tasks": int(model.regularizer.tasks.numpy()),
                "keys": model.regularizer.keys,
                "prediction": np.asarray(model.predict(x, verbose=0)).tolist(),
                "kronecker_penalty": float(kmodel.penalty()),
                "kronecker_tasks": int(kmodel.regularizer.tasks.numpy())}

    if action == "save":
        keras.utils.set_random_seed(int(sys.argv[3]))
        model = keras_ewc.EWCModel(net(), strength=4.0)
        rng = np.random.default_rng(int(sys.argv[3]))
        reg = model.regularizer
        for _ in range(2):
            reg.consolidate([rng.gamma(0.5, 1.0, size=v.shape).astype("float32")
                             for v in reg.targets])
            for v in reg.targets:
                v.assign(v.numpy() + rng.normal(scale=0.2, size=v.shape).astype("float32"))
        model.strength = 6.0
        model.save(folder + "/m.keras")
        model.save_weights(folder + "/m.weights.h5")
        kmodel = kronecker()
        kreg = kmodel.regularizer
        rows = [(int(np.prod(p["kernel"].shape[:-1])) + 1, int(p["kernel"].shape[-1]))
                for _, p in kreg.factored]
        theta = [v.numpy() + rng.normal(scale=0.2, size=v.shape).astype("float32")
                 for v in kreg.targets]
        kreg.consolidate([(np.eye(r, dtype="float32") * 2, np.eye(o, dtype="float32"))
                          for r, o in rows], [], theta)
        kmodel.strength = 3.0
        kmodel.save(folder + "/k.keras")
        kmodel.save_weights(folder + "/k.weights.h5")
    elif action == "load_model":
        model = keras.models.load_model(folder + "/m.keras")
        kmodel = keras.models.load_model(folder + "/k.keras")
    else:
        model = keras_ewc.EWCModel(net(), strength=1.0)
        model.load_weights(folder + "/m.weights.h5")
        kmodel = kronecker()
        kmodel.load_weights(folder + "/k.weights.h5")
    print("REPORT" + json.dumps(report(model, kmodel)))
""")


def _side(tmp_path, backend_name, *args):
    script = tmp_path / "side.py"
    script.write_text(SIDE)
    env = {**os.environ, "KERAS_BACKEND": backend_name, "PYTHONPATH": ROOT,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("REPORT")][-1]
    report = json.loads(line[len("REPORT"):])
    assert report["backend"] == backend_name
    return report


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("jax", "tensorflow"), ("tensorflow", "jax")])
def test_files_saved_on_one_backend_load_on_the_other_with_the_same_penalty(
        tmp_path, source, target):
    # A diagonal and a Kronecker state, each in a `.keras` and a `.weights.h5` file.
    pytest.importorskip("jax")
    # The model as saved, on the source backend, is the reference.
    reference = _side(tmp_path, source, "save", str(tmp_path), "7")
    assert reference["penalty"] > 0.0 and reference["tasks"] == 2
    assert reference["kronecker_penalty"] > 0.0 and reference["kronecker_tasks"] == 1
    for action in ("load_model", "load_weights"):
        other = _side(tmp_path, target, action, str(tmp_path))
        assert other["strength"] == 6.0 and other["tasks"] == 2
        assert other["keys"] == reference["keys"]
        np.testing.assert_allclose(other["penalty"], reference["penalty"], rtol=1e-6)
        np.testing.assert_allclose(other["prediction"], reference["prediction"],
                                   rtol=1e-5, atol=1e-6)
        assert other["kronecker_tasks"] == 1
        np.testing.assert_allclose(other["kronecker_penalty"],
                                   reference["kronecker_penalty"], rtol=1e-6)
