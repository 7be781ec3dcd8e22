"""Sums of squared per-example gradients: the one primitive every estimator needs.

Every per-example Fisher estimator reduces to the same computation. A likelihood turns
the model's outputs on a batch into a `[batch, T]` tensor of pseudo-losses ("terms",
`Likelihood.terms`) whose per-example gradients, squared and summed over examples and
terms, give the Fisher diagonal times the number of examples:

    S_v = sum_n sum_t (d terms[n, t] / d v) ** 2        for every variable v.

Data flows one way, batch → recorded layers → kernels → sums:

- `fast.plan` picks the layers whose registered kernel (`keras_ewc.fisher.kernels`:
  Dense, EinsumDense, Conv1D/2D/3D, Embedding, LayerNormalization, BatchNormalization,
  and any registered with `register_kernel`) covers requested variables;
- `fast.kernel_sums` runs one batched forward pass that records those layers, one
  batched backward pass a term column (the columns kept apart; optionally in a graph
  loop of rounds of a few columns), and lets each kernel form the sums, without materialising
  per-example gradients where it can;
- `local.plan` picks, for the other variables, the innermost layer that owns them; the
  same pass records that layer's inputs and outputs, and `local.local_sums` re-runs the
  layer alone per example (the layer-local path: a layer's work, for any layer);
- `reference.reference_sums` covers every other variable (weights owned or read in
  several places, such as tied weights; layers called where the rows are not examples)
  with one tape an example over the whole network (`tf.vectorized_map`), exact for every
  layer kind.

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

from keras_ewc._tensorflow import tf
from keras_ewc.fisher import fast as fast_module
from keras_ewc.fisher import local as local_module
from keras_ewc.fisher import reference

TermsFn = Callable[[object, object], object]  # (outputs, extra) -> [B, T] terms
SumFn = Callable[[object, object], list]


def variable_key(v) -> str:
    """How paths and errors name a variable: its Keras path, else its name."""
    return getattr(v, "path", None) or v.name


def sum_squared_grads(model, layers, variables, terms_fn, inputs, extra, paths=None,
                      local=True):
    """Per-variable Σ_n Σ_t (∂ terms[n, t] / ∂ v)² for one batch (call while tracing).

    `layers` is `fast.plan(model, variables)`; with `local`, the variables no kernel
    covers go layer-local where they can (with neither: reference path only). `paths`, a
    dict, if given, receives each variable's path ("fast", "layer-local" or "reference")
    by its key.
    """
    local_module.check_stateless(model, variables)
    loops = reference.has_loops(model)
    planned = local_module.plan(model, variables, layers) if local else []
    sums = (fast_module.kernel_sums(model, layers, terms_fn, inputs, extra, loops, planned)
            if layers or planned else {})
    rest = [v for v in variables if id(v) not in sums]
    if paths is not None:
        local_ids = {id(v) for _, found in planned for v in found}
        for v in variables:
            paths[variable_key(v)] = ("reference" if id(v) not in sums else
                                      local_module.NAME if id(v) in local_ids else "fast")
    if rest:
        sums.update(reference.reference_sums(model, rest, terms_fn, inputs, extra))
    return [sums[id(v)] for v in variables]


def build_sum_squared_grads(
    model: Callable,
    variables: Sequence[tf.Variable],
    terms_fn: TermsFn,
    fast: bool = True,
) -> SumFn:
    """Returns `fn(inputs, extra)`: per-variable sums of squared per-example gradients.

    With `fast=True` (the default), the variables of layers that have a kernel take the
    fast path, the others the layer-local path where they can and the reference path
    otherwise; the result is the same either way, to floating-point rounding.
    `fast=False` forces the reference path for all variables. The function is traced
    once for each batch shape; after a call, its `paths` attribute maps each variable's
    path to the path it took ("fast", "layer-local" or "reference").
    """
    variables = list(variables)
    layers = fast_module.plan(model, variables) if fast else []
    paths = {}

    # The kernels and the layer-local path need a static batch size.
    static = bool(layers) or bool(fast and local_module.plan(model, variables, layers))

    @tf.function(reduce_retracing=not static, autograph=False)
    def fn(inputs, extra):
        return sum_squared_grads(model, layers, variables, terms_fn, inputs, extra, paths,
                                 local=fast)

    fn.paths = paths
    return fn
