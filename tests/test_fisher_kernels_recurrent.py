"""The recurrent kernels (LSTM, GRU, SimpleRNN) against the brute-force oracles (one
example at a time), to relative 1e-5, and their re-run recurrence against the layer.

Each configuration is checked with the exact estimator (C = 3 term columns) and the
empirical one (one column); every variable must have taken the fast path, so that a
kernel cannot pass by falling back to the layer-local or reference path.
"""

import keras
import numpy as np
import pytest

from keras_ewc.fisher import diagonal, kernels, likelihoods
from keras_ewc.fisher.kernels import recurrent
from tests import oracle
from tests.test_fisher_kernels import CLASSES, N, _sums

L = keras.layers
STEPS, FEATURES = 5, 3


def _padded(seed=0, n=N):
    """Sequences of lengths 1..STEPS, zero-padded at the end (one of full length)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, STEPS, FEATURES)).astype("float32")
    lengths = np.array([STEPS, 2, 1, 4] * (n // 4 + 1))[:n]
    return x * (np.arange(STEPS)[None, :, None] < lengths[:, None, None])


def _perturb(model):
    """Random biases (Keras starts them at zero or one), so that a bias term a kernel
    drops or misplaces would show."""
    rng = np.random.default_rng(4)
    for v in model.trainable_variables:
        if "bias" in v.path:
            v.assign(rng.normal(scale=0.5, size=v.shape))
    return model


def _model(*layers, masking=False):
    keras.utils.set_random_seed(1)
    head = [L.Masking(0.0)] if masking else []
    return _perturb(keras.Sequential([keras.Input((STEPS, FEATURES))] + head + list(layers)
                                     + [L.Flatten(), L.Dense(CLASSES)]))


CONFIGS = {
    "lstm": lambda: _model(L.LSTM(4)),
    "lstm_sequences_backwards": lambda: _model(
        L.LSTM(3, return_sequences=True, go_backwards=True)),
    "lstm_masked": lambda: _model(L.LSTM(4, return_sequences=True), masking=True),
    "lstm_masked_last": lambda: _model(L.LSTM(3, go_backwards=True), masking=True),
    "lstm_no_bias_tanh_gates": lambda: _model(
        L.LSTM(3, use_bias=False, recurrent_activation="tanh", activation="relu",
               return_sequences=True)),
    "gru_reset_after": lambda: _model(L.GRU(4, return_sequences=True)),
    "gru_reset_before": lambda: _model(L.GRU(4, reset_after=False, return_sequences=True)),
    "gru_masked_reset_before_backwards": lambda: _model(
        L.GRU(3, reset_after=False, go_backwards=True), masking=True),
    "gru_masked_no_bias": lambda: _model(L.GRU(3, use_bias=False), masking=True),
    "simple_rnn": lambda: _model(L.SimpleRNN(4, return_sequences=True)),
    "simple_rnn_masked_backwards": lambda: _model(
        L.SimpleRNN(3, go_backwards=True, activation="relu", use_bias=False),
        masking=True),
    "bidirectional_lstm_masked": lambda: _model(
        L.Bidirectional(L.LSTM(3, return_sequences=True)), masking=True),
    "bidirectional_gru": lambda: _model(L.Bidirectional(L.GRU(2), merge_mode="sum")),
    "stacked_lstm_gru_masked": lambda: _model(
        L.LSTM(4, return_sequences=True), L.GRU(3), masking=True),
    # Dropout acts in training only: the Fisher is taken in inference mode.
    "gru_dropout_lstm_recurrent_dropout": lambda: _model(
        L.GRU(3, dropout=0.5, return_sequences=True), L.LSTM(2, recurrent_dropout=0.4),
        masking=True),
    "stacked_unrolled": lambda: _model(
        L.SimpleRNN(4, return_sequences=True, unroll=True), L.LSTM(3, unroll=True)),
}


# Each configuration takes 3-10 s on 2 shared cores (tracing, and the oracle's eager
# per-example passes): a few stay in the fast subset, the rest are marked slow.
FAST = {"exact": {"lstm_masked", "gru_reset_before", "simple_rnn_masked_backwards"},
        "empirical": {"gru_masked_reset_before_backwards"}}


def _names(estimator):
    return [name if name in FAST[estimator] else pytest.param(name, marks=pytest.mark.slow)
            for name in sorted(CONFIGS)]


def _labels(seed=5):
    return np.random.default_rng(seed).integers(0, CLASSES, size=N).astype("int32")


@pytest.mark.parametrize("name", _names("exact"))
def test_exact_matches_oracle(name):
    model, x = CONFIGS[name](), _padded()
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.parametrize("name", ["stacked_lstm_gru_masked", "bidirectional_gru"])
def test_exact_matches_oracle_in_rounds_of_one_column(name, monkeypatch):
    """The recurrences' backward passes (loops themselves) inside TensorFlow's loop over
    the term columns, two rounds of one column here: still exact."""
    from keras_ewc.fisher import fast

    monkeypatch.setattr(fast, "COLUMNS_A_ROUND", 1)
    model, x = CONFIGS[name](), _padded()
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.parametrize("name", _names("empirical"))
def test_empirical_matches_oracle(name):
    model, x = CONFIGS[name](), _padded()
    y = _labels()
    fisher, paths = _sums(model, x, "empirical", extra=y)
    assert set(paths.values()) == {"fast"}, paths
    expected = oracle.categorical_labels(model, model.trainable_variables, x, y)
    oracle.assert_close(fisher, expected)


def _rerun(layer, x, **kwargs):
    """The kernel's recurrence (probe at zero) and the layer's own call on `x`."""
    kernel = kernels.lookup(layer)
    assert kernel is not None
    record, z, finish = kernel.forward(layer, (x,), kwargs)
    return finish(z), layer(x, **kwargs), record


@pytest.mark.parametrize("make", [
    lambda: L.LSTM(4, return_sequences=True, return_state=True),
    lambda: L.LSTM(3, go_backwards=True, return_state=True),
    lambda: L.GRU(4, return_sequences=True, return_state=True, go_backwards=True),
    lambda: L.GRU(4, reset_after=False, return_state=True),
    lambda: L.SimpleRNN(3, return_sequences=True, return_state=True),
    lambda: L.LSTM(3, return_sequences=True, zero_output_for_mask=True),
    lambda: L.GRU(3, return_sequences=True, unroll=True),
], ids=["lstm", "lstm_backwards", "gru", "gru_reset_before", "simple_rnn",
        "lstm_zero_output_for_mask", "gru_unrolled"])
def test_rerun_returns_what_the_layer_returns(make):
    """Outputs, sequences and final states, with a mask and an initial state (written in
    keras.ops: runs on JAX too)."""
    keras.utils.set_random_seed(2)
    layer = make()
    x = keras.ops.convert_to_tensor(_padded(seed=1))
    layer.build(x.shape)
    _perturb(keras.Sequential([layer]))
    mask = keras.ops.convert_to_tensor(np.abs(_padded(seed=1)).sum(-1) > 0)
    states = len(layer.cell.state_size) if isinstance(layer.cell.state_size, list) else 1
    init = [keras.ops.convert_to_tensor(
        np.random.default_rng(s).normal(size=(N, layer.cell.units)), "float32")
        for s in range(states)]
    for kwargs in ({}, {"mask": mask}, {"mask": mask, "initial_state": init}):
        mine, theirs, record = _rerun(layer, x, **kwargs)
        mine, theirs = keras.tree.flatten(mine), keras.tree.flatten(theirs)
        assert len(mine) == len(theirs) == (1 + states if layer.return_state else 1)
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert record["x"].shape == x.shape
        assert record["h"].shape == (N, STEPS, layer.cell.units)
    # The mask matters: a wrong one would change the sequences.
    unmasked = _rerun(layer, x)[0]
    masked = _rerun(layer, x, mask=mask)[0]
    assert not np.allclose(keras.tree.flatten(unmasked)[0], keras.tree.flatten(masked)[0])


def test_initial_state_gradients_reach_the_encoder():
    """An encoder-decoder: the decoder starts from the encoder's states, so the
    encoder's Fisher flows through the re-run decoder's initial state."""
    keras.utils.set_random_seed(6)
    inputs = keras.Input((STEPS, FEATURES))
    _, h, c = L.LSTM(3, return_state=True, name="encoder")(inputs)
    decoded = L.LSTM(3, return_sequences=True, name="decoder")(
        inputs[:, ::-1], initial_state=[h, c])
    # Positionally too.
    decoded = decoded + L.GRU(3, return_sequences=True, name="second")(inputs, [h])
    model = _perturb(keras.Model(inputs, L.Dense(CLASSES)(L.Flatten()(decoded))))
    x = _padded(seed=2)
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.slow
def test_fisher_diagonal_takes_the_kernels():
    """As a user calls it: two batches, paths reported, exact to the oracle."""
    model = CONFIGS["bidirectional_lstm_masked"]()
    x = _padded(n=6)
    fisher, paths = diagonal.fisher_diagonal(
        model, x, likelihood=likelihoods.Categorical(from_logits=True), batch_size=4,
        verbose=0, return_paths=True)
    assert len(paths) == len(model.trainable_variables)
    assert set(paths.values()) == {"fast"}, paths
    assert set(diagonal.kernel_paths(model).values()) == {"fast"}
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.slow
def test_variable_length_sequences():
    """A time axis unknown when the model is built (`Input((None, F))`)."""
    keras.utils.set_random_seed(3)
    model = _perturb(keras.Sequential([
        keras.Input((None, FEATURES)), L.Masking(0.0), L.GRU(3, return_sequences=True),
        L.LSTM(2), L.Dense(CLASSES)]))
    x = _padded(seed=4)
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


class MyCell(L.LSTMCell):
    """A user's cell: its maths is not the kernel's to assume."""

    def call(self, inputs, states, training=False):
        h, (h2, c) = super().call(inputs * 2.0, states, training)
        return h, [h2, c]


class MyLSTM(L.LSTM):
    def inner_loop(self, sequences, initial_state, mask, training=False):
        return super().inner_loop(sequences * 0.5, initial_state, mask, training)


@pytest.mark.slow
def test_what_the_kernels_refuse_stays_exact_on_the_layer_local_path():
    """User cells, an overridden loop, `RNN(cell)` and mixed precision are refused; the
    layer-local path keeps them exact."""
    keras.utils.set_random_seed(5)
    model = _perturb(keras.Sequential([
        keras.Input((STEPS, FEATURES)), L.RNN(MyCell(3), return_sequences=True, name="a"),
        L.RNN(L.GRUCell(3), return_sequences=True, name="b"), MyLSTM(2, name="c"),
        L.Dense(CLASSES)]))
    for layer in model.layers[:3]:
        assert kernels.lookup(layer) is None, layer.name
    x = _padded(seed=5)
    fisher, paths = _sums(model, x)
    assert {p for k, p in paths.items() if "dense" not in k} == {"layer-local"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = L.LSTM(3)
        half.build((None, STEPS, FEATURES))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert kernels.lookup(half) is None
    stateful = L.LSTM(3, stateful=True)
    stateful.build((N, STEPS, FEATURES))
    assert kernels.lookup(stateful) is None


def test_kernels_are_registered_for_the_three_layer_kinds():
    found = kernels.registry()
    assert isinstance(found[L.LSTM], recurrent.LSTMKernel)
    assert isinstance(found[L.GRU], recurrent.GRUKernel)
    assert isinstance(found[L.SimpleRNN], recurrent.SimpleRNNKernel)
