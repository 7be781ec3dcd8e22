"""The fast path: sums of squared per-example gradients from one batched pass.

Data flows one way: `plan` picks the layers whose kernel covers requested variables;
`kernel_sums` runs one forward pass with those layers recorded (each call's inputs and
pre-activation output z, through the kernel's `forward`), back-propagates the T term
columns to every recorded z (one batched backward pass a column, the results kept apart
as `_common.Columns` for the kernels that read them so; with `COLUMNS_A_ROUND` below T,
in a graph loop of rounds of that many columns, `column_loop`), and hands inputs and
gradients to each layer's kernel, which returns Σ_n Σ_t (∂ terms[n, t] / ∂ v)² (summed
over the rounds).

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

    def sums_of(grads):
        """The kernels' and the layer-local path's sums from the gradients at `zs` and
        `outputs` (of some or all of the term columns)."""
        grads, local_grads = grads[: len(zs)], grads[len(zs):]
        local_grads = [_stacked(g) for g in local_grads]
        sums = {}
        for layer, kernel, params, calls in fast:
            part, grads = grads[: len(calls)], grads[len(calls):]
            if not kernels.reads_columns_apart(kernel):
                part = [_stacked(g) for g in part]
            values = (checks.checked_sum_squared(layer, kernel, params,
                                                 [r for r, _ in calls], part)
                      if calls else {})
            for name, v in params.items():
                value = values[name] if name in values else tf.zeros(v.shape, tf.float32)
                sums[id(v)] = tf.cast(value, tf.float32)
        sums.update(local_module.local_sums(kept_local, local_grads))
        return sums

    targets = zs + outputs
    if targets and looped(terms):
        owned = ([v for _, _, params, _ in fast for v in params.values()]
                 + [v for entry in kept_local for v in entry.variables])
        sums = column_loop(tape, columns, targets, owned, sums_of)
    else:
        sums = sums_of(column_grads(tape, terms, columns, total, targets, loops, apart=True)
                       if targets else [])
    del tape
    return sums


def _stacked(g):
    """`[T, *z]` as one tensor, for a kernel (or the layer-local path) that takes tensors.
    (Not `Columns.stacked`: tests make that raise, to catch a kernel that stacks.)"""
    if not isinstance(g, _common.Columns):
        return g
    return g.columns[0][None] if len(g) == 1 else tf.stack(g.columns)


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


def looped(terms) -> bool:
    """Whether `kernel_sums` takes the `[B, T]` terms' columns in rounds of a graph loop
    (`column_loop`; `loops_over`)."""
    count = terms.shape[1]
    return count is not None and loops_over(int(count))


def loops_over(count: int) -> bool:
    """Whether T = `count` term columns run in rounds of `column_loop`:
    `COLUMNS_A_ROUND` < T <= `COLUMNS_AT_A_TIME` (one round is unrolled:
    `column_grads(apart=True)`)."""
    return COLUMNS_A_ROUND < count <= COLUMNS_AT_A_TIME


_BODIES = "_keras_ewc_column_loops"
"""The attribute of a traced graph holding its `column_loop` bodies (by loop): on the
graph itself, not in a weak dictionary keyed by it, as a body holds the graph through its
captures (the entry would never be freed)."""


def column_loop(tape, columns, targets, owned, sums_of) -> dict:
    """`{id(v): Σ_t sums_of(column t's gradients at targets)[id(v)]}` for `v` in `owned`.

    A `tf.while_loop` over the T term columns in rounds of at most `COLUMNS_A_ROUND`, one
    round at a time: a round back-propagates its columns to every target (a batched
    backward pass a column) and hands their gradients to the kernels as a
    `_common.Columns`; the sums add up across rounds (every kernel's sum is a sum over
    the terms; a column past the last, in the last round, is zeros, and costs a backward
    pass: 5 columns take two rounds of 3). The graph holds a round's backward passes and
    kernel calls, not T of them, and only a round's columns are alive at once: unrolled,
    the exact Fisher of MobileNetV2 traced 27,866 ops and ResNet50's peaked at 8.3 GB.
    `loop_bodies` gives the body to the memory count."""
    count = int(columns.shape[0])
    rounds = -(-count // COLUMNS_A_ROUND)
    width = -(-count // rounds)  # columns a round; a column past the last is zeros
    outer = tf.compat.v1.get_default_graph()
    if not hasattr(outer, _BODIES):
        setattr(outer, _BODIES, {})
    key = object()

    def body(r, totals):
        grads = [tape.gradient(columns, targets,
                               output_gradients=tf.one_hot(r * width + j, count),
                               unconnected_gradients="zero") for j in range(width)]
        for column in grads:  # their static shapes can be lost inside the loop
            for g, z in zip(column, targets):
                g.set_shape(z.shape)
        sums = sums_of([_common.Columns(g) for g in zip(*grads)])
        getattr(outer, _BODIES)[key] = tf.compat.v1.get_default_graph()
        return r + 1, [a + sums[id(v)] for a, v in zip(totals, owned)]

    _, totals = tf.while_loop(
        lambda r, _: r < rounds, body,
        (tf.constant(0), [tf.zeros(v.shape, tf.float32) for v in owned]),
        parallel_iterations=1, maximum_iterations=rounds)
    return {id(v): s for v, s in zip(owned, totals)}


def loop_bodies(graph) -> list:
    """The bodies of the `column_loop`s traced in `graph` (FuncGraphs, one each)."""
    return list(getattr(graph, _BODIES, {}).values())


COLUMNS_A_ROUND = 16
"""The most term columns a round of `column_loop` back-propagates (and its kernels read);
T columns up to this many are unrolled in one round (`column_grads(apart=True)`). At 16
(the default) every T up to `COLUMNS_AT_A_TIME` is unrolled: no loop. At 3, one backward
pass and the kernels' calls are traced three times, not T, and three columns' gradients
are alive at once, but the kernels' work on a layer's inputs (patches, transposes, the
pairs form's input products) is repeated once a round. One exact step of 64 examples,
side by side in fresh processes (docs/fisher_speed.md), rounds of 3 against the T = 9
columns unrolled: first call (trace + first run) 19 s against 33 s on MobileNetV2, 34 s
against 50 s on EfficientNetB0, 73 s against 90 s on ResNet50; peak memory 1.7 against
2.6, 3.0 against 5.5, 4.3 against 8.3 GB; the steady step 9%, 15% and 5% slower. Through
`fisher_diagonal` (the zoo, automatic batches, which the loop's smaller memory count
made larger) the exact Fisher came out 12–20% slower in CPU time for 8–10% less memory,
so the loop is not the default. Set 3 where the trace or the memory matters more."""


COLUMNS_AT_A_TIME = 16
"""Up to this many term columns, they are back-propagated one at a time (in rounds of
`column_loop`, or unrolled by `column_grads(apart=True)`) and the results kept apart;
above it (and at 0), pfor's vectorised jacobian. With 9 columns one at a time was as fast
or faster on every model measured (MobileNetV2 and ResNet50 1.6× faster;
docs/fisher_speed.md). Unrolled, the graph held a backward pass a column: on a small MLP
with 99 columns it traced 15× the ops of pfor's (5.2 s against 0.35 s); in rounds it
holds `COLUMNS_A_ROUND`, but 33 rounds against pfor's one vectorised pass was not
measured. 16 covers the exact Fisher of up to 17 classes."""


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
