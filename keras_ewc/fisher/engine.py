"""Sums of squared per-example gradients: the one primitive every estimator needs.

Every per-example Fisher estimator reduces to the same computation. A likelihood turns
the model's outputs on a batch into a `[batch, T]` tensor of pseudo-losses ("terms")
whose per-example gradients, squared and summed over examples and terms, give the Fisher
diagonal times the number of examples:

    S_v = sum_n sum_t (d terms[n, t] / d v) ** 2        for every variable v.

`build_sum_squared_grads(model, variables, terms_fn)` returns a function
`fn(inputs, extra) -> [S_v for v in variables]` for one batch. Two paths compute it:

- the fast path (`keras_ewc.fisher.fast`): one batched forward pass records the inputs
  and pre-activation outputs of the layers that have a kernel
  (`keras_ewc.fisher.kernels`: Dense, EinsumDense, Conv1D/2D/3D, Embedding,
  LayerNormalization, BatchNormalization), one batched backward pass a term column
  (vectorised over the columns) gives the gradients there, and each kernel forms the
  sums from them without materialising per-example gradients where it can;
- the reference path, used for every other variable (layers without a kernel, subclasses
  that override `call`, weights read outside their layer's call): `tf.vectorized_map`
  over the examples of the batch, one tape per example, exact for every layer kind
  (`tf.map_fn` where pfor cannot vectorise the model, as for recurrent layers).

Both follow the same contract:

- `terms_fn(outputs, extra)` maps outputs `[B, ...]` and the per-example `extra`
  (a nest of tensors with leading dimension B, or None) to `[B, T]`, row n depending on
  example n alone; T is static.
- The model is called in inference mode (`training=False`), so dropout and batch
  normalisation act on each example alone and examples do not interact.

Memory is bounded by the batch: callers chunk the data into batches, and kernels that
form per-example gradients do so in chunks of examples (`kernels._common.BUDGET`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from keras_ewc.fisher import fast as fast_module

TermsFn = Callable[[tf.Tensor, object], tf.Tensor]
SumFn = Callable[[object, object], list]


def build_sum_squared_grads(
    model: Callable,
    variables: Sequence[tf.Variable],
    terms_fn: TermsFn,
    fast: bool = True,
) -> SumFn:
    """Returns `fn(inputs, extra)`: per-variable sums of squared per-example gradients.

    With `fast=True` (the default), the variables of layers that have a kernel take the
    fast path and all others the reference path; the result is the same either way, to
    floating-point rounding. `fast=False` forces the reference path for all variables.
    The function is traced once for each batch shape; after a call, its `paths`
    attribute maps each variable's path to the path it took ("fast" or "reference").
    """
    variables = list(variables)
    layers = fast_module.plan(model, variables) if fast else []
    if not layers:
        return build_reference(model, variables, terms_fn)

    def reference(rest, inputs, extra):
        return reference_sums(model, rest, terms_fn, inputs, extra)

    paths = {}

    @tf.function
    def fn(inputs, extra):
        return fast_module.sum_squared_grads(
            model, layers, variables, terms_fn, reference, inputs, extra, paths
        )

    fn.paths = paths
    return fn


def build_reference(
    model: Callable, variables: Sequence[tf.Variable], terms_fn: TermsFn
) -> SumFn:
    """The reference path alone, as a traced function of `(inputs, extra)`."""
    variables = list(variables)

    @tf.function(reduce_retracing=True)
    def fn(inputs, extra):
        return reference_sums(model, variables, terms_fn, inputs, extra)

    fn.paths = {getattr(v, "path", v.name): "reference" for v in variables}
    return fn


def reference_sums(model, variables, terms_fn, inputs, extra) -> list:
    """Per-example gradients from `tf.vectorized_map`, squared and summed.

    Exact for any layer; squares are summed inside the map so that only one batch of
    gradients is alive at a time.
    """
    variables = list(variables)

    def one(args):
        xi, ei = args
        xi = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), xi)
        if ei is not None:
            ei = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), ei)
        with tf.GradientTape(persistent=True) as tape:
            outputs = model(xi, training=False)
            terms = tf.reshape(tf.cast(terms_fn(outputs, ei), tf.float32), [-1])
            parts = [terms[t] for t in range(int(terms.shape[0]))]
        acc = [tf.zeros(v.shape, tf.float32) for v in variables]
        for part in parts:
            grads = tape.gradient(part, variables, unconnected_gradients="zero")
            acc = [a + tf.square(tf.cast(g, tf.float32)) for a, g in zip(acc, grads)]
        del tape
        return acc

    def each(x, e):
        return one((x, e))

    elems = (inputs, extra) if extra is not None else inputs
    fn = (lambda args: each(*args)) if extra is not None else (lambda x: each(x, None))
    signature = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    if fast_module.has_loops(model):
        # pfor cannot vectorise a recurrent layer's backward loop; failing to try is slow.
        per_example = tf.map_fn(fn, elems, fn_output_signature=signature)
    else:
        try:
            per_example = tf.vectorized_map(fn, elems)
        except (TypeError, ValueError, NotImplementedError):
            # Other graphs pfor cannot vectorise: one example after another instead.
            per_example = tf.map_fn(fn, elems, fn_output_signature=signature)
    return [tf.reduce_sum(p, axis=0) for p in per_example]

