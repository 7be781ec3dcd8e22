"""Embedding: `z[s] = E[ids[s]]`, a row lookup.

Example n's gradient of row r is Σ_{s: ids[n, s] = r} g[n, s]: the output gradients are
summed within each (example, row) pair before squaring, then the squares are added into
their rows. Repeated tokens and padding (mask_zero) are handled by the same sums.
"""

from __future__ import annotations

import keras
import tensorflow as tf

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
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        z = keras.ops.take(stop(layer.embeddings), ids, axis=0)
        return ids, z, lambda z: keras.ops.cast(z, layer.compute_dtype)

    def sum_squared(self, layer, records, grads) -> dict:
        rows, width = (int(d) for d in layer.embeddings.shape)
        batch = int(grads[0].shape[1])
        ids = tf.concat([tf.reshape(tf.cast(r, tf.int64), [batch, -1]) for r in records], 1)
        # [T, B * S, D]: one (example, position) a row, for each term.
        g = tf.concat(
            [tf.reshape(f32(g), [g.shape[0], batch, -1, width]) for g in grads], 2)
        g = tf.reshape(g, [g.shape[0], -1, width])
        example = tf.range(batch, dtype=tf.int64)[:, None] * rows
        keys, pair = tf.unique(tf.reshape(example + ids, [-1]))
        pairs = tf.shape(keys)[0]
        # Σ_t (Σ_{s: ids[n, s] = r} g[t, n, s])², one (example, row) pair at a time.
        squares = tf.add_n([
            tf.square(tf.math.unsorted_segment_sum(g[t], pair, pairs))
            for t in range(g.shape[0])
        ])
        return {"embeddings": tf.math.unsorted_segment_sum(squares, keys % rows, rows)}
