"""Conv1D/2D/3D: `z[p] = Σ_k patch[p, k] W[k] + b`, any strides, padding, dilation, groups.

Example n's gradient of W is Σ_p patch[n, p] ⊗ g[n, p] over output positions p: the
patches of the input are gathered once (`_backend_ops.extract_patches`), and each example's
gradient is formed by a batched matrix product, a term at a time, in chunks of examples,
and squared — the sum over positions must come before the square
(`_common.positions_sum_squared`; on a 1×1 feature map the square factorises).
"""

from __future__ import annotations

import itertools

import keras

from keras_ewc.fisher.kernels import _backend_ops
from keras_ewc.fisher.kernels._common import (
    activation,
    broadcast_sum_squared,
    concatenate_terms,
    f32,
    kernel_and_bias,
    over_examples,
    positions_sum_squared,
    reshape_terms,
    size,
    stop,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                 methods=("convolution_op", "kernel"))
class ConvKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        if getattr(layer, "lora_enabled", False) or layer.quantization_mode is not None:
            return False
        # channels_first cannot run on CPU in TensorFlow, so it is left to the reference.
        return layer.data_format == "channels_last" and layer.padding in (
            "valid", "same", "causal"
        )

    def params(self, layer) -> dict:
        return kernel_and_bias(layer)

    def forward(self, layer, args, kwargs):
        x = args[0]
        padding = layer.padding
        if padding == "causal":
            # As Conv1D pads: (kernel_size - 1) * dilation steps on the left of time.
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            x = keras.ops.pad(x, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        z = keras.ops.conv(
            x,
            stop(layer.kernel),
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            z = z + stop(layer.bias)
        return (x, padding), z, activation(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        return sum_squared(layer, records, grads)


def patches(x, kernel_size, strides, dilation, padding):
    """`[B, *out, K * C]`: the input under each of the K kernel offsets, channels last.

    Offsets are ordered as the kernel's spatial axes, channels fastest, like the rows
    of the kernel reshaped to `[K * C, filters]`.
    """
    pads = [[0, 0]]
    for length, k, s, d in zip(x.shape[1:-1], kernel_size, strides, dilation):
        span = (k - 1) * d + 1
        total = 0
        if padding == "same":
            total = max((-(-int(length) // s) - 1) * s + span - int(length), 0)
        pads.append([total // 2, total - total // 2])
    x = keras.ops.pad(x, pads + [[0, 0]])
    if len(kernel_size) <= 2 or all(d == 1 for d in dilation):
        return _backend_ops.extract_patches(x, kernel_size, strides, dilation)
    # Dilated 3D: one strided slice per kernel offset.
    out = [(int(n) - (k - 1) * d - 1) // s + 1
           for n, k, s, d in zip(x.shape[1:-1], kernel_size, strides, dilation)]
    slices = []
    for offset in itertools.product(*[range(k) for k in kernel_size]):
        index = [slice(None)]
        for o, d, s, count in zip(offset, dilation, strides, out):
            index.append(slice(o * d, o * d + (count - 1) * s + 1, s))
        slices.append(x[tuple(index)])
    return keras.ops.concatenate(slices, axis=-1)


def sum_squared(layer, records, grads) -> dict:
    groups, channels = layer.groups, int(layer.kernel.shape[-2])
    batch = int(grads[0].shape[1])
    xs, gs = [], []
    for (x, padding), g in zip(records, grads):
        p = patches(f32(x), layer.kernel_size, layer.strides, layer.dilation_rate, padding)
        xs.append(keras.ops.reshape(p, [batch, -1, p.shape[-1]]))
        gs.append(reshape_terms(f32(g), [batch, -1, g.shape[-1]]))
    # Positions of every call are summed within an example before squaring.
    x, g = keras.ops.concatenate(xs, 1), concatenate_terms(gs, 2)

    if groups == 1:
        kernel = positions_sum_squared(x, g)
    else:
        def chunk(x, g):
            total = 0.0
            for t in range(g.shape[0]):
                xg = keras.ops.reshape(x, [x.shape[0], x.shape[1], -1, groups, channels])
                gg = keras.ops.reshape(g[t], [g.shape[1], g.shape[2], groups, -1])
                per_example = keras.ops.einsum("npkgc,npgo->nkcgo", xg, gg)
                total += keras.ops.sum(keras.ops.square(per_example), axis=0)
            return total

        kernel = over_examples(chunk, size(layer.kernel.shape), (0, 1), x, g)
    out = {"kernel": keras.ops.reshape(kernel, layer.kernel.shape)}
    if layer.use_bias:
        out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
    return out
