"""Embedding: `z[s] = E[ids[s]]`, a row lookup.

Example n's gradient of row r is Σ_{s: ids[n, s] = r} g[n, s]: the output gradients are
summed within each (example, row) pair before squaring, then the squares are added into
their rows. Repeated tokens and padding (mask_zero) are handled by the same sums.
"""

from __future__ import annotations

import keras

from keras_ewc.fisher.kernels import _backend_ops
from keras_ewc.fisher.kernels._common import f32, stop
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel


@register_kernel(keras.layers.Embedding, methods=("embeddings",))
class EmbeddingKernel(Kernel):
    def supports(self, layer) -> bool:
        return not layer.lora_enabled and layer.quantization_mode is None

    def params(self, layer) -> dict:
        return {"embeddings": layer.embeddings}

    def forward(self, layer, args, kwargs):
        ids = args[0]
        if keras.backend.standardize_dtype(ids.dtype) not in ("int32", "int64"):
            ids = keras.ops.cast(ids, "int32")
        z = keras.ops.take(stop(layer.embeddings), ids, axis=0)
        return ids, z, lambda z: keras.ops.cast(z, layer.compute_dtype)

    def sum_squared(self, layer, records, grads) -> dict:
        rows, width = (int(d) for d in layer.embeddings.shape)
        batch = int(grads[0].shape[1])
        # One key an (example, row) pair: n * rows + id, in 64 bits only where needed
        # (JAX without x64 has no int64).
        dtype = "int32" if batch * rows < 2**31 else "int64"
        ids = keras.ops.concatenate(
            [keras.ops.reshape(keras.ops.cast(r, dtype), [batch, -1]) for r in records], 1)
        # [T, B * S, D]: one (example, position) a row, for each term.
        g = keras.ops.concatenate(
            [keras.ops.reshape(f32(g), [g.shape[0], batch, -1, width]) for g in grads], 2)
        g = keras.ops.reshape(g, [g.shape[0], -1, width])
        example = keras.ops.arange(batch, dtype=dtype)[:, None] * rows
        keys, pair, pairs = _backend_ops.unique_keys(keras.ops.reshape(example + ids, [-1]))
        # Σ_t (Σ_{s: ids[n, s] = r} g[t, n, s])², one (example, row) pair at a time.
        squares = None
        for t in range(g.shape[0]):
            square = keras.ops.square(keras.ops.segment_sum(g[t], pair, num_segments=pairs))
            squares = square if squares is None else squares + square
        return {"embeddings": keras.ops.segment_sum(squares, keys % rows, num_segments=rows)}

