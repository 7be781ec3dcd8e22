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


@pytest.mark.backend_neutral
@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("budget", [None, 40])
@pytest.mark.parametrize("terms, positions", [(1, 1), (3, 1), (9, 4), (2, 5)])
def test_matches_brute_force(monkeypatch, gram, budget, terms, positions):
    """Both forms to 1e-5 of a float64 one-example-at-a-time sum (float32 inputs)."""
    monkeypatch.setattr(_common, "GRAM", gram)
    if budget is not None:  # a chunk of one or two examples (one in the pairs form)
        monkeypatch.setattr(_common, "BUDGET", budget)
    rng = np.random.default_rng(terms * 10 + positions)
    x = rng.normal(size=(5, positions, 3)).astype("float32")
    g = rng.normal(size=(terms, 5, positions, 4)).astype("float32")
    got = _common.positions_sum_squared(keras.ops.convert_to_tensor(x),
                                        keras.ops.convert_to_tensor(g))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), _brute(x, g), rtol=1e-5)


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
    monkeypatch.setattr(_common, "GRAM", gram)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((1, 1, 6)), keras.layers.UpSampling2D(2), keras.layers.Conv2D(16, 1),
        keras.layers.GroupNormalization(groups=-1), keras.layers.Flatten(),
        keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(32, 1, 1, 6)).astype("float32")
    fisher, paths = diagonal.fisher_diagonal(model, x, likelihood="categorical",
                                             verbose=0, return_paths=True)
    assert set(paths.values()) == {"fast"}, paths
    fisher = [keras.ops.convert_to_numpy(f) for f in fisher]
    assert all(f.min() >= 0.0 for f in fisher)
    largest = max(float(f.max()) for f in fisher)
    expected = oracle.categorical_exact(model, model.trainable_variables, x)
    for f, e in zip(fisher[:3], expected[:3]):
        assert max(f.max(), e.max()) < 1e-6 * largest, (f.max(), e.max(), largest)
    oracle.assert_close(fisher[3:], expected[3:])


@pytest.mark.backend_neutral
def test_the_expanded_form_in_float64_is_closer_than_float32_where_it_cancels():
    """Inputs constant over positions and gradients centred over them: the sum is 0 up
    to the float32 rounding of the centring. The float64 expansion is within 1e-12 of
    the products' size of brute force in float64 (a float32 expansion is off by about
    1e-7 of it, signed: tried and dropped); per-example products in float32 are never
    negative."""
    from keras_ewc import backend

    if not backend.has_float64():
        pytest.skip("the expanded form needs float64 (JAX without jax_enable_x64)")
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(16, 1, 8)), 4, axis=1).astype("float32")
    g = rng.normal(size=(9, 16, 4, 5)).astype("float32")
    g = g - g.mean(axis=2, keepdims=True)
    scale = float(_brute(np.abs(x), np.abs(g)).max())  # the products' size
    x_t, g_t = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(g)
    got = {}
    for gram in (False, True):
        _common.GRAM = gram
        try:
            got[gram] = keras.ops.convert_to_numpy(_common.positions_sum_squared(x_t, g_t))
        finally:
            _common.GRAM = None
    assert got[True].min() >= 0.0 and got[False].min() >= 0.0
    expected = _brute(x, g)
    assert np.abs(got[True] - expected).max() <= 1e-12 * scale, (
        np.abs(got[True] - expected).max(), scale)
    assert np.abs(got[False] - expected).max() <= 1e-6 * scale


@pytest.mark.parametrize("terms, positions, inputs, outputs, expanded", [
    (9, 4, 4608, 512, True),    # ResNet50's last 3×3 convolution at 64×64: 17× faster
    (1, 4, 4608, 512, True),    # the same, one term (empirical): 2.2× faster
    (9, 4, 320, 1280, True),    # MobileNetV2's last 1×1: 5× faster
    (9, 9, 1152, 256, True),    # a 3×3 map, 9 terms: 2.4× faster
    (1, 9, 1152, 256, False),   # the same, one term: 2.6× slower
    (9, 16, 144, 24, False),    # a 4×4 map: 5× slower
    (9, 64, 576, 64, False),    # an 8×8 map: 18× slower
])
def test_the_cost_rule_chooses_the_form_measured_faster(terms, positions, inputs, outputs,
                                                        expanded):
    """`gram_is_cheaper` on the shapes it was fitted to (TensorFlow, CPU, 128 examples,
    both forms timed side by side: the comments)."""
    assert _common.gram_is_cheaper(terms, positions, inputs, outputs) is expanded
