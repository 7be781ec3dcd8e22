"""The reference path: per-example gradients, exact for any layer, squared and summed."""

from __future__ import annotations

import keras

from keras_ewc import _private
from keras_ewc._tensorflow import tf


def reference_sums(model, variables, terms_fn, inputs, extra) -> dict:
    """`{id(v): Σ_n Σ_t (∂ terms[n, t] / ∂ v)²}` from one tape an example.

    `tf.vectorized_map` over the examples (`tf.map_fn` where pfor cannot vectorise the
    model, as for recurrent layers); squares are summed inside the map so that only one
    batch of gradients is alive at a time.
    """
    variables = list(variables)

    def one(xi, ei):
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

    elems = (inputs, extra) if extra is not None else inputs
    fn = (lambda args: one(*args)) if extra is not None else (lambda x: one(x, None))
    signature = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    if has_loops(model):
        # pfor cannot vectorise a recurrent layer's backward loop; failing to try is slow.
        per_example = tf.map_fn(fn, elems, fn_output_signature=signature)
    else:
        try:
            per_example = tf.vectorized_map(fn, elems)
        except (TypeError, ValueError, NotImplementedError):
            # Other graphs pfor cannot vectorise: one example after another instead.
            per_example = tf.map_fn(fn, elems, fn_output_signature=signature)
    return {id(v): tf.reduce_sum(p, axis=0) for v, p in zip(variables, per_example)}


def has_loops(model) -> bool:
    """Whether the model holds a Keras recurrent layer (a `while` loop in its graph),
    which pfor cannot vectorise: trying and failing is slow, so callers loop instead."""
    return any(isinstance(layer, keras.layers.RNN) for layer in _private.flatten_layers(model))
