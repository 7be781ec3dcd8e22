"""The EWC state follows the model: keys, a changing model, hyperparameters as variables."""

import functools
import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def net(width=4, inputs=4):
    """`h` and `out` have the same shapes: only keys tell their states apart."""
    return keras.Sequential([keras.Input((inputs,)),
                             keras.layers.Dense(width, activation="tanh", name="h"),
                             keras.layers.Dense(width, name="out")])


def data(n=32, d=4, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, classes, n)


def trained(model_net=None, strength=20.0, lr=0.1, **kwargs):
    """Fit on task A, consolidate, move away from the anchors: a positive penalty.

    The Fisher is a fixed positive array (the engine is tested in test_fisher*.py);
    these tests are about where the state goes, not its values.
    """
    model = keras_ewc.EWCModel(model_net or net(), strength=strength, **kwargs)
    model.compile(keras.optimizers.SGD(lr), LOSS)
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    rng = np.random.default_rng(len(model.regularizer.keys))
    model.regularizer.consolidate([rng.gamma(0.5, 0.1, size=v.shape).astype("float32")
                                   for v in model.regularised_variables])
    for i, v in enumerate(model.network.trainable_variables):
        v.assign(v + 0.05 * (i + 1))
    return model


def state(model):
    reg = model.regularizer
    return [v.numpy() for v in [*reg.anchors, *reg.precision, reg.offset, reg.tasks]]


def penalty_and_gradients(model):
    with tf.GradientTape() as tape:
        value = model.penalty()
    grads = tape.gradient(value, model.regularised_variables)
    return float(value), [g.numpy() for g in grads]


# --- keys -----------------------------------------------------------------------------


@pytest.mark.backend_neutral
def test_keys_are_positions_in_weights_and_names():
    model = keras_ewc.EWCModel(net(), include=["out"])
    assert model.regularizer.keys == ["2:kernel", "3:bias"]
    assert model.get_config()["variable_keys"] == ["2:kernel", "3:bias"]


@pytest.mark.backend_neutral
def test_two_instances_of_one_architecture_load_each_others_weights(tmp_path):
    first = trained(net())
    second = keras_ewc.EWCModel(net(), strength=20.0)  # other auto names, same keys
    second.compile(keras.optimizers.SGD(0.1), LOSS)
    assert first.network.name != second.network.name
    first.save_weights(tmp_path / "w.weights.h5")
    second.load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(state(second), state(first)):
        np.testing.assert_array_equal(a, b)
    assert float(first.penalty()) > 0
    assert float(second.penalty()) == pytest.approx(float(first.penalty()), rel=1e-6)


def test_a_state_that_belongs_to_other_variables_is_refused_even_with_equal_shapes(tmp_path):
    source = trained(net(), include=["out"])
    source.save_weights(tmp_path / "out.weights.h5")
    target = trained(net(), include=["h"])
    before = state(target) + [w.numpy() for w in target.network.weights]
    with pytest.raises(ValueError, match=r"file anchors \['2:kernel', '3:bias'\]; this "
                                         r"model regularises \['0:kernel \(\w+/h/kernel\)'"):
        target.load_weights(tmp_path / "out.weights.h5")
    after = state(target) + [w.numpy() for w in target.network.weights]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_restores_the_state_only_into_the_variables_it_belongs_to(tmp_path):
    source = trained(net(), include=["out"])
    path = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    names = [n for n, _ in tf.train.list_variables(path)]
    assert any("anchor_2:kernel" in n for n in names), names
    target = trained(net(), include=["h"])
    before = state(target)
    status = tf.train.Checkpoint(model=target).read(path)
    # The target's own state finds nothing of its keys in the file.
    with pytest.raises(AssertionError, match=r"(?s)not bound to checkpointed values.*"
                                             r"ewc_state/precision_0_kernel"):
        status.assert_consumed()
    for a, b in zip(state(target)[:-2], before[:-2]):  # anchors and precisions untouched
        np.testing.assert_array_equal(a, b)
    same = trained(net(), include=["out"])
    tf.train.Checkpoint(model=same).read(path).assert_existing_objects_matched()
    for a, b in zip(state(same), state(source)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_freezing_changes_nothing_that_is_anchored(change, tmp_path):
    network = net()
    if change == "unfreeze":
        network.layers[0].trainable = False  # frozen when wrapped: not regularised yet
    model = trained(network)
    keys_before = model.regularizer.keys
    network.layers[0].trainable = change == "unfreeze"
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    x, y = data(seed=1)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    reg = model.regularizer
    if change == "unfreeze":
        # The unfrozen layer joins with zero precision; the head keeps its state.
        assert keys_before == ["2:kernel", "3:bias"]
        assert reg.keys == ["0:kernel", "1:bias", "2:kernel", "3:bias"]
        assert float(np.abs(reg.precision[0].numpy()).max()) == 0.0
    else:
        assert reg.keys == keys_before == ["0:kernel", "1:bias", "2:kernel", "3:bias"]
    assert float(np.abs(reg.precision[-1].numpy()).max()) > 0
    value, grads = penalty_and_gradients(model)
    assert value > 0
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.regularizer.keys == reg.keys
    loaded_value, loaded_grads = penalty_and_gradients(loaded)
    assert loaded_value == pytest.approx(value, abs=1e-6, rel=1e-6)
    for a, b in zip(loaded_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


# --- format version 1 ---------------------------------------------------------------------


def _v1_expected():
    with open(os.path.join(HERE, "data", "v1_expected.json")) as f:
        return json.load(f)


@pytest.mark.backend_neutral
def test_a_version_1_keras_file_loads_with_its_penalty():
    expected = _v1_expected()
    model = keras.models.load_model(os.path.join(HERE, "data", "v1.keras"))
    assert model.strength == expected["strength"]
    assert model.regularizer.keys == ["0:kernel", "1:bias"]  # include=["h"] in the file
    assert int(model.regularizer.tasks.numpy()) == expected["tasks"]
    assert float(model.penalty()) == pytest.approx(expected["penalty"], rel=1e-6)


@pytest.mark.backend_neutral
def test_a_version_1_weights_file_loads_with_its_penalty():
    expected = _v1_expected()
    model = keras_ewc.EWCModel(
        keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh",
                                                                name="h"),
                          keras.layers.Dense(3, name="out")]),
        strength=expected["strength"], include=["h"])
    model.load_weights(os.path.join(HERE, "data", "v1.weights.h5"))
    assert float(model.penalty()) == pytest.approx(expected["penalty"], rel=1e-6)
    # A version 1 state for two variables does not fit a model regularising four.
    everything = keras_ewc.EWCModel(keras.models.clone_model(model.network))
    with pytest.raises(ValueError, match=r"format version 1\) holds 6 variables, but this "
                                         r"model's state has 10"):
        everything.load_weights(os.path.join(HERE, "data", "v1.weights.h5"))
    assert float(everything.penalty()) == 0.0


# --- the model changes under the wrapper --------------------------------------------------


def test_a_replaced_head_leaves_the_state_with_a_warning_and_a_new_one_joins_at_zero(
        tmp_path):
    model = trained(net())
    network = model.network
    hidden_state = [v.numpy() for v in (model.regularizer.anchors[0],
                                        model.regularizer.precision[0])]
    network.pop()
    network.add(keras.layers.Dense(3, name="new_head"))
    assert len(model.regularizer.targets) == 4  # noticed at the next fit, not before
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    x, y = data(classes=3, seed=2)
    with pytest.warns(UserWarning, match=r"dropped: 2:kernel \(\w+/out/kernel\), "
                                         r"3:bias \(\w+/out/bias\)"):
        model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    reg = model.regularizer
    assert [v.path.split("/")[-2] for v in model.regularised_variables] == [
        "h", "h", "new_head", "new_head"]
    assert reg.keys == ["0:kernel", "1:bias", "2:kernel", "3:bias"]
    np.testing.assert_array_equal(reg.anchors[0].numpy(), hidden_state[0])
    np.testing.assert_array_equal(reg.precision[0].numpy(), hidden_state[1])
    assert float(np.abs(reg.precision[2].numpy()).max()) == 0.0
    assert reg.precision[2].shape == (4, 3)
    assert len(reg.weights) == 2 * 4 + 4  # the dropped state left the layer
    # The file loads back (today it could not), with the same penalty.
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert float(loaded.penalty()) == pytest.approx(float(model.penalty()), rel=1e-6)


@pytest.mark.backend_neutral
def test_every_traced_step_follows_a_head_replaced_in_place():
    model = trained(net())
    x, y = data(classes=4, seed=8)
    model.predict(x, verbose=0)  # traced with the old head
    model.evaluate(x, y, verbose=0)
    model.network.pop()
    model.network.add(keras.layers.Dense(4, name="new_head"))  # the same shapes
    with pytest.warns(UserWarning, match="dropped"):
        assert len(model.regularised_variables) == 4  # the state follows here
    outputs = np.asarray(model.network(x))
    # Before: evaluate and predict ran the old head's traced steps silently (no
    # `compile` in between, which would have dropped them).
    loss = float(model.evaluate(x, y, verbose=0, return_dict=True)["loss"])
    assert loss == pytest.approx(float(LOSS(y, outputs)), rel=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs, rtol=1e-5, atol=1e-6)


def test_include_and_exclude_apply_to_new_variables():
    model = trained(net(), exclude=lambda v: v.name == "bias")
    model.network.add(keras.layers.Dense(2, name="extra"))
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    x, y = data(classes=2, seed=3)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model.regularizer.keys == ["0:kernel", "2:kernel", "4:kernel"]
    names = keras_ewc.EWCModel(net(), include=["h"])
    names.network.add(keras.layers.Dense(2, name="extra"))
    assert names.regularizer.keys == ["0:kernel", "1:bias"]
    assert [v.path.split("/")[-2] for v in names.regularised_variables] == ["h", "h"]


def _move_and_consolidate(model):
    """The same further task for two copies: a fixed Fisher, then moved weights."""
    rng = np.random.default_rng(7)
    model.regularizer.consolidate([rng.gamma(0.5, 0.1, size=v.shape).astype("float32")
                                   for v in model.regularised_variables])
    for i, v in enumerate(model.network.trainable_variables):
        v.assign(v + 0.03 * (i + 1))
    return float(model.penalty())


@pytest.mark.backend_neutral
def test_a_replaced_network_is_wrapped_alone_and_its_file_round_trips(tmp_path):
    model = trained(net())
    old = model.network
    reg = model.regularizer
    hidden = [reg.anchors[0].numpy(), reg.precision[0].numpy()]
    x, y = data(classes=4, seed=5)
    model.predict(x, verbose=0)  # a traced predict step that calls the old network
    new = keras.Sequential([keras.Input((4,)), old.get_layer("h"),
                            keras.layers.Dense(4, name="head2")])
    with pytest.warns(UserWarning, match=r"dropped: 2:kernel \(\w+/out/kernel\), "
                                         r"3:bias \(\w+/out/bias\)"):
        model.network = new
    assert model.network is new and model.layers == [new, reg]
    # Only the new network's weights and the state: the old head is neither listed nor
    # saved (before: 4 more weights, and the file put them into the new head).
    assert {id(w) for w in model.weights} == {id(w) for w in new.weights + reg.weights}
    np.testing.assert_allclose(model.predict(x, verbose=0), np.asarray(new(x)), rtol=1e-6)
    assert [v.path.split("/")[-2] for v in model.regularised_variables] == [
        "h", "h", "head2", "head2"]
    np.testing.assert_array_equal(reg.anchors[0].numpy(), hidden[0])  # shared: kept
    np.testing.assert_array_equal(reg.precision[0].numpy(), hidden[1])
    assert float(np.abs(reg.precision[2].numpy()).max()) == 0.0  # new: joins at zero
    model.compile(keras.optimizers.SGD(0.1), LOSS)  # the optimizer knew the old head
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert len(loaded.weights) == len(model.weights)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    assert float(model.penalty()) > 0
    assert float(loaded.penalty()) == pytest.approx(float(model.penalty()), rel=1e-6)
    # A further task on both: the same penalty (before: 0.0003 became 2.08).
    assert _move_and_consolidate(loaded) == pytest.approx(_move_and_consolidate(model),
                                                          rel=1e-5)


@keras.saving.register_keras_serializable(package="keras_ewc_tests")
class UnnamedScale(keras.layers.Layer):
    """A weight made without a name, as ConvNeXt's layer scale is: Keras numbers it
    `variable_N`, N counting the process's unnamed weights."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


@pytest.mark.backend_neutral
def test_unnamed_weights_keep_their_keys_across_instances(tmp_path):
    def make():
        return keras.Sequential([keras.Input((4,)), UnnamedScale(),
                                 keras.layers.Dense(4)])

    model = trained(make())
    assert model.regularizer.keys[0] == "0:variable"  # not the process's variable_N
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")  # new weights: other numbers
    assert again.network.layers[0].w.name != model.network.layers[0].w.name
    assert float(again.penalty()) == pytest.approx(float(model.penalty()), rel=1e-6)


@pytest.mark.backend_neutral
def test_a_warning_turned_into_an_error_comes_after_the_replacement_is_complete():
    # Under `-W error` the "dropped" warning is raised, but only once the new network
    # and the state agree (before, it could interrupt the swap after the state had
    # been rebound to the new network, and the rollback left the two apart).
    model = trained(net())
    old = model.network
    new = keras.Sequential([keras.Input((4,)), old.get_layer("h"),
                            keras.layers.Dense(4, name="head2")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="dropped"):
            model.network = new
    assert model.network is new
    assert {id(v) for v in model.regularised_variables} == {
        id(v) for v in new.trainable_variables}
    assert np.isfinite(float(model.penalty()))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", ["not_a_layer", "unbuilt", "nothing_to_regularise",
                                  "kronecker"])
def test_a_refused_network_replacement_leaves_the_model_as_it_was(case, tmp_path):
    if case == "kronecker":
        model = keras_ewc.EWCModel(net(), strength=20.0, structure="kronecker")
    else:
        model = trained(net())
    old = model.network
    x, _ = data(seed=6)
    before = [v.numpy() for v in model.weights]
    predicted = model.predict(x, verbose=0)
    new, message = {
        "not_a_layer": ("net.keras", r"Expected a Keras model .*Received: network="
                                     r"'net\.keras' of type str"),
        "unbuilt": (keras.Sequential([keras.layers.Dense(4)]),
                    r"has no weights yet.*Build it first"),
        "nothing_to_regularise": (
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, trainable=False)]),
            r"no longer holds any of the regularised variables"),
        "kronecker": (net(), r"structure='kronecker' does not follow a replaced network"),
    }[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=message):
            model.network = new
    assert model.network is old
    assert model.layers == [old, model.regularizer]
    assert len(model.weights) == len(before)
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), value)
    np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert len(loaded.weights) == len(before)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), predicted, rtol=1e-6)


def test_the_train_step_is_traced_once_while_the_model_does_not_change():
    model = trained(net())
    x, y = data(seed=4)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    step = model.train_function
    model.strength = 3.0
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.evaluate(x, y, verbose=0)
    assert model.train_function is step
    model.network.add(keras.layers.Dense(2, name="extra"))
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    model.fit(x, y % 2, epochs=1, batch_size=16, verbose=0)
    assert model.train_function is not step


# --- hyperparameters --------------------------------------------------------------------------


def _run(strength_at_start, strength_for_b=None, callbacks=()):
    """Task A, consolidate, task B (Adam, `shuffle=False`): the weights after B."""
    if not callbacks:
        return _cached_run(strength_at_start, strength_for_b)
    return _train(strength_at_start, strength_for_b, callbacks)


@functools.lru_cache(maxsize=None)
def _cached_run(strength_at_start, strength_for_b):
    # Deterministic (seeded, no shuffling): tests that compare with the same run share it.
    model, weights = _train(strength_at_start, strength_for_b, ())
    return model.strength, weights


def _train(strength_at_start, strength_for_b, callbacks):
    keras.utils.set_random_seed(0)
    model = keras_ewc.EWCModel(net(), strength=strength_at_start)
    model.compile(keras.optimizers.Adam(0.05), LOSS)
    (xa, ya), (xb, yb) = data(seed=5), data(seed=6)
    model.fit(xa, ya, epochs=2, batch_size=8, shuffle=False, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    if strength_for_b is not None:
        model.strength = strength_for_b
    model.fit(xb, yb, epochs=2, batch_size=8, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model, [v.numpy() for v in model.network.weights]


def test_setting_the_strength_takes_effect_at_the_next_step_without_recompiling():
    _, fresh_zero = _run(0.0)
    _, set_zero = _run(500.0, strength_for_b=0.0)
    _, kept = _run(500.0)
    for a, b in zip(set_zero, fresh_zero):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # ... and the strength matters here: a wrong implementation keeping 500 differs.
    assert max(float(np.abs(a - b).max()) for a, b in zip(kept, fresh_zero)) > 1e-2


def test_a_callback_schedules_the_strength():
    schedule = [0.0, 500.0]
    callback = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: setattr(callback.model, "strength",
                                                   schedule[epoch]))
    model, scheduled = _run(7.0, callbacks=[callback])
    assert model.strength == 500.0  # the callback really ran
    # The same schedule by hand, one epoch a fit.
    keras.utils.set_random_seed(0)
    manual = keras_ewc.EWCModel(net(), strength=7.0)
    manual.compile(keras.optimizers.Adam(0.05), LOSS)
    (xa, ya), (xb, yb) = data(seed=5), data(seed=6)
    manual.fit(xa, ya, epochs=2, batch_size=8, shuffle=False, verbose=0)
    manual.consolidate((xa, ya), verbose=0)
    for strength in schedule:
        manual.strength = strength
        manual.fit(xb, yb, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(scheduled, [v.numpy() for v in manual.network.weights]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    _, constant = _run(500.0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(scheduled, constant)) > 1e-3


def test_strength_and_gamma_are_saved_with_the_model(tmp_path):
    model = trained(net(), mode="online", gamma=0.9)
    model.strength, model.gamma = 7.5, 0.25
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert (loaded.strength, loaded.gamma) == (7.5, 0.25)
    model.save_weights(tmp_path / "w.weights.h5")
    other = keras_ewc.EWCModel(net(), mode="online", gamma=0.9)
    other.load_weights(tmp_path / "w.weights.h5")
    assert (other.strength, other.gamma) == (7.5, 0.25)
    assert float(other.penalty()) == pytest.approx(float(model.penalty()), rel=1e-6)


def test_gamma_set_after_wrapping_is_used_by_the_next_consolidation():
    model = trained(net(), mode="online", gamma=1.0)
    before = model.regularizer.precision[0].numpy()
    model.gamma = 0.5
    x, y = data(seed=7)
    fisher = model.consolidate((x, y), verbose=0)
    np.testing.assert_allclose(model.regularizer.precision[0].numpy(),
                               0.5 * before + np.asarray(fisher[0]), rtol=1e-6)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("value, message", [
    (-1.0, r"Expected strength >= 0, finite in float32. Received: strength=-1.0"),
    (float("nan"), r"Received: strength=nan"),
    (1e39, r"Received: strength=1e\+39"),
    ("strong", r"Received: strength='strong'"),
], ids=["negative", "nan", "inf_in_float32", "not_a_number"])
def test_a_bad_strength_is_refused_and_the_old_one_kept(value, message):
    model = keras_ewc.EWCModel(net(), strength=3.0)
    with pytest.raises(ValueError, match=message):
        model.strength = value
    assert model.strength == 3.0
    with pytest.raises(ValueError, match=r"Expected gamma in \(0, 1\]. Received: gamma=2"):
        model.gamma = 2
    assert model.gamma == 1.0


def test_a_strength_that_overflows_float32_is_refused_naming_it():
    model = trained(net(), strength=20.0)
    before = state(model) + [w.numpy() for w in model.network.weights]
    with pytest.raises(ValueError, match=r"strength=1e\+25 is too large.*Received: "
                                         r"strength=1e\+25"):
        model.strength = 1e25
    assert model.strength == 20.0
    # Set before any task (nothing to overflow yet), then refused at consolidation.
    fresh = keras_ewc.EWCModel(net(), strength=1e25)
    fresh.compile(keras.optimizers.Adam(0.01), LOSS)
    x, y = data(seed=8)
    start = state(fresh) + [w.numpy() for w in fresh.network.weights]
    with pytest.raises(ValueError, match=r"strength=1e\+25 is too large"):
        fresh.consolidate((x, y), verbose=0)
    for a, b in zip(state(fresh) + [w.numpy() for w in fresh.network.weights], start):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state(model) + [w.numpy() for w in model.network.weights], before):
        np.testing.assert_array_equal(a, b)
    # A strength within the bound trains to finite weights with Adam.
    model.strength = 1e15
    model.compile(keras.optimizers.Adam(0.01), LOSS)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert all(np.isfinite(w.numpy()).all() for w in model.network.weights)


def test_no_warning_when_nothing_changed():
    model = trained(net())
    x, y = data(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        model.evaluate(x, y, verbose=0)
        model.consolidate((x, y), verbose=0)
