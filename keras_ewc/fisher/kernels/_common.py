"""Helpers shared by the kernels."""

from __future__ import annotations

import tensorflow as tf

# Most float32 elements a kernel materialises at once (per-example gradients): 64 MiB.
BUDGET = 1 << 24


def stop(variable):
    """A variable's value, cut from the tape: gradients are taken at outputs instead."""
    return tf.stop_gradient(tf.convert_to_tensor(variable))


def kernel_and_bias(layer) -> dict:
    """`{"kernel": ..., "bias": ...}` of a layer, without the bias when it has none."""
    out = {"kernel": layer.kernel}
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def activation(layer):
    """The layer's activation, as a function of its pre-activation output."""
    return layer.activation if layer.activation is not None else (lambda z: z)


def f32(t):
    return tf.cast(t, tf.float32)


def over_examples(fn, per_example_size, batch_axes, *tensors):
    """Σ over chunks of examples of `fn(*chunk)`, materialising ≤ `BUDGET` elements.

    `batch_axes[i]` is the example axis of `tensors[i]`; `per_example_size` is how many
    elements `fn` materialises for one example. The batch size must be static.
    """
    size = int(tensors[0].shape[batch_axes[0]])
    chunk = max(1, BUDGET // max(1, int(per_example_size)))
    if size <= chunk:
        return fn(*tensors)
    total = None
    for start in range(0, size, chunk):
        parts = []
        for t, axis in zip(tensors, batch_axes):
            index = [slice(None)] * t.shape.rank
            index[axis] = slice(start, start + chunk)
            parts.append(t[tuple(index)])
        value = fn(*parts)
        total = value if total is None else total + value
    return total


def broadcast_sum_squared(grads, shape):
    """Σ_n Σ_t (per-example gradient)² of a variable of `shape` added to `z`.

    The variable broadcasts against the trailing axes of `z` (a bias); its per-example
    gradient sums `g` over every other axis, and over the layer's calls, before squaring.
    `grads` lists `[T, B, *z]` tensors.
    """
    shape = [int(d) for d in shape]
    total = None
    for g in grads:
        g = f32(g)
        rank = g.shape.rank - 2
        axes = list(range(2, 2 + rank - len(shape)))
        axes += [2 + rank - len(shape) + i for i, d in enumerate(shape) if d == 1]
        per_example = tf.reduce_sum(g, axis=axes) if axes else g
        per_example = tf.reshape(per_example, [tf.shape(g)[0], -1] + shape)
        total = per_example if total is None else total + per_example
    return tf.reduce_sum(tf.square(total), axis=[0, 1])
