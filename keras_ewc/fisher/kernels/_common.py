"""Helpers shared by the kernels, in `keras.ops` (any backend)."""

from __future__ import annotations

import keras

# Most float32 elements a kernel materialises at once (per-example gradients): 64 MiB.
BUDGET = 1 << 24


def stop(variable):
    """A variable's value, cut from differentiation: gradients are taken at outputs instead.

    The value is read as the backend reads it: on JAX inside a `keras.StatelessScope`,
    the scope's value (the weights passed to a traced step), not the variable's own.
    """
    return keras.ops.stop_gradient(keras.ops.convert_to_tensor(variable))


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
    return keras.ops.cast(t, "float32")


def size(shape) -> int:
    """The number of elements of a static shape."""
    count = 1
    for d in shape:
        count *= int(d)
    return count


def over_examples(fn, per_example_size, batch_axes, *tensors):
    """Σ over chunks of examples of `fn(*chunk)`, materialising ≤ `BUDGET` elements.

    `batch_axes[i]` is the example axis of `tensors[i]`; `per_example_size` is how many
    elements `fn` materialises for one example. The batch size must be static: the
    chunks are Python slices, unrolled when traced (on any backend).
    """
    count = int(tensors[0].shape[batch_axes[0]])
    chunk = max(1, BUDGET // max(1, int(per_example_size)))
    if count <= chunk:
        return fn(*tensors)
    total = None
    for start in range(0, count, chunk):
        parts = []
        for t, axis in zip(tensors, batch_axes):
            index = [slice(None)] * len(t.shape)
            index[axis] = slice(start, start + chunk)
            parts.append(t[tuple(index)])
        value = fn(*parts)
        total = value if total is None else total + value
    return total


TERM_SLICES = 64
"""Up to this many terms, `sum_squares_over_terms` adds the terms' slices one by one."""


def sum_squares_over_terms(values):
    """Σ_t values[t]² of a `[T, ...]` tensor (the term columns' gradients): `[...]`.

    For up to `TERM_SLICES` terms, a sum of the slices' squares rather than one
    reduction over the leading axis: XLA (JAX on CPU) then forms each square from
    the slice's producer, the term's own pullback, instead of reducing the stacked
    `[T, ...]` tensor. Measured on the paper MLP's exact Fisher on JAX (9 terms,
    2,048 rows): the step took 5.2× a gradient pass with the reduction, 2.7× with
    the slices. (Same values: the sums differ only in float32 rounding order.)
    """
    count = values.shape[0]
    if count is None or count == 0 or count > TERM_SLICES:
        return keras.ops.sum(keras.ops.square(values), axis=0)
    total = keras.ops.square(values[0])
    for t in range(1, count):
        total = total + keras.ops.square(values[t])
    return total


def positions_sum_squared(x, g):
    """Σ_n Σ_t (Σ_p x[n, p] ⊗ g[t, n, p])² of `x` `[B, P, I]` and `g` `[T, B, P, O]`: `[I, O]`.

    The per-example gradient of a kernel applied at P positions (a Dense layer on a
    sequence, a convolution's patches, a recurrent kernel over time steps) squared and
    summed over examples and terms. Each example's `[I, O]` gradient is formed a term at
    a time (a matmul an example), in chunks of examples that materialise at most
    `BUDGET` elements, and squared: T·P·I·O multiply-adds an example. At one position
    (a convolution on a 1×1 feature map) the square factorises, Σ_n (x_n ∘ x_n)ᵀ
    Σ_t (g_tn ∘ g_tn), so no per-example gradient is formed; every factor is
    non-negative.

    The square is not expanded over pairs of positions (Σ_{p,q} x_p x_q Σ_t g_tp g_tq)
    at P > 1, although that is far cheaper where P < T (ResNet50's last 3×3 convolution
    on a 2×2 map, 9 terms, 128 examples: 0.41 s against 8.8 s on TensorFlow): its sum
    of signed products cancels in float32 and came out negative, and orders of magnitude
    wrong, where the gradients sum to about zero over positions (a normalisation over
    positions after the layer; tests/test_fisher_kernels_gram.py keeps that case).
    """
    terms, positions = int(g.shape[0]), int(x.shape[1])
    inputs, outputs = int(x.shape[-1]), int(g.shape[-1])
    if positions == 1:
        x2 = keras.ops.square(x[:, 0])
        g2 = sum_squares_over_terms(g[:, :, 0])
        return keras.ops.einsum("ni,no->io", x2, g2)

    def chunk(x, g):
        # One term at a time: T small batched matmuls beat one broadcast over T (measured
        # again: a matmul of xᵀ [1, n, K * C, P] with g [T, n, P, filters] was 20% faster
        # on the zoo autoencoder's two Conv2D, 5% slower on MobileNetV2's exact Fisher;
        # T folded into the columns, [n, I, T·O], was 26% slower on MobileNetV2).
        total = 0.0
        for t in range(terms):
            per_example = keras.ops.einsum("npi,npo->nio", x, g[t])  # [n, I, O]
            total += keras.ops.sum(keras.ops.square(per_example), axis=0)
        return total

    return over_examples(chunk, inputs * outputs, (0, 1), x, g)


def broadcast_sum_squared(grads, shape):
    """Σ_n Σ_t (per-example gradient)² of a variable of `shape` added to `z`.

    The variable broadcasts against the trailing axes of `z` (a bias); its per-example
    gradient sums `g` over every other axis, and over the layer's calls, before squaring.
    `grads` lists `[T, B, *z]` tensors (B static).
    """
    shape = [int(d) for d in shape]
    total = None
    for g in grads:
        g = f32(g)
        rank = len(g.shape) - 2
        axes = list(range(2, 2 + rank - len(shape)))
        axes += [2 + rank - len(shape) + i for i, d in enumerate(shape) if d == 1]
        per_example = keras.ops.sum(g, axis=axes) if axes else g
        per_example = keras.ops.reshape(per_example, [-1, int(g.shape[1])] + shape)
        total = per_example if total is None else total + per_example
    return keras.ops.sum(sum_squares_over_terms(total), axis=0)
