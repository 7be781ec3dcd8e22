"""The diagonal penalty on JAX, with its gradient in closed form.

The same value and gradients as autodiff of `keras_ewc.penalty.penalty_value` under a
`lax.cond` on the task count (what the step did before), but cheaper in a jitted step.
Autodiff of a conditional makes the taken branch return its residuals (θ − m and
products of it: three arrays the size of each regularised variable), which XLA must
write and read back in a second conditional for the gradient, and neither conditional
fuses with anything around it. Here the derivative is given (`jax.custom_jvp`) outside
the conditional, which computes only the value (a scalar), and the gradient
`strength * P (θ − m)` is one elementwise expression that XLA fuses into the optimizer's
update. On the benchmark's MLP (benchmarks/train_step_speed.py, JAX on CPU; CPU-time
ratios to a plain step, measured side by side in one process on a loaded 2-core
machine) a step with one consolidated task went from 1.25x to 1.16x, with 20 tasks
from 1.21x to 1.12x (the bare-penalty floor: 1.12x), with none from 1.16x to 1.02x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def penalty(strength, precision, anchors, offset, theta, tasks):
    """`strength * (½ Σ P (θ − m)² + c)` of a state with `tasks` tasks, float32.

    With no task (`tasks == 0`: a zero state) the value is 0 and every gradient is 0
    whatever the weights hold, and the value's arithmetic is skipped (a `lax.cond`,
    which runs one branch, also under `jit`), as before.

    Args are values (not variables): `strength`, `offset` float32 scalars, `precision`,
    `anchors` float32 arrays aligned with the weights `theta` (any float dtype; their
    gradients are cast back to it), `tasks` the integer task count.
    """
    return _penalty(strength, list(precision), list(anchors), offset, list(theta),
                    tasks > 0)


def _quadratic(precision, anchors, theta):
    """½ Σ P (θ − m)², in float32."""
    total = jnp.zeros((), "float32")
    for p, m, t in zip(precision, anchors, theta):
        d = t.astype("float32") - m
        total = total + jnp.sum(p * d * d)
    return 0.5 * total


def _unscaled(offset, precision, anchors, theta, active):
    """The value without the strength (the strength's derivative needs it), skipped
    with no task, and a flag: 1.0 when computed, 0.0 when skipped.

    The gradient selects on the flag, an output of the conditional, rather than on
    `active`: that makes the weights' update depend on the conditional, so XLA orders
    it after the conditional's read of the old weights and updates them in place.
    Selecting on `active` left XLA copying every weight first (1.9 MB copied a step on
    the benchmark's MLP instead of the plain step's 0.66 MB; measured 0.02-0.04x a
    plain step).
    """
    one, zero = jnp.ones((), "float32"), jnp.zeros((), "float32")
    return jax.lax.cond(active,
                        lambda: (offset + _quadratic(precision, anchors, theta), one),
                        lambda: (zero, zero))


@jax.custom_jvp
def _penalty(strength, precision, anchors, offset, theta, active):
    return strength * _unscaled(offset, precision, anchors, theta, active)[0]


def _tangent(primals, tangents):
    """The value and its directional derivative, written out: with respect to θ it is
    `strength * Σ P (θ − m) · dθ`, whose transpose (the gradient a training step takes)
    is `strength * P (θ − m)`, one elementwise expression a variable.

    Tangents that are zero (the state's, the strength's, in a training step) come as
    `SymbolicZero` and are left out, so nothing is computed for them. A JVP rule, not
    a VJP rule, so forward mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) still works.
    """
    strength, precision, anchors, offset, theta, active = primals
    d_strength, d_precision, d_anchors, d_offset, d_theta, _ = tangents
    unscaled, flag = _unscaled(offset, precision, anchors, theta, active)
    on = flag > 0
    zero = jnp.zeros((), "float32")
    # With no task every derivative is 0 whatever the weights hold (a non-finite weight
    # included): the coefficients are selected, not multiplied by the zero precision.
    d_unscaled = zero if _is_zero(d_offset) else jnp.where(on, d_offset, zero)
    for p, m, t, dp, dm, dt in zip(precision, anchors, theta, d_precision, d_anchors,
                                   d_theta):
        d = t.astype("float32") - m
        dd = None if _is_zero(dt) else dt.astype("float32")
        if not _is_zero(dm):
            dd = -dm if dd is None else dd - dm
        if dd is not None:
            d_unscaled = d_unscaled + jnp.sum(jnp.where(on, p * d, zero) * dd)
        if not _is_zero(dp):
            d_unscaled = d_unscaled + jnp.sum(jnp.where(on, 0.5 * d * d, zero) * dp)
    tangent = strength * d_unscaled
    if not _is_zero(d_strength):
        tangent = tangent + d_strength * unscaled
    return strength * unscaled, tangent


def _is_zero(tangent) -> bool:
    return isinstance(tangent, SymbolicZero)


_penalty.defjvp(_tangent, symbolic_zeros=True)
