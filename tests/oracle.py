"""Brute-force Fisher oracles: one example at a time, each with its own gradient.

Independent of the library's engine: no vectorisation, no pseudo-loss factorisation.
The expectation over labels is written out as the definition says it:
F = (1/N) Σ_n Σ_y p(y | x_n) (∇ log p(y | x_n))².

Backend-neutral: on TensorFlow each gradient is a `tf.GradientTape`; on JAX it is a
`jax.grad` through a `keras.StatelessScope` (what `stateless_call` uses) that maps the
given variables to the traced values (training=False, so no state is written back).
Both accumulate in float64 on the host.
"""

import itertools

import keras
import numpy as np

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf

    def batch_gradients(model, variables, xb, fn):
        """float64 gradients of the scalar `fn(model(xb))` (zeros where none flows)."""
        with tf.GradientTape() as tape:
            value = fn(model(xb, training=False))
        return [
            np.zeros(v.shape, np.float64)
            if g is None
            else np.asarray(tf.convert_to_tensor(g), np.float64)  # IndexedSlices too
            for g, v in zip(tape.gradient(value, variables), variables)
        ]

    _softmax, _log_softmax, _log = tf.nn.softmax, tf.nn.log_softmax, tf.math.log
    _sigmoid, _sum, _mean = tf.sigmoid, tf.reduce_sum, tf.reduce_mean

    def _constant(values):
        return tf.constant(values, tf.float32)

    def _pick(logp, labels):
        return tf.gather(logp, labels, axis=-1, batch_dims=1)

elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    def batch_gradients(model, variables, xb, fn):
        """float64 gradients of the scalar `fn(model(xb))` (zeros where none flows)."""

        def value(given):
            # The given variables read as the traced values, through the scope that
            # `stateless_call` itself uses; the model is called as on TensorFlow (a
            # `call` without a `training` argument is not passed one).
            with keras.StatelessScope(state_mapping=list(zip(variables, given))):
                return fn(model(xb, training=False))

        grads = jax.grad(value)([v.value for v in variables])
        return [np.asarray(g, np.float64) for g in grads]

    _softmax, _log_softmax, _log = jax.nn.softmax, jax.nn.log_softmax, jnp.log
    _sigmoid, _sum, _mean = jax.nn.sigmoid, jnp.sum, jnp.mean

    def _constant(values):
        return jnp.asarray(values, jnp.float32)

    def _pick(logp, labels):
        return jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=-1)[:, 0]

else:
    raise ImportError(f"tests/oracle.py has no gradient for the {BACKEND} backend.")


def value_and_gradients(fn, variables):
    """`fn()`, a scalar that reads `variables`, and its float64 gradients with respect to
    them, by the backend's autodiff (a tape on TensorFlow, `jax.grad` on JAX)."""
    if BACKEND == "tensorflow":
        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, variables)
        return (np.asarray(value, np.float64),
                [np.zeros(v.shape, np.float64) if g is None
                 else np.asarray(tf.convert_to_tensor(g), np.float64)
                 for g, v in zip(grads, variables)])

    def traced(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn()

    value, grads = jax.value_and_grad(traced)([v.value for v in variables])
    return np.asarray(value, np.float64), [np.asarray(g, np.float64) for g in grads]


def _grad(model, variables, x, fn):
    """The gradients of `fn(model(x[None])[0])`, a scalar, for one example `x`."""
    return batch_gradients(model, variables, x[None], lambda out: fn(out[0]))


def _probs_logp(out, from_logits):
    if from_logits:
        return _softmax(out), _log_softmax(out)
    return out, _log(out)


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
        p = np.asarray(_sigmoid(model(xn[None], training=False)[0]), np.float64)
        for ys in itertools.product([0.0, 1.0], repeat=p.shape[-1]):
            ys_t = _constant(ys)
            prob = np.prod(np.where(np.array(ys) == 1, p, 1 - p))

            def logp(o, ys_t=ys_t):
                s = _sigmoid(o)
                return _sum(ys_t * _log(s) + (1 - ys_t) * _log(1 - s))

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

        def loss(out, yb=yb):
            logp = _probs_logp(out, from_logits)[1]
            return -_mean(_pick(logp, yb))

        g = batch_gradients(model, variables, xb, loss)
        total = [t + gi ** 2 for t, gi in zip(total, g)]
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
