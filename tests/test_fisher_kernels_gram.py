"""`_common.positions_sum_squared`, the sum of squared per-example gradients of a kernel
applied at P positions (a Dense layer on a sequence, a convolution's patches, a recurrent
kernel over time steps), against brute force; and a case where expanding the square over
pairs of positions (a cheaper form, left out) came out negative.
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
@pytest.mark.parametrize("budget", [None, 40])
@pytest.mark.parametrize("terms, positions", [(1, 1), (3, 1), (9, 4), (2, 5)])
def test_matches_brute_force(monkeypatch, budget, terms, positions):
    if budget is not None:  # a chunk of one or two examples
        monkeypatch.setattr(_common, "BUDGET", budget)
    rng = np.random.default_rng(terms * 10 + positions)
    x = rng.normal(size=(5, positions, 3)).astype("float32")
    g = rng.normal(size=(terms, 5, positions, 4)).astype("float32")
    got = _common.positions_sum_squared(keras.ops.convert_to_tensor(x),
                                        keras.ops.convert_to_tensor(g))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), _brute(x, g), rtol=1e-5)


@pytest.mark.backend_neutral
def test_gradients_that_cancel_over_positions_give_a_non_negative_fisher():
    """A 1×1 convolution of an input constant over 2×2 positions, then a normalisation
    over the positions: each example's output gradients sum to about zero over the
    positions, so the convolution's Fisher is about zero (1e-12 here) while the
    products of inputs and gradients are not. The sum over pairs of positions cancelled
    to values down to -1.5e-5 (the kernel contract refused them). The Fisher must be
    non-negative; the convolution's (kernel and bias) and the normalisation's scale's
    tiny against the model's largest (an input constant over the positions normalises
    to zero: float32 noise, here and in the oracle); the others equal to the oracle's."""
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
