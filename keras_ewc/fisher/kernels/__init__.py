"""Per-layer kernels for sums of squared per-example gradients, BackPACK-style.

A kernel module knows one layer kind. It says which variables it covers, re-runs the
layer's forward pass with the pre-activation output exposed, and turns the recorded
inputs and the gradients at those outputs into Σ_n Σ_t (∂ terms[n, t] / ∂ v)²:

- `LAYER`: the Keras class it handles; `METHODS`: methods a subclass must not override
  (a subclass that overrides `call` computes something else, so it is not supported).
- `supports(layer) -> bool`: whether this instance's configuration is covered.
- `params(layer) -> dict[name, variable]`.
- `forward(layer, args, kwargs) -> (record, z, finish)` or None (not covered: the
  original `call` runs): whatever the kernel needs from the inputs, the pre-activation
  output `z` (`[B, ...]`), and the function mapping z to the layer's output (its
  activation). Variables are read through `tf.stop_gradient`, so the tape sees them
  only where they are used outside this call.
- `sum_squared(layer, records, grads) -> dict[name, tensor]`: `records` and `grads`
  list the layer's calls in the forward pass; `grads[c]` is `[T, B, *z.shape[1:]]`, the
  gradients of the T term columns (summed over the batch) at the call's `z`. Row n of a
  gradient is example n's own, because terms of example n depend on example n alone.

Adding a layer kind means adding one module and one line in `_MODULES`.
"""

from __future__ import annotations

from keras_ewc.fisher.kernels import conv, dense, einsum_dense, embedding, normalization

_MODULES = (dense, einsum_dense, conv, embedding, normalization)


def registry() -> dict:
    """Maps each supported Keras layer class to its kernel module."""
    table = {}
    for module in _MODULES:
        for cls in module.LAYERS:
            table[cls] = module
    return table


def lookup(layer):
    """The kernel module for `layer`, or None when it must take the reference path.

    A subclass of a supported class qualifies only when it overrides none of the
    methods the kernel relies on (`call` first of all).
    """
    if "call" in vars(layer) or getattr(layer, "_remat_mode", None) is not None:
        return None  # a patched instance, or a rematerialised call: not plain Keras.
    table = registry()
    for cls in type(layer).__mro__:
        module = table.get(cls)
        if module is None:
            continue
        for name in ("call",) + tuple(module.METHODS):
            if getattr(type(layer), name, None) is not getattr(cls, name, None):
                return None
        return module if module.supports(layer) else None
    return None
