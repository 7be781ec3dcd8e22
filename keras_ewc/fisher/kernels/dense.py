"""Dense: `z = x W + b`, on flat (`[B, I]`) or sequence (`[B, ..., I]`) inputs.

Example n's gradient of W is Σ_s x[n, s] ⊗ g[n, s] (one term s a position, and a call of
the layer). With one position its square factorises, Σ_n (x_n ⊗ g_n)² = (x∘x)ᵀ (g∘g),
so no per-example gradient is formed; otherwise positions are summed before squaring.
"""

from __future__ import annotations

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


@register_kernel(keras.layers.Dense, methods=("kernel",))
class DenseKernel(Kernel):
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
        x2 = keras.ops.square(f32(records[0]))
        g2 = sum_squares_over_terms(f32(grads[0]))
        return keras.ops.einsum("ni,no->io", x2, g2)
    batch = int(records[0].shape[0])
    x = keras.ops.concatenate(
        [keras.ops.reshape(f32(r), [batch, -1, r.shape[-1]]) for r in records], 1)
    g = keras.ops.concatenate(
        [keras.ops.reshape(f32(g), [g.shape[0], batch, -1, g.shape[-1]]) for g in grads], 2
    )

    def chunk(x, g):
        # One term at a time: T small batched matmuls beat one broadcast over T.
        total = 0.0
        for t in range(g.shape[0]):
            per_example = keras.ops.einsum("nsi,nso->nio", x, g[t])  # [n, I, O]
            total += keras.ops.sum(keras.ops.square(per_example), axis=0)
        return total

    per_example_size = int(x.shape[-1]) * int(g.shape[-1])
    return over_examples(chunk, per_example_size, (0, 1), x, g)
