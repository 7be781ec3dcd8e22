"""`_common.positions_sum_squared`, the sum of squared per-example gradients of a kernel
applied at P positions (a Dense layer on a sequence, a convolution's patches, a recurrent
kernel over time steps), in both its forms (per-example products; the square expanded
over pairs of positions, in float64), against brute force; and a case where the expanded
form cancels (in float32 it came out negative).
"""

import keras
import numpy as np
import pytest

from keras_ewc.fisher import diagonal
from keras_ewc.fisher.kernels import _common
from tests import oracle


def _brute(x, g):
    """Σ_n Σ_t (x[n]ᵀ g[t, n])² in float64, one example and one term at a time."""
    total = np.zeros((x.shape[-1], g.shape[-1]))
    for n in range(x.shape[0]):
        for t in range(g.shape[0]):
            total += np.square(x[n].T.astype(np.float64) @ g[t, n].astype(np.float64))
    return total


def _spy_on_pairs(monkeypatch):
    """A list that gets an entry each time the pairs form runs."""
    used = []
    pairs = _common._pairs_sum_squared
    monkeypatch.setattr(_common, "_pairs_sum_squared",
                        lambda x, g: used.append(True) or pairs(x, g))
    return used


@pytest.mark.backend_neutral
@pytest.mark.parametrize("budget", [None, 40, 2000])
@pytest.mark.parametrize("terms, positions, gram", [
    (1, 1, None), (3, 1, None), (9, 4, False), (9, 4, True), (2, 5, False), (2, 5, True)])
def test_matches_brute_force(monkeypatch, budget, terms, positions, gram):
    """Both forms to 1e-5 of a float64 one-example-at-a-time sum (float32 inputs); the
    pairs form where float64 runs on the CPU (TensorFlow; JAX with x64), else the
    per-example form. The budgets: one chunk; examples one at a time (the pairs form
    then does not fit: per-example); two or three examples a chunk in the pairs form."""
    from keras_ewc import backend

    monkeypatch.setattr(_common, "GRAM", gram)
    if budget is not None:
        monkeypatch.setattr(_common, "BUDGET", budget)
    used = _spy_on_pairs(monkeypatch)
    rng = np.random.default_rng(terms * 10 + positions)
    x = rng.normal(size=(5, positions, 3)).astype("float32")
    g = rng.normal(size=(terms, 5, positions, 4)).astype("float32")
    got = _common.positions_sum_squared(keras.ops.convert_to_tensor(x),
                                        keras.ops.convert_to_tensor(g))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), _brute(x, g), rtol=1e-5)
    fits = _common.pairs_size(terms, positions, 3, 4) <= _common.BUDGET
    assert bool(used) == bool(gram and backend.float64_on_cpu() and fits)


@pytest.mark.jax_only
def test_jax_with_x64_runs_the_pairs_form_in_float64(monkeypatch):
    """JAX with `jax_enable_x64`: the pairs form runs, equal to brute force, and in
    float64 (where the sum cancels, within 1e-12 of the products' size)."""
    import jax

    used = _spy_on_pairs(monkeypatch)
    x, g = _cancelling_inputs()
    with jax.enable_x64(True):
        monkeypatch.setattr(_common, "GRAM", True)
        got = keras.ops.convert_to_numpy(_common.positions_sum_squared(
            keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(g)))
    assert used == [True]
    assert got.min() >= 0.0
    assert np.abs(got - _brute(x, g)).max() <= 1e-12 * _scale(x, g)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("gram", [False, True])
def test_gradients_that_cancel_over_positions_give_a_non_negative_fisher(monkeypatch, gram):
    """A 1×1 convolution of an input constant over 2×2 positions, then a normalisation
    over the positions: each example's output gradients sum to about zero over the
    positions, so the convolution's Fisher is about zero (1e-12 here) while the
    products of inputs and gradients are not. The sum over pairs of positions cancelled
    to values down to -1.5e-5 (the kernel contract refused them). The Fisher must be
    non-negative; the convolution's (kernel and bias) and the normalisation's scale's
    tiny against the model's largest (an input constant over the positions normalises
    to zero: float32 noise, here and in the oracle); the others equal to the oracle's.
    In both forms: the expanded one runs in float64 (on JAX without x64, which has no
    float64, the per-example form runs instead)."""
    from keras_ewc import backend

    monkeypatch.setattr(_common, "GRAM", gram)
    used = _spy_on_pairs(monkeypatch)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((1, 1, 6)), keras.layers.UpSampling2D(2), keras.layers.Conv2D(16, 1),
        keras.layers.GroupNormalization(groups=-1), keras.layers.Flatten(),
        keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(32, 1, 1, 6)).astype("float32")
    fisher, paths = diagonal.fisher_diagonal(model, x, likelihood="categorical",
                                             verbose=0, return_paths=True)
    assert set(paths.values()) == {"fast"}, paths
    assert bool(used) == (gram and backend.float64_on_cpu())
    fisher = [keras.ops.convert_to_numpy(f) for f in fisher]
    assert all(f.min() >= 0.0 for f in fisher)
    largest = max(float(f.max()) for f in fisher)
    expected = oracle.categorical_exact(model, model.trainable_variables, x)
    for f, e in zip(fisher[:3], expected[:3]):
        assert max(f.max(), e.max()) < 1e-6 * largest, (f.max(), e.max(), largest)
    oracle.assert_close(fisher[3:], expected[3:])


def _cancelling_inputs():
    """x constant over 4 positions, g whose sum over them is exactly 0 (multiples of
    2⁻¹² below 2¹³·2⁻¹², summed exactly in float32): every per-example gradient is 0,
    the products are not."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(16, 1, 8)), 4, axis=1).astype("float32")
    g = rng.integers(-2**11, 2**11, size=(9, 16, 4, 5)).astype("float32")
    g[:, :, 3] = -(g[:, :, 0] + g[:, :, 1] + g[:, :, 2])
    g = g * np.float32(2.0 ** -12)
    assert (g.astype(np.float64).sum(axis=2) == 0).all()
    return x, g


def _scale(x, g):
    """The products' size: the sum as if nothing cancelled."""
    return float(_brute(np.abs(x), np.abs(g)).max())


@pytest.mark.backend_neutral
def test_where_the_sum_cancels_the_pairs_form_is_float64_and_clamped(monkeypatch):
    """Every per-example gradient is exactly 0 (`_cancelling_inputs`). The float64
    expansion before the clamp (`_pairs_total`) has negative entries here, so the clamp
    is what keeps the result non-negative; clamped, it is within 1e-12 of the products'
    size of brute force in float64. The same expansion in float32 (NumPy) is off by
    far more than that bound (the form tried before, and dropped, in float32), and the
    per-example products in float32 are within 1e-6 of it and never negative."""
    from keras_ewc import backend

    if not backend.float64_on_cpu():
        pytest.skip("the pairs form needs float64 on the CPU (JAX without "
                    "jax_enable_x64 has no float64: test_jax_with_x64_…)")
    x, g = _cancelling_inputs()
    expected, scale = _brute(x, g), _scale(x, g)
    x_t, g_t = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(g)
    unclamped = keras.ops.convert_to_numpy(_common._pairs_total(x_t, g_t))
    assert unclamped.min() < 0.0
    got = {}
    for gram in (False, True):
        monkeypatch.setattr(_common, "GRAM", gram)
        got[gram] = keras.ops.convert_to_numpy(_common.positions_sum_squared(x_t, g_t))
    assert got[True].min() >= 0.0 and got[False].min() >= 0.0
    assert np.abs(got[True] - expected).max() <= 1e-12 * scale
    assert np.abs(got[False] - expected).max() <= 1e-6 * scale
    xx = np.einsum("npi,nqi->npqi", x, x)
    gg = np.einsum("tnpo,tnqo->npqo", g, g)
    in_float32 = np.tensordot(xx, gg, axes=[[0, 1, 2], [0, 1, 2]])
    assert in_float32.dtype == np.float32
    assert np.abs(in_float32 - expected).max() > 1e-9 * scale


@pytest.mark.parametrize("terms, positions, inputs, outputs, expanded", [
    (9, 4, 4608, 512, True),    # ResNet50's last 3×3 convolution at 64×64: 17× faster
    (1, 4, 4608, 512, True),    # the same, one term (empirical): 2.2× faster
    (9, 4, 320, 1280, True),    # MobileNetV2's last 1×1: 5× faster
    (9, 9, 1152, 256, True),    # a 3×3 map, 9 terms: 2.4× faster
    (1, 9, 1152, 256, False),   # the same, one term: 2.6× slower
    (9, 16, 144, 24, False),    # a 4×4 map: 5× slower
    (9, 64, 576, 64, False),    # an 8×8 map: 18× slower
    (99, 16, 576, 128, True),   # 99 terms (100 classes), a 4×4 map: 1.75× faster
    (99, 25, 288, 64, False),   # a 5×5 map: 1.2× slower
    (99, 36, 256, 64, False),   # a 6×6 map: 2.1× slower
    (99, 64, 128, 64, False),   # an 8×8 map: 4× slower
])
def test_the_cost_rule_chooses_the_form_measured_faster(terms, positions, inputs, outputs,
                                                        expanded):
    """`gram_is_cheaper` on the shapes it was fitted to (TensorFlow, CPU, 128 examples,
    32 with 99 terms, both forms timed side by side: the comments). (A first fit, with
    the terms' products over pairs as cheap as the big matmul's, chose the pairs at
    5×5 and 6×6 with 99 terms.)"""
    assert _common.gram_is_cheaper(terms, positions, inputs, outputs) is expanded


def test_an_accelerator_keeps_the_per_example_form(monkeypatch):
    """With a GPU visible (float64 slow there; a TPU has none) the expanded form is not
    used, even where the cost rule (fitted on the CPU) prefers it; on the CPU it is."""
    import tensorflow as tf

    from keras_ewc import backend

    used = _spy_on_pairs(monkeypatch)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 64)).astype("float32")
    g = rng.normal(size=(9, 3, 4, 32)).astype("float32")
    assert _common.gram_is_cheaper(9, 4, 64, 32)
    on_cpu = _common.positions_sum_squared(tf.constant(x), tf.constant(g)).numpy()
    assert used == [True]
    listed = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/GPU:0"] if kind == "GPU" else listed(kind))
    assert not backend.float64_on_cpu()
    on_gpu = _common.positions_sum_squared(tf.constant(x), tf.constant(g)).numpy()
    assert used == [True]
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5)
    np.testing.assert_allclose(on_cpu, _brute(x, g), rtol=1e-5)
