""".keras files, weights files, checkpoints, SavedModels and atomic consolidation."""

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@keras.saving.register_keras_serializable(package="keras_ewc_tests")
class TwoLayerNet(keras.Model):
    """A subclassed model, registered and configurable as Keras requires for loading."""

    def __init__(self, hidden=8, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.classes = hidden, classes
        self.a = keras.layers.Dense(hidden, activation="relu", name="a")
        self.b = keras.layers.Dense(classes, name="b")

    def call(self, x, training=False):
        return self.b(self.a(x))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "classes": self.classes}


def sequential(hidden=8, inputs=6):
    return keras.Sequential([keras.Input((inputs,)),
                             keras.layers.Dense(hidden, activation="relu", name="hidden"),
                             keras.layers.Dense(3, name="head")])


def functional(hidden=8, inputs=6):
    x = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(3, name="head")(h))


def subclassed_built(hidden=8, inputs=6):
    net = TwoLayerNet(hidden)
    net(np.zeros((1, inputs), "float32"))  # built before wrapping: EWCModel builds now
    return net


ARCHITECTURES = {
    "sequential": sequential,
    "functional": functional,
    "subclassed": subclassed_built,
    "subclassed_lazy": lambda hidden=8, inputs=6: TwoLayerNet(hidden),
}


def tasks(n=48, d=6, seed=0):
    rng = np.random.default_rng(seed)
    xa, xb = rng.normal(size=(2, n, d)).astype("float32")
    return (xa, rng.integers(0, 3, n)), (xb, rng.integers(0, 3, n))


def compiled(net, **kwargs):
    model = keras_ewc.EWCModel(net, **{"strength": 50.0, **kwargs})
    model.compile(keras.optimizers.Adam(0.01), LOSS)
    return model


def after_task_a(net, **kwargs):
    """A model that learned task A, consolidated it, and moved away from the anchors."""
    (xa, ya), _ = tasks()
    model = compiled(net, **kwargs)
    model.fit(xa, ya, epochs=1, batch_size=16, shuffle=False, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    for i, v in enumerate(model.network.trainable_variables):
        v.assign(v + 0.01 * (i + 1))
    return model


def state(model) -> list:
    reg = model.regularizer
    return [v.numpy() for v in [*reg.anchors, *reg.precision, reg.offset, reg.tasks]]


def everything(model) -> list:
    """Weights, EWC state and optimizer variables, as arrays."""
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]


def assert_same(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


def continue_b(model):
    _, (xb, yb) = tasks()
    history = model.fit(xb, yb, epochs=2, batch_size=16, shuffle=False, verbose=0).history
    return history["ewc_penalty"], [v.numpy() for v in model.network.trainable_variables]


# --- .keras ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_keras_file_round_trip_keeps_state_config_and_training(arch, tmp_path):
    model = after_task_a(ARCHITECTURES[arch](), mode="online", gamma=0.5, exclude=["head"]
                         if arch in ("sequential", "functional") else ["b"])
    assert int(model.regularizer.tasks.numpy()) == 1 and float(model.penalty()) > 0
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)

    assert type(loaded) is keras_ewc.EWCModel
    assert (loaded.strength, loaded.mode, loaded.gamma) == (50.0, "online", 0.5)
    # (Keras names a reloaded Sequential's variables without the model's prefix.)
    assert [v.path.split("/")[-2:] for v in loaded.regularised_variables] == [
        v.path.split("/")[-2:] for v in model.regularised_variables]
    assert len(loaded.regularised_variables) == 2  # the excluded head stays out
    assert_same(state(loaded), state(model))
    x = tasks()[0][0]
    assert_same(loaded(x).numpy(), model(x).numpy())
    np.testing.assert_allclose(float(loaded.penalty()), float(model.penalty()), rtol=1e-6)
    # The optimizer state travels too, so further training is step for step the same.
    (p0, w0), (p1, w1) = continue_b(model), continue_b(loaded)
    assert p0[-1] > 0
    np.testing.assert_allclose(p1, p0, rtol=1e-5)
    assert_same(w1, w0, rtol=1e-5, atol=1e-7)


def test_penalty_gradient_after_loading_equals_the_original(tmp_path):
    model = after_task_a(functional())
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    grads = []
    for m in (model, loaded):
        with tf.GradientTape() as tape:
            value = m.penalty()
        grads.append([g.numpy() for g in tape.gradient(value, m.regularised_variables)])
    assert max(float(np.abs(g).max()) for g in grads[0]) > 0
    assert_same(grads[1], grads[0])


def _rewrite_config(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                config = json.loads(data)
                edit(config["config"])
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def test_format_version_is_written_and_an_unknown_one_is_refused(tmp_path):
    model = after_task_a(sequential())
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        assert json.loads(z.read("config.json"))["config"]["format_version"] == 2
    _rewrite_config(tmp_path / "m.keras", tmp_path / "future.keras",
                    lambda c: c.update(format_version=99))
    with pytest.raises(ValueError, match=r"format_version=99.*reads versions 1 to 2"):
        keras.models.load_model(tmp_path / "future.keras")
    # A file from before the version existed still loads.
    _rewrite_config(tmp_path / "m.keras", tmp_path / "old.keras",
                    lambda c: c.pop("format_version"))
    assert_same(state(keras.models.load_model(tmp_path / "old.keras")), state(model))


def test_keras_file_whose_state_belongs_to_other_variables_is_refused(tmp_path):
    model = after_task_a(sequential(), include=["hidden"])
    model.save(tmp_path / "m.keras")
    # The config now says the head is regularised, but the saved state is the hidden
    # layer's: same number of variables, other keys.
    _rewrite_config(tmp_path / "m.keras", tmp_path / "bad.keras",
                    lambda c: c.update(variable_keys=["2:kernel", "3:bias"]))
    with pytest.raises(ValueError, match=r"belongs to other variables.*file anchors "
                                         r"\['0:kernel', '1:bias'\].*2:kernel \((\w+/)?head"):
        keras.models.load_model(tmp_path / "bad.keras")
    # A config naming a variable the architecture does not have.
    _rewrite_config(tmp_path / "m.keras", tmp_path / "bad2.keras",
                    lambda c: c.update(variable_keys=["0:kernel", "9:bias"]))
    with pytest.raises(ValueError, match=r"names variables this model does not have: "
                                         r"9:bias \(the model has 4 weights\)"):
        keras.models.load_model(tmp_path / "bad2.keras")


def test_truncated_and_corrupted_keras_files_raise(tmp_path):
    model = after_task_a(sequential())
    model.save(tmp_path / "m.keras")
    data = (tmp_path / "m.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="zip"):
        keras.models.load_model(tmp_path / "cut.keras")
    # Flipped bytes inside the weights: the archive's checksum names the damaged part.
    info = zipfile.ZipFile(tmp_path / "m.keras").getinfo("model.weights.h5")
    start = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    damaged = bytearray(data)
    damaged[start:start + 64] = bytes(b ^ 0xFF for b in damaged[start:start + 64])
    (tmp_path / "bad.keras").write_bytes(bytes(damaged))
    with pytest.raises(zipfile.BadZipFile, match="CRC.*model.weights.h5"):
        keras.models.load_model(tmp_path / "bad.keras")


# --- weights files ------------------------------------------------------------------------


def test_weights_files_carry_the_state(tmp_path):
    model = after_task_a(sequential())
    expected = everything(model)
    model.save_weights(tmp_path / "w.weights.h5")
    model.regularizer.reset()
    assert float(model.penalty()) == 0.0
    model.load_weights(tmp_path / "w.weights.h5")
    assert_same(everything(model), expected)
    # A fresh model, whose optimizer has no variables yet, takes weights and state.
    fresh = compiled(sequential())
    fresh.load_weights(tmp_path / "w.weights.h5")
    assert_same([v.numpy() for v in fresh.weights], [v.numpy() for v in model.weights])


@pytest.mark.parametrize("case", ["architecture", "state_shapes", "state_count", "truncated"])
def test_a_failed_load_weights_changes_nothing(case, tmp_path):
    source = {
        "architecture": lambda: after_task_a(sequential(hidden=5)),
        "state_shapes": lambda: after_task_a(sequential(), include=["head"]),
        "state_count": lambda: after_task_a(sequential(), include=["hidden"]),
        "truncated": lambda: after_task_a(sequential()),
    }[case]()
    path = tmp_path / "w.weights.h5"
    source.save_weights(path)
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    keras.utils.set_random_seed(7)
    target = after_task_a(sequential(), include=["hidden"] if case == "state_shapes" else None)
    before = everything(target)
    expected = {
        "architecture": r"the architecture .*sequential/layers/dense/vars/0: file has "
                        r"shape \(6, 5\), this model \(6, 8\)",
        "state_shapes": r"belongs to other variables .*file anchors \['2:kernel', "
                        r"'3:bias'\]; this model regularises \['0:kernel \(\w+/hidden/kernel\)",
        "state_count": r"belongs to other variables .*only in this model: \['2:kernel "
                       r"\(\w+/head/kernel\)', '3:bias",
        "truncated": r"w\.weights\.h5.*truncated or corrupted",
    }[case]
    with pytest.raises(Exception, match=r"nothing was loaded") as info:
        target.load_weights(path)
    assert info.match(expected), str(info.value)
    assert_same(everything(target), before)


# --- checkpoints ----------------------------------------------------------------------


def test_tf_train_checkpoint_covers_the_state(tmp_path):
    model = after_task_a(sequential())
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert sum("/regularizer/anchor_" in n for n in names) == 4, names
    assert sum("/regularizer/precision_" in n for n in names) == 4, names
    fresh = compiled(sequential())
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    assert_same(everything(fresh), everything(model))


class Interrupt(keras.callbacks.Callback):
    """Kills a fit at a given global step, as a crashed machine would."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise RuntimeError("killed")


def test_fit_killed_at_a_random_step_resumes_to_the_uninterrupted_result(tmp_path):
    (xa, ya), (xb, yb) = tasks()
    steps, epochs = 3, 4
    # The learner after task A, consolidated; a second task is consolidated inside the
    # run (at each epoch end), so the state changes while the run is being backed up.
    keras.utils.set_random_seed(0)
    start = after_task_a(sequential())
    start.save(tmp_path / "start.keras")

    class ConsolidateEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.consolidate((xb[:8], yb[:8]), verbose=0)

    def run(callbacks):
        model = keras.models.load_model(tmp_path / "start.keras")
        # ConsolidateEachEpoch runs before the backup, so the backup holds the new state.
        model.fit(xb, yb, epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                  callbacks=[ConsolidateEachEpoch(), *callbacks])
        return model

    reference = everything(run([]))
    kill = int(np.random.default_rng(1234).integers(steps + 1, steps * epochs))
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="killed"):
        run([backup, Interrupt(kill)])
    # A new process: the learner rebuilt from the last .keras file, which knows
    # nothing of the tasks consolidated during the run; the backup restores them.
    resumed = run([keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert int(resumed.regularizer.tasks.numpy()) == 1 + epochs
    assert_same(everything(resumed), reference, rtol=1e-6, atol=1e-7)


# --- atomic consolidation ---------------------------------------------------------------


@pytest.mark.parametrize("failure", ["iterator_raises", "nan_in_data"])
def test_a_failed_consolidation_leaves_the_state_as_it_was(failure):
    model = after_task_a(sequential())
    before = everything(model)
    (xa, ya), _ = tasks()

    def batches():
        for i in range(0, 48, 16):
            x = xa[i:i + 16].copy()
            if i == 32:
                if failure == "iterator_raises":
                    raise OSError("the data went away")
                x[3, 2] = np.nan
            yield x, ya[i:i + 16]

    data = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64)))
    with pytest.raises(Exception, match="went away|NaN|finite"):
        model.consolidate(data, verbose=0)
    assert_same(everything(model), before)
    # The same data without the failure does consolidate.
    model.consolidate((xa, ya), verbose=0)
    assert int(model.regularizer.tasks.numpy()) == 2


# --- SavedModel -------------------------------------------------------------------------


def test_saved_model_serves_and_carries_named_state(tmp_path):
    model = after_task_a(functional())
    model.export(tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served"))
    x = tasks()[0][0]
    np.testing.assert_allclose(served.serve(x).numpy(), model(x).numpy(),
                               rtol=1e-6, atol=1e-6)
    reg = model.regularizer
    assert_same([v.numpy() for v in served.ewc_anchors], [v.numpy() for v in reg.anchors])
    assert_same([v.numpy() for v in served.ewc_precision],
                [v.numpy() for v in reg.precision])
    assert float(served.ewc_offset[0].numpy()) == float(reg.offset.numpy())
    assert int(served.ewc_tasks[0].numpy()) == 1
    config = json.loads(served.ewc_config[0].numpy())
    assert config["strength"] == 50.0 and config["format_version"] == 2
    assert [p for p, _ in config["regularised"]] == [v.path for v in reg.targets]
    assert config["variable_keys"] == ["0:kernel", "1:bias", "2:kernel", "3:bias"]


@pytest.mark.parametrize("arch", ["sequential", "subclassed_lazy"])
def test_from_saved_model_goes_back_to_learning(arch, tmp_path):
    model = after_task_a(ARCHITECTURES[arch](), strength=20.0)
    model.export(tmp_path / "served")
    again = keras_ewc.EWCModel.from_saved_model(tmp_path / "served", ARCHITECTURES[arch]())
    assert (again.strength, again.mode) == (20.0, "separate")
    assert_same(state(again), state(model))
    x = tasks()[0][0]
    assert_same(again(x).numpy(), model(x).numpy())
    # A SavedModel keeps no optimizer: compare both from a fresh optimizer.
    for m in (model, again):
        m.compile(keras.optimizers.SGD(0.05), LOSS)
    (p0, w0), (p1, w1) = continue_b(model), continue_b(again)
    assert p0[-1] > 0
    np.testing.assert_allclose(p1, p0, rtol=1e-5)
    assert_same(w1, w0, rtol=1e-5, atol=1e-7)


def test_from_saved_model_refuses_another_architecture(tmp_path):
    after_task_a(sequential()).export(tmp_path / "served")
    other = sequential(hidden=5)
    before = [v.numpy() for v in other.weights]
    with pytest.raises(ValueError, match=r"hidden/kernel: saved shape \(6, 8\), expected "
                                         r"\(6, 5\)"):
        keras_ewc.EWCModel.from_saved_model(tmp_path / "served", other)
    assert_same([v.numpy() for v in other.weights], before)
    with pytest.raises(ValueError, match="carries no EWC state"):
        net = sequential()
        net.export(str(tmp_path / "plain"), verbose=False)
        keras_ewc.EWCModel.from_saved_model(tmp_path / "plain", net)


def test_from_saved_model_refuses_an_unknown_format_version(tmp_path, monkeypatch):
    from keras_ewc import saving

    model = after_task_a(sequential())
    monkeypatch.setattr(saving, "FORMAT_VERSION", 3)
    model.export(tmp_path / "served")
    monkeypatch.setattr(saving, "FORMAT_VERSION", 2)
    with pytest.raises(ValueError, match=r"format_version=3.*reads versions 1 to 2"):
        keras_ewc.EWCModel.from_saved_model(tmp_path / "served", sequential())


# --- the example --------------------------------------------------------------------------


def test_save_and_resume_example_runs_offline(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "save_and_resume.py"),
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The served model predicts what the trained one did, and task A survived task B.
    assert result["served_matches"] is True
    assert result["tasks"] == 2 and result["rebuilt_tasks"] == 2
    assert result["accuracy_a_after_b"] > 0.6, result


def test_all_or_nothing_puts_back_what_a_failing_load_assigned():
    from keras_ewc import saving

    model = after_task_a(sequential())
    before = everything(model)

    def half_a_load():
        model.network.weights[0].assign(np.zeros(model.network.weights[0].shape))
        model.regularizer.offset.assign(123.0)
        raise OSError("read error half-way")

    with pytest.raises(OSError, match=r"'f\.keras'.*nothing was loaded.*read error"):
        saving.all_or_nothing(model, half_a_load, "f.keras")
    assert_same(everything(model), before)


# --- nothing half-written on disk ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["keras", "weights"])
def test_a_save_that_fails_part_way_leaves_the_previous_file_loadable(kind, tmp_path,
                                                                      monkeypatch):
    model = after_task_a(sequential())
    path = tmp_path / ("m.keras" if kind == "keras" else "m.weights.h5")
    save = model.save if kind == "keras" else model.save_weights
    save(path)
    expected = state(model)
    model.regularizer.reset()

    def fail(self, store):
        store["format_version"] = np.array(2)  # a part is written, then the disk fails
        raise OSError("No space left on device")

    monkeypatch.setattr(keras_ewc.EWCRegularizer, "save_own_variables", fail)
    with pytest.raises(OSError, match="No space left"):
        save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    if kind == "keras":
        assert_same(state(keras.models.load_model(path)), expected)
    else:
        model.load_weights(path)
        assert_same(state(model), expected)


def test_save_refuses_to_overwrite_when_told_not_to(tmp_path, monkeypatch):
    model = after_task_a(sequential())
    model.save(tmp_path / "m.keras")
    first = (tmp_path / "m.keras").read_bytes()
    model.regularizer.reset()
    # Keras asks before overwriting; answering no leaves the file as it was.
    monkeypatch.setattr("builtins.input", lambda *a: "n")
    model.save(tmp_path / "m.keras", overwrite=False)
    assert (tmp_path / "m.keras").read_bytes() == first


# --- what a plain write would leave: links, modes, errors naming the user's path ----------

SAVES = {"keras": ("m.keras", "save"), "weights": ("m.weights.h5", "save_weights")}


def _state_from(kind, path):
    if kind == "keras":
        return state(keras.models.load_model(path))
    model = compiled(sequential())
    model.load_weights(path)
    return state(model)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kind", sorted(SAVES))
def test_saving_through_a_symbolic_link_writes_its_target(kind, tmp_path):
    name, method = SAVES[kind]
    model = after_task_a(sequential())
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / name
    getattr(compiled(sequential()), method)(target)  # an older file, zero state
    link = tmp_path / name
    link.symlink_to(target)
    getattr(model, method)(link)
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays
    assert sorted(os.listdir(tmp_path / "store")) == [name]  # no temporary file left
    assert_same(_state_from(kind, target), state(model))  # the target was written
    assert float(state(model)[-1]) == 1.0  # a consolidated state, not the zero one


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kind", sorted(SAVES))
def test_saved_files_get_the_mode_a_plain_write_gives(kind, tmp_path):
    name, method = SAVES[kind]
    model = after_task_a(sequential())
    path = tmp_path / name
    old = os.umask(0o027)
    try:
        getattr(model, method)(path)  # a new file: 0o666 less the umask
        assert oct(os.stat(path).st_mode & 0o7777) == oct(0o640)
        os.chmod(path, 0o664)  # a replaced file keeps its mode
        getattr(model, method)(path)
        assert oct(os.stat(path).st_mode & 0o7777) == oct(0o664)
    finally:
        os.umask(old)
    assert_same(_state_from(kind, path), state(model))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kind", sorted(SAVES))
def test_save_errors_name_the_path_given_and_leave_the_file(kind, tmp_path, monkeypatch):
    name, method = SAVES[kind]
    model = after_task_a(sequential())
    save = getattr(model, method)
    path = tmp_path / name
    save(path)
    before = path.read_bytes()
    weights = [v.numpy() for v in model.weights]
    # A name Keras refuses: Keras' own error, naming it (it named a temporary file).
    given = re.escape(str(tmp_path / "learner."))
    with pytest.raises(ValueError, match=rf"Received: filepath={given}\.?$"):
        save(tmp_path / "learner.")
    # A folder that does not exist.
    with pytest.raises(FileNotFoundError) as error:
        save(tmp_path / "nowhere" / name)
    assert (f"Cannot save to '{tmp_path}/nowhere/{name}': the folder "
            f"'{tmp_path}/nowhere' does not exist") in str(error.value)
    # A link to a file in a folder that does not exist names the link and the folder.
    link = tmp_path / f"link-{name}"
    link.symlink_to(tmp_path / "gone" / name)
    with pytest.raises(FileNotFoundError) as error:
        save(link)
    assert (f"Cannot save to '{link}' (it links to '{tmp_path}/gone/{name}'): the folder "
            f"'{tmp_path}/gone' does not exist") in str(error.value)
    link.unlink()

    # A folder no file can be created in (as /proc or a read-only mount).
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", f"{tmp_path}/.tmp-x-{name}")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as error:
        save(path)
    monkeypatch.undo()
    assert f"Cannot save to '{path}'" in str(error.value)
    assert ".tmp-" not in str(error.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [name]
    assert_same([v.numpy() for v in model.weights], weights)


@pytest.mark.backend_neutral
def test_an_error_raised_while_writing_names_the_path_given(tmp_path):
    from keras_ewc import saving

    def write(temporary):
        raise ValueError(f"Received: filepath={temporary}.")

    path = str(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=rf"^Received: filepath={path}\.$"):
        saving.write_then_rename(path, True, write, fallback=None, endings=(".keras",))
    assert os.listdir(tmp_path) == []


# --- files of another structure or architecture -------------------------------------------


def _kronecker_after_task_a():
    (xa, ya), _ = tasks()
    model = compiled(sequential(), structure="kronecker", max_tasks=3)
    model.fit(xa, ya, epochs=1, batch_size=16, shuffle=False, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    for i, v in enumerate(model.network.trainable_variables):
        v.assign(v + 0.01 * (i + 1))
    return model


def _snapshot(model, path):
    with open(path, "rb") as f:
        return [v.numpy() for v in model.weights], float(model.penalty()), f.read()


@pytest.mark.backend_neutral
@pytest.mark.parametrize("into", ["kronecker", "diagonal"])
@pytest.mark.parametrize("kind", ["keras", "weights"])
def test_a_file_of_the_other_structure_is_refused_naming_both(into, kind, tmp_path):
    diagonal, kronecker = after_task_a(sequential()), _kronecker_after_task_a()
    source, model = (diagonal, kronecker) if into == "kronecker" else (kronecker, diagonal)
    path = tmp_path / ("m.keras" if kind == "keras" else "m.weights.h5")
    (source.save if kind == "keras" else source.save_weights)(path)
    before = _snapshot(model, path)
    held = "diagonal" if into == "kronecker" else "kronecker"
    # Before: "expected 9 variables, but received 0" / "format version 1 holds 0 variables".
    with pytest.raises(ValueError, match=rf"holds a {held} EWC state; this model is "
                                         rf"{into} \(structure='{into}'\); nothing was "
                                         rf"loaded.*structure='{held}'"):
        model.load_weights(path)
    after = _snapshot(model, path)
    assert_same(after[0], before[0])
    assert after[1:] == before[1:] and after[1] > 0  # penalty and the file's bytes


@pytest.mark.backend_neutral
def test_a_keras_file_of_another_architecture_names_what_differs(tmp_path):
    model = after_task_a(sequential())
    model.save(tmp_path / "m.keras")
    other = after_task_a(sequential(hidden=5))
    before = _snapshot(other, tmp_path / "m.keras")
    # Before: Keras' "Layer 'hidden' expected 2 variables, but received 0 variables".
    with pytest.raises(ValueError, match=r"does not match the architecture of this "
                                         r"EWCModel.*nothing was loaded: layers/sequential/"
                                         r"layers/dense/vars/0: file has shape \(6, 8\), "
                                         r"this model \(6, 5\)"):
        other.load_weights(tmp_path / "m.keras")
    after = _snapshot(other, tmp_path / "m.keras")
    assert_same(after[0], before[0])
    assert after[1:] == before[1:]


@pytest.mark.parametrize("structure", ["diagonal", "kronecker"])
def test_from_saved_model_accepts_the_files_own_structure_and_refuses_another(
        structure, tmp_path):
    source = (after_task_a(sequential()) if structure == "diagonal"
              else _kronecker_after_task_a())
    source.export(tmp_path / "served")
    other = "kronecker" if structure == "diagonal" else "diagonal"
    slots = {"max_tasks": 3} if structure == "kronecker" else {}
    # Equal to the file's values: accepted (before: TypeError "got multiple values").
    again = keras_ewc.EWCModel.from_saved_model(
        tmp_path / "served", sequential(), structure=structure, mode="separate", **slots)
    assert again.structure == structure
    assert float(again.penalty()) == pytest.approx(float(source.penalty()), rel=1e-6)
    net = sequential()
    before = [v.numpy() for v in net.weights]
    refused = [({"structure": other}, rf"holds a {structure} EWC state with "
                                      rf"structure='{structure}'; from_saved_model was "
                                      rf"given structure='{other}'"),
               ({"mode": "online"}, r"with mode='separate'; .* given mode='online'"),
               ({"include": ["hidden"]}, r"says which variables its EWC state anchors")]
    if structure == "kronecker":
        refused.append(({"max_tasks": 5}, r"with max_tasks=3; .* given max_tasks=5"))
    for arguments, message in refused:
        with pytest.raises(ValueError, match=message):
            keras_ewc.EWCModel.from_saved_model(tmp_path / "served", net, **arguments)
        assert_same([v.numpy() for v in net.weights], before)


@pytest.mark.backend_neutral
def test_the_umask_is_read_without_proc_too(monkeypatch):
    from keras_ewc import saving

    old = os.umask(0o037)
    try:
        assert saving._umask() == 0o037
        real_open = open

        def no_proc(path, *args, **kwargs):
            if str(path).startswith("/proc/"):
                raise FileNotFoundError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert saving._umask() == 0o037
        assert os.umask(0o037) == 0o037  # and it is left as it was
    finally:
        os.umask(old)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kind", ["keras", "weights"])
def test_a_plain_keras_models_file_is_refused_naming_what_to_do(kind, tmp_path):
    net = sequential()
    path = tmp_path / ("net.keras" if kind == "keras" else "net.weights.h5")
    (net.save if kind == "keras" else net.save_weights)(path)
    model = after_task_a(sequential())
    before = _snapshot(model, path)
    # Before: a list of every path, missing on one side and present on the other.
    with pytest.raises(ValueError, match=r"holds no EWC state: it was saved from a plain "
                                         r"Keras model.*model\.network\.load_weights"):
        model.load_weights(path)
    after = _snapshot(model, path)
    assert_same(after[0], before[0])
    assert after[1:] == before[1:] and after[1] > 0
    model.network.load_weights(path)  # the way the error names
    assert_same([v.numpy() for v in model.network.weights], [v.numpy() for v in net.weights])
