"""Embedding: `z[s] = E[ids[s]]`, a row lookup.

Example n's gradient of row r is Σ_{s: ids[n, s] = r} g[n, s]: the output gradients are
summed within each (example, row) pair before squaring, then the squares are added into
their rows. Repeated tokens and padding (mask_zero) are handled by the same sums.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_ewc.fisher.kernels._common import f32, stop

LAYERS = (keras.layers.Embedding,)
METHODS = ("embeddings",)


def supports(layer) -> bool:
    return not layer.lora_enabled and layer.quantization_mode is None


def params(layer) -> dict:
    return {"embeddings": layer._embeddings}


def forward(layer, args, kwargs):
    ids = args[0]
    if ids.dtype not in (tf.int32, tf.int64):
        ids = tf.cast(ids, tf.int32)
    z = keras.ops.take(stop(layer.embeddings), ids, axis=0)
    return ids, z, lambda z: keras.ops.cast(z, layer.compute_dtype)


def sum_squared(layer, records, grads) -> dict:
    rows, width = (int(d) for d in layer._embeddings.shape)
    batch = int(grads[0].shape[1])
    terms = int(grads[0].shape[0])
    ids = tf.concat([tf.reshape(tf.cast(r, tf.int64), [batch, -1]) for r in records], 1)
    # [T, B, S, D] -> [B, S, T, D]: one (example, position) a row, the T terms side by side.
    g = tf.concat(
        [tf.reshape(f32(g), [terms, batch, -1, width]) for g in grads], 2
    )
    g = tf.reshape(tf.transpose(g, [1, 2, 0, 3]), [-1, terms * width])
    example = tf.range(batch, dtype=tf.int64)[:, None] * rows
    keys, index = tf.unique(tf.reshape(example + ids, [-1]))
    per_pair = tf.math.unsorted_segment_sum(g, index, tf.shape(keys)[0])
    squares = tf.reduce_sum(tf.reshape(tf.square(per_pair), [-1, terms, width]), axis=1)
    return {"embeddings": tf.math.unsorted_segment_sum(squares, keys % rows, rows)}
