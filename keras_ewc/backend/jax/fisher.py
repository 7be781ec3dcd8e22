"""The Fisher engine on JAX: sums of squared per-example gradients from one batched pass.

The same method as the TensorFlow engine (`keras_ewc.fisher.fast`), in JAX's terms:

- the model runs through a `keras.StatelessScope` that maps every weight to a value
  passed into the jitted step (a cached step that read the variables themselves would
  freeze them as constants: a second consolidation after training must see the new
  weights);
- each layer a kernel covers runs the kernel's `forward` (its maths in `keras.ops`, the
  same code as on TensorFlow), and a zero "probe" is added to its pre-activation output
  z; one `jax.vjp` with respect to the probes gives every example's gradient at every z,
  vectorised over the T term columns (`jax.vmap` of the pullback), and the kernel turns
  inputs and gradients into Σ_n Σ_t (∂ terms[n, t] / ∂ v)²;
- each other layer that owns requested variables goes layer-local: a probe on its
  outputs, and the layer alone re-run per example (`jax.vmap`) to pull those gradients
  back to its own variables, in chunks of examples bounded by memory;
- what is left (a weight read outside its layer's calls: tied weights) takes the
  reference path, the whole network per example.

Which layer reads which variable is seen through the scope (`_ReadScope`): JAX gives
zeros, never None, for an unused gradient, so a read outside a layer's recorded calls is
found by watching reads, not by looking for a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_ewc import _private
from keras_ewc.fisher import engine, kernels
from keras_ewc.fisher import local as local_module
from keras_ewc.fisher.kernels import _common

# Most float32 elements one chunk of per-example gradients may hold (as the kernels').
BUDGET = _common.BUDGET


class _ReadScope(keras.StatelessScope):
    """A `StatelessScope` that tells `on_read` which variable each read is of.

    `StatelessScope.get_current_value` is the documented way a variable's value is
    looked up inside the scope (`Variable.value`); the engine's test pins that reads
    reach it.
    """

    def __init__(self, mapping, on_read=None):
        super().__init__(state_mapping=mapping)
        self.on_read = on_read

    def get_current_value(self, variable):
        if self.on_read is not None:
            self.on_read(variable)
        return super().get_current_value(variable)


def _is_array(t) -> bool:
    return isinstance(t, (jax.Array, np.ndarray)) or hasattr(t, "aval")


class _Recorder:
    """Replaces the `call` of the kernel and layer-local layers during one forward pass.

    With `probes=None` it only collects the probes' shapes (and which calls could not be
    recorded); with probes, it adds probe i to the i-th recorded output.
    """

    def __init__(self, kernel_layers, local_layers, batch_size, probes=None):
        self.kernel_layers = kernel_layers
        self.local_layers = local_layers
        self.batch_size = batch_size
        self.probes = probes
        self.shapes = []
        self.kernel_calls = {id(layer): [] for layer, _, _ in kernel_layers}
        self.local_calls = {id(layer): [] for layer, _ in local_layers}
        self.failed = set()  # layer-local layers with a call whose rows are not examples
        self.inside = []  # ids of the layers whose recorded call is running
        self.owner = {}
        for layer, _, params in kernel_layers:
            self.owner.update({id(v): id(layer) for v in params.values()})
        for layer, variables in local_layers:
            self.owner.update({id(v): id(layer) for v in variables})
        self.leaked = set()  # variables read outside their layer's recorded calls

    def on_read(self, variable):
        owner = self.owner.get(id(variable))
        if owner is not None and owner not in self.inside:
            self.leaked.add(id(variable))

    def _probe(self, z):
        index = len(self.shapes)
        self.shapes.append(jax.ShapeDtypeStruct(z.shape, jnp.float32))
        if self.probes is None:
            return z
        return z + self.probes[index].astype(z.dtype)

    def _per_example(self, t) -> bool:
        return _is_array(t) and len(t.shape) >= 1 and t.shape[0] == self.batch_size

    def __enter__(self):
        for layer, kernel, _ in self.kernel_layers:
            _private.set_instance_call(layer, self._kernel_call(layer, kernel, layer.call))
        for layer, _ in self.local_layers:
            _private.set_instance_call(layer, self._local_call(layer, layer.call))
        return self

    def __exit__(self, *exc):
        for layer, _, _ in self.kernel_layers:
            _private.restore_instance_call(layer)
        for layer, _ in self.local_layers:
            _private.restore_instance_call(layer)
        return False

    def _kernel_call(self, layer, kernel, original):
        def call(*args, **kwargs):
            if not (args and self._per_example(args[0])):
                return original(*args, **kwargs)  # its reads count as leaks
            self.inside.append(id(layer))
            try:
                result = kernel.forward(layer, args, kwargs)
                if result is None:
                    self.inside.pop()
                    return original(*args, **kwargs)
                record, z, finish = result
                index = len(self.shapes)
                z = self._probe(z)
                self.kernel_calls[id(layer)].append((record, index))
                return finish(z)
            finally:
                if self.inside and self.inside[-1] == id(layer):
                    self.inside.pop()

        return call

    def _local_call(self, layer, original):
        def call(*args, **kwargs):
            leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
            arrays = [t for t in leaves if _is_array(t)]
            if not arrays or not self._per_example(arrays[0]):
                self.failed.add(id(layer))
                return original(*args, **kwargs)
            self.inside.append(id(layer))
            try:
                out = original(*args, **kwargs)
            finally:
                self.inside.pop()
            out_leaves, out_tree = jax.tree_util.tree_flatten(out)
            indices = []
            for i, y in enumerate(out_leaves):
                if not (_is_array(y) and jnp.issubdtype(y.dtype, jnp.floating)):
                    continue
                if not self._per_example(y):
                    self.failed.add(id(layer))
                    continue
                indices.append((i, len(self.shapes)))
                out_leaves[i] = self._probe(y)
            self.local_calls[id(layer)].append((leaves, tree, indices))
            return jax.tree_util.tree_unflatten(out_tree, out_leaves)

        return call


def plan(model, variables):
    """`(kernel_layers, local_layers)` as on TensorFlow, without layers run inside a
    recurrent layer's loop (a JAX loop body is a nested trace: its values cannot be
    recorded from outside)."""
    from keras_ewc.fisher import fast

    in_loop = set()
    for layer in _private.flatten_layers(model):
        if isinstance(layer, keras.layers.RNN):
            in_loop.update(id(inner) for inner in _private.flatten_layers(layer)
                           if inner is not layer)
    kernel_layers = [entry for entry in fast.plan(model, variables)
                     if id(entry[0]) not in in_loop]
    local_layers = local_module.plan(model, variables, kernel_layers)
    return kernel_layers, local_layers


def sum_squared_grads(model, weights, values, variables, kernel_layers, local_layers,
                      terms_fn, inputs, extra, paths=None, scale=None, contract=None):
    """Per-variable Σ_n Σ_t (scale[n] ∂ terms[n, t] / ∂ v)² for one batch, in a JAX trace.

    `weights` are every variable the model reads, `values` their values (traced
    arrays); `variables` (a subset of `weights`) those to compute sums for. `paths`, a
    dict, receives each variable's path by its key; `contract`, a list, the kernels'
    value checks (`_checked`).
    """
    local_module.check_stateless(model, variables)
    batch_size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    mapping = list(zip(weights, values))
    value_of = {id(w): v for w, v in zip(weights, values)}

    def forward(probes):
        recorder = _Recorder(kernel_layers, local_layers, batch_size, probes)
        with _ReadScope(mapping, recorder.on_read), recorder:
            outputs = model(inputs, training=False)
        terms = keras.ops.cast(terms_fn(outputs, extra), "float32")
        terms = jnp.reshape(terms, (terms.shape[0], -1))
        return terms, recorder

    # A first pass finds the probes' shapes and what could not be recorded (its
    # computation is unused: XLA removes it).
    _, seen = forward(None)
    leaked = seen.leaked
    kernel_kept = []
    for layer, kernel, params in kernel_layers:
        kept = {k: v for k, v in params.items() if id(v) not in leaked}
        if kept:
            kernel_kept.append((layer, kernel, kept))
    local_kept = []
    for layer, own in local_layers:
        if id(layer) in seen.failed:
            continue
        own = [v for v in own if id(v) not in leaked]
        if own:
            local_kept.append((layer, own))

    sums = {}
    if seen.shapes:
        probes = [jnp.zeros(s.shape, s.dtype) for s in seen.shapes]

        def probed(probes):
            terms, recorder = forward(probes)
            records = {key: [r for r, _ in calls]
                       for key, calls in recorder.kernel_calls.items()}
            return terms, (records, recorder.kernel_calls, recorder.local_calls)

        terms, pullback, (records, kernel_calls, local_calls) = jax.vjp(
            probed, probes, has_aux=True)
        grads = column_grads(pullback, terms.shape, scale)
        for layer, kernel, params in kernel_kept:
            calls = kernel_calls[id(layer)]
            found = {}
            if calls:
                found = _checked(layer, kernel, params, records[id(layer)],
                                 [grads[i] for _, i in calls], contract)
            for name, v in params.items():
                value = found.get(name)
                sums[id(v)] = (jnp.zeros(v.shape, jnp.float32) if value is None
                               else jnp.reshape(value.astype(jnp.float32), v.shape))
        for layer, own in local_kept:
            calls = local_calls[id(layer)]
            sums.update(_local_sums(layer, own, calls, grads, mapping, value_of,
                                    batch_size))
    rest = [v for v in variables if id(v) not in sums]
    if paths is not None:
        local_ids = {id(v) for _, own in local_kept for v in own}
        for v in variables:
            paths[engine.variable_key(v)] = (
                "reference" if id(v) not in sums else
                local_module.NAME if id(v) in local_ids else "fast")
    if rest:
        sums.update(reference_sums(model, rest, terms_fn, inputs, extra, mapping,
                                   value_of, batch_size, scale))
    return [sums[id(v)] for v in variables]


LOOP_COLUMNS = 32
"""Up to this many term columns, one pullback a column in the traced step; beyond, one
`lax.map` over the columns (compile time stays bounded for thousands of classes)."""


def factor_sums(model, weights, values, layers, terms_fn, inputs, extra, scale):
    """The Kronecker factors' per-batch sums (`keras_ewc.fisher.kronecker.factor_shapes`)
    for the factored `layers`, from one recorded pass, inside a JAX trace."""
    from keras_ewc.fisher import kronecker

    batch_size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    mapping = list(zip(weights, values))

    def forward(probes):
        recorder = _Recorder(layers, [], batch_size, probes)
        with _ReadScope(mapping, recorder.on_read), recorder:
            outputs = model(inputs, training=False)
        terms = keras.ops.cast(terms_fn(outputs, extra), "float32")
        return jnp.reshape(terms, (terms.shape[0], -1)), recorder

    _, seen = forward(None)
    for layer, _, params in layers:
        if any(id(v) in seen.leaked for v in params.values()):
            raise kronecker.no_factors_error(layer, model)
    records, grads = [[] for _ in layers], []
    if seen.shapes:
        probes = [jnp.zeros(s.shape, s.dtype) for s in seen.shapes]

        def probed(probes):
            terms, recorder = forward(probes)
            return terms, recorder.kernel_calls

        terms, pullback, calls = jax.vjp(probed, probes, has_aux=True)
        by_probe = column_grads(pullback, terms.shape, scale)
        records = [[r for r, _ in calls[id(layer)]] for layer, _, _ in layers]
        grads = [by_probe[i] for layer, _, _ in layers for _, i in calls[id(layer)]]
    return kronecker.sums_from_records(layers, records, grads, extra[0], batch_size)


def column_grads(pullback, shape, scale=None):
    """`[T, *probe.shape]` for each probe: the gradient of each term column, row n
    scaled by `scale[n]` (the examples' √weight).

    One pullback a column, unrolled up to `LOOP_COLUMNS` columns, else a `lax.map` over
    them (compile time stays bounded for thousands of classes). Not `jax.vmap` of the
    pullback: with jaxlib 0.10.2 on CPU it gives wrong gradients from 512 rows (sums a
    few percent low against the same data in batches of 128, which the oracle confirms),
    or crashes with a segmentation fault (tests/test_fisher_jax.py checks 1,024 rows).
    Row n of a probe's gradient is linear in row n of the cotangent, so the scale is
    applied to the gradients.
    """
    count = shape[1]

    def column(e):
        # Row n of a probe's gradient is linear in row n of the cotangent: the scale
        # goes into the [B, T] cotangent, not into every (much larger) gradient.
        cotangent = jnp.broadcast_to(e[None, :], tuple(shape))
        if scale is not None:
            cotangent = cotangent * jnp.reshape(scale, (-1, 1)).astype(cotangent.dtype)
        return pullback(cotangent)[0]

    eye = jnp.eye(count, dtype=jnp.float32)
    if count <= LOOP_COLUMNS:
        per_column = [column(eye[t]) for t in range(count)]
        return [jnp.stack(g) for g in zip(*per_column)]
    return list(jax.lax.map(column, eye))


def _checked(layer, kernel, params, records, grads, contract=None):
    """The kernel's sums, with the kernel contract checked as on TensorFlow
    (`checks.checked_sum_squared`): keys, shapes and float dtype when traced; finite and
    >= 0 in the step, on every batch. `contract`, a list, receives `(message, ok)` for
    each sum, `ok` a traced boolean; the loop reads them back with the sums and raises
    the message of the first that failed (`_raise_broken_contract`). A non-finite sum
    from non-finite inputs is not blamed on the kernel: the loop's own checks name the
    data or the weights."""
    from keras_ewc.fisher import checks

    who, values, known = checks.kernel_sums_keyed(layer, kernel, params, records, grads)
    given = [t for t in jax.tree_util.tree_leaves((records, grads))
             if _is_array(t) and jnp.issubdtype(t.dtype, jnp.floating)]

    def given_finite():
        # Only when a sum is not finite: a reduction over every gradient costs a pass
        # over the largest tensors of the step (`lax.cond` runs one branch).
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in given])) if given \
            else jnp.array(True)

    out = {}
    for name, value in values.items():
        value = jnp.asarray(value)
        shape = tuple(known[name].shape)
        what = f"its sum for variable {name!r} ({checks._name(known[name])})"
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{who}: {what} has dtype {value.dtype}; expected a float "
                             "tensor (squared gradients). Cast it, or compute it in float.")
        if int(np.prod(value.shape)) != int(np.prod(shape)) or (
                len(value.shape) == len(shape) and tuple(value.shape) != shape):
            raise ValueError(f"{who}: {what} has shape {tuple(value.shape)}; expected "
                             f"{shape}, the variable's shape (sum over the batch and the "
                             "terms).")
        if contract is not None:
            finite = jnp.all(jnp.isfinite(value))
            ok = jnp.logical_not(jnp.any(value < 0)) & jax.lax.cond(
                finite, lambda: jnp.array(True),
                lambda: jnp.logical_not(given_finite()))
            contract.append((checks.broken_contract_message(who, what), ok))
        out[name] = value
    return out


def _and_flags(flags, pairs) -> dict:
    """A copy of `flags` (`{message: ok}`) with each `(message, ok)` of `pairs` and-ed in."""
    out = dict(flags)
    for message, ok in pairs:
        out[message] = ok & out[message] if message in out else ok
    return out


def _raise_broken_contract(pending):
    """Raises the ValueError of the first kernel sum that broke the contract, from the
    flags the steps returned (`{message: ok}`, and-ed over the batches; one read-back,
    at the end)."""
    for message, ok in pending.items():
        if not bool(np.asarray(ok)):
            raise ValueError(message)


def _chunk_size(per_example: int, batch_size: int) -> int:
    return max(1, min(batch_size, BUDGET // max(1, per_example)))


def _over_chunks(fn, batch_size, per_example, *tensors):
    """Σ over chunks of examples of `fn(*chunk)` (each tensor split along axis 1 when it
    is a `[T, B, ...]` cotangent, else axis 0), memory-bounded, as one `lax.map`."""
    size = _chunk_size(per_example, batch_size)
    if size >= batch_size:
        return fn(*tensors)
    count = -(-batch_size // size)
    padded = count * size

    def split(t, axis):
        pad = [(0, 0)] * t.ndim
        pad[axis] = (0, padded - batch_size)
        t = jnp.pad(t, pad)  # zero cotangents: the padding adds nothing
        t = jnp.reshape(t, t.shape[:axis] + (count, size) + t.shape[axis + 1:])
        return jnp.moveaxis(t, axis, 0)

    parts = [split(t, axis) for t, axis in tensors]
    partial = jax.lax.map(lambda args: fn(*[(a, ax) for a, (_, ax) in zip(args, tensors)]),
                          parts)
    return jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), partial)


def _per_example_squares(apply, params, example_leaves, cotangents, batch_size):
    """Σ_n Σ_t (pullback of `apply` at example n with cotangent t)², for each param.

    `apply(params, leaves)` maps params and one example's leaves (leading axis 1) to a
    list of outputs; `example_leaves` are `[B, ...]` arrays; `cotangents` one
    `[T, B, ...]` array per output.
    """
    per_example = sum(int(np.prod(p.shape)) for p in params) * int(cotangents[0].shape[0])

    def chunk(*pairs):
        leaves = [t for t, _ in pairs[: len(example_leaves)]]
        cots = [t for t, _ in pairs[len(example_leaves):]]

        def one(leaves_n, cots_n):
            leaves_n = [t[None] for t in leaves_n]
            _, pullback = jax.vjp(lambda p: apply(p, leaves_n), params)
            per_term = jax.vmap(lambda c: pullback([x[None] for x in c])[0])(cots_n)
            return [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0) for g in per_term]

        per_n = jax.vmap(one, in_axes=(0, 1))(leaves, cots)
        return [jnp.sum(s, axis=0) for s in per_n]

    tensors = [(t, 0) for t in example_leaves] + [(c, 1) for c in cotangents]
    return _over_chunks(chunk, batch_size, per_example, *tensors)


def _local_sums(layer, own, calls, grads, mapping, value_of, batch_size):
    """Layer-local sums: `layer` alone, re-run per example, for each of its calls."""
    # Which leaves of each call are per-example arrays (vmapped), which are fixed.
    plans = []
    example_leaves, cotangents = [], []
    for leaves, tree, indices in calls:
        slots = []
        for t in leaves:
            if _is_array(t) and len(t.shape) >= 1 and t.shape[0] == batch_size:
                slots.append(("example", len(example_leaves)))
                example_leaves.append(t)
            else:
                slots.append(("fixed", t))
        plans.append((tree, slots, [i for i, _ in indices]))
        cotangents.extend(grads[j] for _, j in indices)
    others = [(w, v) for w, v in mapping if all(w is not o for o in own)]

    def apply(params, leaves_n):
        outs = []
        with _ReadScope(others + list(zip(own, params))):
            for tree, slots, wanted in plans:
                leaves = [leaves_n[v] if kind == "example" else v for kind, v in slots]
                args, kwargs = jax.tree_util.tree_unflatten(tree, leaves)
                out_leaves = jax.tree_util.tree_leaves(layer.call(*args, **kwargs))
                outs.extend(out_leaves[i].astype(jnp.float32) for i in wanted)
        return outs

    params = [value_of[id(v)] for v in own]
    squares = _per_example_squares(apply, params, example_leaves, cotangents, batch_size)
    return {id(v): s for v, s in zip(own, squares)}


def reference_sums(model, variables, terms_fn, inputs, extra, mapping, value_of,
                   batch_size, scale=None):
    """The whole network per example, for `variables` (exact for any layer)."""
    others = [(w, v) for w, v in mapping if all(w is not o for o in variables)]
    x_leaves, x_tree = jax.tree_util.tree_flatten(inputs)
    e_leaves, e_tree = jax.tree_util.tree_flatten(extra)
    count = len(x_leaves)

    def apply(params, leaves_n):
        with _ReadScope(others + list(zip(variables, params))):
            outputs = model(jax.tree_util.tree_unflatten(x_tree, leaves_n[:count]),
                            training=False)
        extra_n = jax.tree_util.tree_unflatten(e_tree, leaves_n[count:])
        terms = keras.ops.cast(terms_fn(outputs, extra_n), "float32")
        return [jnp.reshape(terms, (1, -1))]

    params = [value_of[id(v)] for v in variables]
    # The number of terms, from the shapes alone.
    probe = jax.eval_shape(apply, params, [t[:1] for t in x_leaves + e_leaves])
    count_t = probe[0].shape[1]
    rows = jnp.ones((batch_size,), jnp.float32) if scale is None else scale
    cotangent = jnp.eye(count_t, dtype=jnp.float32)[:, None, :] * rows[None, :, None]
    squares = _per_example_squares(apply, params, x_leaves + e_leaves, [cotangent],
                                   batch_size)
    return {id(v): s for v, s in zip(variables, squares)}


def batched_sums(model, weights, values, variables, lik, inputs, extra):
    """The `"batched"` estimator: the squared gradient of the batch's weighted mean loss."""
    weight, y = extra
    value_of = {id(w): v for w, v in zip(weights, values)}
    others = [(w, v) for w, v in zip(weights, values) if all(w is not o for o in variables)]

    def loss(params):
        with _ReadScope(others + list(zip(variables, params))):
            outputs = model(inputs, training=False)
        nll = keras.ops.cast(lik.nll(outputs, y), "float32")
        total = jnp.sum(weight)
        return jnp.where(total > 0, jnp.sum(weight * nll) / jnp.where(total > 0, total, 1.0),
                         0.0)

    grads = jax.grad(loss)([value_of[id(v)] for v in variables])
    return [jnp.square(g.astype(jnp.float32)) for g in grads]


# --- the loop ---------------------------------------------------------------------------
#
# The TensorFlow loop (`keras_ewc.fisher.diagonal._Loop`) reads the data, checks it and
# keeps the progress line; on JAX only the step differs. The batch is made ready on the
# host (padding to the step's static batch size with weight-0 rows; the checks' flags in
# float64, so that the weight total, a counter, is not truncated to float32 when JAX runs
# without x64), and one jitted function a (model, variables, estimator, likelihood, batch
# size) adds the batch's sums; the weights go in as arguments.

_JAX_STEPS = __import__("weakref").WeakKeyDictionary()


def _misc_of_batch(lik, estimator, num_outputs, x, y, w, size):
    from keras_ewc.fisher import diagonal

    weights = np.array([-np.inf, -np.inf, 0.0])
    if w is not None:
        w64 = np.asarray(w, np.float64).reshape(size)
        nan = np.isnan(w64)
        weights = np.array([-np.min(np.where(nan, np.inf, w64)),
                            np.max(np.where(nan, -np.inf, w64)), float(nan.any())])
        w = np.where(np.isfinite(w64) & (w64 >= 0), w64, 0.0)
    else:
        w = np.ones([size])
    bad_inputs = any(not np.all(np.isfinite(t)) for t in jax.tree_util.tree_leaves(x)
                     if np.issubdtype(np.asarray(t).dtype, np.floating))
    bad_labels = False
    summary = np.array([-np.inf, -np.inf, 0.0, 0.0])
    if estimator in diagonal._NEEDS_LABELS:
        bad_labels = any(not np.all(np.isfinite(t)) for t in jax.tree_util.tree_leaves(y)
                         if np.issubdtype(np.asarray(t).dtype, np.floating))
        found = lik.label_summary(y, num_outputs)
        if found is not None:
            summary = np.asarray(found, np.float64)
    flags = np.concatenate([[float(np.sum(w)), float(bad_inputs), float(bad_labels)],
                            summary, weights])
    if estimator == "batched":
        flags[0] = float(flags[0] > 0)
    return w.astype(np.float32), flags


def _pad(t, size, batch_size):
    t = np.asarray(t)
    if size == batch_size:
        return t
    return np.concatenate([t, np.repeat(t[:1], batch_size - size, axis=0)], axis=0)


class Step:
    """The jitted step for one (model, variables, estimator, likelihood, batch size)."""

    def __init__(self, model, variables, lik, estimator, noise, batch_size, factored=None,
                 unrecordable=False):
        import weakref


        self.batch_size = batch_size
        self.paths = {}
        self.estimator = estimator
        self.lik = lik
        self.noise = noise
        model_ref = weakref.ref(model)
        self._rebuild = lambda: Step(model_ref(), variables, lik, estimator, noise,
                                     batch_size, factored, unrecordable=True)
        variables = list(variables)
        def terms_fn(outputs, extra):  # unweighted: √weight scales the cotangents
            target = extra[1] if len(extra) > 1 else None
            return keras.ops.cast(lik.terms(estimator, outputs, target), "float32")
        paths = self.paths
        self.weights = _weights_of(model, variables)
        weights = self.weights

        def step(values, totals, inputs, w, target, key):
            model = model_ref()
            if estimator == "sampled":
                target = jax.random.uniform(key, (batch_size,) + tuple(noise),
                                            minval=0.0, maxval=1.0)
            extra = (w,) if target is None else (w, target)
            if factored is not None:
                sums = factor_sums(model, weights, values, factored, terms_fn, inputs,
                                   extra, scale=jnp.sqrt(w))
                return ([a if b is None else a + b.astype(jnp.float32)
                         for a, b in zip(totals, sums)], {})
            contract = []
            if estimator == "batched":
                sums = batched_sums(model, weights, values, variables, lik, inputs, extra)
                paths.update({engine.variable_key(v): "batched" for v in variables})
            else:
                kernel_layers, local_layers = ([], []) if unrecordable else plan(model,
                                                                              variables)
                sums = sum_squared_grads(model, weights, values, variables, kernel_layers,
                                         local_layers, terms_fn, inputs, extra, paths,
                                         scale=jnp.sqrt(w), contract=contract)
            # Keyed by message (static strings): a trace for another input signature
            # may check other layers, or the same in another order.
            return ([a + b.astype(jnp.float32) for a, b in zip(totals, sums)],
                    _and_flags({}, contract))

        self.jitted = jax.jit(step)
        self.unrecordable = unrecordable
        self.variables = variables
        self.factored = factored
        if factored is not None:
            from keras_ewc.fisher import kronecker

            self.factored_shapes = kronecker.factor_shapes(factored)

    def accepts(self, batch) -> bool:
        return True  # jit traces again for another input signature

    def per_example_bytes(self, batch, estimator) -> int:
        """Bytes of the step's batch-sized values, per example, from its jaxpr (traced,
        not compiled or run): every value with the batch as one of its first two axes,
        live or not, as the TensorFlow engine counts its graph's tensors (an upper
        bound of the peak; the bodies of loops are not counted)."""
        from keras_ewc.fisher import diagonal

        if getattr(self, "_per_example_bytes", None) is not None:
            return self._per_example_bytes
        x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
        size = self.batch_size

        def spec(t):
            t = np.asarray(t) if not hasattr(t, "dtype") else t
            dtype = np.dtype(getattr(t.dtype, "as_numpy_dtype", t.dtype))
            return jax.ShapeDtypeStruct((size,) + tuple(t.shape[1:]), dtype)

        target = (jax.tree_util.tree_map(spec, y) if estimator in diagonal._NEEDS_LABELS
                  else None)
        jaxpr = jax.make_jaxpr(self.jitted)(
            [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in self.weights],
            [jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for v in self.variables]
            if self.factored is None else
            [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in self.factored_shapes],
            jax.tree_util.tree_map(spec, x), jax.ShapeDtypeStruct((size,), jnp.float32),
            target, jax.random.PRNGKey(0))
        self._per_example_bytes = _per_example_bytes(jaxpr, size)
        return self._per_example_bytes

    def function(self, state, batch, seed):
        from keras_ewc.fisher import diagonal

        totals, (misc, pending) = state
        x, y, w = keras.utils.unpack_x_y_sample_weight(batch)
        to_np = lambda t: None if t is None else np.asarray(t)  # noqa: E731
        x, y, w = (jax.tree_util.tree_map(to_np, t) for t in (x, y, w))
        size = int(jax.tree_util.tree_leaves(x)[0].shape[0])
        weight, data_flags = _misc_of_batch(self.lik, self.estimator, self.num_outputs,
                                            x, y, w, size)
        batch_size = self.batch_size
        x = jax.tree_util.tree_map(lambda t: _pad(t, size, batch_size), x)
        weight = np.concatenate([weight, np.zeros([batch_size - size], np.float32)])
        target = None
        if self.estimator in diagonal._NEEDS_LABELS:
            target = jax.tree_util.tree_map(lambda t: _pad(t, size, batch_size), y)
        seed = np.asarray(seed).astype(np.int64)
        key = jax.random.fold_in(jax.random.PRNGKey(int(seed[0]) % (2**32)),
                                 int(seed[1]) % (2**31))
        x, weight, target = _distribute((x, weight, target))
        values = [v.value for v in self.weights]
        try:
            totals, flags = self.jitted(values, totals, x, weight, target, key)
        except jax.errors.UnexpectedTracerError:
            if self.unrecordable or self.factored is not None:
                raise
            # A recorded layer was called inside a loop body of the model's own
            # (`keras.ops.scan`, `fori_loop`): its values live in the loop's trace and
            # cannot be recorded from outside. Every variable then takes the reference
            # path, exact for any layer (`paths` says so, and `fallback=` applies).
            # (A new step: the failed trace's function must not be traced again.)
            fresh = self._rebuild()
            totals, flags = fresh.jitted(values, totals, x, weight, target, key)
            self.jitted, self.unrecordable = fresh.jitted, True
            self.paths.clear()
            self.paths.update(fresh.paths)  # the loop holds this dict
        # The kernels' checks stay on the device until the loop's one read-back: a
        # flag a check (its message), and-ed over the batches.
        return totals, (diagonal._combine_np(misc, data_flags),
                        _and_flags(pending, flags.items()))


def _distribute(batch):
    """The batch laid out as the Keras distribution asks (`keras.distribution.DataParallel`
    splits its rows over the devices); the jitted step then runs on every device, and the
    sums over the batch are all-reduced by XLA. Unchanged without a distribution."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return batch

    def place(t):
        return keras.distribution.distribute_tensor(
            t, distribution.get_data_layout(tuple(t.shape)))

    return jax.tree_util.tree_map(place, batch)


def _devices_of_the_batch() -> int:
    """How many parts the Keras distribution cuts a batch into (1 without one)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))


def _all_equations(jaxpr):
    """The equations of `jaxpr` and of the jaxprs called from it (a jitted step is one
    `pjit` equation), but not the bodies of loops (`lax.map`, `scan`, `while`), whose
    values live one iteration at a time."""
    for eqn in jaxpr.eqns:
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name in ("pjit", "jit", "closed_call", "custom_jvp_call",
                                  "custom_vjp_call") and inner is not None:
            yield from _all_equations(getattr(inner, "jaxpr", inner))
        else:
            yield eqn


def compiled_forward(model):
    """`fn(x) -> model(x, training=False)`, jitted with the weights passed in (so it
    never freezes them); for the Fisher's check of the first rows' outputs."""
    import weakref

    model_ref = weakref.ref(model)

    @jax.jit
    def forward(values, x):
        model = model_ref()
        with keras.StatelessScope(list(zip(model.weights, values))):
            return model(x, training=False)

    def call(x):
        x = jax.tree_util.tree_map(np.asarray, x)
        return forward([v.value for v in model_ref().weights], x)

    return call


def gradient_bytes(model, variables, x, batch_size) -> int:
    """Bytes a batched gradient step's values hold an example, counted from its jaxpr
    as `Step.per_example_bytes` counts the Fisher step's: the gradient of the sum of
    `model(x, training=False)` with respect to `variables` (floating-point), at
    `batch_size` examples of `x`'s shapes (traced, not compiled or run)."""
    weights = _weights_of(model, variables)
    wanted = {id(v) for v in variables}
    trained = [i for i, v in enumerate(weights) if id(v) in wanted]

    def loss(values, others, x):
        merged = list(others)
        for i, value in zip(trained, values):
            merged[i] = value
        with keras.StatelessScope(list(zip(weights, merged))):
            out = model(x, training=False)
        return sum(jnp.sum(t.astype(jnp.float32)) for t in jax.tree_util.tree_leaves(out))

    def spec(t):
        t = np.asarray(t) if not hasattr(t, "dtype") else t
        dtype = np.dtype(getattr(t.dtype, "as_numpy_dtype", t.dtype))
        return jax.ShapeDtypeStruct((batch_size,) + tuple(t.shape[1:]), dtype)

    avals = [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in weights]
    jaxpr = jax.make_jaxpr(jax.grad(loss))(
        [avals[i] for i in trained], avals, jax.tree_util.tree_map(spec, x))
    return _per_example_bytes(jaxpr, batch_size)


def _per_example_bytes(jaxpr, size) -> int:
    """Σ bytes of the jaxpr's values with `size` as one of their first two axes, / size
    (every value, live or not; the bodies of loops are not counted)."""
    total = 0
    for eqn in _all_equations(jaxpr.jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if shape and size in shape[:2]:
                total += int(np.prod(shape)) * np.dtype(var.aval.dtype).itemsize
    return total // max(size, 1)


def _weights_of(model, variables) -> list:
    """Every variable the model reads (its weights), then any requested one it lacks."""
    seen, out = set(), []
    for v in list(getattr(model, "weights", [])) + list(variables):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def make_loop_class():
    """The JAX loop: `diagonal._Loop` with the step above (made lazily: the loop class
    lives in `keras_ewc.fisher.diagonal`, which imports this module only on JAX)."""
    from keras_ewc.fisher import diagonal

    class Loop(diagonal._Loop):
        def _build(self, batch, size):
            noise = self._noise()
            if self.sums is not None and getattr(self.sums, "layers", None) is None:
                raise ValueError(
                    "Expected the Kronecker factors' sums on the JAX backend. Received "
                    f"custom sums {self.sums.key!r}, which run TensorFlow only.")
            if self.distributed:
                raise ValueError(
                    "Expected strategy=None on the JAX backend: `tf.distribute` strategies "
                    "run TensorFlow only. Received a strategy with several replicas.")
            if self.state is None:
                shapes = (self.sums.shapes if self.sums is not None
                          else [tuple(v.shape) for v in self.variables])
                self.state = ([jnp.zeros(shape, jnp.float32) for shape in shapes],
                              (np.array(diagonal._EMPTY_MISC, np.float64), {}))
            if self.auto:
                size = min(diagonal.AUTO_BATCH_SIZE,
                           max(diagonal.MIN_AUTO_BATCH_SIZE, 1 << (int(size) - 1).bit_length()))
            # Under a Keras distribution the batch is split over the devices: a multiple
            # of their number (padding rows have weight 0).
            parts = _devices_of_the_batch()
            size = -(-int(size) // parts) * parts
            what = (tuple(id(v) for v in self.variables) if self.sums is None
                    else ("sums", self.sums.key))
            key = (what, self.estimator, diagonal._lik_key(self.lik), noise, int(size),
                   kernels.version())
            steps = _JAX_STEPS.setdefault(self.model, {})

            def step_at(batch_size):  # the cached step of `batch_size` examples, or new
                step_key = key[:4] + (int(batch_size),) + key[5:]
                if step_key not in steps:
                    steps[step_key] = Step(self.model, self.variables, self.lik,
                                           self.estimator, noise, int(batch_size),
                                           factored=None if self.sums is None
                                           else self.sums.layers)
                steps[step_key].num_outputs = self.num_outputs
                return steps[step_key]

            # A multiple of the devices: the rows split evenly over them.
            step = (diagonal.automatic_step(
                        self, batch, size, step_at,
                        lambda step: step.per_example_bytes(batch, self.estimator), parts)
                    if self.auto else step_at(size))
            self.step = step
            self.paths = step.paths

        def _read_back(self, totals, misc):
            misc, pending = misc
            _raise_broken_contract(pending)
            finite = [bool(np.all(np.isfinite(np.asarray(t)))) for t in totals]
            return np.asarray(misc, np.float64), finite

    return Loop
