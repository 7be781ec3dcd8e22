"""Likelihood inference from the compiled loss: what it finds, and its errors."""

import keras
import numpy as np
import pytest

import keras_ewc


def two_outputs():
    x = keras.Input((4,))
    h = keras.layers.Dense(5, "tanh")(x)
    return keras.Model(x, [keras.layers.Dense(3, name="cls")(h),
                           keras.layers.Dense(1, name="reg")(h)])


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_a_multi_output_model_gets_an_error_naming_its_losses_and_the_fix(kind):
    net = two_outputs()
    model = keras_ewc.EWCModel(net)
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"]
    model.compile("sgd", losses if kind == "list" else dict(zip(["cls", "reg"], losses)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    keys = ("0", "1") if kind == "list" else ("cls", "reg")
    with pytest.raises(ValueError, match=(
            rf"compiled with 2 losses, one for each of its outputs \({keys[0]}: "
            rf"SparseCategoricalCrossentropy, {keys[1]}: 'mse'\).*single output.*"
            r"keras.Model\(net.inputs, net.outputs\[0\]\).*Pass likelihood=")):
        model.consolidate(x, verbose=0)
    assert int(model.regularizer.tasks.numpy()) == 0
    # The fix the message gives works.
    single = keras_ewc.EWCModel(keras.Model(net.inputs, net.outputs[0]))
    single.consolidate(x, likelihood=keras_ewc.fisher.likelihoods.Categorical(
        from_logits=True), verbose=0)
    assert int(single.regularizer.tasks.numpy()) == 1


@pytest.mark.backend_neutral
def test_an_unknown_or_missing_loss_is_named():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = keras_ewc.EWCModel(net)
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError, match=r"the model is not compiled \(no loss\); "
                                         r"expected one of the losses"):
        model.consolidate(x, verbose=0)
    model.compile("sgd", keras.losses.Huber())
    with pytest.raises(ValueError, match=r"compiled with the loss Huber; expected one of"):
        model.consolidate(x, verbose=0)
