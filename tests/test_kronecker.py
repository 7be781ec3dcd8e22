"""Kronecker EWC: penalty, gradient and merges against explicit dense algebra."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc
from keras_ewc import kronecker as kron
from keras_ewc.fisher.kronecker import wbar_shape
from tests import oracle


def _psd(n, seed, rank=None):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, rank or n + 2))
    return (m @ m.T / m.shape[1]).astype("float32")


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-2 * scale)


def _explicit(a, g, delta):
    """vec(ΔW̄)ᵀ (A ⊗ G) vec(ΔW̄) / 2 and (A ⊗ G) vec(ΔW̄), row-major vec, float64."""
    k = np.kron(np.float64(a), np.float64(g))
    v = np.float64(delta).reshape(-1)
    return 0.5 * v @ k @ v, (k @ v).reshape(delta.shape)


@pytest.mark.backend_neutral
def test_penalty_and_gradient_equal_the_explicit_quadratic_form():
    rng = np.random.default_rng(0)
    pairs = [(_psd(4, s), _psd(3, s + 10), rng.normal(size=(4, 3)).astype("float32"))
             for s in range(3)]
    wbar = keras.Variable(rng.normal(size=(4, 3)).astype("float32"))
    value, (grad,) = oracle.value_and_gradients(lambda: kron.kronecker_penalty(wbar, pairs),
                                                [wbar])
    want_value = sum(_explicit(a, g, wbar.numpy() - m)[0] for a, g, m in pairs)
    want_grad = sum(_explicit(a, g, wbar.numpy() - m)[1] for a, g, m in pairs)
    _close(value, want_value)
    _close(grad, want_grad)
    a, g, m = pairs[0]
    _close(kron.kronecker_quadratic(a, g, wbar - m), _explicit(a, g, wbar.numpy() - m)[0])


@pytest.mark.backend_neutral
def test_augment_and_split_put_the_bias_last():
    kernel = np.arange(2 * 2 * 3 * 4, dtype="float32").reshape(2, 2, 3, 4)
    bias = -np.arange(4, dtype="float32")
    wbar = kron.augment(kernel, bias)
    assert wbar.shape == (13, 4)
    np.testing.assert_array_equal(wbar[-1], bias)
    np.testing.assert_array_equal(wbar[:-1], kernel.reshape(12, 4))
    back = kron.split(wbar, kernel.shape, True)
    np.testing.assert_array_equal(back[0], kernel)
    np.testing.assert_array_equal(back[1], bias)


@pytest.mark.backend_neutral
def test_nearest_kronecker_equals_the_top_singular_pair_of_the_rearranged_sum():
    pairs = [(_psd(5, s, rank=2), _psd(3, s + 20, rank=2)) for s in range(3)]
    weights = (1.0, 0.5, 2.0)
    pairs = [(w * a, g) for w, (a, g) in zip(weights, pairs)]
    a, g, err = kron.nearest_kronecker(pairs)
    r = sum(np.outer(np.float64(x).reshape(-1), np.float64(y).reshape(-1)) for x, y in pairs)
    u, s, vt = np.linalg.svd(r)
    best = s[0] * np.outer(u[:, 0], vt[0])
    _close(np.outer(np.float64(a).reshape(-1), np.float64(g).reshape(-1)), best, rtol=1e-5)
    _close(err, np.sqrt(np.sum(s[1:] ** 2) / np.sum(s**2)), rtol=1e-4)
    assert err > 1e-3  # a real approximation, not an exact case
    # The factors stay positive semi-definite (Van Loan & Pitsianis).
    assert np.linalg.eigvalsh(np.float64(a)).min() > -1e-6
    assert np.linalg.eigvalsh(np.float64(g)).min() > -1e-6
    # The error reported is the relative Frobenius error of the sum.
    full = sum(np.kron(np.float64(x), np.float64(y)) for x, y in pairs)
    _close(np.linalg.norm(full - np.kron(np.float64(a), np.float64(g))) / np.linalg.norm(full),
           err, rtol=1e-4)


@pytest.mark.backend_neutral
def test_merge_online_is_exact_when_one_factor_is_shared():
    a, g1, g2 = _psd(4, 0), _psd(3, 1), _psd(3, 2)
    merged_a, merged_g, err = kron.merge_online(a, g1, a, g2, gamma=0.5)
    _close(np.kron(merged_a, merged_g), np.kron(a, 0.5 * g1 + g2), rtol=1e-5)
    assert err < 1e-3


def _mixed_net():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "tanh", name="h"),
                            keras.layers.LayerNormalization(name="norm"),
                            keras.layers.Dense(2, use_bias=False, name="out")])
    return net


def _random_state_tasks(reg, count, seed=0):
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(count):
        factors = [(_psd(int(wbar_shape(p)[0]), 10 * t + i),
                    _psd(int(wbar_shape(p)[1]), 10 * t + i + 5))
                   for i, (_, p) in enumerate(reg.factored)]
        rest = [np.abs(rng.normal(size=v.shape)).astype("float32") for v in reg.rest]
        theta = [rng.normal(size=v.shape).astype("float32") for v in reg.targets]
        reg.consolidate(factors, rest, theta)
        tasks.append((factors, rest, theta))
    return tasks


@pytest.mark.backend_neutral
def test_separate_regularizer_penalty_and_gradients_equal_the_sum_over_tasks():
    net = _mixed_net()
    reg = kron.KroneckerRegularizer(strength=3.0, max_tasks=3)
    reg.build_for(net.trainable_variables, net)
    assert [layer.name for layer, _ in reg.factored] == ["h", "out"]
    assert sorted(v.name for v in reg.rest) == ["beta", "gamma"]
    tasks = _random_state_tasks(reg, 2)
    theta = [v.numpy() for v in reg.targets]
    value, grads = 0.0, [np.zeros(v.shape) for v in reg.targets]
    for factors, rest, anchor in tasks:
        i = 0
        for (_, params), (a, g) in zip(reg.factored, factors):
            k = len(params)
            w = np.concatenate([theta[i].reshape(-1, theta[i].shape[-1])]
                               + ([theta[i + 1][None]] if k == 2 else []))
            m = np.concatenate([anchor[i].reshape(-1, anchor[i].shape[-1])]
                               + ([anchor[i + 1][None]] if k == 2 else []))
            v, gr = _explicit(a, g, w - m)
            value += v
            grads[i] += gr[: theta[i].shape[0]].reshape(theta[i].shape)
            if k == 2:
                grads[i + 1] += gr[-1]
            i += k
        for j, (f, t0) in enumerate(zip(rest, anchor[i:])):
            value += 0.5 * np.sum(f * (theta[i + j] - t0) ** 2)
            grads[i + j] += f * (theta[i + j] - t0)
    _close(reg.penalty(), 3.0 * value)
    for got, want in zip(reg.gradients(), grads):
        _close(got, 3.0 * want)
    _, autodiff = oracle.value_and_gradients(reg.penalty, reg.targets)
    for got, want in zip(autodiff, grads):
        _close(got, 3.0 * want)


@pytest.mark.backend_neutral
def test_the_state_factors_the_layers_it_is_told_and_no_others():
    from keras_ewc.fisher import kronecker as factors_module

    net = _mixed_net()
    plan = factors_module.factored_layers(net, net.trainable_variables)
    # Told to factor only the last layer: the first one's kernel and bias are diagonal.
    reg = kron.KroneckerRegularizer(strength=2.0)
    reg.build_for(net.trainable_variables, net, plan=plan[1:], layer_keys=["the_out"])
    assert [layer.name for layer, _ in reg.factored] == ["out"]
    assert reg.layer_keys == ["the_out"]
    first = [v.name for v in plan[0][2].values()]
    assert sorted(v.name for v in reg.rest) == sorted(first + ["beta", "gamma"])
    assert [tuple(v.shape) for v in reg.kronecker_state[0]] == [
        (reg.num_slots,) + s for s in (
            (wbar_shape(plan[1][2])[0],) * 2, (wbar_shape(plan[1][2])[1],) * 2,
            wbar_shape(plan[1][2]))]
    # A plan with a layer whose variables are not all regularised is refused.
    with pytest.raises(ValueError, match="must be regularised"):
        kron.KroneckerRegularizer().build_for(net.trainable_variables[2:], net, plan=plan,
                                              layer_keys=["a", "b"])
    with pytest.raises(ValueError, match="one layer key a factored layer"):
        kron.KroneckerRegularizer().build_for(net.trainable_variables, net, plan=plan,
                                              layer_keys=["a"])


@pytest.mark.backend_neutral
def test_separate_slots_run_out_with_a_clear_error_and_no_change():
    net = _mixed_net()
    reg = kron.KroneckerRegularizer(max_tasks=1)
    reg.build_for(net.trainable_variables, net)
    _random_state_tasks(reg, 1)
    before = [v.numpy().copy() for v in reg.weights]
    with pytest.raises(ValueError, match="All 1 task slots are used"):
        _random_state_tasks(reg, 1, seed=5)
    bad = [(np.eye(9, dtype="float32"), np.eye(3, dtype="float32"))] * 2
    with pytest.raises(ValueError, match=r"Expected factors of shapes \(5, 5\)"):
        reg.consolidate(bad, [np.ones(v.shape) for v in reg.rest])
    for v, b in zip(reg.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.backend_neutral
def test_online_regularizer_keeps_one_nearest_kronecker_pair_at_the_latest_anchor():
    net = _mixed_net()
    reg = kron.KroneckerRegularizer(mode="online", gamma=0.7)
    reg.build_for(net.trainable_variables, net)
    assert reg.num_slots == 1 and reg.kronecker_state[0][0].shape[0] == 1
    tasks = _random_state_tasks(reg, 2)
    (f1, _, _), (f2, _, theta2) = tasks
    for index, (a_var, g_var, _) in enumerate(reg.slot(0)):
        a, g, err = kron.nearest_kronecker([(0.7 * f1[index][0], f1[index][1]), f2[index]])
        _close(np.kron(a_var, g_var), np.kron(a, g))
        assert 0 < err == reg.last_merge_errors[reg.layer_keys[index]]
    _close(reg.slot(0)[0][2], kron.augment(theta2[0], theta2[1]))
    with pytest.raises(ValueError, match="Received: mode='both'"):
        kron.KroneckerRegularizer(mode="both")


def _task(seed, n=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _kron_model(mode="separate", **kwargs):
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu", name="h"),
                            keras.layers.LayerNormalization(name="norm"),
                            keras.layers.Dense(3, name="out")])
    model = keras_ewc.EWCModel(net, strength=5.0, mode=mode, structure="kronecker",
                               max_tasks=3, **kwargs)
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_model_kronecker_trains_consolidates_and_round_trips(tmp_path, mode):
    model = _kron_model(mode)
    (xa, ya), (xb, yb) = _task(0), _task(1)
    model.fit(xa, ya, epochs=1, verbose=0)
    out = model.consolidate((xa, ya), verbose=0)
    factors = keras_ewc.kronecker_factors(model.network, xa, likelihood="categorical",
                                          verbose=0)
    assert set(factors) <= set(out)
    for key, (a, g) in factors.items():  # the state holds this task's factors
        _close(out[key][0], a)
        _close(out[key][1], g)
    model.fit(xb, yb, epochs=1, verbose=0)
    model.consolidate((xb, yb), verbose=0)
    model.fit(xa, ya, epochs=1, verbose=0)
    penalty = float(model.penalty())
    assert penalty > 1e-4
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert again.structure == "kronecker" and again.mode == mode
    _close(again.penalty(), penalty)
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = _kron_model(mode)
    fresh.load_weights(tmp_path / "m.weights.h5")
    _close(fresh.penalty(), penalty)
    assert int(fresh.regularizer.tasks.numpy()) == 2
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = _kron_model(mode)
    tf.train.Checkpoint(model=restored).read(path).expect_partial()
    _close(restored.penalty(), penalty)
    diagonal = keras_ewc.EWCModel(_kron_model(mode).network, strength=5.0)
    with pytest.raises(ValueError, match="holds a kronecker EWC state; this model is "
                                         "diagonal"):
        diagonal.load_weights(tmp_path / "m.weights.h5")


def test_fit_adds_the_kronecker_penalty_gradient():
    # One SGD step on a batch equals the plain step minus lr * λ A ΔW̄ G.
    model = _kron_model()
    (xa, ya), (xb, yb) = _task(0), _task(1, n=16)
    model.fit(xa, ya, epochs=1, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    model.fit(xb, yb, epochs=1, verbose=0, batch_size=16)  # off the anchor
    before = [v.numpy() for v in model.regularizer.targets]
    penalty_grads = [g.numpy() for g in model.regularizer.gradients()]
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            yb, model.network(xb))
    loss_grads = tape.gradient(loss, model.regularizer.targets)
    model.fit(xb, yb, epochs=1, verbose=0, batch_size=16, shuffle=False)
    for v, b, lg, pg in zip(model.regularizer.targets, before, loss_grads, penalty_grads):
        _close(v.numpy(), b - 0.05 * (lg.numpy() + pg), rtol=1e-4)
    assert max(np.abs(p).max() for p in penalty_grads) > 1e-4


@pytest.mark.backend_neutral
def test_structure_errors():
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Received: structure='full'"):
        keras_ewc.EWCModel(net, structure="full")
    with pytest.raises(ValueError, match="Received: max_tasks=0"):
        keras_ewc.EWCModel(net, structure="kronecker", max_tasks=0)


def test_results_protocol_runs_the_kronecker_rows(tmp_path):
    import importlib.util
    import json
    import os

    from tests.test_continual_datasets import write_mnist_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "results_protocol", os.path.join(root, "scripts", "results_protocol.py"))
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    write_mnist_dir(str(tmp_path / "data"), gz=False, n=40, m=10)
    out = tmp_path / "out"
    assert protocol.main([str(tmp_path / "data"), "--protocol", "permuted", "--tasks", "2",
                          "--iterations", "2", "--batch-size", "8", "--fisher-examples", "8",
                          "--seeds", "0", "--strengths", "1e1",
                          "--methods", "kronecker,kronecker-online", "--out", str(out)]) == 0
    with open(out / "runs.json") as f:
        runs = json.load(f)["runs"]
    assert [r["method"] for r in runs] == ["kronecker", "kronecker-online"]
    table = (out / "table.md").read_text()
    assert "Kronecker EWC (exact, separate)" in table
    assert "Kronecker EWC (exact, online, γ = 1)" in table


def test_strength_set_after_fit_takes_effect_at_the_next_step():
    model = _kron_model()
    (xa, ya), (xb, yb) = _task(0), _task(1, n=16)
    model.fit(xa, ya, epochs=1, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    model.fit(xb, yb, epochs=1, verbose=0, batch_size=16)  # traced at strength 5
    at_five = float(model.penalty())
    model.regularizer.strength = 0.0
    assert float(model.penalty()) == 0.0 and at_five > 1e-4
    variables = model.network.trainable_variables
    before = [v.numpy() for v in variables]
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            yb, model.network(tf.constant(xb)))
    grads = tape.gradient(loss, variables)
    logs = model.fit(xb, yb, epochs=1, verbose=0, batch_size=16, shuffle=False).history
    assert logs["ewc_penalty"] == [0.0]
    for v, b, g in zip(variables, before, grads):  # a plain SGD step: no penalty pull
        _close(v.numpy(), b - 0.05 * g.numpy(), rtol=1e-4)
    model.regularizer.strength = 2.5
    model.regularizer.strength = 5.0
    for v, b in zip(variables, before):
        v.assign(b)
    _close(model.penalty(), at_five)
    with pytest.raises(ValueError, match="Received: strength=-1"):
        model.regularizer.strength = -1


def test_freezing_changes_nothing_and_a_replaced_head_is_refused():
    (xa, ya), (xb, yb) = _task(0), _task(1, n=16)
    model = _kron_model()
    model.fit(xa, ya, epochs=1, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    model.fit(xb, yb, epochs=1, verbose=0)
    penalty = float(model.penalty())
    network = model.network
    network.get_layer("h").trainable = False  # frozen after wrapping: still anchored
    assert len(model.regularised_variables) == 6
    _close(model.penalty(), penalty)
    network.get_layer("h").trainable = True
    network.pop()
    network.add(keras.layers.Dense(3, name="new_head"))  # the state cannot follow it
    with pytest.raises(ValueError, match=r"Removed: \['4:kernel', '5:bias'\]"):
        model.fit(xb, yb, epochs=1, verbose=0)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_saved_model_carries_the_kronecker_state_back_to_learning(tmp_path, mode):
    model = _kron_model(mode)
    (xa, ya), (xb, yb) = _task(0), _task(1)
    for x, y in ((xa, ya), (xb, yb)):
        model.fit(x, y, epochs=1, verbose=0)
        model.consolidate((x, y), verbose=0)
    model.fit(xa, ya, epochs=1, verbose=0)
    penalty = float(model.penalty())
    assert penalty > 1e-4
    model.export(tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(xa).numpy(), model(xa).numpy(), rtol=1e-6,
                               atol=1e-6)
    reg = model.regularizer
    slots = [v.numpy() for trio in reg.kronecker_state for v in trio]
    np.testing.assert_array_equal(
        np.concatenate([v.numpy().ravel() for v in served.ewc_kronecker]),
        np.concatenate([s.ravel() for s in slots]))
    again = keras_ewc.EWCModel.from_saved_model(tmp_path / "served", _kron_model(mode).network)
    assert (again.structure, again.mode, again.strength) == ("kronecker", mode, 5.0)
    assert again.regularizer.max_tasks == 3 and int(again.regularizer.tasks.numpy()) == 2
    _close(again.penalty(), penalty)
    for got, want in zip(again.regularizer.weights, reg.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # Both go on learning alike from a fresh optimizer.
    for m in (model, again):
        m.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(xb, yb, epochs=1, verbose=0, shuffle=False)
    for got, want in zip(again.network.weights, model.network.weights):
        _close(got.numpy(), want.numpy(), rtol=1e-4)


def test_a_kronecker_saved_model_for_another_architecture_is_refused_unchanged(tmp_path):
    model = _kron_model()
    model.consolidate(_task(0), verbose=0)
    model.export(tmp_path / "served")
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, "relu", name="h"),
                            keras.layers.LayerNormalization(name="norm"),
                            keras.layers.Dense(3, name="out")])
    before = [v.numpy() for v in net.weights]
    with pytest.raises(ValueError, match=r"saved shape \(6, 8\), expected \(6, 5\)"):
        keras_ewc.EWCModel.from_saved_model(tmp_path / "served", net)
    for v, b in zip(net.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_assign_state_checks_everything_before_assigning():
    model = _kron_model()
    model.consolidate(_task(0), verbose=0)
    reg = model.regularizer
    good = [tuple(v.numpy() for v in trio) for trio in reg.kronecker_state]
    rest = ([p.numpy() for p in reg.precision], [m.numpy() for m in reg.anchors])
    before = [v.numpy() for v in reg.weights]
    bad_shape = [good[0], (good[1][0][:, :-1], good[1][1], good[1][2])]
    with pytest.raises(ValueError, match=r"does not fit.*expected \(3, 9, 9\)"):
        reg.assign_state(bad_shape, *rest, 0.0, 1)
    not_finite = [good[0], (np.full_like(good[1][0], np.inf), good[1][1], good[1][2])]
    with pytest.raises(ValueError, match="not finite"):
        reg.assign_state(not_finite, *rest, 0.0, 1)
    with pytest.raises(ValueError, match=r"<= max_tasks=3. Received: tasks=4"):
        reg.assign_state(good, *rest, 0.0, 4)
    with pytest.raises(ValueError, match="Received: tasks=0 with a non-zero precision"):
        reg.assign_state(good, *rest, 0.0, 0)
    for v, b in zip(reg.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_a_strength_that_overflows_float32_is_refused_and_the_state_kept():
    model = _kron_model()
    x, y = _task(0)
    model.fit(x, y, epochs=1, verbose=0)
    model.consolidate((x, y), verbose=0)
    model.fit(*_task(1), epochs=1, verbose=0)  # off the anchor
    before = [v.numpy() for v in model.regularizer.weights + model.network.weights]
    with pytest.raises(ValueError, match=r"strength=1e\+25 is too large.*Received: "
                                         r"strength=1e\+25"):
        model.strength = 1e25
    assert model.strength == 5.0
    # Set before any task (nothing to overflow yet), then refused at consolidation.
    fresh = _kron_model()
    fresh.strength = 1e25
    start = [v.numpy() for v in fresh.regularizer.weights + fresh.network.weights]
    with pytest.raises(ValueError, match=r"strength=1e\+25 is too large"):
        fresh.consolidate((x, y), verbose=0)
    for v, b in zip(fresh.regularizer.weights + fresh.network.weights, start):
        np.testing.assert_array_equal(v.numpy(), b)
    for v, b in zip(model.regularizer.weights + model.network.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # A strength within the bound trains to finite weights with Adam.
    model.strength = 1e12
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(float(model.penalty()))
    assert all(np.isfinite(w.numpy()).all() for w in model.network.weights)


def _doc_block():
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "docs", "kronecker.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"It prints `(.*?)`", text).group(1)
    return block, shown


def test_docs_snippet_runs_and_one_key_scheme_names_the_layers_everywhere(capsys):
    block, shown = _doc_block()
    namespace = {"__name__": "__kronecker_doc__"}
    exec(compile(block, "docs/kronecker.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == shown
    model = namespace["model"]
    keys = model.regularizer.layer_keys
    assert keys == ["hidden", "out"]
    assert list(namespace["factors"]) == list(namespace["same"]) == keys
    # The wrapper's factors are the network's, with the likelihood from the wrapper's loss.
    for key in keys:
        _close(namespace["factors"][key][0], namespace["same"][key][0])
        _close(namespace["factors"][key][1], namespace["same"][key][1])
    # consolidate's dict: the same layer keys, and the state's variable keys for the rest.
    x, y = namespace["tasks"][0]
    out = model.consolidate((x, y), verbose=0)
    assert list(out) == keys


def test_consolidate_keys_diagonal_variables_as_the_state_does():
    # Auto-numbered names: two models first, so this one is "sequential_2" / "dense_2".
    for _ in range(2):
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                            keras.layers.Dense(3), keras.layers.LayerNormalization()])
    model = keras_ewc.EWCModel(net, strength=1.0, structure="kronecker")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.arange(32) % 3
    model.fit(x, y, epochs=1, verbose=0)
    out = model.consolidate((x, y), verbose=0)
    reg = model.regularizer
    assert all("/" not in k and not k.startswith("sequential") for k in reg.layer_keys)
    assert list(out) == reg.layer_keys + ["4:gamma", "5:beta"] == reg.layer_keys + reg.keys[4:]
    assert list(keras_ewc.kronecker_factors(model, (x, y), verbose=0)) == reg.layer_keys
    assert list(keras_ewc.kronecker_factors(net, (x, y), likelihood="categorical",
                                            verbose=0)) == reg.layer_keys


@pytest.mark.backend_neutral
def test_uncompiled_network_needs_a_likelihood_as_for_the_diagonal():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.ones((8, 4), "float32")
    for fn in (keras_ewc.kronecker_factors, keras_ewc.fisher_diagonal):
        with pytest.raises(ValueError, match="Could not infer the likelihood.*Pass likelihood="):
            fn(net, x, verbose=0)


def test_progress_line_says_what_is_computed(capsys):
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.ones((8, 4), "float32")
    keras_ewc.kronecker_factors(net, x, likelihood="categorical", verbose=1)
    keras_ewc.fisher_diagonal(net, x, likelihood="categorical", estimator="exact", verbose=1)
    lines = capsys.readouterr().out.splitlines()
    # One batch (of an array: the count of batches is not known in advance).
    assert re.match(r"Kronecker factors A, G \(exact\): 1 batch - examples: 8 - ", lines[0])
    assert re.match(r"Fisher diagonal \(exact\): 1 batch - examples: 8 - ", lines[1])
