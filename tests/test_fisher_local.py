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
from keras_ewc.fisher import engine, fast, kernel_paths, likelihoods
from keras_ewc.fisher.kernels import _common
from keras_ewc.fisher.kernels import recurrent as recurrent_kernels
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
        return keras.ops.tanh(x @ self.a) * keras.ops.sigmoid(x + self.b)


class Twice(L.Layer):
    """Calls one Scale on two halves of its input: the calls sum per example."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = Scale(name="inner_scale")

    def call(self, x):
        half = x.shape[-1] // 2
        return keras.ops.concatenate(
            [self.scale(x[:, :half]), self.scale(x[:, half:]) ** 2], -1)


class Block(L.Layer):
    """Owns a variable and holds a Dense (a kernel) and a Scale (layer-local) inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4, name="block_dense")
        self.scale = Scale(name="block_scale")

    def build(self, input_shape):
        self.shift = self.add_weight(shape=(4,), initializer="random_normal", name="shift")

    def call(self, x):
        return keras.ops.gelu(self.scale(self.dense(x)) + self.shift, approximate=False)


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


@pytest.mark.backend_neutral
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


@pytest.mark.backend_neutral
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


@pytest.mark.backend_neutral
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


@pytest.mark.backend_neutral
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
        folded = keras.ops.reshape(x, [-1, x.shape[-1]])
        return keras.ops.reshape(self.scale(folded), [-1] + list(x.shape[1:]))


@pytest.mark.backend_neutral
def test_a_layer_called_on_rows_that_are_not_examples_falls_back():
    keras.utils.set_random_seed(6)
    model = _perturb(keras.Sequential([
        keras.Input((3, 4)), FoldBatch(name="fold"), L.Flatten(), L.Dense(CLASSES)]))
    x = _x(model)
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert paths[model.layers[0].scale.w.path] == "reference"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


class RaggedTwin(L.Layer):
    """Returns its scaled input twice: as a tensor and as a ragged tensor."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones", name="w")

    def call(self, x):
        y = x * self.w
        return y, tf.RaggedTensor.from_tensor(y * y)


class RaggedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.twin = RaggedTwin(name="twin")
        self.out = L.Dense(CLASSES, name="out")

    def call(self, x):
        y, ragged = self.twin(x)
        return self.out(y + ragged.to_tensor())


def test_a_ragged_output_sends_the_layer_to_the_whole_network_path():
    # What flows through a ragged output cannot be watched as one tensor; the layer
    # goes to the reference path (before: layer-local, its Fisher missing that part).
    keras.utils.set_random_seed(7)
    model = RaggedNet()
    x = np.random.default_rng(7).normal(size=(N, 4)).astype("float32")
    model(x[:1])
    model.twin.w.assign(np.linspace(0.5, 1.5, 4).astype("float32"))
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert paths[model.twin.w.path] == "reference"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def _loops(fn, x):
    """Whether the traced step holds a loop besides the engine's loop over the term
    columns (whose body holds the layer-local path)."""
    graph = fn.get_concrete_function(tf.constant(x), None).graph
    bodies = fast.loop_bodies(graph)
    whiles = sum("While" in op.type for g in [graph, *bodies] for op in g.get_operations())
    return whiles > len(bodies)


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
        # 14 pairs of (term, example); ~190 floats a pair: one pair a chunk at 64.
        assert _loops(fn, x) == loops
        oracle.assert_close([s / N for s in sums], expected)


class MaskedGate(L.Layer):
    """Uses Keras' mask and the training flag: y = x * w where the mask holds, else 0."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dropout = L.Dropout(0.5)

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x, mask=None, training=None):
        y = self.dropout(x, training=training) * self.w  # inference: no dropout
        return y if mask is None else y * keras.ops.cast(mask, y.dtype)[..., None]

    def compute_mask(self, x, mask=None):
        return mask


@pytest.mark.backend_neutral
def test_mask_and_training_arguments_are_passed_per_example():
    keras.utils.set_random_seed(7)
    model = _perturb(keras.Sequential([
        keras.Input((6,), dtype="int32"), L.Embedding(9, 4, mask_zero=True),
        MaskedGate(name="gate"), L.GlobalAveragePooling1D(), L.Dense(CLASSES)]))
    rng = np.random.default_rng(8)
    x = rng.integers(1, 9, size=(N, 6)).astype("int32")
    x[0, 3:] = 0
    x[2, 1:] = 0
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert _local_layers(paths) == ["gate"]
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))
    # The mask matters: without it, the gate's Fisher differs.
    unmasked = keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(9, 4),
                                 MaskedGate(), L.GlobalAveragePooling1D(), L.Dense(CLASSES)])
    unmasked.set_weights(model.get_weights())
    other = fisher_diagonal(unmasked, x, likelihood="categorical", verbose=0)
    assert not np.allclose(other[1], fisher[1], rtol=1e-2)


def _padded(n, steps, features, seed=0):
    """Sequences of random lengths 1..steps, zero-padded at the end."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, steps, features)).astype("float32")
    lengths = rng.integers(1, steps + 1, n)
    return x * (np.arange(steps)[None, :, None] < lengths[:, None, None])


RECURRENT = {
    "simple_rnn_sequences_backwards": lambda: [
        L.SimpleRNN(3, return_sequences=True, go_backwards=True, name="rnn"), L.Flatten()],
    "lstm_masked": lambda: [L.Masking(0.0), L.LSTM(3, name="rnn")],
    "gru_masked_sequences": lambda: [
        L.Masking(0.0), L.GRU(3, return_sequences=True, name="rnn"),
        L.GlobalAveragePooling1D()],
    "bidirectional_lstm_masked": lambda: [
        L.Masking(0.0), L.Bidirectional(L.LSTM(2), name="bi")],
}


@pytest.mark.backend_neutral
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("name", [
    # Tracing pfor's conversion of the recurrence takes 20-50 s on 2 cores for these.
    pytest.param(name, marks=pytest.mark.slow) if name != "simple_rnn_sequences_backwards"
    else name for name in sorted(RECURRENT)])
def test_recurrent_layers_go_layer_local_exactly(monkeypatch, name, estimator):
    """A recurrent layer re-runs alone per example (its cell's variables with it), masks,
    directions and sequences included. The recurrent kernels (which cover these layers)
    are switched off, as for a layer they refuse (a user's cell)."""
    monkeypatch.setattr(recurrent_kernels._RecurrentKernel, "supports", lambda self, layer: False)
    keras.utils.set_random_seed(8)
    model = _perturb(keras.Sequential([keras.Input((5, 4))] + RECURRENT[name]()
                                      + [L.Dense(CLASSES)]))
    x = _padded(6, 5, 4)
    y = np.random.default_rng(3).integers(0, CLASSES, 6)
    data = (x, y) if estimator == "empirical" else x
    fisher, paths = fisher_diagonal(model, data, estimator=estimator,
                                    likelihood="categorical", verbose=0, return_paths=True)
    recurrent = [v for v in model.trainable_variables if "dense" not in v.path]
    assert {paths[v.path] for v in recurrent} == {"layer-local"}, paths
    v = model.trainable_variables
    expected = (oracle.categorical_exact(model, v, x) if estimator == "exact"
                else oracle.categorical_labels(model, v, x, y))
    oracle.assert_close(fisher, expected)


@pytest.mark.backend_neutral
def test_stateful_layers_are_refused():
    model = keras.Sequential([keras.Input(batch_shape=(4, 5, 3)),
                              L.LSTM(3, stateful=True, name="lstm"), L.Dense(2)])
    x = _padded(8, 5, 3)
    with pytest.raises(ValueError, match=r"stateful layer 'lstm'.*stateful=False"):
        fisher_diagonal(model, x, likelihood="categorical", batch_size=4, verbose=0)


def test_mixed_precision_matches_the_reference_path():
    """float16 compute: the layer re-runs under Keras' autocast, the sums stay float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(9)
        model = keras.Sequential([keras.Input((4, 5)), L.Dense(5), Scale(name="scale"),
                                  Gated(name="gated"), L.Flatten(),
                                  L.Dense(CLASSES, dtype="float32")])
        x = tf.constant(_x(model))
        lik = likelihoods.Categorical(from_logits=True)
        terms = lambda out, extra: lik.terms("exact", out, extra)  # noqa: E731
        fn = engine.build_sum_squared_grads(model, model.trainable_variables, terms)
        sums = fn(x, None)
        reference = engine.build_sum_squared_grads(
            model, model.trainable_variables, terms, fast=False)(x, None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert _local_layers(fn.paths) == ["gated", "scale"]
    assert all(s.dtype == tf.float32 for s in sums)
    # Both paths round in float16, in different orders.
    oracle.assert_close(sums, reference, rtol=2e-3)
