"""SeparableConv1D/2D: a depthwise convolution `u = D(x)`, then `z = u P + b` (1×1).

The layer is two linear maps in a row, so the kernel exposes both: the pointwise kernel
P and the bias see `u` and the gradient g at `z` as a Dense layer on positions does
(Σ_p u[n, p] ⊗ g[n, p], then squared); the depthwise kernel D sees `x` and the gradient
at `u`, which is `g Pᵀ` (P is linear), as a DepthwiseConv layer does.
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels._common import Columns, broadcast_sum_squared, f32, stop
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel
from keras_ewc.fisher.kernels.dense import kernel_sum_squared
from keras_ewc.fisher.kernels.depthwise import (
    DepthwiseConvKernel,
    channels_last,
    depthwise_sum_squared,
    finish,
)


@register_kernel(keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
                 methods=("depthwise_kernel", "pointwise_kernel"))
class SeparableConvKernel(Kernel):
    _columns_apart = True

    def supports(self, layer) -> bool:
        # The depthwise half has the DepthwiseConv kernel's coverage (channels_last,
        # "valid"/"same", strides or dilations).
        return DepthwiseConvKernel.supports(self, layer)

    def params(self, layer) -> dict:
        out = {"depthwise_kernel": layer.depthwise_kernel,
               "pointwise_kernel": layer.pointwise_kernel}
        if layer.use_bias:
            out["bias"] = layer.bias
        return out

    def forward(self, layer, args, kwargs):
        x = channels_last(args[0], layer.data_format)
        u = keras.ops.depthwise_conv(
            x,
            stop(layer.depthwise_kernel),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        z = keras.ops.matmul(u, _pointwise(stop(layer.pointwise_kernel)))
        if layer.use_bias:
            z = z + stop(layer.bias)
        return (x, u), z, finish(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        pointwise = f32(_pointwise(stop(layer.pointwise_kernel)))

        def to_u(g):  # the gradient at u of each term: g Pᵀ (a column at a time if apart)
            return keras.ops.matmul(g, keras.ops.transpose(pointwise))

        grads_u = [f32(g).map(to_u) if isinstance(g, Columns) else to_u(f32(g))
                   for g in grads]
        depthwise = depthwise_sum_squared(
            [x for x, _ in records], grads_u, layer.kernel_size, layer.strides,
            layer.dilation_rate, layer.padding, int(layer.depth_multiplier))
        out = {
            "depthwise_kernel": keras.ops.reshape(depthwise, layer.depthwise_kernel.shape),
            "pointwise_kernel": keras.ops.reshape(
                kernel_sum_squared([u for _, u in records], grads),
                layer.pointwise_kernel.shape),
        }
        if layer.use_bias:
            out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
        return out


def _pointwise(kernel):
    """The `[1, ..., C * M, filters]` pointwise kernel as a `[C * M, filters]` matrix."""
    return keras.ops.reshape(kernel, kernel.shape[-2:])
