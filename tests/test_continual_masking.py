"""ActiveClassMask: training, predictions and saving respect the active classes."""

import keras
import numpy as np
import pytest

from keras_ewc.continual import ActiveClassMask, set_active_classes


def net(units=4, from_logits=True):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(units, name="d"),
                             ActiveClassMask(from_logits=from_logits, name="mask")])


def test_masked_logits_get_zero_probability_and_others_renormalise():
    model = net()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    raw = np.asarray(model.get_layer("d")(x))
    assert set_active_classes(model, [1, 3]) == 1
    probs = np.asarray(keras.ops.softmax(model(x)))
    assert np.all(probs[:, [0, 2]] == 0.0)
    expected = np.exp(raw[:, [1, 3]]) / np.exp(raw[:, [1, 3]]).sum(1, keepdims=True)
    assert np.allclose(probs[:, [1, 3]], expected, atol=1e-6)
    set_active_classes(model, None)
    assert np.allclose(np.asarray(model(x)), raw)


def test_probability_inputs_are_renormalised():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax"),
                              ActiveClassMask(from_logits=False)])
    set_active_classes(model, np.array([True, True, False, False]))
    p = np.asarray(model(np.ones((2, 3), "float32")))
    assert np.allclose(p.sum(1), 1.0) and np.all(p[:, 2:] == 0)


def test_masked_classes_get_no_gradient():
    model = net()
    set_active_classes(model, [0, 1])
    x = np.ones((4, 3), "float32")
    y = np.array([0, 1, 0, 1])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    kernel_grad = tape.gradient(loss, model.get_layer("d").kernel).numpy()
    assert np.all(kernel_grad[:, 2:] == 0) and np.any(kernel_grad[:, :2] != 0)


def test_mask_is_saved_and_not_trainable(tmp_path):
    model = net()
    set_active_classes(model, [2])
    assert model.get_layer("mask").trainable_weights == []
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert np.asarray(loaded.get_layer("mask").mask).tolist() == [0, 0, 1, 0]
    assert loaded.get_layer("mask").get_config()["from_logits"] is True


def test_nested_models_are_searched_and_bad_classes_rejected():
    inner = net()
    outer = keras.Sequential([keras.Input((3,)), inner])
    assert set_active_classes(outer, [0]) == 1
    assert np.asarray(inner.get_layer("mask").mask).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="active classes in \\[0, 4\\).*\\[7\\]"):
        set_active_classes(outer, [7])
    assert set_active_classes(keras.Sequential([keras.Input((3,)),
                                                keras.layers.Dense(2)]), [0]) == 0


def test_exact_fisher_respects_active_classes():
    import keras_ewc

    model = net()
    x = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    set_active_classes(model, [0, 2])
    kernel, bias = keras_ewc.fisher_diagonal(model, x, estimator="exact",
                                             likelihood="categorical", verbose=0)
    kernel, bias = np.asarray(kernel), np.asarray(bias)
    # Units 1 and 3 have probability 0: no Fisher information reaches their weights.
    assert np.all(kernel[:, [1, 3]] == 0) and np.all(bias[[1, 3]] == 0)
    assert np.all(kernel[:, [0, 2]] > 0)
    # Two active classes with probabilities a, b: d log p_y / d z_0 = [y = 0] - a, so the
    # bias Fisher is E_y[([y = 0] - a)^2] = a b^2 + b a^2 = a b, averaged over examples.
    # Without the mask it would include the other two classes and differ.
    logits = np.asarray(model.get_layer("d")(x))[:, [0, 2]]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean(p[:, 0] * p[:, 1])
    assert bias[0] == pytest.approx(expected, rel=1e-4)
    assert bias[2] == pytest.approx(expected, rel=1e-4)
