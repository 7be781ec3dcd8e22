"""A registered kernel's output is checked: keys, shapes, float dtype, finite, >= 0.

A user's kernel (`keras_ewc.fisher.register_kernel`) that breaks the contract is
refused when the Fisher step is traced (keys, shapes, dtypes, errors it raises) or at
the batch that shows it (negative or non-finite sums), naming the layer, the kernel and
the variable; the EWC state is left as it was.
"""

import keras
import numpy as np
import pytest

import keras_ewc
from keras_ewc.fisher import Kernel, fisher_diagonal, register_kernel


def good_sums(records, grads):
    per_example = sum(x[None] * g for x, g in zip(records, grads))
    return keras.ops.sum(keras.ops.square(per_example), axis=[0, 1])


BROKEN = {
    "wrong-shape": (lambda r, g: {"w": good_sums(r, g)[:-1]},
                    r"its sum for variable 'w' \(.*scale.*/w\) has shape \(4,\); "
                    r"expected \(5,\)"),
    "integer-dtype": (lambda r, g: {"w": keras.ops.cast(good_sums(r, g) * 100, "int32")},
                      r"its sum for variable 'w' .* has dtype int32; expected a float"),
    "misspelt-key": (lambda r, g: {"W": good_sums(r, g)},
                     r"Received keys \['W'\]: unknown \['W'\], missing \['w'\]"),
    "negative": (lambda r, g: {"w": -good_sums(r, g)},
                 r"its sum for variable 'w' .* holds negative, NaN or Inf values"),
    "nan": (lambda r, g: {"w": good_sums(r, g) * np.nan},
            r"its sum for variable 'w' .* holds negative, NaN or Inf values"),
    "raises": (lambda r, g: {"w": keras.ops.matmul(r[0], r[0])},
               r"raised (ValueError|InvalidArgumentError|TypeError) in `sum_squared`: .*"
               r"Fix the "
               r"kernel"),
    "not-a-dict": (lambda r, g: [good_sums(r, g)],
                   r"to return a dict \{variable name: tensor\}.*Received a list"),
}


def scale_model(broken):
    class Scale(keras.layers.Layer):  # y = x * w, elementwise; a new class each time
        def build(self, input_shape):
            self.w = self.add_weight(shape=input_shape[-1:], initializer="ones", name="w")

        def call(self, x):
            return x * self.w

    class ScaleKernel(Kernel):
        def params(self, layer):
            return {"w": layer.w}

        def forward(self, layer, args, kwargs):
            x = args[0]
            w = keras.ops.stop_gradient(keras.ops.convert_to_tensor(layer.w))
            return x, x * w, lambda z: z

        def sum_squared(self, layer, records, grads):
            return broken(records, grads)

    net = keras.Sequential([keras.Input((5,)), Scale(name="scale"),
                            keras.layers.Dense(3, name="out")])
    net.layers[0].w.assign(np.linspace(0.5, 1.5, 5))
    register_kernel(Scale)(ScaleKernel)
    return net


def data(n=12):
    return np.random.default_rng(0).normal(size=(n, 5)).astype("float32")


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_kernel_that_breaks_the_contract_is_refused_naming_it(case):
    broken, message = BROKEN[case]
    net = scale_model(broken)
    model = keras_ewc.EWCModel(net)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [keras.ops.convert_to_numpy(v) for v in model.regularizer.weights]
    with pytest.raises(ValueError, match=(
            r"the Fisher kernel ScaleKernel registered for layer 'scale' \(Scale\)"
            r"[\s\S]*" + message)):
        model.consolidate(data(), batch_size=4, verbose=0)
    for v, b in zip(model.regularizer.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), b)


@pytest.mark.parametrize("case", ["negative", "nan", "raises"])
def test_a_broken_kernel_is_named_from_inside_the_loop_over_the_columns(case, monkeypatch):
    """TensorFlow's engine runs the kernels inside its loop over the term columns (here
    two rounds of one column): a broken kernel is still refused by name, whether its
    error is raised while traced or by the in-graph check."""
    from keras_ewc.fisher import fast

    monkeypatch.setattr(fast, "COLUMNS_A_ROUND", 1)
    broken, message = BROKEN[case]
    net = scale_model(broken)
    with pytest.raises(ValueError, match=(
            r"the Fisher kernel ScaleKernel registered for layer 'scale' \(Scale\)"
            r"[\s\S]*" + message)):
        fisher_diagonal(net, data(), likelihood="categorical", verbose=0, batch_size=4)


@pytest.mark.backend_neutral
def test_a_kernel_that_keeps_the_contract_gives_the_reference_fisher():
    net = scale_model(lambda r, g: {"w": good_sums(r, g)})
    fast, paths = fisher_diagonal(net, data(), likelihood="categorical", verbose=0,
                                  batch_size=4, return_paths=True)
    assert paths[net.layers[0].w.path] == "fast"
    reference_net = keras.Sequential([keras.Input((5,)), _Plain(name="scale"),
                                      keras.layers.Dense(3, name="out")])
    reference_net.set_weights(net.get_weights())
    reference, paths = fisher_diagonal(reference_net, data(), likelihood="categorical",
                                       verbose=0, batch_size=4, return_paths=True)
    # Without a kernel the layer is re-run alone per example (the layer-local path).
    assert paths[reference_net.layers[0].w.path] == "layer-local"
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


class _Plain(keras.layers.Layer):  # the same layer, with no kernel: the reference path
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones", name="w")

    def call(self, x):
        return x * self.w
