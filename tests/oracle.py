"""Brute-force Fisher oracles: one example at a time, each with its own tape.

Independent of the library's engine: no vectorisation, no pseudo-loss factorisation.
The expectation over labels is written out as the definition says it:
F = (1/N) Σ_n Σ_y p(y | x_n) (∇ log p(y | x_n))².
"""

import itertools

import numpy as np
import tensorflow as tf


def _grad(model, variables, x, fn):
    with tf.GradientTape() as tape:
        out = model(x[None], training=False)
        value = fn(out[0])
    return [
        np.zeros(v.shape, np.float64)
        if g is None
        else np.asarray(tf.convert_to_tensor(g), np.float64)  # IndexedSlices too
        for g, v in zip(tape.gradient(value, variables), variables)
    ]


def _probs_logp(out, from_logits):
    if from_logits:
        return tf.nn.softmax(out), tf.nn.log_softmax(out)
    return out, tf.math.log(out)


def categorical_exact(model, variables, x, from_logits=True):
    total = [np.zeros(v.shape, np.float64) for v in variables]
    for xn in x:
        probs = np.asarray(_probs_logp(model(xn[None], training=False)[0], from_logits)[0])
        for c in range(probs.shape[-1]):
            g = _grad(model, variables, xn, lambda o, c=c: _probs_logp(o, from_logits)[1][c])
            total = [t + probs[c] * gi**2 for t, gi in zip(total, g)]
    return [t / len(x) for t in total]


def categorical_labels(model, variables, x, labels, from_logits=True):
    """Mean over examples (and over the k labels of each) of squared score gradients."""
    total = [np.zeros(v.shape, np.float64) for v in variables]
    labels = np.asarray(labels).reshape(len(x), -1)
    for xn, yn in zip(x, labels):
        for y in yn:
            g = _grad(model, variables, xn,
                      lambda o, y=int(y): -_probs_logp(o, from_logits)[1][y])
            total = [t + gi**2 / len(yn) for t, gi in zip(total, g)]
    return [t / len(x) for t in total]


def bernoulli_exact(model, variables, x):
    """Enumerates all 2^K joint label vectors: no independence argument used."""
    total = [np.zeros(v.shape, np.float64) for v in variables]
    for xn in x:
        p = np.asarray(tf.sigmoid(model(xn[None], training=False)[0]), np.float64)
        for ys in itertools.product([0.0, 1.0], repeat=p.shape[-1]):
            ys_t = tf.constant(ys, tf.float32)
            prob = np.prod(np.where(np.array(ys) == 1, p, 1 - p))

            def logp(o, ys_t=ys_t):
                s = tf.sigmoid(o)
                return tf.reduce_sum(ys_t * tf.math.log(s) + (1 - ys_t) * tf.math.log(1 - s))

            g = _grad(model, variables, xn, logp)
            total = [t + prob * gi**2 for t, gi in zip(total, g)]
    return [t / len(x) for t in total]


def gaussian_exact(model, variables, x):
    """Σ_k (∂f_k/∂θ)² per example: E_y((y−f)ᵀJ)² = diag(JᵀJ) for y ∼ N(f, I)."""
    total = [np.zeros(v.shape, np.float64) for v in variables]
    for xn in x:
        k = int(model(xn[None], training=False).shape[-1])
        for j in range(k):
            g = _grad(model, variables, xn, lambda o, j=j: o[j])
            total = [t + gi**2 for t, gi in zip(total, g)]
    return [t / len(x) for t in total]


def batched(model, variables, x, y, batch_size, from_logits=True):
    total = [np.zeros(v.shape, np.float64) for v in variables]
    batches = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with tf.GradientTape() as tape:
            out = model(xb, training=False)
            logp = _probs_logp(out, from_logits)[1]
            loss = -tf.reduce_mean(tf.gather(logp, yb, axis=-1, batch_dims=1))
        g = tape.gradient(loss, variables)
        total = [t + np.asarray(gi, np.float64) ** 2 for t, gi in zip(total, g)]
        batches += 1
    return [t / batches for t in total]


def assert_close(actual, expected, rtol=1e-5, atol_scale=1e-6):
    """Relative closeness; entries far below the largest are compared absolutely."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a = np.asarray(a, np.float64)
        e = np.asarray(e, np.float64)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(np.abs(e).max(), 1e-30)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_scale * rtol * scale)
