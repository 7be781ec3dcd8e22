"""The layer-local path against brute-force oracles (one example at a time, own tape).

Layers no kernel covers re-run alone per example (`keras_ewc.fisher.local`). Each check
compares `fisher_diagonal` (exact with C = 3 classes, so T = 2 terms, and empirical,
T = 1) with the oracles of tests/oracle.py to relative 1e-5 (float32 round-off of sums of
a few dozen products), and checks the path each variable took, so that the layer-local
path cannot pass by silently falling back to the whole-network reference path.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ewc import fisher_diagonal
from keras_ewc.fisher import engine, kernel_paths, likelihoods
from keras_ewc.fisher.kernels import _common
from tests import oracle

L = keras.layers
N = 7
CLASSES = 3


class Scale(L.Layer):
    """y = x * w, elementwise (ConvNeXt's LayerScale): no kernel covers it."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


class Gated(L.Layer):
    """Two variables and a nonlinearity: y = tanh(x a) * sigmoid(x + b)."""

    def build(self, input_shape):
        d = input_shape[-1]
        self.a = self.add_weight(shape=(d, d), initializer="glorot_uniform")
        self.b = self.add_weight(shape=(d,), initializer="zeros")

    def call(self, x, training=None, mask=None):
        return tf.tanh(x @ self.a) * tf.sigmoid(x + self.b)


class Twice(L.Layer):
    """Calls one Scale on two halves of its input: the calls sum per example."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = Scale(name="inner_scale")

    def call(self, x):
        half = x.shape[-1] // 2
        return tf.concat([self.scale(x[:, :half]), self.scale(x[:, half:]) ** 2], -1)


class Block(L.Layer):
    """Owns a variable and holds a Dense (a kernel) and a Scale (layer-local) inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4, name="block_dense")
        self.scale = Scale(name="block_scale")

    def build(self, input_shape):
        self.shift = self.add_weight(shape=(4,), initializer="random_normal", name="shift")

    def call(self, x):
        return tf.nn.gelu(self.scale(self.dense(x)) + self.shift)


def _perturb(model):
    """Weights away from their initial ones and zeros, so no gradient vanishes."""
    rng = np.random.default_rng(9)
    for v in model.trainable_variables:
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype("float32"))
    return model


def scale_model():
    keras.utils.set_random_seed(1)
    return _perturb(keras.Sequential([
        keras.Input((5,)), L.Dense(6, activation="tanh"), Scale(name="scale"),
        L.Dense(CLASSES)]))


def gated_model():
    keras.utils.set_random_seed(2)
    return _perturb(keras.Sequential([
        keras.Input((4, 5)), Gated(name="gated"), L.Flatten(), L.Dense(CLASSES)]))


def twice_model():
    keras.utils.set_random_seed(3)
    return _perturb(keras.Sequential([
        keras.Input((6,)), Twice(name="twice"), L.Dense(CLASSES)]))


def nested_model():
    keras.utils.set_random_seed(4)
    inner = keras.Sequential([keras.Input((5,)), Block(name="block"), Scale(name="scale2")],
                             name="inner")
    return _perturb(keras.Sequential([keras.Input((5,)), inner, L.Dense(CLASSES)]))


MODELS = {"scale": scale_model, "gated": gated_model, "twice": twice_model,
          "nested": nested_model}
LOCAL = {
    "scale": ["scale"],
    "gated": ["gated"],
    "twice": ["inner_scale"],
    "nested": ["block", "block_scale", "scale2"],
}


def _x(model, n=N, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + tuple(model.inputs[0].shape[1:])
                                              ).astype("float32")


def _local_layers(paths):
    """The layers (by the name before the variable's) whose variables went layer-local."""
    return sorted({key.split("/")[-2] for key, p in paths.items() if p == "layer-local"})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_matches_oracle_and_goes_layer_local(name):
    model = MODELS[name]()
    x = _x(model)
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", batch_size=4,
                                    verbose=0, return_paths=True)
    assert _local_layers(paths) == LOCAL[name], paths
    assert set(paths.values()) <= {"fast", "layer-local"}
    assert kernel_paths(model) == paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_matches_oracle(name):
    model = MODELS[name]()
    x = _x(model, seed=1)
    y = np.random.default_rng(2).integers(0, CLASSES, N)
    fisher, paths = fisher_diagonal(model, (x, y), estimator="empirical",
                                    likelihood="categorical", verbose=0, return_paths=True)
    assert _local_layers(paths) == LOCAL[name]
    oracle.assert_close(fisher,
                        oracle.categorical_labels(model, model.trainable_variables, x, y))


class TiedScale(L.Layer):
    """Reads another layer's weight (`source.w`) in its own call: a tied weight."""

    def __init__(self, source, **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def build(self, input_shape):
        self.v = self.add_weight(shape=input_shape[-1:], initializer="ones", name="v")

    def call(self, x):
        return x * self.source.w * self.v


def test_tied_weight_takes_the_reference_path_and_fallback_names_it():
    keras.utils.set_random_seed(5)
    scale = Scale(name="scale")
    inputs = keras.Input((5,))
    h = scale(L.Dense(5, activation="tanh")(inputs))
    outputs = L.Dense(CLASSES)(TiedScale(scale, name="tied")(h))
    model = _perturb(keras.Model(inputs, outputs))
    x = _x(model)
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    # scale.w is read in both layers' calls: the whole network, per example.
    assert paths[scale.w.path] == "reference"
    assert paths[model.get_layer("tied").v.path] == "layer-local"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))
    with pytest.warns(UserWarning, match=r"1 variable\(s\) take the whole-network .*scale"):
        fisher_diagonal(model, x, likelihood="categorical", verbose=0, fallback="warn")
    with pytest.raises(ValueError, match=r"whole-network per-example reference path"):
        fisher_diagonal(model, x, likelihood="categorical", verbose=0, fallback="error")


def test_layer_local_alone_does_not_trigger_the_fallback():
    model = gated_model()
    x = _x(model)
    fisher = fisher_diagonal(model, x, likelihood="categorical", verbose=0, fallback="error")
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


class FoldBatch(L.Layer):
    """Owns a weight and calls a layer-local Scale on `[B * S, D]`: rows not examples."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = Scale(name="folded_scale")

    def call(self, x):
        folded = tf.reshape(x, [-1, x.shape[-1]])
        return tf.reshape(self.scale(folded), [-1] + list(x.shape[1:]))


def test_a_layer_called_on_rows_that_are_not_examples_falls_back():
    keras.utils.set_random_seed(6)
    model = _perturb(keras.Sequential([
        keras.Input((3, 4)), FoldBatch(name="fold"), L.Flatten(), L.Dense(CLASSES)]))
    x = _x(model)
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert paths[model.layers[0].scale.w.path] == "reference"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def _loops(fn, x):
    graph = fn.get_concrete_function(tf.constant(x), None).graph
    return any("While" in op.type for op in graph.get_operations())


def test_chunks_bound_memory_and_stay_exact(monkeypatch):
    """Pairs (term, example) run in chunks of the budget (padded with zero cotangents),
    one chunk after another in a loop; within the budget, one vectorised chunk."""
    model = gated_model()
    x = _x(model)
    lik = likelihoods.Categorical(from_logits=True)
    expected = oracle.categorical_exact(model, model.trainable_variables, x)
    for budget, loops in ((_common.BUDGET, False), (64, True)):
        monkeypatch.setattr(_common, "BUDGET", budget)
        fn = engine.build_sum_squared_grads(
            model, model.trainable_variables,
            lambda out, extra: lik.terms("exact", out, extra))
        sums = fn(tf.constant(x), None)
        assert _local_layers(fn.paths) == ["gated"]
        # 14 pairs of (term, example); ~90 floats a pair: one pair a chunk at 64.
        assert _loops(fn, x) == loops
        oracle.assert_close([s / N for s in sums], expected)
