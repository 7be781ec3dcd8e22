"""Every way into the EWC state keeps it whole: one strength bound, hyperparameters that
follow a load, a penalty that agrees with the next step, and commits that neither two
threads nor a Ctrl-C can tear (diagonal and Kronecker states alike)."""

import re
import shutil
import signal
import threading
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_ewc
from keras_ewc import penalty as diag

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STRUCTURES = ["diagonal", "kronecker"]


def net():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, "tanh", name="h"),
                             keras.layers.LayerNormalization(name="norm"),
                             keras.layers.Dense(3, name="out")])


def data(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def consolidated(structure="diagonal", mode="separate", gamma=1.0, strength=5.0,
                 model_net=None):
    """One task consolidated, the weights then moved off their anchors."""
    model = keras_ewc.EWCModel(model_net or net(), strength=strength, mode=mode,
                               gamma=gamma, structure=structure, max_tasks=4)
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    model.consolidate(data(0), verbose=0)
    for i, v in enumerate(model.network.trainable_variables):
        v.assign(v + 0.03 * (i + 1))
    return model


def values(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def assert_unchanged(variables, before):
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def edit_h5(path, suffix, change):
    """Applies `change` to every dataset of the h5 file whose name ends with `suffix`."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.endswith(suffix):
            found.append(name)

    with h5py.File(path, "r+") as f:
        f.visititems(visit)
        for name in found:
            new = change(f[name][()])
            del f[name]
            f[name] = new
    assert found, f"no entry ending with {suffix!r} in {path}"


def strength_entry(model):
    """The h5 entry of the saved strength (keyed in the diagonal state, Keras' position
    0 of the non-trainable variables in the Kronecker one)."""
    return "vars/strength" if model.structure == "diagonal" else "regularizer/vars/0"


# --- item 1: one strength bound for every way into the state ---------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
def test_from_saved_model_refuses_a_strength_that_overflows_the_saved_state(
        tmp_path, structure):
    model = consolidated(structure)
    model.export(tmp_path / "served")
    fresh = net()
    before = values(fresh.weights)
    with pytest.raises(ValueError, match=r"strength=1e\+30 is too large for this "
                                         r"(Kronecker )?EWC state.*Expected strength <"):
        keras_ewc.EWCModel.from_saved_model(tmp_path / "served", fresh, strength=1e30)
    assert_unchanged(fresh.weights, before)
    # Within the bound, the SavedModel loads with the strength given.
    again = keras_ewc.EWCModel.from_saved_model(tmp_path / "served", net(), strength=50.0)
    assert again.strength == 50.0 and int(again.regularizer.tasks.numpy()) == 1


@pytest.mark.parametrize("structure", STRUCTURES)
def test_assign_state_checks_the_strength_against_the_new_state(structure):
    model = consolidated(structure)
    reg = model.regularizer
    # The largest strength the setter accepts for the present state, about.
    for strength in (1e6, 1e9, 1e12, 1e15):
        try:
            model.strength = strength
        except ValueError:
            break
    allowed = model.strength
    assert allowed >= 1e6
    before = values(reg.weights)
    big_p = [p.numpy() * 1e8 for p in reg.precision]
    anchors = [m.numpy() for m in reg.anchors]
    if structure == "diagonal":
        args = (big_p, anchors, reg.offset.numpy(), 1)
    else:
        slots = [(a.numpy() * 1e4, g.numpy() * 1e4, m.numpy())
                 for a, g, m in reg.kronecker_state]
        args = (slots, big_p, anchors, reg.offset.numpy(), 1)
    with pytest.raises(ValueError, match=re.escape(f"strength={allowed:g} is too large")):
        reg.assign_state(*args)
    assert_unchanged(reg.weights, before)
    assert model.strength == allowed
    # With a strength given, the bound uses it: the same state at strength 1e-12 fits.
    reg.assign_state(*args, strength=1e-12)
    assert reg.strength == 1e-12
    np.testing.assert_allclose(reg.precision[0].numpy(), big_p[0])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_load_weights_refuses_a_file_whose_strength_overflows_its_state(
        tmp_path, structure):
    model = consolidated(structure)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    edit_h5(path, strength_entry(model), lambda x: np.asarray(1e30, x.dtype))
    target = consolidated(structure, strength=2.0)
    before = values(target.weights)
    with pytest.raises(ValueError, match=r"strength=1e\+30 is too large"):
        target.load_weights(path)
    assert_unchanged(target.weights, before)
    assert target.strength == 2.0


@pytest.mark.parametrize("structure", STRUCTURES)
def test_load_model_refuses_a_file_whose_strength_overflows_its_state(tmp_path, structure):
    model = consolidated(structure)
    path = str(tmp_path / "m.keras")
    model.save(path)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        z.extractall(folder)
    edit_h5(str(folder / "model.weights.h5"), strength_entry(model),
            lambda x: np.asarray(1e30, x.dtype))
    edited = str(tmp_path / "edited.keras")
    with zipfile.ZipFile(edited, "w") as z:
        for name in names:
            z.write(folder / name, name)
    with pytest.raises(ValueError, match=r"strength=1e\+30 is too large"):
        keras.saving.load_model(edited)
    shutil.rmtree(folder)
    assert keras.saving.load_model(path).strength == 5.0  # the unedited file loads


def test_the_strength_bound_is_one_function():
    # The value the message names is the bound itself: just under it passes.
    limit = diag.GRADIENT_LIMIT / (4.0 * 2.0)
    diag.check_strength(limit * 0.999, 4.0, 2.0, 1.0)
    with pytest.raises(ValueError, match=re.escape(f"Expected strength < {limit:.3g}")):
        diag.check_strength(limit * 1.001, 4.0, 2.0, 1.0)
    with pytest.raises(ValueError, match=re.escape("the penalty 4e+38")):
        diag.check_strength(1e38, 0.0, 1.0, 4.0)  # the penalty itself overflows


# --- item 2: a Kronecker load brings its hyperparameters -------------------------------


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_kronecker_load_weights_restores_strength_and_gamma(tmp_path, mode):
    model = consolidated("kronecker", mode, gamma=0.5, strength=5.0)
    penalty = float(model.penalty())
    model.save_weights(tmp_path / "m.weights.h5")
    other = consolidated("kronecker", mode, gamma=0.9, strength=1.0)
    other.load_weights(tmp_path / "m.weights.h5")
    assert other.strength == 5.0 and other.gamma == 0.5
    assert other.get_config()["strength"] == 5.0 and other.get_config()["gamma"] == 0.5
    np.testing.assert_allclose(float(other.penalty()), penalty, rtol=1e-6)
    other.save(tmp_path / "m.keras")  # the config written now holds the loaded values
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert (again.strength, again.gamma) == (5.0, 0.5)
    # A file written before γ was saved still loads, keeping the model's γ.
    edit_h5(str(tmp_path / "m.weights.h5"), "regularizer/vars/0",
            lambda x: np.asarray(3.0, x.dtype))
    with h5py.File(tmp_path / "m.weights.h5", "r+") as f:
        names = []
        f.visit(names.append)
        del f[next(n for n in names if n.endswith("/kronecker_gamma"))]
    older = consolidated("kronecker", mode, gamma=0.9, strength=1.0)
    older.load_weights(tmp_path / "m.weights.h5")
    assert (older.strength, older.gamma) == (3.0, 0.9)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_a_failed_kronecker_load_puts_gamma_back_too(tmp_path, mode, monkeypatch):
    # The Kronecker γ is a Python value, not a variable: a load that fails after the
    # state was read (here, in the optimizer) must restore it with the variables.
    model = consolidated("kronecker", mode, gamma=0.5, strength=5.0)
    model.save_weights(tmp_path / "m.weights.h5")
    other = consolidated("kronecker", mode, gamma=0.9, strength=1.0)
    penalty = float(other.penalty())

    def broken(*args, **kwargs):
        raise RuntimeError("disk error while reading the optimizer")

    monkeypatch.setattr(type(other.optimizer), "load_own_variables", broken)
    with pytest.raises(ValueError, match=r"nothing was loaded[\s\S]*disk error"):
        other.load_weights(tmp_path / "m.weights.h5")
    assert (other.strength, other.gamma) == (1.0, 0.9)
    np.testing.assert_allclose(float(other.penalty()), penalty, rtol=1e-6)


# --- item 9: penalty() is the penalty of the next step ---------------------------------


def test_penalty_follows_a_removed_head_as_the_next_step_does():
    model = consolidated("diagonal")
    reg = model.regularizer
    # The oracle: ½ λ Σ P (θ − m)² over the hidden layers only (one task: no offset).
    kept = {k: (p.numpy(), m.numpy(), t.numpy())
            for k, p, m, t in zip(reg.keys, reg.precision, reg.anchors, reg.targets)}
    head = sum(0.5 * 5.0 * float(np.sum(p * (t - m) ** 2))
               for k, (p, m, t) in kept.items() if k.split(":")[0] in ("4", "5"))
    expected = sum(0.5 * 5.0 * float(np.sum(p * (t - m) ** 2))
                   for k, (p, m, t) in kept.items() if k.split(":")[0] not in ("4", "5"))
    assert head > 1e-3  # counting the head would be visibly wrong
    model.network.pop()
    model.network.add(keras.layers.Dense(3, name="new_out"))
    with pytest.warns(UserWarning, match="no longer part of the wrapped model"):
        value = float(model.penalty())
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    logs = model.evaluate(*data(1), verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["ewc_penalty"], value, rtol=1e-5)


def test_kronecker_penalty_refuses_a_model_its_fit_refuses():
    model = consolidated("kronecker")
    model.network.pop()
    model.network.add(keras.layers.Dense(3, name="new_out"))
    with pytest.raises(ValueError, match=r"does not follow.*Removed: \['4:kernel', '5:bias'\]"):
        model.penalty()
    with pytest.raises(ValueError, match=r"does not follow"):
        model.fit(*data(1), epochs=1, verbose=0)


# --- item 8: two threads consolidating one model --------------------------------------


def _race(count, work):
    barrier = threading.Barrier(count)
    errors = []

    def run(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_regularizer_consolidations_are_all_merged():
    model = consolidated("diagonal")
    reg = model.regularizer
    rng = np.random.default_rng(3)
    fisher = [rng.gamma(0.5, 0.1, size=v.shape).astype("float32") for v in reg.targets]
    p0 = values(reg.precision)
    rounds, threads = 6, 4
    for _ in range(rounds):
        _race(threads, lambda i: reg.consolidate(fisher))
    assert int(reg.tasks.numpy()) == 1 + rounds * threads
    for p, start, f in zip(reg.precision, p0, fisher):
        np.testing.assert_allclose(p.numpy(), start + rounds * threads * f, rtol=1e-5)


def _rest_keys(reg):
    """The state's keys of a Kronecker state's diagonal variables (`consolidate`'s dict
    keys them so)."""
    return reg.keys[len(reg.targets) - len(reg.rest):]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_two_threads_consolidating_one_model_both_count(structure):
    model = consolidated(structure)
    reg = model.regularizer
    p0 = values(reg.precision)
    x, y = data(0)
    fisher = model.consolidate((x, y), verbose=0)  # the Fisher at these weights
    _race(2, lambda i: model.consolidate((x, y), verbose=0))
    assert int(reg.tasks.numpy()) == 4
    rest = fisher if structure == "diagonal" else [fisher[k] for k in _rest_keys(reg)]
    for p, start, f in zip(reg.precision, p0, rest):
        np.testing.assert_allclose(p.numpy(), start + 3 * np.asarray(f), rtol=1e-4,
                                   atol=1e-7)
    if structure == "kronecker":
        # Tasks 2, 3 and 4 each have their slot, holding this Fisher's factors.
        for (a_all, g_all, _), key in zip(reg.kronecker_state, reg.layer_keys):
            for k in (1, 2, 3):
                np.testing.assert_allclose(a_all.numpy()[k], fisher[key][0], rtol=1e-4,
                                           atol=1e-7)
                np.testing.assert_allclose(g_all.numpy()[k], fisher[key][1], rtol=1e-4,
                                           atol=1e-7)



# --- item 5: a Ctrl-C near the end of consolidate commits all or nothing --------------


def _torn(model, unit, theta):
    """What is wrong with the state, if it is not `tasks` whole merges of one task
    (the same Fisher `unit` at the same weights `theta` every time), or None."""
    reg = model.regularizer
    tasks = int(reg.tasks.numpy())
    precision, anchors = [p.numpy() for p in reg.precision], [m.numpy() for m in reg.anchors]
    # Kronecker, online with γ = 1: slot 0 holds the nearest Kronecker pair to t A ⊗ G,
    # whose Frobenius norm is t ‖A‖ ‖G‖, anchored at the same weights.
    for (a, g, anchor), (norm, wbar) in zip(getattr(reg, "kronecker_state", []),
                                            unit.get("kronecker", [])):
        got = np.linalg.norm(a.numpy()[0]) * np.linalg.norm(g.numpy()[0])
        if not np.isclose(got, tasks * norm, rtol=1e-4, atol=1e-12):
            return f"tasks={tasks} but factors of {got / norm:.3f} tasks"
        if tasks and not np.allclose(anchor.numpy()[0], wbar, atol=1e-6):
            return f"tasks={tasks} but a Kronecker anchor elsewhere"
    for p, f in zip(precision, unit["diagonal"]):
        if not np.allclose(p, tasks * f, rtol=1e-4, atol=1e-9):
            return f"tasks={tasks} but the precision of {float(np.sum(p) / np.sum(f)):.3f}"
    for m, t in zip(anchors, theta):
        if tasks and not np.allclose(m, t, atol=1e-6):
            return f"tasks={tasks} but an anchor elsewhere"
    return None


def _interrupt_consolidations(structure, trials, seed):
    import _thread
    import time

    model = (consolidated("diagonal") if structure == "diagonal"
             else consolidated("kronecker", "online", gamma=1.0))
    reg = model.regularizer
    x, y = data(0, n=16)
    reg.reset()
    fisher = model.consolidate((x, y), verbose=0)  # traces every function once
    if structure == "diagonal":
        rest, theta = fisher, [v.numpy() for v in reg.targets]
        unit = {"diagonal": [np.asarray(f) for f in fisher]}
    else:
        rest = [np.asarray(fisher[k]) for k in _rest_keys(reg)]
        theta = [v.numpy() for v in reg.rest]
        unit = {"diagonal": rest, "kronecker": [
            (np.linalg.norm(fisher[k][0]) * np.linalg.norm(fisher[k][1]), s.numpy()[0])
            for k, (_, _, s) in zip(reg.layer_keys, reg.kronecker_state)]}
    assert _torn(model, unit, theta) is None
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        model.consolidate((x, y), verbose=0)
        timings.append(time.perf_counter() - start)
    duration = float(np.median(timings))
    rng = np.random.default_rng(seed)
    interrupted, torn = 0, []
    for trial in range(trials):
        # Uniform over the last 20% of a call and a little past its end: the merge and
        # the commit come last.
        timer = threading.Timer(rng.uniform(0.8, 1.05) * duration, _thread.interrupt_main)
        try:
            try:
                timer.start()
                model.consolidate((x, y), verbose=0)
            finally:
                timer.join()
            time.sleep(0.005)  # a pending interrupt is raised here, inside the `try`
        except KeyboardInterrupt:
            interrupted += 1
        problem = _torn(model, unit, theta)
        if problem:
            torn.append(f"trial {trial}: {problem}")
            reg.reset()
    return interrupted, torn


@pytest.mark.slow
@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_ctrl_c_near_the_end_of_consolidate_never_tears_the_state(structure):
    trials = 300 if structure == "diagonal" else 250  # a Kronecker call is ~3x longer
    # `_thread.interrupt_main` does nothing unless Python's own SIGINT handler is set. In
    # one run of the whole suite no interrupt landed (the test passes alone), most likely
    # because something earlier had replaced that handler; the culprit was not found. A
    # user's process has Python's handler: so does this test (a failure shows the one it
    # found).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted, torn = _interrupt_consolidations(structure, trials, seed=1)
        # consolidate itself leaves the handler alone.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert not torn, f"{len(torn)} torn states in {interrupted} interrupted calls: {torn[:5]}"
    # The interrupts did land, most of them inside the calls.
    assert interrupted > trials // 2, (interrupted, before)


# A Ctrl-C that lands inside TensorFlow's C++ code (the data iterator's next batch)
# comes out of pybind11 as this RuntimeError (seen in the trials above).
MISMATCH = ("pybind11::error_already_set: MISMATCH of original and normalized active "
            "exception types: ORIGINAL InvalidArgumentError REPLACED BY KeyboardInterrupt: "
            "<EMPTY MESSAGE>")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_ctrl_c_in_the_data_iterator_is_a_keyboard_interrupt(monkeypatch, structure):
    from keras_ewc.fisher import diagonal

    model = consolidated(structure)
    before = values(model.regularizer.weights)
    add = diagonal._Loop.add

    def interrupted_at_the_second_batch(self, batch):
        if self.batches == 1:
            raise RuntimeError(MISMATCH)
        return add(self, batch)

    monkeypatch.setattr(diagonal._Loop, "add", interrupted_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt, match="MISMATCH"):
        model.consolidate(data(0), batch_size=8, verbose=0)
    assert_unchanged(model.regularizer.weights, before)
    # Any other RuntimeError stays what it is.
    monkeypatch.setattr(diagonal._Loop, "add", lambda self, batch: (_ for _ in ()).throw(
        RuntimeError("pybind11::error_already_set: ORIGINAL ValueError")))
    with pytest.raises(RuntimeError, match="ORIGINAL ValueError"):
        model.consolidate(data(0), verbose=0)
