"""EinsumDense: `z = einsum(equation, x, W) + b`.

Example n's gradient of W is `einsum("<x>,<z>-><W>", x[n], g[n])`. When every axis of x
and z other than the batch axis is an axis of W, nothing is summed within an example and
the square factorises: Σ_n (x_n g_n)² = einsum(x∘x, g∘g). Otherwise (a sequence axis,
say) each example's gradient is formed, in chunks, and squared.
"""

from __future__ import annotations

import string

import keras

from keras_ewc.fisher.kernels._common import (
    activation,
    broadcast_sum_squared,
    f32,
    kernel_and_bias,
    over_examples,
    stop,
    sum_squares_over_terms,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.EinsumDense, methods=("kernel",))
class EinsumDenseKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        if layer.lora_enabled or layer.quantization_mode is not None:
            return False
        # The batch axis must lead both x and z and not be an axis of W.
        lhs, z_spec = layer.equation.replace(" ", "").split("->")
        x_spec, w_spec = lhs.split(",")
        if x_spec.startswith("..."):
            return z_spec.startswith("...")
        return x_spec[:1] == z_spec[:1] and x_spec[:1] not in w_spec

    def params(self, layer) -> dict:
        return kernel_and_bias(layer)

    def forward(self, layer, args, kwargs):
        x = args[0]
        z = keras.ops.einsum(layer.equation, x, stop(layer.kernel))
        if layer.bias is not None:
            z = z + stop(layer.bias)
        return x, z, activation(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        out = {"kernel": kernel_sum_squared(layer.equation, records, grads)}
        if layer.bias is not None:
            out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
        return out


def _explicit(equation, x_rank):
    """The equation with any `...` spelled out in fresh letters."""
    lhs, z_spec = equation.replace(" ", "").split("->")
    x_spec, w_spec = lhs.split(",")
    free = [c for c in string.ascii_letters if c not in equation]
    if "..." in x_spec:
        # The ellipsis stands for the same axes of x and z.
        dots = "".join(free[: x_rank - (len(x_spec) - 3)])
        x_spec, z_spec = x_spec.replace("...", dots), z_spec.replace("...", dots)
    return x_spec, w_spec, z_spec


def kernel_sum_squared(equation, records, grads):
    x_spec, w_spec, z_spec = _explicit(equation, len(records[0].shape))
    n = x_spec[0]
    if len(records) == 1 and set(x_spec + z_spec) - {n} <= set(w_spec):
        x2 = keras.ops.square(f32(records[0]))
        g2 = sum_squares_over_terms(f32(grads[0]))
        return keras.ops.einsum(f"{x_spec},{z_spec}->{w_spec}", x2, g2)

    per_example = f"{x_spec},{z_spec}->{n}{w_spec}"

    def chunk(*tensors):
        xs, gs = tensors[: len(records)], tensors[len(records):]
        total = 0.0
        for t in range(gs[0].shape[0]):
            # Example n's gradient for term t, summed over the layer's calls.
            g_t = sum(keras.ops.einsum(per_example, f32(x), f32(g[t]))
                      for x, g in zip(xs, gs))
            total += keras.ops.sum(keras.ops.square(g_t), axis=0)
        return total

    size = _num_elements(w_spec, x_spec, z_spec, records[0], grads[0])
    axes = (0,) * len(records) + (1,) * len(grads)
    return over_examples(chunk, size, axes, *records, *grads)


def _num_elements(w_spec, x_spec, z_spec, x, g):
    dims = dict(zip(x_spec, x.shape))
    dims.update(zip(z_spec, g.shape[1:]))
    size = 1
    for c in w_spec:
        size *= int(dims[c])
    return size
