"""The diagonal penalty's TensorFlow pieces: its closed-form gradient and the commit
of a whole state in one graph call."""

from __future__ import annotations

import tensorflow as tf


def penalty_with_gradient(strength, precision, anchor, offset, theta,
                          active=None) -> tf.Tensor:
    """`strength * (½ Σ P (θ − m)² + c)`, with the gradient `strength * P (θ − m)`.

    The gradient is given in closed form (`tf.custom_gradient`): it reuses `P (θ − m)`
    from the forward pass, so a training step pays one multiply a variable for it (and
    the add of the two gradients) instead of differentiating a chain of small ops
    (TensorFlow runs them one by one on CPU, without XLA).
    `active` (a boolean tensor, default true) False skips the arithmetic: a state with
    no task is 0 everywhere, and a training step then costs almost nothing more.
    """
    theta = list(theta)
    if active is None:
        active = tf.constant(True)

    @tf.custom_gradient
    def fn(*theta):
        def compute():
            diffs = [tf.cast(t, tf.float32) - m for t, m in zip(theta, anchor)]
            scaled = [p * d for p, d in zip(precision, diffs)]
            total = tf.add_n([tf.reduce_sum(s * d) for s, d in zip(scaled, diffs)])
            return [total] + scaled

        def skip():
            return [tf.zeros((), tf.float32)] + [tf.zeros(tf.shape(p), tf.float32)
                                                 for p in precision]

        total, *scaled = tf.cond(active, compute, skip)
        value = strength * (offset + 0.5 * total)

        def grad(upstream):
            factor = upstream * strength
            grads = tf.cond(active, lambda: [factor * s for s in scaled], lambda: scaled)
            return [tf.cast(g, t.dtype) for g, t in zip(grads, theta)]

        return value, grad

    return fn(*theta)


def penalty(strength, precision, anchors, offset, theta, tasks) -> tf.Tensor:
    """The penalty of a state held in variables (see `keras_ewc.penalty`)."""
    return penalty_with_gradient(
        tf.convert_to_tensor(strength), _tensors(precision), _tensors(anchors),
        tf.convert_to_tensor(offset), _tensors(theta),
        active=tf.convert_to_tensor(tasks) > 0)


def commit(owner, variables, values) -> None:
    """Assigns `values` to `variables` in ONE graph call (a `tf.function` traced once a
    set of variables), so a Ctrl-C (`KeyboardInterrupt`, which Python delivers between
    bytecodes, never inside a running TensorFlow call) lands before every assignment or
    after all of them: a new state is committed whole or not at all."""
    key = tuple(id(v) for v in variables)
    cached = owner.__dict__.get("_commit")
    if cached is None or cached[0] != key:
        # A tuple, not a bare tf.function attribute: kept out of SavedModel tracking.
        cached = (key, tf.function(_AssignAll(variables), autograph=False))
        owner.__dict__["_commit"] = cached
    cached[1]([tf.convert_to_tensor(x, v.dtype) for v, x in zip(variables, values)])


class _AssignAll:
    """`values` into the variables, as one traced function. A callable object, not a
    closure: TensorFlow counts retraces per function code, and every state (of every
    model in a process) traces its own, which is not the retracing it warns about."""

    def __init__(self, variables):
        self.variables = list(variables)

    def __call__(self, values):
        # Stateful ops all run (automatic control dependencies): nothing to return.
        for v, x in zip(self.variables, values):
            v.assign(x)


def _tensors(variables) -> list:
    return [tf.convert_to_tensor(v) for v in variables]
