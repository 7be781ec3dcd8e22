"""A brute-force Fisher on JAX, one example and one class at a time (the tests' oracle).

Independent of the library's engine and likelihood terms: per example n and class c, the
gradient of log p(c | x_n) by `jax.grad` through `stateless_call`, then
F = (1/N) Σ_n Σ_c p_c (∇ log p_c)² (exact) or (1/N) Σ_n (∇ log p_{y_n})² (empirical),
accumulated in float64 on the host.
"""

from __future__ import annotations

import jax
import numpy as np


def categorical(model, x, y=None, from_logits=True, weights=None):
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def log_p(values, xn):
        out, _ = model.stateless_call(values, fixed, xn[None], training=False)
        out = out[0]
        if from_logits:
            return jax.nn.log_softmax(out)
        return jax.numpy.log(out / jax.numpy.sum(out))

    totals = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    weights = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    for n in range(len(x)):
        lp = np.asarray(log_p(trainable, x[n]), np.float64)
        classes = range(lp.shape[0]) if y is None else [int(y[n])]
        for c in classes:
            g = jax.grad(lambda v, c=c, xn=x[n]: log_p(v, xn)[c])(trainable)
            p = np.exp(lp[c]) if y is None else 1.0
            for t, gi in zip(totals, g):
                t += weights[n] * p * np.square(np.asarray(gi, np.float64))
    return [t / weights.sum() for t in totals]
