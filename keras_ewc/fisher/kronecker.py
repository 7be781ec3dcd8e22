"""Kronecker factors of the Fisher (KFAC): per layer, A from its inputs, G from its outputs.

For a Dense layer `z = Wᵀ a + b` (kernel W `[in, out]`) let `ā = [a; 1]` (the bias LAST,
omitted without a bias) and `W̄ = [W; bᵀ]` (`[in + 1, out]`). Example n's gradient of
term t is `ā_n g_{n,t}ᵀ` with `g = ∂ term / ∂ z`, and the Fisher block of W̄ is
approximated by `A ⊗ G` (Martens & Grosse 2015) with

    A = (1/N) Σ_n ā_n ā_nᵀ,        G = (1/N) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ

over the estimator's terms (`exact`: the √p-weighted classes, `sampled`: drawn labels,
`empirical`: the true label). They come from the same recording as the diagonal engine
(`keras_ewc.fisher.fast`): one batched forward pass records each layer's inputs and
pre-activation output z, and one batched backward pass a term column gives every g.

Weight sharing (Conv1D/2D/3D, Dense on sequences, a layer called several times) uses
KFAC-expand, i.e. KFC (Grosse & Martens 2016): every output position r of every call is
one more row, its input patch ā_{n,r} and its output gradient g_{n,r,t}, and

    A = 1/(N R) Σ_n Σ_r ā_{n,r} ā_{n,r}ᵀ,    G = (1/N) Σ_n Σ_r Σ_t g g ᵀ

(Eschenhagen et al. 2023, "Kronecker-factored approximate curvature for modern neural
network architectures", KFAC-expand), so `A ⊗ G` has the scale of the sum over positions
of the per-position blocks and, with one position, is the flat Dense case exactly. Why
expand rather than reduce: expand needs no assumption about how the positions are
combined after the layer (per-token losses, pooling, flattening all happen in the models
this library regularises), it is the classic KFC that conv networks are known to work
with, and its rows are exactly what the diagonal engine records; reduce is exact only
when the positions are summed before the loss, and would need a second convention.

Only plain Dense and Conv layers with one group are factored (EinsumDense, Embedding,
normalisation and custom layers keep the exact diagonal: `fisher_diagonal(...,
variables=rest)`). A factored layer whose kernel is also read outside its call (tied
weights), or which is called where it cannot be recorded (inside a loop), has no
Kronecker block: it is refused with an error that names it.
"""

from __future__ import annotations

import random
from typing import Sequence

import keras
import numpy as np
from keras import ops

from keras_ewc import distribute
from keras_ewc._tensorflow import tf
from keras_ewc.fisher import checks, diagonal, fast, reference
from keras_ewc.fisher import likelihoods as lik_module
from keras_ewc.fisher.kernels import conv
from keras_ewc.fisher.kernels._common import f32
from keras_ewc.fisher.kernels.conv import ConvKernel
from keras_ewc.fisher.kernels.dense import DenseKernel

ESTIMATORS = ("exact", "sampled", "empirical")


def factored_layers(model, variables: Sequence | None = None) -> list:
    """The layers of `model` that get Kronecker factors, in the order of the model.

    A layer qualifies when it is a plain Dense or a Conv1D/2D/3D with one group (no
    LoRA, no quantisation, `call` not overridden) and all of its variables (kernel, and
    bias if it has one) are among `variables` (default: the trainable variables).

    Returns:
        A list of `(layer, kernel, params)`, `kernel` the layer's Fisher kernel
        (`keras_ewc.fisher.kernels`), `params` the `{"kernel", "bias"}` variables.
    """
    variables = list(model.trainable_variables if variables is None else variables)
    found = []
    for layer, kernel, params in fast.plan(model, variables):
        # Exactly the built-in kernels: a user's kernel registered for a subclass
        # computes something else.
        if type(kernel) not in (DenseKernel, ConvKernel):
            continue
        if isinstance(kernel, ConvKernel) and layer.groups != 1:
            continue
        if len(params) != len(kernel.params(layer)):
            continue  # the bias (or kernel) is not regularised: keep the diagonal
        found.append((layer, kernel, params))
    return found


def wrapped_network(model):
    """The model an `EWCModel` wraps (its `network`), else `model` itself.

    Recognised by its attributes, since this engine knows nothing above it: a Keras model
    with a `regularizer` and a Keras model as `network`.
    """
    network = getattr(model, "network", None)
    if hasattr(model, "regularizer") and isinstance(network, keras.layers.Layer):
        return network
    return model


def layer_key(layer, model=None) -> str:
    """A layer's path in `model` (Keras' `layer.path` without the model's own name).

    Relative to the model, so that two instances of one architecture (whose top-level
    names Keras numbers `sequential`, `sequential_1`, ...) give the same keys.
    """
    path = str(getattr(layer, "path", None) or layer.name)
    prefix = f"{model.name}/" if model is not None else None
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def kronecker_factors(
    model,
    data,
    estimator: str = "exact",
    likelihood=None,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    verbose="auto",
    variables: Sequence | None = None,
    strategy: tf.distribute.Strategy | None = None,
    steps: int | None = None,
) -> dict:
    """Computes the Kronecker factors `(A, G)` of the Fisher of each Dense and Conv layer.

    Per layer, `A ⊗ G` approximates the Fisher block of `W̄ = [kernel; bias]` (kernel
    reshaped to `[in, out]`, the bias as the LAST row): `A = (1/N) Σ_n ā_n ā_nᵀ` with
    `ā = [input; 1]`, `G = (1/N) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ` over the estimator's terms at
    the pre-activation output. Conv layers and Dense layers on sequences count every
    position as a row of A (divided by N·R) and add its gradients into G (KFC /
    KFAC-expand; see the module docstring). Layers without a Kronecker kernel are left
    out: use `keras_ewc.fisher_diagonal(..., variables=rest)` for their variables.

    Args:
        model: a built Keras model with one output (see `fisher_diagonal`), or an
            `EWCModel`: then the factors are those of the model it wraps, keyed as its
            state is (relative to the wrapped model).
        data: a `tf.data.Dataset` of batches, an array of inputs, or `(x, y)`.
        estimator: `"exact"` (default), `"sampled"` or `"empirical"`.
        likelihood: `"categorical"`, `"bernoulli"`, `"gaussian"`, a `Likelihood`, or
            None to infer it from the compiled loss of `model`, as `fisher_diagonal`
            does: a network that is not compiled itself (only its `EWCModel` is) needs
            `likelihood=`, or pass the compiled `EWCModel`.
        samples: labels drawn per example by `"sampled"` (default 1).
        batch_size: examples a batch (bounds the memory); default as in
            `fisher_diagonal`.
        seed: integer seed of the `"sampled"` estimator.
        verbose: 0 for silence, 1 or "auto" for a progress bar.
        variables: only layers whose variables are all in this list are factored
            (default: the trainable variables).
        strategy: a `tf.distribute.Strategy`: replicas sum over their shards of every
            batch and the sums are all-reduced, as for `fisher_diagonal`.
        steps: the number of batches to use (needed for an infinite dataset).

    Sample weights (`(x, y, sample_weight)`) make both factors weighted means: example n
    counts `w_n` times. The data, the weights and the first batch's outputs are checked
    as for `fisher_diagonal` (`keras_ewc.fisher.checks`).

    Returns:
        `{layer key: (A, G)}`, the key being the layer's path relative to the model
        (to the wrapped model for an `EWCModel`), e.g. `"dense_1"` or `"block/dense"`:
        the keys of `EWCModel.consolidate`'s result and of the Kronecker state
        (`regularizer.layer_keys`). Float32 tensors of shapes `[in (+1), in (+1)]` and
        `[out, out]` (`in` is kernel_size × channels for a conv).

    Example:

    >>> import keras, numpy as np, keras_ewc
    >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    >>> factors = keras_ewc.kronecker_factors(net, x, likelihood="categorical", verbose=0)
    >>> {k: (tuple(a.shape), tuple(g.shape)) for k, (a, g) in factors.items()}
    {'d': ((5, 5), (3, 3))}
    """
    network = wrapped_network(model)
    if network is not model:
        # The wrapper's compiled loss gives the likelihood; the keys are relative to the
        # wrapped model, as the state's are.
        likelihood = lik_module.get(likelihood, model)
        model = network
    layers = factored_layers(model, variables)
    values = compute_factors(model, layers, data, estimator=estimator,
                             likelihood=likelihood, samples=samples,
                             batch_size=batch_size, seed=seed, verbose=verbose,
                             strategy=strategy, steps=steps)
    return {layer_key(layer, model): ag for (layer, _, _), ag in zip(layers, values)}


def compute_factors(model, layers, data, estimator="exact", likelihood=None, samples=None,
                    batch_size=None, seed=None, verbose="auto", strategy=None,
                    steps=None) -> list:
    """`[(A, G)]` aligned with `layers` (from `factored_layers`); see `kronecker_factors`."""
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator for Kronecker factors. Expected one of {list(ESTIMATORS)} "
            f"('batched' has no per-example terms to factor). Received: "
            f"estimator={estimator!r}"
        )
    checks.check_sampling_arguments(estimator, samples, batch_size)
    if not getattr(model, "built", True):
        raise ValueError(
            "The model is not built yet, so it has no weights to compute factors for. "
            "Call it on a batch of data or call `model.build(input_shape)` first."
        )
    if not layers:
        return []
    lik = lik_module.get(likelihood, model)
    checks.check_steps(steps)
    checks.check_single_output_model(model)
    checks.check_finite_weights(list(getattr(model, "weights", [])))
    checks.check_inputs(model, diagonal._x_spec(data))
    samples = int(samples or 1)
    seed = random.randrange(2**31) if seed is None else int(seed)

    # The diagonal's loop, summing the factors: one traced step a batch (cached per
    # model, ragged last batch padded), checks in the graph, one read-back at the end.
    # Batches chosen as for the diagonal when `batch_size` is None (see
    # `fisher_diagonal`): up to `AUTO_BATCH_SIZE` examples a call, within its memory bound.
    auto = batch_size is None and not distribute.is_distributed(strategy)
    dataset = diagonal.loop_data(data, batch_size, steps, auto)
    loop = diagonal._loop_class()(model, [], lik, estimator, samples, seed, strategy, auto=auto,
                          sums=factor_sums_spec(layers))
    progress = loop.run(dataset, verbose, what="Kronecker factors A, G")
    totals, num_examples, _ = loop.finish()
    progress.finish(loop.batches, loop.examples)
    factors = []
    for (layer, _, _), (a_sum, g_sum, rows) in zip(layers, assemble(layers, totals)):
        a = a_sum / ops.maximum(rows, 1.0)
        g = g_sum / num_examples
        for name, f in (("A", a), ("G", g)):
            if not bool(ops.all(ops.isfinite(f))):
                raise ValueError(
                    f"The Kronecker factor {name} of layer {layer_key(layer, model)} is not "
                    "finite (NaN or Inf): the model's outputs or gradients overflow on this "
                    "data."
                )
        factors.append((a, g))
    return factors


def factor_sums_spec(layers) -> diagonal.Sums:
    """The factors' per-batch sums as the diagonal loop runs them (`diagonal.Sums`)."""
    layers = list(layers)

    def fn(model, terms_fn, inputs, extra):
        return factor_sums(model, layers, terms_fn, inputs, extra)

    spec = diagonal.Sums(("kronecker", tuple(id(layer) for layer, _, _ in layers)),
                         factor_shapes(layers), fn)
    spec.layers = layers  # what the JAX engine records in place of `fn`
    return spec


def factor_shapes(layers) -> list:
    """Shapes of the per-batch sums: `A_sum` and `G_sum` each as `gram_sums` lays them
    out, then the row count, per layer."""
    shapes = []
    for _, _, params in layers:
        rows, out = wbar_shape(params)
        shapes += gram_shapes(rows) + gram_shapes(out) + [()]
    return shapes


def assemble(layers, sums) -> list:
    """`[(A_sum, G_sum, rows)]` per layer from the flat per-batch sums (`factor_shapes`)."""
    out, i = [], 0
    for _, _, params in layers:
        rows, width = wbar_shape(params)
        na, ng = len(gram_shapes(rows)), len(gram_shapes(width))
        a = from_gram_sums(sums[i:i + na], rows)
        g = from_gram_sums(sums[i + na:i + na + ng], width)
        out.append((a, g, sums[i + na + ng]))
        i += na + ng + 1
    return out


def wbar_shape(params) -> tuple:
    """`(rows, out)` of W̄ = [W; bᵀ]: the kernel's input size (+1 with a bias) and width."""
    kernel = params["kernel"]
    rows = int(np.prod(kernel.shape[:-1])) + (1 if "bias" in params else 0)
    return rows, int(kernel.shape[-1])


def build_factor_sums(model, layers, terms_fn):
    """`fn(inputs, extra) -> sums` for one batch, traced (`assemble(layers, sums)` gives
    `[(A_sum, G_sum, rows)]` a layer).

    `A_sum = Σ w ā āᵀ` over the batch's rows (examples × positions × calls), `G_sum =
    Σ w g gᵀ` over the same rows and the terms, `rows` = Σ w over the rows (float32), w
    the example's sample weight; the symmetric sums come as their upper blocks.
    `terms_fn(outputs, target)` gives the estimator's unweighted `[B, T]` terms; `extra`
    is `(weights,)` or `(weights, target)`, target the labels (`empirical`) or the noise
    (`sampled`). (`kronecker_factors` runs the same sums in the diagonal engine's loop;
    this stand-alone form is for benchmarks.)
    """
    layers = list(layers)

    def weighted(outputs, extra):
        target = extra[1] if len(extra) > 1 else None
        values = tf.cast(terms_fn(outputs, target), tf.float32)
        return values * tf.sqrt(tf.cast(extra[0], tf.float32))[:, None]

    @tf.function(autograph=False)
    def fn(inputs, extra):
        return factor_sums(model, layers, weighted, inputs, extra)

    return fn


def factor_sums(model, layers, terms_fn, inputs, extra) -> list:
    """The per-batch sums of `build_factor_sums` (call while tracing); `terms_fn(outputs,
    extra)` returns the terms already scaled by √weight (`diagonal.Sums`' contract)."""
    batch_size = tf.nest.flatten(inputs)[0].shape[0]
    tape, recorder, terms, columns, total = fast.record(model, layers, terms_fn, inputs, extra)
    leaks = fast.leaked(tape, total, [v for _, _, params in layers for v in params.values()])
    for layer, _, params in layers:
        if any(id(v) in leaks for v in params.values()) or batch_size is None:
            raise no_factors_error(layer, model)
    calls = [recorder.calls[id(layer)] for layer, _, _ in layers]
    zs = [z for c in calls for _, z in c]
    grads = fast.column_grads(tape, terms, columns, total, zs, reference.has_loops(model))
    del tape
    return sums_from_records(layers, [[r for r, _ in c] for c in calls], grads, extra[0],
                             batch_size)


def no_factors_error(layer, model) -> ValueError:
    return ValueError(
        f"Layer {layer_key(layer, model)} has no Kronecker factors: its weights are read "
        "outside its own call (shared or tied weights), or it is called where its "
        "inputs cannot be recorded (inside a loop, on a tensor whose first axis "
        "is not the batch). Leave it to the diagonal with "
        "`exclude=[...]`/`structure='diagonal'`, or call it once per example."
    )


def sums_from_records(layers, records, grads, weights, batch_size) -> list:
    """The per-batch sums (`factor_shapes`) from each layer's recorded calls' inputs and
    the term columns' gradients at their z (`[T, B, *z]`, in call order, already scaled
    by √weight), on any backend. `weights` are the examples' sample weights."""
    weights = ops.cast(weights, "float32")
    # √w on each example's input rows (the terms carry it already): A weighs it by w.
    root = ops.sqrt(weights)
    out = []
    for (layer, kernel, params), recorded in zip(layers, records):
        part, grads = grads[: len(recorded)], grads[len(recorded):]
        rows = _input_rows(layer, kernel, params, recorded, batch_size)
        per_example = float(rows.shape[1])
        rows = ops.reshape(rows * root[:, None, None], (-1, rows.shape[-1]))
        size, out_dim = wbar_shape(params)
        if recorded:
            a_sum = gram_sums(rows)
            # Every term of every example (and position, and call) is one row of G's
            # product: one [rows, out] matrix.
            g_rows = [ops.reshape(f32(g), (-1, g.shape[-1])) for g in part]
            g_sum = gram_sums(g_rows[0] if len(g_rows) == 1 else ops.concatenate(g_rows, 0))
            count = ops.sum(weights) * per_example
        else:
            a_sum = [None] * len(gram_shapes(size))
            g_sum = [None] * len(gram_shapes(out_dim))
            count = None
        out += a_sum + g_sum + [count]
    return out


# Below twice this width a Gram matrix is one product; above, blocks of about this width.
_GRAM_BLOCK = 256


def _edges(d: int) -> list:
    k = max(1, d // _GRAM_BLOCK)
    return [d * i // k for i in range(k + 1)]


def block_shapes(d: int) -> list:
    """Shapes of the upper blocks `gram_blocks` returns for width `d`, row by row."""
    e = _edges(d)
    k = len(e) - 1
    return [(e[i + 1] - e[i], e[j + 1] - e[j]) for i in range(k) for j in range(i, k)]


def gram_blocks(m) -> list:
    """The blocks on and above the diagonal of the symmetric `mᵀ m` (`m` `[rows, d]`),
    row by row: about (k + 1) / 2k of the product's work for k column blocks. Sums
    over batches stay in blocks; `from_blocks` assembles the matrix once."""
    e = _edges(int(m.shape[-1]))
    k = len(e) - 1
    if k == 1:
        return [_symmetric(_at_b(m, m))]
    parts = [m[:, e[i]:e[i + 1]] for i in range(k)]
    return [_symmetric(_at_b(parts[i], parts[i])) if i == j
            else _at_b(parts[i], parts[j])
            for i in range(k) for j in range(i, k)]


def _symmetric(product):
    """`mᵀ m` made exactly symmetric: one product is not, on every CPU and load (oneDNN
    may split the two triangles differently); the factors are, so the mean is kept."""
    return 0.5 * (product + ops.transpose(product))


def _at_b(a, b):
    """`aᵀ b` (an einsum: on TensorFlow one MatMul with its adjoint flag, no transpose)."""
    return ops.einsum("ri,rj->ij", a, b)


def from_blocks(blocks, d: int):
    """The symmetric `[d, d]` matrix whose upper blocks are `blocks` (`gram_blocks`)."""
    k = len(_edges(d)) - 1
    upper, index = {}, 0
    for i in range(k):
        for j in range(i, k):
            upper[i, j] = blocks[index]
            index += 1
    return ops.concatenate([
        ops.concatenate([ops.transpose(upper[j, i]) for j in range(i)]
                        + [upper[i, j] for j in range(i, k)], 1)
        for i in range(k)], 0)


def gram_shapes(d: int) -> list:
    """How the per-batch sums hold a `[d, d]` Gram matrix: `[(d, d)]` when it is one
    block, else `[(d, d)]` then the upper blocks (`block_shapes`)."""
    blocks = block_shapes(d)
    return [(d, d)] + (blocks if len(blocks) > 1 else [])


def gram_sums(m) -> list:
    """`mᵀ m` as `gram_shapes` lays it out, an entry None where nothing is added.

    With at least as many rows as columns (many terms, or positions), the blocks on and
    above the diagonal (`gram_blocks`): about (k + 1) / 2k of the work. With fewer rows,
    one product is faster (blocks of a short product cost more than they save)."""
    d = int(m.shape[-1])
    count = len(gram_shapes(d))
    if count == 1 or (m.shape[0] is not None and m.shape[0] < d):
        return [_symmetric(_at_b(m, m))] + [None] * (count - 1)
    return [None] + gram_blocks(m)


def from_gram_sums(sums, d: int):
    """The `[d, d]` matrix from its `gram_shapes` entries (summed over batches)."""
    if len(sums) == 1:
        return sums[0]
    return sums[0] + from_blocks(sums[1:], d)


def gram(m):
    """`mᵀ m`, through `gram_sums`."""
    d = int(m.shape[-1])
    return from_gram_sums([ops.zeros(shape) if s is None else s
                           for s, shape in zip(gram_sums(m), gram_shapes(d))], d)


def _input_rows(layer, kernel, params, records, batch_size):
    """`[B, positions, in (+1)]`: every recorded input position of every call, example
    by example, with a column of ones for a bias."""
    kernel_in = int(np.prod(params["kernel"].shape[:-1]))
    parts = []
    for record in records:
        if isinstance(kernel, ConvKernel):
            x, padding = record
            x = conv.patches(f32(x), layer.kernel_size, layer.strides, layer.dilation_rate,
                             padding)
        else:
            x = f32(record)
        parts.append(ops.reshape(x, (batch_size, -1, kernel_in)))
    x = ops.concatenate(parts, 1) if parts else ops.zeros((batch_size, 0, kernel_in))
    if "bias" in params:
        x = ops.concatenate([x, ops.ones(tuple(x.shape[:-1]) + (1,))], axis=-1)
    return x
