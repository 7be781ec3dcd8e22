"""Kronecker factors against brute force, one example at a time (relative 1e-5).

The oracles run each example through a hand-written forward pass of the same weights
(no recording, no kernels, no vectorisation), watch the pre-activation outputs, and form
A and G from the definitions: A = mean over rows of ā āᵀ (patches built by explicit
loops), G = (1/N) Σ_n Σ_rows Σ_y p(y) (∂ log p(y) / ∂ z)(…)ᵀ.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc
from keras_ewc.fisher import kronecker as kfac
from tests import oracle


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3 * scale)


def _rows(x, bias):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return np.concatenate([x, np.ones((len(x), 1))], 1) if bias else x


def _brute(forward, x, labels=None):
    """Factors from `forward(x_n) -> (rows_list, z_list, logits)`, one example at a time.

    `labels`: None for the exact estimator (every class weighted by p), else the label
    of each example (the empirical estimator).
    """
    a_sums, g_sums, counts = None, None, None
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            rows, zs, logits = forward(tf.constant(x[n:n + 1]), tape)
            log_p = tf.nn.log_softmax(tf.cast(logits, tf.float64))[0]
            terms = [log_p[c] for c in range(log_p.shape[0])]
        p = np.exp(log_p.numpy())
        weights = p if labels is None else np.eye(len(p))[labels[n]]
        if a_sums is None:
            a_sums = [np.zeros((r.shape[1],) * 2) for r in rows]
            g_sums = [np.zeros((z.shape[-1],) * 2) for z in zs]
            counts = [0] * len(rows)
        for i, r in enumerate(rows):
            a_sums[i] += r.T @ r
            counts[i] += len(r)
        for c, w in enumerate(weights):
            if w == 0:
                continue
            for i, g in enumerate(tape.gradient(terms[c], zs)):
                g = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
                g_sums[i] += w * g.T @ g
        del tape
    return [(a / k, g / len(x)) for a, g, k in zip(a_sums, g_sums, counts)]


def _watched(tape, z):
    z = tf.convert_to_tensor(z)
    tape.watch(z)
    return z


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _check(net, forward, x, estimator="exact", y=None):
    data = x if y is None else (x, y)
    got = keras_ewc.kronecker_factors(net, data, estimator=estimator,
                                      likelihood="categorical", verbose=0, batch_size=5)
    want = _brute(forward, x, None if estimator == "exact" else y)
    assert len(got) == len(want)
    for (a, g), (a0, g0) in zip(got.values(), want):
        _close(a, a0)
        _close(g, g0)
    return got


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_dense_with_and_without_bias(estimator):
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, "tanh", name="h"),
                            keras.layers.Dense(4, use_bias=False, name="out")])
    h, out = net.layers
    x, y = _x((12, 6)), np.arange(12) % 4

    def forward(xn, tape):
        z1 = _watched(tape, xn @ h.kernel + h.bias)
        a2 = tf.tanh(z1)
        z2 = _watched(tape, a2 @ out.kernel)
        return [_rows(xn.numpy(), True), _rows(a2.numpy(), False)], [z1, z2], z2

    got = _check(net, forward, x, estimator, y if estimator == "empirical" else None)
    assert list(got) == ["h", "out"]
    assert got["h"][0].shape == (7, 7) and got["out"][0].shape == (5, 5)


@pytest.mark.parametrize("positions", [None, 140], ids=["flat", "sequence"])
def test_wide_layers_equal_brute_force(positions):
    """Widths of two and three Gram blocks (A 521 wide, G 530 wide): fewer rows a batch
    than columns (flat: one product) and more (140 positions an example: the upper
    blocks), summed over a padded ragged batch and assembled, against the oracle."""
    shape = (520,) if positions is None else (positions, 520)
    layers = [keras.Input(shape), keras.layers.Dense(530, "tanh", name="h")]
    if positions is not None:
        layers.append(keras.layers.GlobalAveragePooling1D())
    layers.append(keras.layers.Dense(770 if positions is None else 3, name="out"))
    net = keras.Sequential(layers)
    h, out = net.layers[0], net.layers[-1]
    x = _x((6,) + shape, seed=9) * 0.1
    y = np.arange(6) * 101 % out.units

    def forward(xn, tape):
        z1 = _watched(tape, tf.einsum("...i,io->...o", xn, h.kernel) + h.bias)
        a2 = tf.tanh(z1)
        if positions is not None:
            a2 = tf.reduce_mean(a2, axis=1)
        z2 = _watched(tape, a2 @ out.kernel + out.bias)
        return [_rows(xn.numpy(), True), _rows(a2.numpy(), True)], [z1, z2], z2

    # Batches of 4 and 2 (padded to 4): two batches summed. The empirical estimator
    # keeps the oracle at one backward pass an example; the stacked terms of `exact`
    # take the same path.
    got = keras_ewc.kronecker_factors(net, (x, y), estimator="empirical", batch_size=4,
                                      likelihood="categorical", verbose=0)
    for (a, g), (a0, g0) in zip(got.values(), _brute(forward, x, y)):
        for actual, expected in ((a, a0), (g, g0)):
            # Float32 sums of hundreds of products of either sign: relative 1e-5 of the
            # factor's largest entry (the float64 oracle has no such rounding).
            scale = np.abs(expected).max()
            np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5,
                                       atol=1e-5 * scale)


def test_dense_on_sequences_counts_positions_as_rows():
    net = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(5, "relu"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    d1, _, d2 = net.layers
    x = _x((9, 3, 4), seed=1)

    def forward(xn, tape):
        z1 = _watched(tape, tf.einsum("nsi,io->nso", xn, d1.kernel) + d1.bias)
        a2 = tf.reshape(tf.nn.relu(z1), [1, -1])
        z2 = _watched(tape, a2 @ d2.kernel + d2.bias)
        return [_rows(xn.numpy(), True), _rows(a2.numpy(), True)], [z1, z2], z2

    _check(net, forward, x)


def _patches_by_loops(x, k, stride, dilation, padding):
    """`[positions, prod(k) * C]` patches of one example `[*spatial, C]`, by loops."""
    spatial = x.shape[:-1]
    pads = []
    for n, kk, s, d in zip(spatial, k, stride, dilation):
        span = (kk - 1) * d + 1
        if padding == "same":
            total = max((int(np.ceil(n / s)) - 1) * s + span - n, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((span - 1, 0))
        else:
            pads.append((0, 0))
    xp = np.pad(x, pads + [(0, 0)])
    out = [(n + sum(p) - ((kk - 1) * d + 1)) // s + 1
           for n, p, kk, s, d in zip(spatial, pads, k, stride, dilation)]
    rows = []
    for pos in np.ndindex(*out):
        patch = []
        for off in np.ndindex(*k):
            index = tuple(p * s + o * d for p, o, s, d in zip(pos, off, stride, dilation))
            patch.append(xp[index])
        rows.append(np.concatenate(patch))
    return np.array(rows, np.float64)


@pytest.mark.parametrize("kind", ["conv2d_same_stride", "conv1d_causal_dilated"])
def test_conv_kfc_factors(kind):
    if kind == "conv2d_same_stride":
        conv = keras.layers.Conv2D(3, (3, 2), strides=(2, 1), padding="same")
        shape = (5, 4, 2)
        op = dict(strides=(2, 1), padding="SAME")
    else:
        conv = keras.layers.Conv1D(3, 2, dilation_rate=2, padding="causal", use_bias=False)
        shape = (7, 2)
        op = dict(dilations=2, padding="VALID")
    net = keras.Sequential([keras.Input(shape), conv, keras.layers.Flatten(),
                            keras.layers.Dense(4)])
    head = net.layers[-1]
    x = _x((6,) + shape, seed=2)

    def forward(xn, tape):
        xin = xn
        if kind != "conv2d_same_stride":
            xin = tf.pad(xn, [[0, 0], [2, 0], [0, 0]])  # causal: (k - 1) * d on the left
        z1 = tf.nn.convolution(xin, conv.kernel, **op)
        if conv.use_bias:
            z1 = z1 + conv.bias
        z1 = _watched(tape, z1)
        a2 = tf.reshape(z1, [1, -1])  # the conv is linear here
        z2 = _watched(tape, a2 @ head.kernel + head.bias)
        rows = _patches_by_loops(xn.numpy()[0], conv.kernel_size, conv.strides, conv.dilation_rate,
                                 conv.padding)
        if conv.use_bias:
            rows = np.concatenate([rows, np.ones((len(rows), 1))], 1)
        return [rows, _rows(a2.numpy(), True)], [z1, z2], z2

    _check(net, forward, x)


def test_mixed_model_factors_dense_and_leaves_the_rest_to_the_diagonal():
    tokens = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(7, 4, name="emb")(tokens)
    h = keras.layers.Dense(6, "tanh", name="seq_dense")(e)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    out = keras.layers.Dense(3, name="head")(h)
    net = keras.Model(tokens, out)
    x = np.random.default_rng(3).integers(0, 7, size=(8, 5)).astype("int32")
    emb, dense, norm, head = (net.get_layer(n) for n in ("emb", "seq_dense", "norm", "head"))

    def forward(xn, tape):
        a1 = tf.gather(emb.embeddings, xn)
        z1 = _watched(tape, a1 @ dense.kernel + dense.bias)
        a2 = norm(tf.reduce_mean(tf.tanh(z1), axis=1))
        z2 = _watched(tape, a2 @ head.kernel + head.bias)
        return [_rows(a1.numpy(), True), _rows(a2.numpy(), True)], [z1, z2], z2

    got = _check(net, forward, x)
    assert list(got) == ["seq_dense", "head"]
    covered = {id(v) for _, _, p in kfac.factored_layers(net) for v in p.values()}
    rest = [v for v in net.trainable_variables if id(v) not in covered]
    assert sorted(v.path.split("/")[-2] for v in rest) == ["emb", "norm", "norm"]
    diag = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", variables=rest,
                                     verbose=0)
    oracle.assert_close(diag, oracle.categorical_exact(net, rest, x))


def test_one_example_one_term_block_is_exact_and_its_diagonal_is_the_fisher():
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "relu"),
                            keras.layers.Dense(3)])
    x, y = _x((1, 5), seed=4), np.array([2])
    factors = keras_ewc.kronecker_factors(net, (x, y), estimator="empirical",
                                          likelihood="categorical", verbose=0)
    diag = keras_ewc.fisher_diagonal(net, (x, y), estimator="empirical",
                                     likelihood="categorical", verbose=0)
    with tf.GradientTape() as tape:
        nll = -tf.nn.log_softmax(net(x))[0, 2]
    grads = tape.gradient(nll, net.trainable_variables)
    for (a, g), (layer_index) in zip(factors.values(), (0, 1)):
        kernel_diag, bias_diag = diag[2 * layer_index], diag[2 * layer_index + 1]
        block_diag = np.outer(np.diag(a), np.diag(g))  # diag(A ⊗ G) laid out as W̄
        _close(block_diag[:-1], kernel_diag)
        _close(block_diag[-1], bias_diag)
        # The whole block: A ⊗ G = vec(∇W̄) vec(∇W̄)ᵀ (row-major vec of [in + 1, out]).
        wbar = np.concatenate([grads[2 * layer_index], grads[2 * layer_index + 1][None]])
        v = wbar.reshape(-1).astype(np.float64)
        _close(np.kron(a, g), np.outer(v, v))


@pytest.mark.backend_neutral
def test_errors_name_the_problem():
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = _x((4, 3))
    with pytest.raises(ValueError, match="Received: estimator='batched'"):
        keras_ewc.kronecker_factors(net, (x, np.zeros(4)), estimator="batched",
                                    likelihood="categorical")
    with pytest.raises(ValueError, match="needs the true labels"):
        keras_ewc.kronecker_factors(net, x, estimator="empirical", likelihood="categorical",
                                    verbose=0)
    with pytest.raises(ValueError, match="holds no examples"):
        keras_ewc.kronecker_factors(net, x[:0], likelihood="categorical", verbose=0)
    # The diagonal's checks apply: probabilities read as logits, an endless dataset.
    soft = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, "softmax")])
    with pytest.raises(ValueError, match="look like probabilities"):
        keras_ewc.kronecker_factors(soft, x, verbose=0,
                                    likelihood=keras_ewc.fisher.Categorical(from_logits=True))
    endless = tf.data.Dataset.from_tensor_slices(x).batch(2).repeat()
    got = keras_ewc.kronecker_factors(net, endless, likelihood="categorical", verbose=0,
                                      steps=2)
    want = keras_ewc.kronecker_factors(net, x, likelihood="categorical", verbose=0)
    for (a, g), (a0, g0) in zip(got.values(), want.values()):
        _close(a, a0)
        _close(g, g0)


class TiedDense(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        h = self.dense(x)
        return h @ keras.ops.transpose(self.dense.kernel)  # the kernel read again: tied


@pytest.mark.backend_neutral
def test_tied_weights_are_refused_by_name():
    net = TiedDense()
    x = _x((4, 3))
    net(x)
    with pytest.raises(ValueError, match="read outside its own call"):
        keras_ewc.kronecker_factors(net, x, likelihood="categorical", verbose=0)


def test_sample_weights_count_examples_that_many_times():
    net = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(5, "relu"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    x, y = _x((6, 3, 4), seed=5), np.arange(6) % 3
    w = np.array([2.0, 0.0, 1.0, 3.0, 1.0, 0.0], "float32")
    repeated = np.repeat(np.arange(6), w.astype(int))
    for estimator in ("exact", "empirical"):
        got = keras_ewc.kronecker_factors(net, (x, y, w), estimator=estimator,
                                          likelihood="categorical", verbose=0, batch_size=4)
        want = keras_ewc.kronecker_factors(net, (x[repeated], y[repeated]),
                                           estimator=estimator, likelihood="categorical",
                                           verbose=0)
        for (a, g), (a0, g0) in zip(got.values(), want.values()):
            _close(a, a0)
            _close(g, g0)
    with pytest.raises(ValueError, match="only examples of sample weight 0"):
        keras_ewc.kronecker_factors(net, (x, y, 0 * w), likelihood="categorical", verbose=0)


def test_factors_are_traced_once_across_calls():
    """A second call, with new weights, other data and a ragged last batch, reuses the
    traced step of the diagonal engine's loop (cached per model)."""
    from keras_ewc.fisher import diagonal

    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    x = _x((10, 3), seed=6)
    first = keras_ewc.kronecker_factors(net, x, likelihood="categorical", verbose=0,
                                        batch_size=4)
    assert diagonal.trace_count(net) == 1
    steps = {key: step.function for key, step in diagonal._STEPS[net].items()}
    net.layers[0].kernel.assign(net.layers[0].kernel * 2.0)  # new weights, same trace
    again = keras_ewc.kronecker_factors(net, x[:7] + 1.0, likelihood="categorical",
                                        verbose=0, batch_size=4)  # 4, 3: padded
    assert diagonal.trace_count(net) == 1
    # The very same traced functions, not new ones traced once each.
    assert {key: step.function for key, step in diagonal._STEPS[net].items()} == steps
    assert not np.allclose(list(first.values())[0][1], list(again.values())[0][1])
    # The ragged, padded call is still exact: the same factors as one batch of 7.
    whole = keras_ewc.kronecker_factors(net, x[:7] + 1.0, likelihood="categorical",
                                        verbose=0, batch_size=7)
    for (a, g), (a0, g0) in zip(again.values(), whole.values()):
        _close(a, a0)
        _close(g, g0)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("rows", [9, 1040], ids=["short", "tall"])
@pytest.mark.parametrize("width", [5, 511, 512, 700, 1030])
def test_gram_takes_the_symmetric_blocks_exactly(width, rows):
    """`mᵀ m` (one product, or from 2 upper blocks up) against NumPy in float64."""
    m = np.random.default_rng(width).normal(size=(rows, width)).astype("float32")
    got = keras.ops.convert_to_numpy(kfac.gram(keras.ops.convert_to_tensor(m)))
    want = m.astype(np.float64).T @ m.astype(np.float64)
    # Float32 rounding: relative 1e-5 of the largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)
