"""GroupNormalization: `z = x̂ γ + β`, x̂ normalised within each example's channel groups.

The statistics are each example's own (no batch axis among the reduced ones), so the
examples do not interact and the scale and offset are covered as for LayerNormalization:
example n's gradient of γ is Σ x̂[n] g[n] and of β is Σ g[n], summed over positions
(and calls) before squaring (`normalization.sum_squared`).
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels import normalization
from keras_ewc.fisher.kernels._common import stop
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.GroupNormalization)
class GroupNormalizationKernel(Kernel):
    _columns_apart = True  # reads grads as [T, B, *z] through _common's helpers

    def supports(self, layer) -> bool:
        # Tested: the channel axis last (-1) or given as a positive index.
        return layer.axis == -1 or layer.axis > 0

    def params(self, layer) -> dict:
        out = {}
        if layer.gamma is not None:
            out["gamma"] = layer.gamma
        if layer.beta is not None:
            out["beta"] = layer.beta
        return out

    def forward(self, layer, args, kwargs):
        x = args[0]
        rank = len(x.shape)
        axis = layer.axis % rank
        # As the layer computes (in float32 at least): split the channel axis into
        # (groups, channels per group), take moments over all but the batch and groups.
        x = keras.ops.cast(x, keras.backend.result_type(x.dtype, "float32"))
        shape = [int(d) for d in x.shape[1:]]
        grouped = shape[: axis - 1] + [layer.groups, shape[axis - 1] // layer.groups]
        grouped += shape[axis:]
        xg = keras.ops.reshape(x, [-1] + grouped)
        reduce = [a for a in range(1, rank + 1) if a != axis]
        x_hat = (_normalize_closed_form if CLOSED_FORM_GRADIENT else _normalize)(
            xg, reduce, layer.epsilon)
        x_hat = keras.ops.reshape(x_hat, [-1] + shape)
        broadcast = [int(x.shape[a]) if a == axis else 1 for a in range(rank)]
        z = x_hat
        if layer.gamma is not None:
            z = z * keras.ops.reshape(keras.ops.cast(stop(layer.gamma), z.dtype), broadcast)
        if layer.beta is not None:
            z = z + keras.ops.reshape(keras.ops.cast(stop(layer.beta), z.dtype), broadcast)
        return x_hat, z, lambda z: keras.ops.cast(z, layer.compute_dtype)

    def sum_squared(self, layer, records, grads) -> dict:
        return normalization.sum_squared(layer, records, grads)


CLOSED_FORM_GRADIENT = True
"""The normalisation is back-propagated in closed form (False: by autodiff of the
moments, as before; kept for A/B timings)."""


def _normalize(xg, reduce, epsilon):
    """`(x - mean) / sqrt(variance + epsilon)` over the `reduce` axes, as the layer does."""
    mean, variance = keras.ops.moments(xg, axes=reduce, keepdims=True)
    return (xg - mean) * keras.ops.rsqrt(variance + epsilon)


def _normalize_closed_form(xg, reduce, epsilon):
    """`_normalize`, back-propagated in closed form.

    With r = 1 / sqrt(variance + epsilon), the gradient at x of ⟨dx̂, x̂⟩ is
    r (dx̂ − mean(dx̂) − x̂ mean(dx̂ x̂)), means over the `reduce` axes. Autodiff of the
    moments takes the long way (a broadcast by Tile for each mean, the subtraction's and
    product's reductions): on TensorFlow's CPU the group normalisation's backward was
    most of the exact Fisher's T column pullbacks on a GroupNorm CNN.
    """

    @keras.ops.custom_gradient
    def normalize(x):
        mean = _mean(x, reduce)
        r = keras.ops.rsqrt(_mean(keras.ops.square(x - mean), reduce) + epsilon)
        x_hat = (x - mean) * r

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return r * (upstream - _mean(upstream, reduce)
                        - x_hat * _mean(upstream * x_hat, reduce))

        return x_hat, grad

    return normalize(xg)


def _mean(x, axes):
    """The mean over `axes` (kept), a run of adjacent axes at a time, the first first.

    One reduction over axes that are not adjacent ((H, W) and the channels in a group,
    the group axis between) is a transpose and a reduction on TensorFlow's CPU; a run
    of adjacent axes at a time is a plain reduction each, and the spatial run first
    leaves a tensor as small as the channels for the next one.
    """
    runs = []
    for axis in sorted(axes):
        if runs and runs[-1][-1] == axis - 1:
            runs[-1].append(axis)
        else:
            runs.append([axis])
    count = 1
    for run in runs:
        for axis in run:
            count *= int(x.shape[axis])
        x = keras.ops.sum(x, axis=run, keepdims=True)
    return x / count

