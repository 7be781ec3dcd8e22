"""The fast Fisher engine against brute-force oracles, kernel by kernel.

Each model is small; each check compares the engine's sums of squared per-example
gradients (or `fisher_diagonal`) with an oracle that takes one example at a time, to
relative 1e-5, and checks which path (fast kernel or reference) each variable took, so
that a kernel cannot pass by silently falling back.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ewc.fisher import diagonal, engine, fast, likelihoods
from keras_ewc.fisher.kernels import _common
from tests import oracle

N = 4
CLASSES = 3


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(N,) + shape).astype("float32")


def _tokens(length, vocab=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(N, length))
    ids[:, 1] = ids[:, 0]  # repeated tokens within an example
    ids[0, -2:] = 0
    ids[3, -3:] = 0
    return ids.astype("int32")


def _seq(shape, *layers):
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input(shape)] + list(layers) + [
        keras.layers.Flatten(), keras.layers.Dense(CLASSES)])


def _bn(model):
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size=layer.moving_variance.shape))
            layer.gamma.assign(rng.normal(size=layer.gamma.shape))
            layer.beta.assign(rng.normal(size=layer.beta.shape))
    return model


L = keras.layers
CONFIGS = {
    "dense": lambda: (_seq((5,), L.Dense(4, activation="tanh")), _x((5,))),
    "dense_sequence": lambda: (_seq((4, 5), L.Dense(4, activation="tanh")), _x((4, 5))),
    "dense_no_bias_layernorm": lambda: (
        _seq((4, 5), L.Dense(6, use_bias=False), L.LayerNormalization()), _x((4, 5))),
    "layernorm_two_axes": lambda: (
        _seq((4, 5), L.LayerNormalization(axis=[-2, -1]), L.Dense(2)), _x((4, 5))),
    "einsum_flat": lambda: (
        _seq((5,), L.EinsumDense("ab,bc->ac", 4, bias_axes="c", activation="tanh")),
        _x((5,))),
    "einsum_sequence": lambda: (
        _seq((4, 5), L.EinsumDense("abc,cd->abd", (4, 6), bias_axes="d"),
             L.EinsumDense("abd,bde->ae", 5, bias_axes="e")), _x((4, 5))),
    "einsum_ellipsis": lambda: (
        _seq((4, 5), L.EinsumDense("...b,bcd->...cd", (2, 3), bias_axes="cd")), _x((4, 5))),
    "conv1d": lambda: (
        # Grouped convolutions come first: TensorFlow has no CPU gradient for their input.
        _seq((12, 4), L.Conv1D(6, 2, groups=2),
             L.Conv1D(4, 3, strides=2, padding="same", activation="relu"),
             L.Conv1D(4, 3, dilation_rate=2, padding="causal")), _x((12, 4))),
    "conv2d": lambda: (
        _seq((9, 8, 2), L.Conv2D(4, (3, 2), strides=(2, 1), padding="same", groups=2),
             L.Conv2D(4, 3, dilation_rate=2, activation="tanh"),
             L.Conv2D(2, 1, use_bias=False)), _x((9, 8, 2))),
    "conv3d": lambda: (
        _seq((4, 5, 4, 2), L.Conv3D(3, 2, strides=(1, 2, 1), padding="same"),
             L.Conv3D(2, 2, dilation_rate=(2, 1, 1))),
        _x((4, 5, 4, 2))),
    "embedding": lambda: (_seq((6,), L.Embedding(7, 4)), _tokens(6)),
    "embedding_mask_zero": lambda: (
        _seq((6,), L.Embedding(7, 4, mask_zero=True), L.GlobalAveragePooling1D()),
        _tokens(6)),
    "masked_sequence_dense": lambda: (
        _seq((5, 4), L.Masking(0.0), L.Dense(4, activation="tanh"),
             L.GlobalAveragePooling1D()),
        _x((5, 4)) * (np.arange(5)[None, :, None] < np.array([5, 3, 2, 1])[:, None, None])),
    "batchnorm": lambda: (
        _bn(_seq((5,), L.Dense(6), L.BatchNormalization(), L.Dense(4, activation="relu"))),
        _x((5,))),
    "batchnorm_conv": lambda: (
        _bn(_seq((6, 5, 2), L.Conv2D(3, 2), L.BatchNormalization(axis=-1))), _x((6, 5, 2))),
}


def _terms(lik, estimator):
    """The engine's terms function for `estimator`: the likelihood's own terms."""
    return lambda outputs, extra: lik.terms(estimator, outputs, extra)


def _sums(model, x, estimator="exact", lik=None, extra=None, samples=1, fast=True):
    lik = lik or likelihoods.Categorical(from_logits=True)
    if keras.backend.backend() == "jax":
        return _sums_jax(model, x, _terms(lik, estimator), extra, fast)
    fn = engine.build_sum_squared_grads(
        model, model.trainable_variables, _terms(lik, estimator), fast
    )
    extra = None if extra is None else tf.constant(extra)
    sums = fn(tf.constant(x), extra)
    return [s / len(x) for s in sums], dict(fn.paths)


def _sums_jax(model, x, terms_fn, extra, fast):
    """`_sums` through the JAX engine's step: one jitted batch, the weights its arguments
    (as the engine's `Step` calls it); `fast=False` plans no kernel and no layer-local
    layer, so every variable takes the reference path."""
    import jax

    from keras_ewc.backend.jax import fisher as jax_fisher

    variables = list(model.trainable_variables)
    weights = jax_fisher._weights_of(model, variables)
    kernel_layers, local_layers = jax_fisher.plan(model, variables) if fast else ([], [])
    paths = {}

    def fn(values, inputs, extra):
        return jax_fisher.sum_squared_grads(model, weights, values, variables,
                                            kernel_layers, local_layers, terms_fn, inputs,
                                            extra, paths)

    sums = jax.jit(fn)([w.value for w in weights], x, extra)
    return [s / len(x) for s in sums], dict(paths)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_matches_oracle(name):
    model, x = CONFIGS[name]()
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def _brute(model, variables, terms_fn, x, extra):
    """Σ_n Σ_t (∂ terms[n, t] / ∂ v)² / N: one example and one term a tape."""
    total = [np.zeros(v.shape) for v in variables]
    for n in range(len(x)):
        e = None if extra is None else extra[n:n + 1]
        terms = terms_fn(model(x[n:n + 1], training=False), e)
        for t in range(int(keras.ops.reshape(terms, [-1]).shape[0])):
            grads = oracle.batch_gradients(
                model, variables, x[n:n + 1],
                lambda out, e=e, t=t: keras.ops.reshape(terms_fn(out, e), [-1])[t])
            for i, g in enumerate(grads):
                total[i] += g ** 2
    return [t / len(x) for t in total]


def _estimator_model(likelihood):
    keras.utils.set_random_seed(2)
    outputs = 3
    activation = {"probabilities": "softmax", "bernoulli": None}.get(likelihood)
    return keras.Sequential([
        keras.Input((6,), dtype="int32"), L.Embedding(9, 3),
        L.Conv1D(4, 2, activation="tanh"), L.Flatten(),
        L.Dense(outputs, activation=activation)])


LIKELIHOODS = {
    "logits": lambda: likelihoods.Categorical(from_logits=True),
    "probabilities": lambda: likelihoods.Categorical(from_logits=False),
    "bernoulli": lambda: likelihoods.Bernoulli(from_logits=True),
    "gaussian": lambda: likelihoods.Gaussian(),
}


@pytest.mark.backend_neutral
@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_estimators_and_likelihoods_match_brute_force(estimator, likelihood):
    model = _estimator_model(likelihood)
    lik = LIKELIHOODS[likelihood]()
    x = _tokens(6, vocab=9)
    rng = np.random.default_rng(4)
    samples = 2 if estimator == "sampled" else 1
    extra = None
    if estimator == "sampled":
        extra = rng.uniform(size=(N, samples, 3)).astype("float32")
    elif estimator == "empirical":
        if isinstance(lik, likelihoods.Categorical):
            extra = rng.integers(0, 3, size=N).astype("int32")
        elif isinstance(lik, likelihoods.Bernoulli):
            extra = rng.integers(0, 2, size=(N, 3)).astype("float32")
        else:
            extra = rng.normal(size=(N, 3)).astype("float32")
    fisher, paths = _sums(model, x, estimator, lik, extra, samples)
    assert set(paths.values()) == {"fast"}
    terms_fn = _terms(lik, estimator)
    oracle.assert_close(fisher, _brute(model, model.trainable_variables, terms_fn, x, extra))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_exact_fisher_diagonal_matches_definition(likelihood):
    """fisher_diagonal (fast path, two batches) against the textbook oracles."""
    model = _estimator_model(likelihood)
    x = _tokens(6, vocab=9)
    v = model.trainable_variables
    lik = LIKELIHOODS[likelihood]()
    fisher = diagonal.fisher_diagonal(model, x, likelihood=lik, batch_size=2, verbose=0)
    if likelihood == "bernoulli":
        expected = oracle.bernoulli_exact(model, v, x)
    elif likelihood == "gaussian":
        expected = oracle.gaussian_exact(model, v, x)
    else:
        expected = oracle.categorical_exact(model, v, x, from_logits=likelihood == "logits")
    oracle.assert_close(fisher, expected)


def test_empirical_and_sampled_fisher_diagonal_match_label_oracle():
    model = _estimator_model("logits")
    x, v = _tokens(6, vocab=9), model.trainable_variables
    y = np.random.default_rng(5).integers(0, 3, size=N)
    fisher = diagonal.fisher_diagonal(
        model, (x, y), estimator="empirical", likelihood="categorical", verbose=0)
    oracle.assert_close(fisher, oracle.categorical_labels(model, v, x, y))
    # The sampled estimator's labels, drawn as fisher_diagonal draws them (one batch).
    lik = likelihoods.Categorical(from_logits=True)
    noise = tf.random.stateless_uniform([N, 3, 3], seed=[7, 0])
    labels = lik.sample(model(x, training=False), noise)
    fisher = diagonal.fisher_diagonal(
        model, x, estimator="sampled", samples=3, seed=7, likelihood=lik, verbose=0)
    oracle.assert_close(fisher, oracle.categorical_labels(model, v, x, labels))


class DoubledDense(keras.layers.Dense):
    """A Dense subclass whose `call` differs: it must not take the Dense kernel."""

    def call(self, inputs, training=None):
        return super().call(inputs) * 2.0 + keras.ops.sum(self.kernel)


class Scale(keras.layers.Layer):
    """A custom layer: an elementwise scale, no kernel."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, inputs):
        return inputs * self.w


def _paths_by_layer(paths):
    """The path taken by each layer's variables, by the layer's name (all alike)."""
    by_layer = {}
    for key, path in paths.items():
        for name in key.split("/")[:-1]:
            by_layer.setdefault(name, set()).add(path)
    return {name: found.pop() for name, found in by_layer.items() if len(found) == 1}


@pytest.mark.backend_neutral
def test_model_mixing_fast_and_fallback_layers():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((2, 3)), L.Dense(3, activation="tanh", name="d1"),
        L.SimpleRNN(2, return_sequences=True, name="rnn"), Scale(name="scale"),
        L.Flatten(), DoubledDense(5, name="doubled"), L.Dense(CLASSES, name="d2")])
    x = _x((2, 3))
    fisher, paths = _sums(model, x)
    by_layer = _paths_by_layer(paths)
    assert by_layer["d1"] == by_layer["d2"] == by_layer["rnn"] == "fast"
    # No kernel: each of these layers is re-run alone per example (the layer-local path).
    assert by_layer["scale"] == by_layer["doubled"] == "layer-local"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
def test_subclassed_model_with_shared_and_tied_layers():
    """A layer called twice sums its calls per example; a weight read elsewhere falls back."""

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.shared = L.Dense(4, activation="tanh")
            self.tied = L.Dense(5)
            self.head = L.Dense(CLASSES)

        def call(self, x):
            a = self.shared(x[:, :5])
            b = self.shared(x[:, 5:])
            h = self.tied(a + b)
            # Reads `tied`'s kernel outside its call: its kernel must take the reference.
            h = h + keras.ops.sum(self.tied.kernel**2)
            return self.head(h)

    keras.utils.set_random_seed(4)
    model = Net()
    x = _x((10,))
    model(x)
    fisher, paths = _sums(model, x)
    assert paths[model.tied.kernel.path] == "reference"
    assert paths[model.tied.bias.path] == "fast"
    assert paths[model.shared.kernel.path] == paths[model.head.kernel.path] == "fast"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


class FoldTime(keras.layers.Layer):
    """Applies a Dense to `[B * S, D]`: time folded into the batch axis."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = L.Dense(5, name="inner")

    def call(self, x):
        folded = keras.ops.reshape(x, [-1, x.shape[-1]])
        return keras.ops.reshape(self.inner(folded), [-1, x.shape[1], 5])


@pytest.mark.backend_neutral
def test_time_distributed_is_fast_but_a_merged_batch_axis_falls_back():
    """TimeDistributed calls its layer once a step on `[B, ...]`: the calls are summed
    per example. A layer that folds time into the batch axis sees rows that are not
    examples: its Dense must take the reference path."""
    keras.utils.set_random_seed(5)
    for wrapper, path in ((L.TimeDistributed(L.Dense(5, name="inner")), "fast"),
                          (FoldTime(), "reference")):
        model = _seq((3, 4), wrapper)
        x = _x((3, 4))
        fisher, paths = _sums(model, x)
        assert _paths_by_layer(paths)["inner"] == path
        expected = oracle.categorical_exact(model, model.trainable_variables, x)
        oracle.assert_close(fisher, expected)


def test_memory_is_bounded_by_chunks(monkeypatch):
    """Per-example gradients are formed in chunks: no tensor of the traced graph holds
    more than the budget (or the batch's activations), however large the batch."""
    monkeypatch.setattr(_common, "BUDGET", 4096)
    keras.utils.set_random_seed(6)
    model = _seq((8, 16), L.Dense(32), L.Conv1D(16, 3))
    lik = likelihoods.Categorical(from_logits=True)
    for batch in (64, 16):
        fn = engine.build_sum_squared_grads(
            model, model.trainable_variables, _terms(lik, "exact"))
        x = tf.constant(np.random.default_rng(0).normal(size=(batch, 8, 16)), tf.float32)
        graph = fn.get_concrete_function(x, None).graph
        sizes = [o.shape.num_elements() or 0 for op in graph.get_operations()
                 for o in op.outputs if o.shape.is_fully_defined()]
        # The largest tensor the method needs: the gradients at the Dense outputs, one
        # a class. One batch of the Conv1D's per-example gradients (batch * 96 * 16) would
        # be twice as large; the chunks hold at most the budget.
        largest = CLASSES * batch * 8 * 32
        assert max(sizes) <= max(4096, largest), (max(sizes), largest)
    assert set(fn.paths.values()) == {"fast"}
    reference = engine.build_sum_squared_grads(
        model, model.trainable_variables, _terms(lik, "exact"), fast=False)
    oracle.assert_close(fn(x, None), reference(x, None))


class ScaledKernelDense(keras.layers.Dense):
    """Overrides the `kernel` property, which Dense.call reads: not the plain kernel."""

    @property
    def kernel(self):
        return self._kernel * 2.0


@pytest.mark.backend_neutral
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_unsupported_configurations_take_the_reference_path():
    keras.utils.set_random_seed(7)
    lora = L.Dense(4, name="lora")
    model = _seq((5,), lora, ScaledKernelDense(4, name="scaled"),
                 L.LayerNormalization(rms_scaling=True, name="rms"), L.Dense(4, name="plain"))
    lora.enable_lora(2)
    x = _x((5,))
    fisher, paths = _sums(model, x)
    by_layer = _paths_by_layer(paths)
    assert by_layer["lora"] == by_layer["scaled"] == by_layer["rms"] == "layer-local"
    assert by_layer["plain"] == "fast"
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
def test_mixed_precision_matches_reference_path():
    """float16 compute: records and gradients are squared and summed in float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(8)
        model = _seq((8, 6), L.Conv1D(4, 3), L.LayerNormalization(),
                     L.Dense(5, activation="relu"))
        x = _x((8, 6))
        fisher, paths = _sums(model, x)
        reference, _ = _sums(model, x, fast=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert set(paths.values()) == {"fast"}
    assert all(keras.backend.standardize_dtype(f.dtype) == "float32" for f in fisher)
    # Both paths round in float16, in different orders.
    oracle.assert_close(fisher, reference, rtol=2e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_matches_oracle_with_the_columns_vectorised(name, monkeypatch):
    """TensorFlow back-propagates up to `fast.COLUMNS_AT_A_TIME` term columns one at a
    time, kept apart; pfor's vectorised jacobian (0 here, and above the cap) is the
    other path: both exact."""
    monkeypatch.setattr(fast, "COLUMNS_AT_A_TIME", 0)
    model, x = CONFIGS[name]()
    fisher, paths = _sums(model, x)
    assert set(paths.values()) == {"fast"}, paths
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def refuse_stacking(monkeypatch) -> list:
    """Makes stacking a `Columns` raise; returns a list that grows by one for each
    `Columns` made (so that a test can check the columns did reach the kernels apart)."""
    made = []
    init = _common.Columns.__init__

    def spy(self, columns):
        columns = list(columns)
        made.append(len(columns))
        init(self, columns)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a kernel stacked the columns it reads apart")

    monkeypatch.setattr(_common.Columns, "__init__", spy)
    monkeypatch.setattr(_common.Columns, "stacked", refuse)
    monkeypatch.setattr(_common.Columns, "__tf_tensor__", refuse)
    return made


def _apart_kernels_model(classes=CLASSES):
    """Dense and LayerNorm called twice, a convolution on a 4×4 map (the pairs form when
    forced) and one on a 1×1 map (the factorised form), a transposed convolution, a
    depthwise convolution called twice, a separable one and a group normalisation."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 2))
    depthwise = L.DepthwiseConv2D(3, padding="same", depth_multiplier=1, activation="tanh")
    h = L.SeparableConv2D(2, 2, padding="same", depth_multiplier=2)(depthwise(depthwise(inputs)))
    h = L.Conv2DTranspose(4, 2, strides=2)(h)
    # Two channels a group: with one, the normalisation would cancel the bias above
    # (its Fisher exactly 0, float32 noise against the oracle's float64).
    h = L.GroupNormalization(groups=2)(h)
    h = L.Conv2D(4, 3, strides=3)(h)  # 12×12 → 4×4
    h = L.Conv2D(4, 3, strides=2)(h)  # 4×4 → 1×1
    h = L.Flatten()(h)
    shared, norm = L.Dense(4, activation="tanh"), L.LayerNormalization()
    h = norm(shared(norm(shared(h))))
    return keras.Model(inputs, L.Dense(classes)(h))


@pytest.mark.parametrize("a_round, width", [(1, 1), (2, 2), (4, 3), (16, 5)])
def test_the_term_columns_loop_in_rounds_and_stay_exact(monkeypatch, a_round, width):
    """Five term columns (six classes) in rounds of at most `fast.COLUMNS_A_ROUND`: five
    rounds of one, three of two and two of three (the last round's last column past the
    end: zeros), or unrolled, all five at once (no more than a round). Every kernel kind
    that reads the columns apart, and a layer-local layer, exact to the oracle; the
    kernels get a round's columns apart, never stacked."""
    from tests.test_fisher_local import Gated

    made = refuse_stacking(monkeypatch)
    monkeypatch.setattr(fast, "COLUMNS_A_ROUND", a_round)
    model = _apart_kernels_model(classes=6)
    inputs = model.input
    gated = Gated(name="gated")(L.Reshape((4, 5))(L.Dense(20)(L.Flatten()(inputs))))
    combined = keras.Model(inputs, L.Dense(6)(L.Flatten()(gated)) + model.output)
    x = _x((6, 6, 2))
    fn = _exact_fn(combined)
    fisher = [s / N for s in fn(tf.constant(x), None)]
    assert set(fn.paths.values()) == {"fast", "layer-local"}, fn.paths
    oracle.assert_close(fisher,
                        oracle.categorical_exact(combined, combined.trainable_variables, x))
    assert set(made) == {width}
    graph = fn.get_concrete_function(tf.constant(x), None).graph
    assert len(fast.loop_bodies(graph)) == (width < 5)


def _exact_fn(model):
    """The engine's exact-Fisher step for a model with logits."""
    return engine.build_sum_squared_grads(
        model, model.trainable_variables,
        lambda out, extra: likelihoods.Categorical(from_logits=True).terms("exact", out,
                                                                           extra))


def _step_graph(model, x):
    return _exact_fn(model).get_concrete_function(tf.constant(x), None).graph


def _traced_ops(model, x) -> int:
    """Ops of the traced exact step, with the bodies of its loops over the columns."""
    graph = _step_graph(model, x)
    return sum(len(g.get_operations()) for g in [graph, *fast.loop_bodies(graph)])


def test_the_backward_pass_is_traced_once_a_round_whatever_the_columns(monkeypatch):
    """The loop over the term columns traces a round's `fast.COLUMNS_A_ROUND` backward
    passes (and kernel calls), not T: nine columns trace about the ops of six (two rounds
    of three either way); unrolled they trace about three times as many, which the count
    tells apart. The memory count adds the body once (one round alive at a time): less
    than the unrolled step's. (Rounds of 3 set here; by default T up to 16 is
    unrolled.)"""
    monkeypatch.setattr(fast, "COLUMNS_A_ROUND", 3)
    x = _x((6, 6, 2))
    six, nine = _apart_kernels_model(classes=7), _apart_kernels_model(classes=10)
    looped = _traced_ops(nine, x)
    assert looped < 1.1 * _traced_ops(six, x)
    graph = _step_graph(nine, x)
    counted = diagonal._per_example_bytes(graph, N)
    assert counted > diagonal._batch_bytes(graph, N) // N  # the body counts
    monkeypatch.setattr(fast, "looped", lambda terms: False)
    assert _traced_ops(nine, x) > 2 * looped
    assert diagonal._per_example_bytes(_step_graph(nine, x), N) > counted


@pytest.mark.parametrize("gram, budget", [(True, _common.BUDGET), (False, 60)])
def test_kernels_that_read_the_columns_apart_never_stack_them(monkeypatch, gram, budget):
    """The kernels marked `_columns_apart` take the columns' gradients as `Columns` and
    never stack them (the copy the default path avoids): stacking raises here, and the
    sums still match the oracle, with the pairs form forced, and with the per-example
    form over chunks of an example or two (a budget of 60 elements). The others get
    stacked tensors from the engine."""
    made = refuse_stacking(monkeypatch)
    monkeypatch.setattr(_common, "GRAM", gram)
    monkeypatch.setattr(_common, "BUDGET", budget)
    pairs, total = [], _common._pairs_total
    monkeypatch.setattr(_common, "_pairs_total",
                        lambda x, g: pairs.append(type(g)) or total(x, g))
    models = [CONFIGS[name]() for name in sorted(CONFIGS)]
    models.append((_apart_kernels_model(), _x((6, 6, 2))))
    for model, x in models:
        fisher, paths = _sums(model, x)
        assert set(paths.values()) == {"fast"}, paths
        oracle.assert_close(fisher,
                            oracle.categorical_exact(model, model.trainable_variables, x))
    assert made  # the columns did reach the kernels apart
    assert (_common.Columns in pairs) == gram  # and the pairs form, when forced


def test_more_columns_than_the_cap_take_the_vectorised_jacobian(monkeypatch):
    """Above `fast.COLUMNS_AT_A_TIME` columns the engine stacks pfor's jacobian (no
    `Columns` is made), and stays exact."""
    made = refuse_stacking(monkeypatch)
    monkeypatch.setattr(fast, "COLUMNS_AT_A_TIME", 1)  # 2 columns (3 classes): above it
    model, x = CONFIGS["conv2d"]()
    fisher, _ = _sums(model, x)
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))
    assert not made


def test_only_a_kernel_that_says_so_reads_the_columns_apart():
    """A user's kernel, a subclass of a built-in kernel that overrides `sum_squared`, and
    a kernel not derived from `Kernel` get tensors; the built-in ones marked so, Columns."""
    from keras_ewc.fisher import kernels
    from keras_ewc.fisher.kernels import dense, depthwise, embedding, separable

    class Mine(dense.DenseKernel):
        def sum_squared(self, layer, records, grads):
            return super().sum_squared(layer, records, grads)

    class Inherits(dense.DenseKernel):
        pass

    class Duck:
        def sum_squared(self, layer, records, grads):
            return {}

    assert kernels.reads_columns_apart(dense.DenseKernel())
    assert kernels.reads_columns_apart(Inherits())
    assert not kernels.reads_columns_apart(Mine())
    assert not kernels.reads_columns_apart(Duck())
    assert kernels.reads_columns_apart(depthwise.DepthwiseConvKernel())
    assert kernels.reads_columns_apart(separable.SeparableConvKernel())
    assert not kernels.reads_columns_apart(embedding.EmbeddingKernel())


def test_columns_read_as_the_stacked_tensor():
    """`Columns` and the helpers that keep columns apart give what the stacked tensor
    gives (exactly: the same ops on the same slices)."""
    rng = np.random.default_rng(0)
    parts = [tf.constant(rng.normal(size=(4, 3, 5)).astype("float32")) for _ in range(3)]
    cols, whole = _common.Columns(parts), tf.stack(parts)
    assert tuple(cols.shape) == tuple(whole.shape) and cols.ndim == 4 and len(cols) == 3
    np.testing.assert_array_equal(cols[1], whole[1])
    np.testing.assert_array_equal(cols[2, 1:3], whole[2, 1:3])
    np.testing.assert_array_equal(tf.stack(cols[:, 1:3, ::2].columns), whole[:, 1:3, ::2])
    np.testing.assert_array_equal(cols[np.int64(2)], whole[2])
    assert cols[:] is cols and cols[...] is cols and cols[:, ...] is cols
    np.testing.assert_array_equal(cols[1:], whole[1:])  # anything else: the stacked tensor
    np.testing.assert_array_equal(cols[..., 0], whole[..., 0])
    np.testing.assert_array_equal(tf.convert_to_tensor(cols), whole)
    np.testing.assert_array_equal(keras.ops.square(cols), keras.ops.square(whole))
    np.testing.assert_array_equal(tf.stack((cols + cols).columns), whole + whole)
    assert 0.0 + cols is cols
    np.testing.assert_array_equal(
        tf.stack(_common.reshape_terms(cols, [4, 15]).columns), tf.reshape(whole, [3, 4, 15]))
    joined = _common.concatenate_terms([cols, _common.Columns(parts[::-1])], 2)
    np.testing.assert_array_equal(tf.stack(joined.columns),
                                  tf.concat([whole, tf.stack(parts[::-1])], 2))
    np.testing.assert_allclose(_common.sum_squares_over_terms(cols),
                               tf.reduce_sum(whole ** 2, 0), rtol=1e-6)
    x = tf.constant(rng.normal(size=(4, 3, 2)).astype("float32"))
    np.testing.assert_allclose(_common.positions_sum_squared(x, cols),
                               _common.positions_sum_squared(x, whole), rtol=1e-6)
    np.testing.assert_allclose(_common.broadcast_sum_squared([cols], [5]),
                               _common.broadcast_sum_squared([whole], [5]), rtol=1e-6)
    with pytest.raises(ValueError, match="an axis after the terms"):
        _common.concatenate_terms([cols, cols], 0)
    with pytest.raises(ValueError, match="at least one term column"):
        _common.Columns([])
