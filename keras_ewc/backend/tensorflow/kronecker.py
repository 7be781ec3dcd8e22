"""The Kronecker penalty's TensorFlow pieces: a loop over the used task slots only
(`tf.while_loop`) and the gradient formed with the value (`tf.custom_gradient`)."""

from __future__ import annotations

import tensorflow as tf


def kronecker_gradient(a, g, delta) -> tf.Tensor:
    return tf.matmul(tf.matmul(a, delta), g)


def kronecker_penalty(wbar, pairs) -> tf.Tensor:
    """`Σ_k ½ tr((W̄ − W̄*_k)ᵀ A_k (W̄ − W̄*_k) G_k)`, its gradient `Σ_k A_k ΔW̄_k G_k`
    formed in the forward pass and reused (see `keras_ewc.kronecker.kronecker_penalty`)."""

    @tf.custom_gradient
    def value(w):
        total, grad = tf.constant(0.0, tf.float32), tf.zeros_like(w)
        for a, g, anchor in pairs:
            delta = w - anchor
            m = kronecker_gradient(a, g, delta)
            total += 0.5 * tf.reduce_sum(delta * m)
            grad += m
        return total, lambda upstream: upstream * grad

    return value(tf.cast(wbar, tf.float32))


def value_and_grads(kronecker_state, wbars, tasks, num_slots) -> tuple:
    """`(Σ ½ tr(ΔW̄ᵀ A ΔW̄ G), [Σ A ΔW̄ G per layer])` over the used slots."""
    used = tf.minimum(tf.cast(tf.convert_to_tensor(tasks), tf.int32), num_slots)
    total, grads = tf.constant(0.0, tf.float32), []
    for trio, wbar in zip(kronecker_state, wbars):
        a_all, g_all, anchors = (tf.convert_to_tensor(v) for v in trio)

        def body(k, value, grad, wbar=wbar, a_all=a_all, g_all=g_all, anchors=anchors):
            delta = wbar - anchors[k]
            m = kronecker_gradient(a_all[k], g_all[k], delta)
            return k + 1, value + 0.5 * tf.reduce_sum(delta * m), grad + m

        # Only the slots of consolidated tasks are visited: empty ones cost nothing.
        _, value, grad = tf.while_loop(
            lambda k, *_: k < used, body,
            (tf.constant(0), tf.constant(0.0, tf.float32), tf.zeros_like(wbar)))
        total += value
        grads.append(grad)
    return total, grads


def kronecker_value(kronecker_state, wbars, tasks, num_slots) -> tf.Tensor:
    if not wbars:
        return tf.constant(0.0, tf.float32)

    @tf.custom_gradient
    def value(*wbars):
        # The gradient A ΔW̄ G is formed with the value and reused: back-propagation
        # through the penalty adds no matrix product.
        total, grads = value_and_grads(kronecker_state, wbars, tasks, num_slots)
        return total, lambda upstream: [upstream * g for g in grads]

    return value(*wbars)
