"""Conv1D/2D/3DTranspose: `z = convᵀ(x, W) + b`, the adjoint of a convolution by W.

Since ⟨g, convᵀ(x, W)⟩ = ⟨conv(g, W), x⟩, example n's gradient of W is a plain
convolution's weight gradient with the roles swapped: the gradient g at the output is the
"input" and x the "output gradient", Σ_q patch(g[n])[q] ⊗ x[n, q] over the input
positions q (and the layer's calls), squared after the sum. The patches of g are gathered
a term and a chunk of examples at a time, so that memory stays bounded.
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels._common import (
    activation,
    broadcast_sum_squared,
    f32,
    kernel_and_bias,
    over_examples,
    size,
    stop,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel
from keras_ewc.fisher.kernels.conv import patches


@register_kernel(keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                 keras.layers.Conv3DTranspose, methods=("kernel",))
class ConvTransposeKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        # Tested: channels_last, "valid"/"same", strides, output_padding. Neither
        # channels_first nor dilations run on CPU in TensorFlow, so neither is tested:
        # both are left to the reference path.
        return (
            layer.data_format == "channels_last"
            and max(layer.dilation_rate) == 1
            and layer.padding in ("valid", "same")
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    def params(self, layer) -> dict:
        return kernel_and_bias(layer)

    def forward(self, layer, args, kwargs):
        x = args[0]
        z = keras.ops.conv_transpose(
            x,
            stop(layer.kernel),
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        if layer.use_bias:
            z = z + stop(layer.bias)
        return x, z, activation(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        out = {"kernel": kernel_sum_squared(layer, records, grads)}
        if layer.use_bias:
            out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
        return out


def kernel_sum_squared(layer, records, grads):
    """`[*k, filters, C]`: Σ_n Σ_t (Σ_calls Σ_q patch(g[t, n])[q] ⊗ x[n, q])²."""
    terms = int(grads[0].shape[0])
    shape = [int(d) for d in layer.kernel.shape]
    cols = shape[-1]  # C: the input channels
    rows = size(shape) // cols  # K * filters: one patch of the output gradient
    positions = sum(size(x.shape[1:-1]) for x in records)

    def chunk(*tensors):
        xs, gs = tensors[: len(records)], tensors[len(records):]
        n = int(xs[0].shape[0])
        x = keras.ops.concatenate([keras.ops.reshape(f32(x), [n, -1, cols]) for x in xs], 1)
        total = 0.0
        for t in range(terms):
            # Patches of the output gradient, at the input's positions: [n, Q, K * F].
            p = keras.ops.concatenate([
                keras.ops.reshape(patches(f32(g[t]), layer.kernel_size, layer.strides,
                                          layer.dilation_rate, layer.padding), [n, -1, rows])
                for g in gs], 1)
            per_example = keras.ops.einsum("nqk,nqc->nkc", p, x)  # [n, K * F, C]
            total += keras.ops.sum(keras.ops.square(per_example), axis=0)
        return total

    per_example_size = positions * rows + rows * cols
    axes = (0,) * len(records) + (1,) * len(grads)
    total = over_examples(chunk, per_example_size, axes, *records, *grads)
    return keras.ops.reshape(total, shape)
