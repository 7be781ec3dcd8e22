"""The layer-local path: per-example gradients of one layer alone, for layers no kernel covers.

In the one recorded forward pass (`fast.record`), a layer without a kernel keeps each
call's inputs (the arguments Keras passed to its `call`) and its outputs; the term columns
are back-propagated to those outputs together with the kernels' pre-activations. Example
n's gradient of the layer's variables for term t is then the vector-Jacobian product of
the layer alone on example n's inputs, with example n's output gradient for term t as
cotangent, summed over the layer's calls and only then squared:

    Σ_n Σ_t (Σ_c J_c[n]ᵀ g_c[t, n])²

The products are vectorised over (t, n) pairs (`tf.vectorized_map`, recurrent layers'
loops included; `tf.map_fn` where pfor cannot vectorise) in chunks bounded by memory
(`kernels._common.BUDGET`). The work is a layer's, not the network's.

Which layer: the innermost that owns the variable (holds it while none of its children
does), as the cheapest call to re-run; a recurrent layer owns its cell's variables (the
cell runs inside the recurrence's loop, where nothing can be recorded). While recorded,
the layer's `call` reads the variables through a `keras.StatelessScope` that maps them to
stopped values, so a gradient the tape still finds for them reveals a read outside the
layer's calls (a tied weight, or a read the scope does not see). Those variables take the
whole-network reference path, as do variables owned by several layers, the variables of
stateful layers, and layers called where the rows are not examples (inside a loop body or
nested function, on a tensor whose leading axis is not the batch, returning a tensor
whose leading axis is not the batch). A layer's outputs must carry all it contributes to
the model's outputs (as for any Keras layer); like every path, the rows of a batch must
not interact (inference mode).
"""

from __future__ import annotations

import keras

from keras_ewc import _private
from keras_ewc._tensorflow import tf
from keras_ewc.fisher.kernels import _common

NAME = "layer-local"
"""The path's name in `kernel_paths` and `fisher_diagonal(..., return_paths=True)`."""


def plan(model, variables, layers) -> list:
    """`[(layer, [variables])]`: the layers whose own requested variables go layer-local.

    `layers` is `fast.plan(model, variables)`; the variables it claims stay with kernels.
    """
    wanted = {id(v) for v in variables}
    claimed = {id(v) for _, _, params in layers for v in params.values()}
    everything = _private.flatten_layers(model)
    in_loop = set()  # layers a recurrent layer runs inside its loop (its cell)
    for layer in everything:
        if isinstance(layer, keras.layers.RNN):
            in_loop.update(id(inner) for inner in _private.flatten_layers(layer)
                           if inner is not layer)
    owners = {}
    for layer in everything:
        if id(layer) in in_loop or not getattr(layer, "built", False):
            continue
        for v in _own_variables(layer):
            owners.setdefault(id(v), []).append((layer, v))
    found = {}
    for key, entries in owners.items():
        if key not in wanted or key in claimed or len(entries) != 1:
            continue  # several owners: a shared weight, for the reference path
        layer, v = entries[0]
        if _supports(layer):
            found.setdefault(id(layer), (layer, []))[1].append(v)
    return list(found.values())


def check_stateless(model, variables) -> None:
    """Refuses a stateful layer (a recurrent layer with `stateful=True`) among `variables`'
    owners: its state carries over from batch to batch, so its rows are not independent
    examples, and no path can give per-example gradients."""
    wanted = {id(v) for v in variables}
    for layer in _private.flatten_layers(model):
        if getattr(layer, "stateful", False) and any(
                id(v) in wanted for v in getattr(layer, "trainable_variables", [])):
            raise ValueError(
                f"Expected layers without state carried between batches. Received the "
                f"stateful layer {layer.name!r} ({type(layer).__name__}, stateful=True): "
                "each example's Fisher must not depend on the examples before it. Build "
                "the same model with stateful=False, copy the weights into it "
                "(`set_weights`), and compute the Fisher on that model."
            )


def _own_variables(layer) -> list:
    if isinstance(layer, keras.layers.RNN):
        return list(layer.trainable_variables)
    inner = {id(v) for child in _private.child_layers(layer)
             for v in getattr(child, "trainable_variables", [])}
    return [v for v in layer.trainable_variables if id(v) not in inner]


def _supports(layer) -> bool:
    return (not getattr(layer, "stateful", False)  # refused by `check_stateless`
            and not _private.has_instance_call(layer)
            and _private.remat_mode(layer) is None)


class Calls:
    """What the recorder keeps of one layer-local layer: its calls and stopped values."""

    def __init__(self, layer, variables):
        self.layer = layer
        self.variables = variables
        self.stopped = None
        self.calls = []  # [(flat inputs, structure of (args, kwargs), [output indices])]
        self.outputs = []  # the watched float outputs of every call, in order
        self.failed = False  # a call whose outputs are not per example


def wrap(recorder, entry: Calls, original):
    """The recorded `call` of a layer-local layer (see `fast.Recorder`)."""

    def call(*args, **kwargs):
        flat = tf.nest.flatten((args, kwargs))
        if not _recordable(recorder, flat):
            return original(*args, **kwargs)  # reads the variables: a leak, found later
        # The layer's variables read as stopped values; layer-local layers nested in this
        # one keep the outer mappings.
        outer = recorder.local_mapping
        mapping = outer + list(zip(entry.variables, entry.stopped))
        recorder.local_mapping = mapping
        try:
            with keras.StatelessScope(mapping, initialize_variables=False):
                out = original(*args, **kwargs)
        finally:
            recorder.local_mapping = outer
        indices = []
        for i, t in enumerate(tf.nest.flatten(out)):
            if isinstance(t, tf.Tensor) and t.dtype.is_floating:
                if t.shape.rank is None or t.shape.rank < 1 or t.shape[0] != recorder.batch_size:
                    entry.failed = True
                # Watched before anything uses it, so that the ops after it are recorded.
                recorder.tape.watch(t)
                entry.outputs.append(t)
                indices.append(i)
            elif tf.is_tensor(t) and not isinstance(t, tf.Tensor):
                # A ragged or sparse output cannot be watched as one tensor: what flows
                # through it would be missed, so the whole-network path takes the layer.
                entry.failed = True
        if not indices:
            entry.failed = True  # nothing differentiable to back-propagate to
        entry.calls.append((flat, tf.nest.map_structure(lambda _: 0, (args, kwargs)),
                            indices))
        return out

    return call


def _recordable(recorder, flat) -> bool:
    tensors = [t for t in flat if tf.is_tensor(t)]
    return (
        recorder.batch_size is not None
        and tf.compat.v1.get_default_graph() is recorder.graph
        and bool(tensors)
        and all(isinstance(t, tf.Tensor) and t.shape.rank is not None and t.shape.rank >= 1
                and t.shape[0] == recorder.batch_size for t in tensors)
    )


def local_sums(entries, grads) -> dict:
    """`{id(v): Σ_n Σ_t (Σ_c J_c[n]ᵀ g_c[t, n])²}` for each entry's variables.

    `entries` are the `Calls` kept (no leak, no failed call); `grads` lists the
    `[T, B, ...]` gradients at every entry's outputs, in order.
    """
    sums = {}
    for entry in entries:
        part, grads = grads[: len(entry.outputs)], grads[len(entry.outputs):]
        values = _layer_sums(entry, part) if entry.calls else [
            tf.zeros(v.shape, tf.float32) for v in entry.variables]
        sums.update({id(v): s for v, s in zip(entry.variables, values)})
    return sums


def _layer_sums(entry, grads):
    layer, variables, stopped = entry.layer, entry.variables, entry.stopped
    terms = int(grads[0].shape[0])
    batch = int(grads[0].shape[1])
    per_call = []  # for each call: (indices of its tensor inputs, its grads' positions)
    xs = []
    start = 0
    for flat, _, indices in entry.calls:
        positions = [i for i, t in enumerate(flat) if tf.is_tensor(t)]
        per_call.append((positions, list(range(len(xs), len(xs) + len(positions))),
                         list(range(start, start + len(indices)))))
        xs += [flat[i] for i in positions]
        start += len(indices)

    def one(x_n, g_n):
        """The squared gradient of one (term, example) pair: its inputs and cotangents."""
        values = [tf.identity(s) for s in stopped]
        with tf.GradientTape() as tape:
            tape.watch(values)
            outs = []
            with keras.StatelessScope(list(zip(variables, values)), initialize_variables=False):
                for (flat, structure, indices), (positions, slots, _) in zip(entry.calls,
                                                                            per_call):
                    flat = list(flat)
                    for i, s in zip(positions, slots):
                        flat[i] = x_n[s][None]
                    args, kwargs = tf.nest.pack_sequence_as(structure, flat)
                    found = tf.nest.flatten(layer(*args, **kwargs))
                    outs += [found[i] for i in indices]
        cotangents = [tf.cast(g[None], o.dtype) for g, o in zip(g_n, outs)]
        found = tape.gradient(outs, values, output_gradients=cotangents,
                              unconnected_gradients="zero")
        return [tf.square(tf.cast(g, tf.float32)) for g in found]

    signature = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    # (t, n) pairs flattened to one axis i = t B + n: one forward and backward pass a pair,
    # a graph whose size does not grow with T.
    count = terms * batch
    # Floats a pair holds, as an estimate: its gradients, and a few copies of its inputs
    # and outputs for the activations kept for the backward pass.
    per_pair = sum(int(v.shape.num_elements()) for v in variables)
    per_pair += 4 * sum(int(x.shape[1:].num_elements() or 1) for x in xs)
    per_pair += 4 * sum(int(g.shape[2:].num_elements() or 1) for g in grads)
    chunk = max(1, min(count, _common.BUDGET // max(1, per_pair)))
    chunks = -(-count // chunk)
    flat_grads = [tf.reshape(g, [count] + g.shape[2:].as_list()) for g in grads]
    if chunks * chunk > count:
        # Zero cotangents: padded pairs add exactly nothing.
        flat_grads = [tf.concat([g, tf.zeros([chunks * chunk - count] + g.shape[1:].as_list(),
                                             g.dtype)], 0) for g in flat_grads]

    def chunk_sums(k):
        index = k * chunk + tf.range(chunk)
        x_part = [tf.gather(x, index % batch) for x in xs]
        g_part = [tf.gather(g, index) for g in flat_grads]
        try:
            per_pair = tf.vectorized_map(lambda e: one(*e), (x_part, g_part))
        except (TypeError, ValueError, NotImplementedError):
            per_pair = tf.map_fn(lambda e: one(*e), (x_part, g_part),
                                 fn_output_signature=signature)
        return [tf.reduce_sum(p, axis=0) for p in per_pair]

    if chunks == 1:
        return chunk_sums(tf.constant(0))
    # One chunk alive at a time: the chunks run one after another.
    per_chunk = tf.map_fn(chunk_sums, tf.range(chunks), fn_output_signature=signature,
                          parallel_iterations=1)
    return [tf.reduce_sum(p, axis=0) for p in per_chunk]

