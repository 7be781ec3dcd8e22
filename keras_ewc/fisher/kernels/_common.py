"""Helpers shared by the kernels, in `keras.ops` (any backend)."""

from __future__ import annotations

import numbers

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
    if isinstance(t, Columns):
        return t.map(f32)
    return keras.ops.cast(t, "float32")


class Columns:
    """The T term columns' gradients at one `z`, kept as T tensors: `[T, B, *z]` as a kernel
    reads it.

    TensorFlow's engine back-propagates the columns one at a time, which is faster than
    its vectorised jacobian (`keras_ewc.fisher.fast.column_grads`, or, optionally, in
    rounds of a few columns, `column_loop`); stacking the T
    results into one tensor would copy every gradient, 1.8× a gradient pass on the
    zoo's GroupNorm CNN (docs/fisher_speed.md). Kernels whose `_columns_apart` is True
    get this; the others get the stacked tensor. It reads as a tensor does: `g[t]` is
    column t, `g[:, a:b]` and `g[:, ...]` slice every column, `g.shape` is `[T, B, *z]`;
    the helpers of this module (`f32`, `reshape_terms`, `concatenate_terms`,
    `sum_squares_over_terms`, `positions_sum_squared`, `broadcast_sum_squared`) keep
    the columns apart. Anything else converts it to the stacked tensor (TensorFlow's
    `__tf_tensor__`): still right, only slower (tests/test_fisher_kernels.py checks that
    the kernels that read it never stack it, on small models of each kind).
    """

    def __init__(self, columns):
        self.columns = list(columns)
        if not self.columns:
            raise ValueError("Expected at least one term column. Received none.")

    @property
    def shape(self):
        return (len(self.columns),) + tuple(self.columns[0].shape)

    @property
    def dtype(self):
        return self.columns[0].dtype

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return len(self.columns)

    def map(self, fn):
        """`fn` applied to each column (`[B, *z]` → anything per column)."""
        return Columns([fn(c) for c in self.columns])

    def stacked(self):
        return keras.ops.stack(self.columns)

    def __add__(self, other):
        if isinstance(other, Columns) and len(other) == len(self):
            return Columns([a + b for a, b in zip(self.columns, other.columns)])
        return self.stacked() + other

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self
        return other + self.stacked()

    def __getitem__(self, key):
        if isinstance(key, numbers.Integral):
            return self.columns[int(key)]
        if key is Ellipsis or (isinstance(key, slice) and key == slice(None)) or (
                isinstance(key, tuple) and all(k is Ellipsis or (
                    isinstance(k, slice) and k == slice(None)) for k in key)):
            return self
        if isinstance(key, tuple) and key:
            first, rest = key[0], key[1:]
            if isinstance(first, numbers.Integral):
                return self.columns[int(first)][rest] if rest else self.columns[int(first)]
            if isinstance(first, slice) and first == slice(None):  # rest: not all slices
                return self.map(lambda c: c[rest])
        return self.stacked()[key]

    def __tf_tensor__(self, dtype=None, name=None):
        import tensorflow as tf

        return tf.convert_to_tensor(self.stacked(), dtype=dtype, name=name)


def terms_of(g) -> list:
    """The T columns of a `[T, B, *z]` gradient (a tensor's slices, or `Columns`' own)."""
    return list(g.columns) if isinstance(g, Columns) else [g[t] for t in range(g.shape[0])]


def reshape_terms(g, shape):
    """`g` `[T, B, *z]` reshaped to `[T, *shape]`, its columns kept apart if they are."""
    if isinstance(g, Columns):
        return g.map(lambda c: keras.ops.reshape(c, shape))
    return keras.ops.reshape(g, [g.shape[0]] + list(shape))


def concatenate_terms(gs, axis):
    """`keras.ops.concatenate(gs, axis)` of `[T, ...]` gradients (`axis` ≥ 1 counts T's)."""
    if axis < 1:
        raise ValueError(f"Expected an axis after the terms' (>= 1). Received: {axis}")
    if len(gs) == 1:
        return gs[0]
    if any(isinstance(g, Columns) for g in gs):
        per = [terms_of(g) for g in gs]
        return Columns([keras.ops.concatenate(list(cs), axis - 1) for cs in zip(*per)])
    return keras.ops.concatenate(gs, axis)


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
    if isinstance(values, Columns):  # kept apart: never stacked, whatever T
        return sum_of_squares(values.columns)
    if count is None or count == 0 or count > TERM_SLICES:
        return keras.ops.sum(keras.ops.square(values), axis=0)
    return sum_of_squares([values[t] for t in range(count)])


def sum_of_squares(tensors):
    """Σ_i tensors[i]², one slice's square at a time."""
    total = keras.ops.square(tensors[0])
    for t in tensors[1:]:
        total = total + keras.ops.square(t)
    return total


def factorised_sum_squared(x, g):
    """Σ_n Σ_t (x[n] ⊗ g[t, n])² of `x` `[B, I]` and `g` `[T, B, O]`: `[I, O]`, as
    Σ_n (x_n ∘ x_n)ᵀ Σ_t (g_tn ∘ g_tn) (a kernel applied at one position: the square
    factorises, and no per-example gradient is formed)."""
    return keras.ops.einsum("ni,no->io", keras.ops.square(x), sum_squares_over_terms(g))


GRAM = None
"""Whether `positions_sum_squared` expands the square over pairs of positions (float64):
None chooses by `gram_is_cheaper`; True or False forces it (tests, side-by-side
timings; True still needs float64 on the CPU: `keras_ewc.backend.float64_on_cpu`)."""


def gram_is_cheaper(terms, positions, inputs, outputs) -> bool:
    """Whether the pairs-of-positions form costs less than per-example products.

    A cost model fitted to side-by-side timings (TensorFlow on CPU, 128 examples, CPU
    s, per example → pairs): ResNet50's last 3×3 convolution at 64×64 (T 9, P 4,
    I 4,608, O 512) 8.5 → 0.51, and 0.90 → 0.40 with one term (empirical); its
    512 → 2,048 1×1 6.8 → 0.53; MobileNetV2's last 1×1 (P 4, 320 → 1,280) 1.46 → 0.27;
    a 3×3 map (P 9, 1,152 → 256) 1.13 → 0.47, and 0.17 → 0.43 with one term; a 4×4 map
    (P 16, 144 → 24) 0.017 → 0.086 and an 8×8 one (P 64, 576 → 64) 0.37 → 6.9; with 99
    terms (100 classes; 32 examples): a 4×4 map (576 → 128) 0.62 → 0.35, 5×5 (288 → 64)
    0.24 → 0.28, 6×6 (256 → 64) 0.20 → 0.43, 8×8 (128 → 64) 0.19 → 0.80. The
    per-example products are small matmuls bound by memory: about
    (T + 1)·I·O·(P + 200), whatever P (the +1: a pass over the chunk's inputs); the
    pairs, one large float64 matmul over P (P + 1) / 2 pairs and the terms' products
    over pairs (small matmuls again), about 8·P (P + 1)·(I + 24·T·O + I·O). So the pairs
    win at P ≤ 4 for any T, at P ≤ 9 with 9 terms, at 16 with 99, and not beyond.
    """
    per_example = (terms + 1) * inputs * outputs * (positions + 200)
    pairs = 8 * positions * (positions + 1) * (inputs + 24 * terms * outputs
                                               + inputs * outputs)
    return pairs < per_example


def positions_sum_squared(x, g):
    """Σ_n Σ_t (Σ_p x[n, p] ⊗ g[t, n, p])² of `x` `[B, P, I]` and `g` `[T, B, P, O]`: `[I, O]`.

    The per-example gradient of a kernel applied at P positions (a Dense layer on a
    sequence, a convolution's patches, a recurrent kernel over time steps) squared and
    summed over examples and terms. At one position (a convolution on a 1×1 feature
    map) the square factorises, Σ_n (x_n ∘ x_n)ᵀ Σ_t (g_tn ∘ g_tn), so no per-example
    gradient is formed; every factor is non-negative.

    Otherwise one of two forms, whichever `gram_is_cheaper` says costs less:
    - per-example products: each example's `[I, O]` gradient formed a term at a time (a
      matmul an example), in chunks of examples that materialise at most `BUDGET`
      elements, and squared: T·P·I·O multiply-adds an example, a sum of squares;
    - pairs of positions: the square expanded, Σ_{p,q} x_p x_q Σ_t g_tp g_tq, one large
      matmul over examples and pairs, far cheaper where P < T (the last stages of a CNN:
      ResNet50's last 3×3 convolution on a 2×2 map, 9 terms, 17× faster). It is a sum of
      signed products and cancels where the gradients sum to about zero over positions
      (a normalisation over positions after the layer: in float32 it came out negative,
      orders of magnitude wrong; tests/test_fisher_kernels_gram.py keeps the case), so it
      runs in float64 and is clamped at 0: its error is then about 1e-16 of the
      products' size, below the per-example form's float32 rounding. Only on the CPU,
      where the cost model was fitted (`keras_ewc.backend.float64_on_cpu`: not on JAX
      without x64, whose float64 is float32, nor where an accelerator is visible, whose
      float64 is slow or, on a TPU, absent), and where one example's share fits in
      `BUDGET` (`pairs_size`): elsewhere the per-example form runs.
    """
    from keras_ewc import backend

    terms, positions = int(g.shape[0]), int(x.shape[1])
    inputs, outputs = int(x.shape[-1]), int(g.shape[-1])
    if positions == 1:  # reshapes, not slices: no copy
        return factorised_sum_squared(keras.ops.reshape(x, [x.shape[0], inputs]),
                                      reshape_terms(g, [g.shape[1], outputs]))
    gram = GRAM if GRAM is not None else gram_is_cheaper(terms, positions, inputs, outputs)
    if (gram and backend.float64_on_cpu()
            and pairs_size(terms, positions, inputs, outputs) <= BUDGET):
        return _pairs_sum_squared(x, g)

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


def pairs_size(terms, positions, inputs, outputs) -> int:
    """The float32-sized elements `_pairs_sum_squared` holds at once for one example: the
    float64 copies of x and g, both factors over every pair, the kept pairs of both and
    the weighted copy of x's (a float64 element counts as two)."""
    kept = positions * (positions + 1) // 2
    return 2 * (positions * inputs + terms * positions * outputs
                + positions * positions * (inputs + outputs) + kept * (2 * inputs + outputs))


def _pairs_sum_squared(x, g):
    """`_pairs_total` clamped at 0 (where the true sum is about 0 its rounding may be
    below), in float32."""
    return keras.ops.cast(keras.ops.maximum(_pairs_total(x, g), 0.0), "float32")


def _pairs_total(x, g):
    """`positions_sum_squared` as Σ_n Σ_{p,q} (x_np ∘ x_nq)ᵀ Σ_t (g_tnp ∘ g_tnq), float64.

    Both factors are symmetric in (p, q): the pairs p ≤ q are kept, the others counted
    by doubling p < q, so the matmul runs over P (P + 1) / 2 pairs, not P².
    """
    import numpy as np

    positions, inputs, outputs = int(x.shape[1]), int(x.shape[-1]), int(g.shape[-1])
    upper = [(p, q) for p in range(positions) for q in range(p, positions)]
    index = np.array([p * positions + q for p, q in upper], "int32")
    weight = np.array([1.0 if p == q else 2.0 for p, q in upper], "float64")[:, None]

    def chunk(x, g):
        x = keras.ops.cast(x, "float64")
        n = int(x.shape[0])
        xx = keras.ops.einsum("npi,nqi->npqi", x, x)  # [n, P, P, I]
        if isinstance(g, Columns):  # [n, P, P, O], Σ over terms a column at a time
            gg = 0.0
            for c in g.columns:
                c = keras.ops.cast(c, "float64")
                gg += keras.ops.einsum("npo,nqo->npqo", c, c)
        else:
            g = keras.ops.cast(g, "float64")
            gg = keras.ops.einsum("tnpo,tnqo->npqo", g, g)  # [n, P, P, O], Σ over terms
        xx = keras.ops.take(keras.ops.reshape(xx, [n, -1, inputs]), index, axis=1) * weight
        gg = keras.ops.take(keras.ops.reshape(gg, [n, -1, outputs]), index, axis=1)
        # One matmul over examples and pairs: [I, n·P(P+1)/2] by [n·P(P+1)/2, O].
        return keras.ops.tensordot(xx, gg, axes=[[0, 1], [0, 1]])

    size = pairs_size(int(g.shape[0]), positions, inputs, outputs)
    return over_examples(chunk, size, (0, 1), x, g)


def broadcast_sum_squared(grads, shape):
    """Σ_n Σ_t (per-example gradient)² of a variable of `shape` added to `z`.

    The variable broadcasts against the trailing axes of `z` (a bias); its per-example
    gradient sums `g` over every other axis, and over the layer's calls, before squaring.
    `grads` lists `[T, B, *z]` gradients, tensors or `Columns` (B static).
    """
    shape = [int(d) for d in shape]
    total = None
    for g in grads:
        g = f32(g)
        rank = len(g.shape) - 2
        axes = list(range(2, 2 + rank - len(shape)))
        axes += [2 + rank - len(shape) + i for i, d in enumerate(shape) if d == 1]
        batch = int(g.shape[1])

        def reduce(c, axes=tuple(a - 1 for a in axes), batch=batch):  # a column, [B, *z]
            c = keras.ops.sum(c, axis=list(axes)) if axes else c
            return keras.ops.reshape(c, [batch] + shape)

        per_example = g.map(reduce) if isinstance(g, Columns) else keras.ops.reshape(
            keras.ops.sum(g, axis=axes) if axes else g, [-1, batch] + shape)
        total = per_example if total is None else total + per_example
    return keras.ops.sum(sum_squares_over_terms(total), axis=0)
