"""The fast path: sums of squared per-example gradients from one batched pass.

One forward pass runs with the supported layers' `call` temporarily replaced by their
kernel's `forward`, which returns the same outputs and records each call's inputs and
pre-activation output z. The T term columns are then back-propagated to every recorded
z at once (a batched gradient for T = 1, a vectorised jacobian over T otherwise), and
each layer's kernel turns inputs and gradients into Σ_n Σ_t (∂ terms[n, t] / ∂ v)².

A variable takes the reference path (per-example gradients, exact for any layer) when
its layer has no kernel, when its layer was called where it could not be recorded (inside
a loop body, a nested function, on a tensor whose leading axis is not the batch), or when
the variable is read anywhere outside its layer's recorded calls (shared or tied
weights): the kernels read variables through `stop_gradient`, so any gradient the tape
still finds for them reveals such a use.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_ewc.fisher import kernels


def plan(model, variables) -> list:
    """`[(layer, module, {name: variable})]` for the layers whose variables go fast."""
    wanted = {id(v) for v in variables}
    claimed = set()
    found = []
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        return found
    for layer in flatten(include_self=True, recursive=True):
        module = kernels.lookup(layer) if getattr(layer, "built", False) else None
        if module is None:
            continue
        params = {k: v for k, v in module.params(layer).items() if id(v) in wanted}
        if not params or any(id(v) in claimed for v in params.values()):
            continue
        claimed.update(id(v) for v in params.values())
        found.append((layer, module, params))
    return found


class Recorder:
    """Replaces the `call` of planned layers while the forward pass is traced."""

    def __init__(self, layers, batch_size, tape):
        self.layers = layers
        self.tape = tape
        self.batch_size = batch_size
        self.calls = {id(layer): [] for layer, _, _ in layers}

    def __enter__(self):
        self.graph = tf.compat.v1.get_default_graph()
        for layer, module, _ in self.layers:
            object.__setattr__(layer, "call", self._wrap(layer, module, layer.call))
        return self

    def __exit__(self, *exc):
        for layer, _, _ in self.layers:
            layer.__dict__.pop("call", None)
        return False

    def _recordable(self, args) -> bool:
        x = args[0] if args else None
        return (
            self.batch_size is not None
            and isinstance(x, tf.Tensor)
            and tf.compat.v1.get_default_graph() is self.graph
            and x.shape.rank is not None
            and x.shape.rank >= 1
            and x.shape[0] == self.batch_size
        )

    def _wrap(self, layer, module, original):
        def call(*args, **kwargs):
            result = module.forward(layer, args, kwargs) if self._recordable(args) else None
            if result is None:
                return original(*args, **kwargs)
            record, z, finish = result
            # Nothing upstream of z need be watched (inputs, stopped variables); watch
            # z before anything uses it, so that the ops after it are recorded.
            self.tape.watch(z)
            self.calls[id(layer)].append((record, z))
            return finish(z)

        return call


def sum_squared_grads(
    model, layers, variables, terms_fn, reference, inputs, extra, paths=None
):
    """Per-variable Σ_n Σ_t (∂ terms[n, t] / ∂ v)² for one batch (call while tracing).

    `reference(variables, inputs, extra)` computes the same for the variables no kernel
    covers. `paths`, a dict, if given, is filled with each variable's path ("fast" or
    "reference") under its `path` (or name), for tests and diagnostics.
    """
    batch_size = tf.nest.flatten(inputs)[0].shape[0]
    with tf.GradientTape(persistent=True) as tape:
        recorder = Recorder(layers, batch_size, tape)
        with recorder:
            outputs = model(inputs, training=False)
        terms = tf.cast(terms_fn(outputs, extra), tf.float32)
        terms = tf.reshape(terms, [tf.shape(terms)[0], -1])
        columns = tf.reduce_sum(terms, axis=0)
        total = tf.reduce_sum(columns)

    fast = []
    for layer, module, params in layers:
        names = list(params)
        leaks = tape.gradient(total, [params[k] for k in names])
        # A leaked variable is read outside the recorded calls; the others stay exact,
        # as the gradients at z cover every use of z.
        kept = {k: params[k] for k, g in zip(names, leaks) if g is None}
        if batch_size is not None and kept:
            fast.append((layer, module, kept, recorder.calls[id(layer)]))
    zs = [z for _, _, _, calls in fast for _, z in calls]
    grads = _column_grads(tape, terms, columns, total, zs, has_loops(model)) if zs else []
    del tape

    sums = {}
    for layer, module, params, calls in fast:
        part, grads = grads[: len(calls)], grads[len(calls):]
        if calls:
            values = module.sum_squared(layer, [r for r, _ in calls], part)
        else:
            values = {}
        for name, v in params.items():
            sums[id(v)] = values[name] if name in values else tf.zeros(v.shape, tf.float32)
    rest = [v for v in variables if id(v) not in sums]
    if paths is not None:
        for v in variables:
            paths[getattr(v, "path", v.name)] = "reference" if id(v) not in sums else "fast"
    if rest:
        sums.update(zip((id(v) for v in rest), reference(rest, inputs, extra)))
    return [tf.convert_to_tensor(sums[id(v)]) for v in variables]


def _column_grads(tape, terms, columns, total, zs, loops=False):
    """`[T, *z.shape]` for each z: the gradient of each term column summed over examples.

    Vectorised over the T columns (`tape.jacobian` with pfor); where pfor cannot
    vectorise the backward pass (`loops`: recurrent layers), one pass a column.
    """
    # Targets must be computed while the tape records: `total`, or `columns` as a whole.
    if terms.shape[1] == 1:
        return [g[None] for g in tape.gradient(total, zs, unconnected_gradients="zero")]
    if not loops:
        try:
            return tape.jacobian(columns, zs, unconnected_gradients="zero")
        except (ValueError, TypeError, NotImplementedError):
            pass
    count = int(terms.shape[1])
    per_column = [
        tape.gradient(columns, zs, output_gradients=tf.one_hot(t, count),
                      unconnected_gradients="zero")
        for t in range(count)
    ]
    return [tf.stack(list(g)) for g in zip(*per_column)]


def has_loops(model) -> bool:
    """Whether the model holds a Keras recurrent layer (a `while` loop in its graph),
    which pfor cannot vectorise: trying and failing is slow, so callers loop instead."""
    flatten = getattr(model, "_flatten_layers", None)
    layers = flatten(include_self=True, recursive=True) if flatten else []
    return any(isinstance(layer, keras.layers.RNN) for layer in layers)
