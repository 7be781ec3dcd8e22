"""DepthwiseConv1D/2D: `z[p, c, m] = Σ_k x[p s + k d, c] W[k, c, m] + b[c, m]`.

Example n's gradient of W is Σ_p x[n, p s + k d, c] g[n, p, c, m], summed over output
positions p (and the layer's calls) before squaring. That is itself the filter gradient
of a depthwise convolution, with the examples folded into the channels: one call
(`depthwise_filter_grads`) gives every example's gradient, for every term column of a
stacked `[T, ...]` gradient (folded into the depth multiplier) or for one column of
those kept apart (`_common.Columns`, a call each), without gathering patches. That call
is the one op here without a `keras.ops` form (`_backend_ops.depthwise_filter_grad`).
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels import _backend_ops, _common
from keras_ewc.fisher.kernels._common import (
    activation,
    broadcast_sum_squared,
    f32,
    stop,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
                 methods=("kernel",))
class DepthwiseConvKernel(Kernel):
    _columns_apart = True

    def supports(self, layer) -> bool:
        # Tested: channels_last, "valid" and "same" padding, strides or dilations, any
        # depth multiplier. Strides and dilations together: Keras decomposes that
        # convolution, with its own padding; not covered. channels_first: on CPU
        # TensorFlow (Keras 3.15) the layer adds its bias along the last spatial axis
        # when that axis is as long as the channels, so the layer itself (the reference
        # path) is differentiated instead of its documented maths.
        return (
            layer.data_format == "channels_last"
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and layer.padding in ("valid", "same")
            and not (max(layer.strides) > 1 and max(layer.dilation_rate) > 1)
        )

    def params(self, layer) -> dict:
        out = {"kernel": layer.kernel}
        if layer.use_bias:
            out["bias"] = layer.bias
        return out

    def forward(self, layer, args, kwargs):
        x = channels_last(args[0], layer.data_format)
        z = keras.ops.depthwise_conv(
            x,
            stop(layer.kernel),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        if layer.use_bias:
            z = z + stop(layer.bias)
        return x, z, finish(layer)

    def sum_squared(self, layer, records, grads) -> dict:
        kernel = depthwise_sum_squared(
            records, grads, layer.kernel_size, layer.strides, layer.dilation_rate,
            layer.padding, int(layer.kernel.shape[-1]))
        out = {"kernel": keras.ops.reshape(kernel, layer.kernel.shape)}
        if layer.use_bias:
            out["bias"] = broadcast_sum_squared(grads, layer.bias.shape)
        return out


def channels_last(x, data_format):
    """The input with its channels last: the kernel's maths is written for that layout."""
    return keras.ops.moveaxis(x, 1, -1) if data_format == "channels_first" else x


def finish(layer):
    """Maps the channels-last pre-activation `z` to the layer's output."""
    act = activation(layer)
    if layer.data_format == "channels_first":
        return lambda z: act(keras.ops.moveaxis(z, -1, 1))
    return act


def pad_to_valid(x, kernel_size, strides, dilation, padding):
    """`x` padded as TensorFlow pads for `padding`, so that a "valid" conv follows."""
    if padding != "same":
        return x
    pads = [[0, 0]]
    for size, k, s, d in zip(x.shape[1:-1], kernel_size, strides, dilation):
        span = (k - 1) * d + 1
        total = max((-(-int(size) // s) - 1) * s + span - int(size), 0)
        pads.append([total // 2, total - total // 2])
    return keras.ops.pad(x, pads + [[0, 0]])


def depthwise_filter_grads(x, g, kernel_size, strides, dilation, multiplier):
    """`[*K, B, C, T, M]`: each example's and term's gradient of a depthwise kernel.

    `x` is the padded input `[B, *S, C]` (1 or 2 spatial axes, "valid" from here on),
    `g` the gradients at the output `[T, B, *P, C * M]`. Example n's gradient is
    Σ_p x[n, p s + k d, c] g[t, n, p, c, m]: the filter gradient of a depthwise
    convolution whose channels are (example, channel) and whose multiplier is
    (term, m), so that one call serves every example and term.
    """
    rank = len(kernel_size)
    batch, channels, terms = int(x.shape[0]), int(x.shape[-1]), int(g.shape[0])
    # TensorFlow's depthwise convolutions take equal strides along both axes only.
    if rank == 1:  # a 1D convolution is a 2D one of height 1 (any stride along it)
        x, g = x[:, None], g[:, :, None]
        kernel_size, strides, dilation = (1, *kernel_size), (strides[0], *strides), (1, *dilation)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    out_hw = [int(d) for d in g.shape[2:4]]
    # Examples into channels: [1, *S, B * C] and [1, *P, B * C * T * M].
    xs = keras.ops.reshape(keras.ops.transpose(x, [1, 2, 0, 3]),
                           [1, *x.shape[1:3], batch * channels])
    gs = keras.ops.reshape(g, [terms, batch, *out_hw, channels, multiplier])
    gs = keras.ops.reshape(keras.ops.transpose(gs, [2, 3, 1, 4, 0, 5]),
                           [1, *out_hw, batch * channels * terms * multiplier])
    # CPU TensorFlow ignores `dilations` in this op: take the gradient of the dense
    # kernel spanning the dilated one and keep every d-th tap (on every backend).
    grads = _backend_ops.depthwise_filter_grad(
        xs, [*spans, batch * channels, terms * multiplier], gs, strides)
    grads = grads[:: dilation[0], :: dilation[1]]
    grads = keras.ops.reshape(grads, [*kernel_size, batch, channels, terms, multiplier])
    return grads[0] if rank == 1 else grads


def depthwise_sum_squared(records, grads, kernel_size, strides, dilation, padding,
                          multiplier):
    """`[*K, C, M]`: Σ_n Σ_t (Σ_calls example n's gradient)² of a depthwise kernel.

    `records` are the calls' channels-last inputs, `grads` the `[T, B, *P, C * M]`
    gradients at their outputs. Examples are taken in chunks, so that at most
    `_common.BUDGET` elements of per-example gradients exist at once.

    Gradients kept apart as `_common.Columns` are taken a column at a time (one
    filter-gradient call each, the term axis of size 1), so that the columns are never
    stacked; a stacked `[T, ...]` tensor is taken in one call, its terms folded into
    the depth multiplier.
    """
    xs = [pad_to_valid(f32(x), kernel_size, strides, dilation, padding) for x in records]
    gs = [f32(g) for g in grads]
    batch, terms = int(xs[0].shape[0]), int(gs[0].shape[0])
    apart = any(isinstance(g, _common.Columns) for g in gs)
    # Each call's gradients as groups of terms: one group of T, or T groups of one.
    if apart:
        groups = [[c[None] for c in _common.terms_of(g)] for g in gs]
    else:
        groups = [[g] for g in gs]
    per_example = (1 if apart else terms) * int(xs[0].shape[-1]) * multiplier
    for k, d in zip(kernel_size, dilation):
        per_example *= (k - 1) * d + 1
    chunk = max(1, _common.BUDGET // per_example)
    rank = len(kernel_size)
    total = None
    for start in range(0, batch, chunk):
        for group in zip(*groups):
            part = None
            for x, g in zip(xs, group):
                value = depthwise_filter_grads(
                    x[start:start + chunk], g[:, start:start + chunk], kernel_size,
                    strides, dilation, multiplier)
                part = value if part is None else part + value  # calls: sum, then square
            value = keras.ops.sum(keras.ops.square(part), axis=[rank, rank + 2])
            total = value if total is None else total + value
    return total
