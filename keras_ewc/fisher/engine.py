"""Sums of squared per-example gradients: the one primitive every estimator needs.

Every per-example Fisher estimator reduces to the same computation. A likelihood turns
the model's outputs on a batch into a `[batch, T]` tensor of pseudo-losses ("terms")
whose per-example gradients, squared and summed over examples and terms, give the Fisher
diagonal times the number of examples:

    S_v = sum_n sum_t (d terms[n, t] / d v) ** 2        for every variable v.

`build_sum_squared_grads(model, variables, terms_fn)` returns a function
`fn(inputs, extra) -> [S_v for v in variables]` for one batch. This module holds the
reference implementation: `tf.vectorized_map` over the examples of the batch, one tape
per example, exact for every layer kind. Per-layer kernels may replace it for the layers
they support, with the same contract:

- `terms_fn(outputs, extra)` maps outputs `[B, ...]` and the per-example `extra`
  (a nest of tensors with leading dimension B, or None) to `[B, T]`, row n depending on
  example n alone; T is static.
- The model is called in inference mode (`training=False`), so dropout and batch
  normalisation act on each example alone and examples do not interact.

Memory is bounded by the batch: callers chunk the data into batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

TermsFn = Callable[[tf.Tensor, object], tf.Tensor]
SumFn = Callable[[object, object], list]


def build_sum_squared_grads(
    model: Callable, variables: Sequence[tf.Variable], terms_fn: TermsFn
) -> SumFn:
    """Returns `fn(inputs, extra)`: per-variable sums of squared per-example gradients.

    The reference path, exact for any layer: per-example gradients from
    `tf.vectorized_map`, squared and summed inside the map so that only one batch of
    gradients is alive at a time.
    """
    variables = list(variables)

    def one(args):
        xi, ei = args
        xi = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), xi)
        if ei is not None:
            ei = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), ei)
        with tf.GradientTape(persistent=True) as tape:
            outputs = model(xi, training=False)
            terms = tf.reshape(tf.cast(terms_fn(outputs, ei), tf.float32), [-1])
            parts = [terms[t] for t in range(int(terms.shape[0]))]
        acc = [tf.zeros(v.shape, tf.float32) for v in variables]
        for part in parts:
            grads = tape.gradient(part, variables, unconnected_gradients="zero")
            acc = [a + tf.square(tf.cast(g, tf.float32)) for a, g in zip(acc, grads)]
        del tape
        return acc

    @tf.function(reduce_retracing=True)
    def fn(inputs, extra):
        if extra is None:
            per_example = tf.vectorized_map(lambda x: one((x, None)), inputs)
        else:
            per_example = tf.vectorized_map(one, (inputs, extra))
        return [tf.reduce_sum(p, axis=0) for p in per_example]

    return fn
