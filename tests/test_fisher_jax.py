"""The Fisher engine on the JAX backend, against a brute-force JAX oracle.

Runs only under `KERAS_BACKEND=jax` (see README: the suite's JAX pass). Tolerance: each
variable's Fisher agrees with the oracle (float64 sums, one example and one class at a
time) to 1e-5 of the variable's largest entry.
"""

import keras
import numpy as np
import pytest

pytestmark = [
    pytest.mark.jax_only,
]

import keras_ewc  # noqa: E402
from tests import oracle_jax  # noqa: E402

RTOL = 1e-5


class Scale(keras.layers.Layer):
    """A layer no kernel covers: it takes the layer-local path."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal")

    def call(self, x):
        return x * self.w + 0.1 * keras.ops.square(x) * self.w


class TiedOutput(keras.layers.Layer):
    """Logits from another layer's kernel: a weight read in two places."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, h):
        return keras.ops.matmul(h, self.dense.kernel)


def _close(fisher, expected):
    assert len(fisher) == len(expected)
    for f, e in zip(fisher, expected):
        f = np.asarray(f, np.float64)
        assert f.shape == e.shape
        scale = max(float(np.max(np.abs(e))), 1e-12)
        np.testing.assert_allclose(f, e, rtol=0, atol=RTOL * scale)


def _data(n=37, features=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, features)).astype("float32"),
            rng.integers(0, classes, n).astype("int32"))


def _mlp(features=6, classes=4):
    inputs = keras.Input((features,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    h = Scale()(h)
    h = keras.layers.LayerNormalization()(h)
    outputs = keras.layers.Dense(classes)(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_mlp_with_a_custom_layer_matches_the_oracle(estimator):
    net = _mlp()
    x, y = _data()
    # 37 examples in batches of 16: the last batch is padded with weight-0 rows.
    fisher, paths = keras_ewc.fisher_diagonal(
        net, (x, y), estimator=estimator, likelihood="categorical", batch_size=16,
        verbose=0, return_paths=True)
    _close(fisher, oracle_jax.categorical(net, x, y if estimator == "empirical" else None))
    assert paths["scale/variable"] == "layer-local"
    assert paths["dense/kernel"] == paths["layer_normalization/gamma"] == "fast"
    assert set(paths.values()) <= {"fast", "layer-local"}


def test_a_tied_weight_takes_the_reference_path_and_stays_exact():
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(5, activation="tanh")
    h = dense(inputs)
    h = keras.layers.Dense(6, activation="tanh")(h)
    outputs = TiedOutput(dense)(h)  # [B, 6] @ [6, 5]: logits over 5 classes
    net = keras.Model(inputs, outputs)
    x, y = _data(n=20, classes=5)
    fisher, paths = keras_ewc.fisher_diagonal(
        net, (x, y), estimator="exact", likelihood="categorical", verbose=0,
        return_paths=True)
    assert paths[dense.kernel.path] == "reference"
    _close(fisher, oracle_jax.categorical(net, x))


def test_a_second_call_after_training_sees_the_new_weights():
    # A jitted step that read the variables would keep the first weights as constants.
    net = _mlp()
    x, y = _data()
    first = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    for v in net.trainable_variables:
        v.assign(np.asarray(v.value) * 1.5 + 0.1)
    second = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    _close(second, oracle_jax.categorical(net, x))
    assert not np.allclose(np.asarray(first[0]), np.asarray(second[0]))


def test_sample_weights_weight_the_mean():
    net = _mlp()
    x, y = _data(n=24)
    w = np.linspace(0.0, 2.0, 24).astype("float32")
    fisher = keras_ewc.fisher_diagonal(net, (x, y, w), estimator="empirical",
                                       likelihood="categorical", batch_size=10, verbose=0)
    _close(fisher, oracle_jax.categorical(net, x, y, weights=w))


def test_a_cnn_with_inference_batch_norm_matches_the_oracle():
    net = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(3, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 8, 8, 2)).astype("float32")
    fisher = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    _close(fisher, oracle_jax.categorical(net, x))


def test_sampled_is_deterministic_for_a_seed_and_batched_is_the_squared_batch_gradient():
    net = _mlp()
    x, y = _data(n=16)
    a = keras_ewc.fisher_diagonal(net, x, estimator="sampled", likelihood="categorical",
                                  seed=7, samples=3, verbose=0)
    b = keras_ewc.fisher_diagonal(net, x, estimator="sampled", likelihood="categorical",
                                  seed=7, samples=3, verbose=0)
    c = keras_ewc.fisher_diagonal(net, x, estimator="sampled", likelihood="categorical",
                                  seed=8, samples=3, verbose=0)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
    import jax

    batched = keras_ewc.fisher_diagonal(net, (x, y), estimator="batched",
                                        likelihood="categorical", batch_size=16, verbose=0)
    values = [v.value for v in net.trainable_variables]
    fixed = [v.value for v in net.non_trainable_variables]

    def loss(vals):
        out, _ = net.stateless_call(vals, fixed, x, training=False)
        logp = jax.nn.log_softmax(out)
        return -jax.numpy.mean(logp[np.arange(16), y])

    expected = [np.square(np.asarray(g, np.float64)) for g in jax.grad(loss)(values)]
    _close(batched, expected)


def test_bad_data_is_refused_after_the_loop():
    net = _mlp()
    x, y = _data(n=8)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    x, y = _data(n=8)
    y[2] = 7
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        keras_ewc.fisher_diagonal(net, (x, y), estimator="empirical",
                                  likelihood="categorical", verbose=0)


def test_tf_distribute_strategies_are_refused_on_jax():
    class Several:
        num_replicas_in_sync = 2

    net = _mlp()
    x, _ = _data(n=8)
    with pytest.raises(ValueError, match="strategy"):
        keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0,
                                  strategy=Several())


def test_many_rows_and_many_classes():
    # 1,024 rows in one step, equal to the same data in steps of 128 rows (a vectorised
    # pullback over the columns gave sums a few percent low from 512 rows, or crashed
    # XLA on CPU); a kernel layer and a layer-local one.
    net = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
                            Scale(), keras.layers.Dense(10)])
    x = np.random.default_rng(2).normal(size=(1024, 20)).astype("float32")
    whole = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", batch_size=1024,
                                      verbose=0)
    parts = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", batch_size=128,
                                      verbose=0)
    _close(whole, [np.asarray(p, np.float64) for p in parts])
    # More term columns than are unrolled (`LOOP_COLUMNS`): one `lax.map` over them.
    from keras_ewc.backend.jax import fisher as jax_fisher

    classes = jax_fisher.LOOP_COLUMNS + 8
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(classes)])
    x, _ = _data(n=10)
    _close(keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0),
           oracle_jax.categorical(net, x))


_DATA_PARALLEL = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"
import jax, keras, numpy as np, keras_ewc
assert len(jax.devices()) == 2, jax.devices()
def net():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(4)])
rng = np.random.default_rng(0)
x = rng.normal(size=(37, 6)).astype("float32"); y = rng.integers(0, 4, 37)
results = {}
for name in ("one", "two"):
    if name == "two":
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()))
    model = net()
    for estimator in ("exact", "empirical", "sampled"):
        f = keras_ewc.fisher_diagonal(model, (x, y), estimator=estimator, seed=5,
                                      likelihood="categorical", verbose=0, batch_size=16)
        results[name, estimator] = [np.asarray(t, np.float64) for t in f]
for estimator in ("exact", "empirical", "sampled"):
    for a, b in zip(results["one", estimator], results["two", estimator]):
        scale = float(np.max(np.abs(a)))
        assert scale > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)
# One epoch of EWC training after a consolidation: the same weights on two devices.
weights = {}
for name in ("one", "two"):
    keras.distribution.set_distribution(
        None if name == "one" else keras.distribution.DataParallel(devices=jax.devices()))
    model = keras_ewc.EWCModel(net(), strength=50.0)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.consolidate((x, y), verbose=0, batch_size=16)
    model.fit(x[:32] + 1.0, y[:32], batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert float(model.penalty()) > 0
    weights[name] = [np.asarray(w, np.float64) for w in model.network.get_weights()]
moved = max(float(np.max(np.abs(a - b))) for a, b in zip(weights["one"], net().get_weights()))
assert moved > 1e-3
for a, b in zip(weights["one"], weights["two"]):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
# The engine splits each batch's rows over the two devices (8 rows each of 16).
from keras_ewc.backend.jax import fisher as jax_fisher
placed = jax_fisher._distribute((x[:16],))[0]
assert len(placed.sharding.device_set) == 2
assert [s.data.shape[0] for s in placed.addressable_shards] == [8, 8]
print("DATA PARALLEL OK")
"""


@pytest.mark.slow
def test_data_parallel_on_two_host_devices_equals_one_device(tmp_path):
    # The Fisher of each estimator, and one epoch of `fit` with a consolidated state.
    import os
    import subprocess
    import sys

    script = tmp_path / "data_parallel.py"
    script.write_text(_DATA_PARALLEL)
    env = dict(os.environ, KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DATA PARALLEL OK" in done.stdout


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_kronecker_factors_match_a_numpy_oracle(estimator):
    # Two Dense layers by hand in float64: A = Σ w ā āᵀ / Σ w (ā = [a; 1]) and
    # G = Σ w Σ_c q_c g_c g_cᵀ / Σ w with g_c = ∂ log p_c / ∂ z, q = p (exact) or the
    # true label's indicator (empirical).
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                            keras.layers.Dense(3)])
    rng = np.random.default_rng(4)
    net.set_weights([rng.normal(size=w.shape).astype("float32") for w in net.get_weights()])
    x = rng.normal(size=(19, 5)).astype("float32")
    y = rng.integers(0, 3, 19)
    w = rng.uniform(0.0, 2.0, 19).astype("float32")
    factors = keras_ewc.fisher.kronecker_factors(
        net, (x, y, w), estimator=estimator, likelihood="categorical", batch_size=8,
        verbose=0)
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in net.get_weights())
    x64, weights = x.astype(np.float64), w.astype(np.float64)
    h = np.tanh(x64 @ w1 + b1)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = [np.zeros((6, 6)), np.zeros((5, 5))]
    g = [np.zeros((4, 4)), np.zeros((3, 3))]
    for n in range(19):
        for i, inputs in enumerate((x64[n], h[n])):
            bar = np.append(inputs, 1.0)
            a[i] += weights[n] * np.outer(bar, bar)
        q = p[n] if estimator == "exact" else np.eye(3)[y[n]]
        for c in range(3):
            g2 = np.eye(3)[c] - p[n]
            g1 = (w2 @ g2) * (1 - h[n] ** 2)
            g[0] += weights[n] * q[c] * np.outer(g1, g1)
            g[1] += weights[n] * q[c] * np.outer(g2, g2)
    total = weights.sum()
    for i, key in enumerate(sorted(factors)):
        got_a, got_g = (np.asarray(t, np.float64) for t in factors[key])
        for got, want in ((got_a, a[i] / total), (got_g, g[i] / total)):
            np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_the_automatic_batch_respects_the_memory_budget(monkeypatch, chosen_sizes):
    from keras_ewc.backend.jax import fisher as jax_fisher
    from keras_ewc.fisher import diagonal

    net = keras.Sequential([keras.Input((30,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(5)])
    x = np.random.default_rng(5).normal(size=(300, 30)).astype("float32")
    whole = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    step = next(iter(jax_fisher._JAX_STEPS[net].values()))
    assert step.batch_size == 512  # 300 examples: one call, padded to a power of two
    per_example = step.per_example_bytes((x,), "exact")
    assert per_example > 4 * (64 + 5) * 4  # at least the probes' gradients, 4 columns
    # A budget for about 100 examples: calls of 64 (a power of two), the same Fisher.
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 100 * per_example)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO", 0)  # the fixed budget alone
    chosen = chosen_sizes()  # the steps that run
    jax_fisher._JAX_STEPS.pop(net)
    chunked = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    assert chosen == [64]
    _close(chunked, [np.asarray(w, np.float64) for w in whole])
    # A large model: the budget alone would allow one example a call; 40 examples'
    # worth of the Fisher step's bytes, as gradient steps, give calls of 32.
    gradient = diagonal.gradient_bytes(net, net.trainable_variables, (x,))
    assert 4 * (64 + 5) <= gradient < per_example  # the hidden layer and logits at least
    # An integer variable asked for (a dropout's seed state) is not differentiated.
    dropped = keras.Sequential([keras.Input((30,)), keras.layers.Dense(8),
                                keras.layers.Dropout(0.5), keras.layers.Dense(5)])
    assert diagonal.gradient_bytes(dropped, dropped.variables, (x,)) >= 4 * (8 + 5)
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO",
                        40.5 * per_example / (diagonal.DEFAULT_BATCH_SIZE * gradient))
    jax_fisher._JAX_STEPS.pop(net)
    chunked = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    assert chosen == [64, 32]
    _close(chunked, [np.asarray(w, np.float64) for w in whole])


class _Loop(keras.layers.Layer):
    """A Dense applied three times inside the layer's own `keras.ops.scan`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, activation="tanh")

    def build(self, input_shape):
        self.dense.build((None, 4))

    def call(self, x):
        carry, _ = keras.ops.scan(lambda c, _: (self.dense(c), None), x, None, length=3)
        return carry


def test_a_layer_called_inside_a_loop_body_takes_the_reference_path_exactly():
    # Its values live in the loop's own trace and cannot be recorded from outside.
    inputs = keras.Input((4,))
    net = keras.Model(inputs, keras.layers.Dense(3)(_Loop()(inputs)))
    x, _ = _data(n=12, features=4)
    fisher, paths = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0,
                                              return_paths=True)
    assert set(paths.values()) == {"reference"}
    _close(fisher, oracle_jax.categorical(net, x))
    with pytest.raises(ValueError, match="reference"):
        keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0,
                                  fallback="error")


class _Twice(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return 2.0 * x * self.w


def test_a_registered_kernel_breaking_its_contract_is_named():
    from keras_ewc.fisher import Kernel, register_kernel

    @register_kernel(_Twice)
    class WrongKeys(Kernel):
        def params(self, layer):
            return {"w": layer.w}

        def forward(self, layer, args, kwargs):
            x = args[0]
            return x, 2.0 * x * keras.ops.stop_gradient(layer.w), lambda z: z

        def sum_squared(self, layer, records, grads):
            return {"weights": keras.ops.sum(keras.ops.square(grads[0]), axis=(0, 1))}

    net = keras.Sequential([keras.Input((6,)), _Twice(), keras.layers.Dense(3)])
    x, _ = _data(n=8)
    with pytest.raises(ValueError, match=r"WrongKeys.*unknown \['weights'\], missing \['w'\]"):
        keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)


class _Branchy(keras.Model):
    """Calls `b` only on sequences longer than 4: another input signature traces a step
    that checks other kernels' sums."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = (keras.layers.Dense(4), keras.layers.Dense(4),
                                    keras.layers.Dense(3))

    def call(self, x, training=False):
        h = self.a(x)
        if x.shape[1] > 4:
            h = h + self.b(x)
        return self.out(keras.ops.mean(h, axis=1))


def test_a_step_traced_again_for_another_input_signature_keeps_its_checks_apart():
    # The jitted step is traced again for each input shape (padded sequences of another
    # length); each trace checks the sums of the kernels it calls. Before, their flags
    # were combined by position: a crash (shapes (4,) and (6,)) or a check misnamed.
    import tensorflow as tf

    net = _Branchy()
    rng = np.random.default_rng(0)
    short = rng.normal(size=(8, 3, 4)).astype("float32")
    long = rng.normal(size=(8, 5, 4)).astype("float32")
    net(long)
    data = tf.data.Dataset.from_tensors(short).concatenate(tf.data.Dataset.from_tensors(long))
    fisher = keras_ewc.fisher_diagonal(net, data, likelihood="categorical", verbose=0)
    expected = [(a + b) / 2 for a, b in zip(oracle_jax.categorical(net, short),
                                            oracle_jax.categorical(net, long))]
    _close(fisher, expected)
