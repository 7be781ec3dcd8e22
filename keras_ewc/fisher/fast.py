"""The fast path: sums of squared per-example gradients from one batched pass.

Data flows one way: `plan` picks the layers whose kernel covers requested variables;
`kernel_sums` runs one forward pass with those layers recorded (each call's inputs and
pre-activation output z, through the kernel's `forward`), back-propagates the T term
columns to every recorded z (one batched backward pass a column, the T results kept
apart as `_common.Columns` for the kernels that read them so), and hands inputs and
gradients to each layer's kernel, which returns Σ_n Σ_t (∂ terms[n, t] / ∂ v)².

A planned variable is left out of the result (for the reference path) when its layer
was called where it could not be recorded (inside a loop body, a nested function, on a
tensor whose leading axis is not the batch), or when the variable is read anywhere
outside its layer's recorded calls (shared or tied weights): the kernels read variables
through `stop_gradient`, so any gradient the tape still finds for them reveals such a
use.

Variables no kernel covers may go through the same pass on the layer-local path
(`keras_ewc.fisher.local`): their layer's inputs and outputs are recorded, the columns
back-propagated to those outputs with the z's, and each layer alone re-run per example.
"""

from __future__ import annotations

from keras_ewc import _private
from keras_ewc._tensorflow import tf
from keras_ewc.fisher import checks, kernels
from keras_ewc.fisher import local as local_module
from keras_ewc.fisher.kernels import _common


def plan(model, variables) -> list:
    """`[(layer, kernel, {name: variable})]` for the layers whose variables go fast."""
    wanted = {id(v) for v in variables}
    claimed = set()
    found = []
    for layer in _private.flatten_layers(model):
        kernel = kernels.lookup(layer) if getattr(layer, "built", False) else None
        if kernel is None:
            continue
        params = {k: v for k, v in kernel.params(layer).items() if id(v) in wanted}
        if not params or any(id(v) in claimed for v in params.values()):
            continue
        claimed.update(id(v) for v in params.values())
        found.append((layer, kernel, params))
    return found


class Recorder:
    """Replaces the `call` of planned layers while the forward pass is traced."""

    def __init__(self, layers, batch_size, tape, local=()):
        self.layers = layers
        self.tape = tape
        self.batch_size = batch_size
        self.calls = {id(layer): [] for layer, _, _ in layers}
        # Layer-local layers (`local.plan`): what each keeps, and the stopped values of
        # the variables of those whose call is running (nested ones keep the outer's).
        self.local = [local_module.Calls(layer, variables) for layer, variables in local]
        self.local_mapping = []

    def __enter__(self):
        self.graph = tf.compat.v1.get_default_graph()
        for layer, kernel, _ in self.layers:
            _private.set_instance_call(layer, self._wrap(layer, kernel, layer.call))
        for entry in self.local:
            entry.stopped = [_common.stop(v) for v in entry.variables]
            _private.set_instance_call(
                entry.layer, local_module.wrap(self, entry, entry.layer.call))
        return self

    def __exit__(self, *exc):
        for layer, _, _ in self.layers:
            _private.restore_instance_call(layer)
        for entry in self.local:
            _private.restore_instance_call(entry.layer)
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

    def _wrap(self, layer, kernel, original):
        def call(*args, **kwargs):
            result = kernel.forward(layer, args, kwargs) if self._recordable(args) else None
            if result is None:
                return original(*args, **kwargs)
            record, z, finish = result
            # Nothing upstream of z need be watched (inputs, stopped variables); watch
            # z before anything uses it, so that the ops after it are recorded.
            self.tape.watch(z)
            self.calls[id(layer)].append((record, z))
            return finish(z)

        return call


def kernel_sums(model, layers, terms_fn, inputs, extra, loops=False, local=()) -> dict:
    """`{id(v): Σ_n Σ_t (∂ terms[n, t] / ∂ v)²}` for the planned variables that stay fast.

    Call while tracing; the batch size of `inputs` must be static. `local` is
    `local.plan(...)`: layers whose variables go layer-local. Variables missing from the
    result need the reference path.
    """
    batch_size = tf.nest.flatten(inputs)[0].shape[0]
    if batch_size is None:
        return {}
    tape, recorder, terms, columns, total = record(
        model, layers, terms_fn, inputs, extra, local)

    leaks = leaked(tape, total, [v for _, _, params in layers for v in params.values()]
                   + [v for e in recorder.local if not e.failed for v in e.variables])
    fast = []
    for layer, kernel, params in layers:
        # A leaked variable is read outside the recorded calls; the others stay exact,
        # as the gradients at z cover every use of z.
        kept = {k: v for k, v in params.items() if id(v) not in leaks}
        if kept:
            fast.append((layer, kernel, kept, recorder.calls[id(layer)]))
    kept_local = local_kept(recorder.local, leaks)
    zs = [z for _, _, _, calls in fast for _, z in calls]
    outputs = [y for entry in kept_local for y in entry.outputs]
    grads = (column_grads(tape, terms, columns, total, zs + outputs, loops, apart=True)
             if zs or outputs else [])
    del tape
    grads, local_grads = grads[: len(zs)], grads[len(zs):]
    local_grads = [_stacked(g) for g in local_grads]

    sums = {}
    for layer, kernel, params, calls in fast:
        part, grads = grads[: len(calls)], grads[len(calls):]
        if not kernels.reads_columns_apart(kernel):
            part = [_stacked(g) for g in part]
        values = (checks.checked_sum_squared(layer, kernel, params, [r for r, _ in calls],
                                             part) if calls else {})
        for name, v in params.items():
            value = values[name] if name in values else tf.zeros(v.shape, tf.float32)
            sums[id(v)] = tf.cast(value, tf.float32)
    sums.update(local_module.local_sums(kept_local, local_grads))
    return sums


def _stacked(g):
    """`[T, *z]` as one tensor, for a kernel (or the layer-local path) that takes tensors.
    (Not `Columns.stacked`: tests make that raise, to catch a kernel that stacks.)"""
    return tf.stack(g.columns) if isinstance(g, _common.Columns) else g


def leaked(tape, total, variables) -> set:
    """The ids of `variables` that the tape still reaches from `total` (read outside
    their layer's recorded calls), from ONE backward pass: a pass a layer cost minutes
    of tracing on deep models (106 on MobileNetV2)."""
    if not variables:
        return set()
    grads = tape.gradient(total, variables)
    return {id(v) for v, g in zip(variables, grads) if g is not None}


def local_kept(entries, leaks) -> list:
    """The layer-local entries whose variables stay layer-local: with no variable read
    outside the layer's recorded calls (its id not in `leaks`, see `leaked`) and no call
    whose outputs are not per example."""
    entries = [e for e in entries if not e.failed]
    kept = []
    for entry in entries:
        # A leaked variable goes to the reference path; the others stay exact, as the
        # gradients at the outputs cover every use inside the layer's calls.
        stay = [i for i, v in enumerate(entry.variables) if id(v) not in leaks]
        if stay:
            entry.variables = [entry.variables[i] for i in stay]
            entry.stopped = [entry.stopped[i] for i in stay]
            kept.append(entry)
    return kept


def record(model, layers, terms_fn, inputs, extra, local=()):
    """One forward pass of `model` with `layers` (and `local`) recorded, under a persistent tape.

    Call while tracing. Returns `(tape, recorder, terms, columns, total)`:
    `recorder.calls[id(layer)]` holds each recorded call's `(record, z)`, `terms` the
    `[B, T]` float32 terms, `columns` and `total` their sums over examples and over
    everything (the targets of `column_grads`). The caller deletes the tape.
    """
    batch_size = tf.nest.flatten(inputs)[0].shape[0]
    with tf.GradientTape(persistent=True) as tape:
        recorder = Recorder(layers, batch_size, tape, local)
        with recorder:
            outputs = model(inputs, training=False)
        terms = tf.cast(terms_fn(outputs, extra), tf.float32)
        terms = tf.reshape(terms, [tf.shape(terms)[0], -1])
        columns = tf.reduce_sum(terms, axis=0)
        total = tf.reduce_sum(columns)
    return tape, recorder, terms, columns, total


COLUMNS_AT_A_TIME = 16
"""Up to this many term columns, `column_grads(apart=True)` back-propagates them one at a
time and keeps the results apart; above it (and at 0), pfor's vectorised jacobian. With
9 columns one at a time was as fast or faster on every model measured (MobileNetV2 and
ResNet50 1.6× faster; docs/fisher_speed.md), but the graph holds a backward pass a
column: on a small MLP with 99 columns it traced 15× the ops of pfor's (5.2 s against
0.35 s). 16 covers the exact Fisher of up to 17 classes."""


def column_grads(tape, terms, columns, total, zs, loops=False, apart=False):
    """`[T, *z.shape]` for each z: the gradient of each term column summed over examples.

    One batched gradient for T = 1. Otherwise vectorised over the T columns
    (`tape.jacobian` with pfor), or one pass a column: where pfor cannot vectorise the
    backward pass (`loops`: recurrent layers), and with `apart` for up to
    `COLUMNS_AT_A_TIME` columns, whose results are then kept apart as `_common.Columns`,
    never stacked (kernels read them as `[T, *z.shape]`).
    """
    # Targets must be computed while the tape records: `total`, or `columns` as a whole.
    if terms.shape[1] == 1:
        return [g[None] for g in tape.gradient(total, zs, unconnected_gradients="zero")]
    at_a_time = (apart and terms.shape[1] is not None
                 and int(terms.shape[1]) <= COLUMNS_AT_A_TIME)
    if not loops and not at_a_time:
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
    if at_a_time:
        return [_common.Columns(g) for g in zip(*per_column)]
    return [tf.stack(list(g)) for g in zip(*per_column)]
