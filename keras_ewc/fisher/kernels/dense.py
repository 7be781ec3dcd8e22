"""Dense: `z = x W + b`, on flat (`[B, I]`) or sequence (`[B, ..., I]`) inputs.

Example n's gradient of W is Σ_s x[n, s] ⊗ g[n, s] (one term s a position, and a call of
the layer). With one position its square factorises, Σ_n (x_n ⊗ g_n)² = (x∘x)ᵀ (g∘g),
so no per-example gradient is formed; otherwise positions are summed before squaring
(`_common.positions_sum_squared`).
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels._common import (
    activation,
    broadcast_sum_squared,
    concatenate_terms,
    f32,
    factorised_sum_squared,
    kernel_and_bias,
    positions_sum_squared,
    reshape_terms,
    stop,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.Dense, methods=("kernel",))
class DenseKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        # LoRA and quantised layers compute their kernel: `layer.kernel` is no variable.
        return not layer.lora_enabled and layer.quantization_mode is None

    def params(self, layer) -> dict:
        return kernel_and_bias(layer)

    def forward(self, layer, args, kwargs):
        x = args[0]
        z = keras.ops.matmul(x, stop(layer.kernel))
        if layer.bias is not None:
            z = z + stop(layer.bias)
        return x, z, activation(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        out = {"kernel": kernel_sum_squared(records, grads)}
        if layer.bias is not None:
            out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
        return out


def kernel_sum_squared(records, grads):
    """Σ_n Σ_t (Σ_s x[n, s] ⊗ g[t, n, s])², over the calls' inputs and output grads."""
    if len(records) == 1 and len(records[0].shape) == 2:
        return factorised_sum_squared(f32(records[0]), f32(grads[0]))
    batch = int(records[0].shape[0])
    x = keras.ops.concatenate(
        [keras.ops.reshape(f32(r), [batch, -1, r.shape[-1]]) for r in records], 1)
    g = concatenate_terms([reshape_terms(f32(g), [batch, -1, g.shape[-1]]) for g in grads], 2)

    return positions_sum_squared(x, g)
