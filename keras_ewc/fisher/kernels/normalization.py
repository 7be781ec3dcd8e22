"""LayerNormalization and BatchNormalization (inference): `z = x̂ γ + β`.

The scale and offset act on the normalised input x̂, one value per parameter axis:
example n's gradient of γ is Σ x̂[n] g[n] and of β is Σ g[n], summed over every
non-parameter axis (positions) before squaring. Batch normalisation is covered in
inference mode only, where x̂ uses the moving statistics and examples do not interact.
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels._common import (
    Columns,
    f32,
    reshape_terms,
    stop,
    sum_squares_over_terms,
)
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.LayerNormalization, keras.layers.BatchNormalization)
class NormalizationKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        if isinstance(layer, keras.layers.LayerNormalization):
            return not layer.rms_scaling
        return not getattr(layer, "renorm", False)

    def params(self, layer) -> dict:
        out = {}
        if layer.gamma is not None:
            out["gamma"] = layer.gamma
        if layer.beta is not None:
            out["beta"] = layer.beta
        return out

    def forward(self, layer, args, kwargs):
        return forward(layer, args, kwargs)

    def sum_squared(self, layer, records, grads) -> dict:
        return sum_squared(layer, records, grads)


def _axes(layer, rank):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axes)


def forward(layer, args, kwargs):
    x = args[0]
    if isinstance(layer, keras.layers.BatchNormalization):
        if kwargs.get("training") and layer.trainable:
            return None  # batch statistics couple the examples: not covered.
        x = keras.ops.cast(x, keras.backend.result_type(x.dtype, "float32"))
        x_hat = keras.ops.batch_normalization(
            x,
            keras.ops.cast(layer.moving_mean, x.dtype),
            keras.ops.cast(layer.moving_variance, x.dtype),
            axis=layer.axis,
            epsilon=layer.epsilon,
        )
    else:
        x_hat = keras.ops.layer_normalization(
            x, None, None, axis=layer.axis, epsilon=layer.epsilon
        )
    rank = len(x.shape)
    axes = _axes(layer, rank)
    if 0 in axes:
        return None  # normalising over the batch couples the examples.
    shape = [int(x.shape[a]) if a in axes else 1 for a in range(rank)]
    z = x_hat
    if layer.gamma is not None:
        z = z * keras.ops.reshape(keras.ops.cast(stop(layer.gamma), z.dtype), shape)
    if layer.beta is not None:
        z = z + keras.ops.reshape(keras.ops.cast(stop(layer.beta), z.dtype), shape)
    return x_hat, z, lambda z: keras.ops.cast(z, layer.compute_dtype)


def sum_squared(layer, records, grads) -> dict:
    rank = len(records[0].shape)
    axes = _axes(layer, rank)
    # Sum over every axis but the terms, the examples and the parameter axes.
    reduce = [a + 1 for a in range(1, rank) if a not in axes]
    gamma = beta = 0.0
    for x_hat, g in zip(records, grads):
        g, x_hat = f32(g), f32(x_hat)
        if isinstance(g, Columns):  # a column at a time: [B, *z], the reduced axes one less
            each = [a - 1 for a in reduce]
            gamma += g.map(lambda c, x=x_hat, a=each: keras.ops.sum(x * c, axis=a) if a else x * c)
            beta += g.map(lambda c, a=each: keras.ops.sum(c, axis=a) if a else c)
            continue
        gamma += keras.ops.sum(x_hat[None] * g, axis=reduce) if reduce else x_hat[None] * g
        beta += keras.ops.sum(g, axis=reduce) if reduce else g
    out = {}
    if layer.gamma is not None:
        out["gamma"] = _square_sum(gamma, layer.gamma.shape)
    if layer.beta is not None:
        out["beta"] = _square_sum(beta, layer.beta.shape)
    return out


def _square_sum(per_example, shape):
    per_example = reshape_terms(per_example, [-1] + [int(d) for d in shape])
    return keras.ops.sum(sum_squares_over_terms(per_example), axis=0)
