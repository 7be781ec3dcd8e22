"""The Fisher checks the outputs it differentiates: `model(x, training=False)`, not what a
model's `predict_step` serves."""

import keras
import numpy as np
import pytest

import keras_ewc

pytestmark = pytest.mark.backend_neutral


class Served(keras.Model):
    """Serves probabilities from `predict_step`; its `call` gives logits."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(4)

    def call(self, x, training=False):
        return self.dense(x)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return keras.ops.softmax(self(x, training=False))


def test_a_model_serving_probabilities_still_gives_the_fisher_of_its_logits():
    net = Served()
    net(np.zeros((1, 6), "float32"))
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    plain.set_weights(net.get_weights())
    x = np.random.default_rng(0).normal(size=(20, 6)).astype("float32")
    served = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    expected = keras_ewc.fisher_diagonal(plain, x, likelihood="categorical", verbose=0)
    for a, b in zip(served, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    # And the check still reads the model's outputs: probabilities from `call` with a
    # logits likelihood are refused as before.
    probabilities = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                                      keras.layers.Softmax()])
    with pytest.raises(ValueError, match="probabilities"):
        keras_ewc.fisher_diagonal(probabilities, x,
                                  likelihood=keras_ewc.fisher.Categorical(from_logits=True),
                                  verbose=0)
