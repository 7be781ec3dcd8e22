"""The diagonal of the Fisher information, from per-example gradients."""

from __future__ import annotations

import random
import sys
import time
import warnings
import weakref
from typing import Sequence

import keras
import numpy as np

from keras_ewc import backend, distribute
from keras_ewc._tensorflow import tf
from keras_ewc.fisher import checks, engine, kernels
from keras_ewc.fisher import fast as fast_module
from keras_ewc.fisher import likelihoods as lik_module
from keras_ewc.fisher import local as local_module

ESTIMATORS = ("exact", "sampled", "empirical", "batched")
_NEEDS_LABELS = ("empirical", "batched")
DEFAULT_BATCH_SIZE = 64
"""Examples a batch for arrays when the batch is not chosen automatically."""

AUTO_BATCH_SIZE = 2048
"""Most examples one traced call takes when `batch_size` is None (see `fisher_diagonal`)."""

MIN_AUTO_BATCH_SIZE = 64
"""Fewest examples an automatic step is traced for (smaller data is padded to it)."""

MIN_MEMORY_CHUNK = 16
"""Fewest examples a call the memory bound may bring an automatic batch down to."""

MEMORY_BUDGET = 2**30
"""Bytes of batch-sized tensors one traced call may hold, as `_per_example_bytes`
counts them (every such tensor of the step's graph, live or not: a bound that measured
3-4 times the actual peak on the MLP and CNN of benchmarks/fisher_speed.py), unless
`GRADIENT_MEMORY_RATIO` gradient steps hold more (large models)."""

GRADIENT_MEMORY_RATIO = 4
"""A call may also hold this many times what a batched gradient step of
`DEFAULT_BATCH_SIZE` examples holds, counted the same way, where that is more than
`MEMORY_BUDGET`. The counts overstate the Fisher's peak against the gradient's: on
ResNet50 (64×64, batches of 64, exact) they count 17.5× the gradient's bytes an example,
where the measured peaks above the model's resident memory are 6.1 GB against 0.62 GB
(10×). With 4, ResNet50's and EfficientNetB0's exact Fisher run 16 examples a call:
ResNet50's then peaked at 3.4 GB resident against the gradient step's 1.6 GB
(docs/fisher_speed.md)."""


def fisher_diagonal(
    model,
    data,
    estimator: str = "exact",
    likelihood=None,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    verbose="auto",
    variables: Sequence[tf.Variable] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    steps: int | None = None,
    fallback: str = "allow",
    return_paths: bool = False,
):
    """Computes the diagonal of the Fisher information of `model` on `data`.

    `F = (1/N) Σ_n E_{y∼q_n} (∇_θ log p(y | x_n, θ))²`, where the estimator chooses q_n:

    - `"exact"`: the model's own predictive distribution, summed over every class
      (C backward passes a batch for C classes). The reliable choice, and the default.
    - `"sampled"`: `samples` labels (default 1) drawn from the model's predictive
      distribution; deterministic for a given `seed`.
    - `"empirical"`: the true labels from `data`.
    - `"batched"`: the squared gradient of each mini-batch's mean loss, averaged over
      batches. This is NOT a Fisher (cross-example terms do not cancel, and it shrinks
      with the batch size); it is offered only for parity with libraries that use it.

    The model is run in inference mode (`training=False`): dropout is off and batch
    normalisation uses its moving statistics, so the examples of a batch do not interact.
    Memory is bounded by `batch_size`, not by the number of examples.

    With sample weights, the Fisher is a weighted mean: example n counts `w_n` times
    (its terms are scaled by `√w_n`) and the sum is divided by `Σ w_n`; a zero weight
    removes the example. `"batched"` then uses each batch's weighted mean loss.

    Before any computation, the data, the model's weights and the first batch's outputs
    are checked (`keras_ewc.fisher.checks`): outputs that contradict the likelihood
    (probabilities read as logits, or logits read as probabilities), an infinite dataset
    without `steps`, an un-batched dataset, labels that do not fit the outputs and
    non-finite weights are refused with an error that says what to do. Checks of values
    in every batch (NaN or Inf inputs and labels, label range, sample weights) run inside
    the traced loop and are reported when it ends, before anything is returned.

    The per-batch step is traced once per model, variables, estimator, likelihood,
    batch size and input signature, and reused by later calls (a continual run
    consolidates after every task); a ragged last batch is padded with weight-0 rows and
    does not retrace.

    Args:
        model: a built Keras model (or any callable with `trainable_variables`)
            returning one output tensor: logits or probabilities for `categorical` and
            `bernoulli`, predictions for `gaussian`.
        data: a `tf.data.Dataset` of batches (`x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`), an array of inputs, or a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays.
        estimator: one of `"exact"`, `"sampled"`, `"empirical"`, `"batched"`.
        likelihood: `"categorical"`, `"bernoulli"`, `"gaussian"`, a
            `keras_ewc.fisher.Likelihood`, or None to infer it from the compiled loss.
        samples: labels drawn per example by the `"sampled"` estimator (default 1).
        batch_size: examples a batch; re-batches a dataset when given. Default:
            chosen for speed, since the Fisher's cost a batch is mostly fixed overhead
            on small batches: the data is re-cut into batches of up to 2,048 examples
            (`AUTO_BATCH_SIZE`), fewer when the step's batch-sized tensors would pass
            `MEMORY_BUDGET` (1 GiB as counted) and `GRADIENT_MEMORY_RATIO` (4) batched
            gradient steps of 64 examples, whichever is larger, but never fewer than
            `MIN_MEMORY_CHUNK` (16): a large CNN's exact Fisher gets 16 examples a
            call, and peaks at about twice the memory of a gradient step. A dataset
            whose elements cannot be re-cut (a free non-batch dimension, ragged or
            sparse tensors) keeps its own batches, cut further when memory needs it.
            `"batched"` always uses the data's batches (its value depends on them).
        seed: integer seed for the `"sampled"` estimator.
        verbose: 0 for silence, 1 (or "auto") for a progress bar.
        variables: the variables to compute the Fisher for (default:
            `model.trainable_variables`).
        strategy: a `tf.distribute.Strategy` with several replicas to share the work:
            each replica sums squared per-example gradients over its shard of every
            batch, and the sums are all-reduced (see `keras_ewc.distribute`). The
            result equals the one-device Fisher. Default: one device.
        steps: the number of batches to use (as in Keras' `evaluate`); needed for an
            infinite dataset. Default: all of them.
        fallback: what to do when variables take the slow whole-network per-example
            reference path (tied weights, layers called where the rows are not
            examples; see `kernel_paths`): `"allow"` (default), `"warn"`, or `"error"`
            (a ValueError naming them, before the second batch). The kernels and the
            layer-local path never trigger it.
        return_paths: also return a dict from each variable's path to the path its
            Fisher took (`"fast"`, `"layer-local"`, `"reference"`, or `"batched"`).

    Returns:
        A list of float32 tensors, aligned with `variables` (and the paths, when
        `return_paths`).

    Example:

    >>> import keras, numpy as np, keras_ewc
    >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    >>> fisher = keras_ewc.fisher_diagonal(net, x, likelihood="categorical", verbose=0)
    >>> [tuple(f.shape) for f in fisher]
    [(4, 3), (3,)]
    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator. Expected one of {list(ESTIMATORS)}. "
            f"Received: estimator={estimator!r}"
        )
    if fallback not in FALLBACKS:
        raise ValueError(
            f"Expected fallback in {FALLBACKS}. Received: fallback={fallback!r}"
        )
    checks.check_sampling_arguments(estimator, samples, batch_size)
    if verbose not in ("auto", 0, 1, 2, True, False):
        raise ValueError(f"Expected verbose in ('auto', 0, 1, 2). Received: verbose={verbose!r}")
    if not getattr(model, "built", True):
        raise ValueError(
            "The model is not built yet, so it has no weights to compute a Fisher for. "
            "Call it on a batch of data or call `model.build(input_shape)` first."
        )
    lik = lik_module.get(likelihood, model)
    variables = list(model.trainable_variables if variables is None else variables)
    if not variables:
        raise ValueError("The model has no trainable variables to compute a Fisher for.")
    samples = int(samples or 1)
    seed = random.randrange(2**31) if seed is None else int(seed)
    # Checks of the data's type and spec, the model and its weights, before the loop.
    checks.check_steps(steps)
    checks.check_single_output_model(model)
    checks.check_finite_weights(list(getattr(model, "weights", [])) + variables)
    checks.check_inputs(model, _x_spec(data))

    auto = batch_size is None and estimator != "batched" and not distribute.is_distributed(
        strategy)
    dataset = loop_data(data, batch_size, steps, auto)
    loop = _loop_class()(model, variables, lik, estimator, samples, seed, strategy,
                         auto=auto)
    progress = loop.run(dataset, verbose, first=lambda: _check_paths(loop.paths, fallback))
    fisher = loop.result()
    progress.finish(loop.batches, loop.examples)
    if return_paths:
        return fisher, dict(loop.paths)
    return fisher


FALLBACKS = ("allow", "warn", "error")


def _loop_class():
    """The loop of the Keras backend: the JAX engine's on JAX, else the TensorFlow one."""
    if keras.backend.backend() == "jax":
        from keras_ewc.backend.jax import fisher as jax_fisher

        return jax_fisher.make_loop_class()
    return _Loop


def _check_paths(paths, fallback):
    slow = sorted(k for k, p in paths.items() if p == "reference")
    if not slow or fallback == "allow":
        return
    message = (
        f"{len(slow)} variable(s) take the whole-network per-example reference path "
        f"(slow), as neither a kernel nor the layer-local path covers their use: {slow}. "
        "This happens to a weight read in several places (tied weights), or in a layer "
        "called where the rows are not examples (inside a loop, on a tensor whose first "
        "axis is not the batch). Read each weight in one layer only, register a kernel "
        "for the layer that uses it with `keras_ewc.fisher.register_kernel`, or pass "
        "fallback='allow'."
    )
    if fallback == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def kernel_paths(model, variables: Sequence[tf.Variable] | None = None) -> dict:
    """Which path each variable's Fisher takes: `"fast"`, `"layer-local"` or `"reference"`.

    `"fast"`: a kernel covers its layer (one batched pass, no per-example gradient);
    `"layer-local"`: its layer has no kernel and is re-run alone per example, from the
    inputs and output gradients the one batched pass recorded (a layer's work);
    `"reference"`: the whole network per example, for a weight owned by several layers
    (or not trainable). The answer is read from the layers before any data flows: a
    weight also read outside its layer (a tied weight), or a layer called where the rows
    are not examples, is found only when the Fisher is traced, and then takes the
    reference path; `fisher_diagonal(..., return_paths=True)` reports the paths as
    computed.

    Args:
        model: a built Keras model.
        variables: the variables to ask about (default: `model.trainable_variables`).

    Returns:
        A dict from each variable's path to `"fast"`, `"layer-local"` or `"reference"`.

    Example:

    >>> import keras
    >>> from keras_ewc.fisher import kernel_paths
    >>> net = keras.Sequential([keras.Input((5, 4)), keras.layers.Dense(3),
    ...                         keras.layers.RNN(keras.layers.SimpleRNNCell(2))])
    >>> sorted(set(kernel_paths(net).values()))
    ['fast', 'layer-local']
    """
    variables = list(model.trainable_variables if variables is None else variables)
    layers = fast_module.plan(model, variables)
    fast_ids = {id(v) for _, _, params in layers for v in params.values()}
    local_ids = {id(v) for _, found in local_module.plan(model, variables, layers)
                 for v in found}
    return {engine.variable_key(v): "fast" if id(v) in fast_ids else
            local_module.NAME if id(v) in local_ids else "reference"
            for v in variables}


# --- the loop --------------------------------------------------------------------------
#
# One traced step a batch: pads the batch to a static size with zero-weight rows (the
# kernels need a static batch size, and padding keeps one trace for a ragged last
# batch), draws the sampled estimator's noise, computes the per-variable sums and adds
# them, the weight total and the checks' flags to the running state. Nothing is read
# back to the host until the end. Steps are cached per model (weakly) and per variables,
# estimator, likelihood, batch size and input signature, so a second call, on the same
# or other data of the same kind, traces nothing.
#
# What is summed is pluggable: by default the squared per-example gradients of
# `variables`; a `Sums` (e.g. the Kronecker factors, `keras_ewc.fisher.kronecker`) puts
# its own per-batch sums in the same loop, with the same padding, checks and cache.

_NO_EXAMPLES = (
    "The data holds no examples (or only examples of sample weight 0): cannot compute a "
    "Fisher from nothing."
)

_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# The misc state, a float64 vector: the weight total (or, for `batched`, the count of
# batches with weight), then values combined by maximum: whether inputs or labels are not
# finite, the likelihood's label summary (4), and the weights' summary (−min, max, NaN).
_MISC = 10
_EMPTY_MISC = [0.0, 0.0, 0.0, -np.inf, -np.inf, 0.0, 0.0, -np.inf, -np.inf, 0.0]


class Sums:
    """What the loop sums a batch, in place of the squared per-example gradients.

    Args:
        key: hashable; names these sums in the per-model cache of traced steps.
        shapes: the shapes of the float32 tensors `fn` returns.
        fn: `fn(model, terms_fn, inputs, extra) -> [tensors]`, called while tracing;
            `terms_fn(outputs, extra)` gives the estimator's `[B, T]` terms already
            scaled by √weight, `extra` is `(weights,)` or `(weights, target)`, and the
            batch size of `inputs` is static (padded rows have weight 0). An entry may
            be None: nothing is added to it (its running sum is passed on untouched).
    """

    def __init__(self, key, shapes, fn):
        self.key = key
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.fn = fn


def trace_count(model) -> int:
    """How many times the cached Fisher steps of `model` have been traced (for tests)."""
    return sum(step.function.experimental_get_tracing_count()
               for step in _STEPS.get(model, {}).values())


class _Loop:
    """Runs the Fisher estimator batch by batch and accumulates the sums."""

    def __init__(self, model, variables, lik, estimator, samples, seed, strategy,
                 auto=False, sums: Sums | None = None):
        self.model, self.variables, self.lik = model, variables, lik
        self.sums = sums
        # auto: the step's batch size is chosen from the first batch, capped by memory;
        # larger batches are then cut into calls of that size, never retraced.
        self.auto = auto
        self.calls = 0
        self.estimator, self.samples, self.seed = estimator, samples, seed
        self.distributed = distribute.is_distributed(strategy)
        self.strategy = strategy
        self.step = None
        self.state = None
        self.batches = 0
        self.examples = 0
        self.paths = {}
        self.num_outputs = None
        self.probe = None

    def run(self, dataset, verbose, first=None, what="Fisher diagonal") -> _Progress:
        """Adds every batch of `dataset`, with a progress line that says `what` is
        computed (returned, to be finished once the result is checked); `first()` runs
        after the first non-empty batch."""
        progress = _Progress(dataset, verbose, f"{what} ({self.estimator})")
        try:
            for batch in dataset:
                if self.add(batch) and self.batches == 1 and first is not None:
                    first()
                progress.update(self.batches, self.examples)
        except RuntimeError as error:
            if is_interrupt(error):
                raise KeyboardInterrupt(str(error)) from error
            raise
        except _graph_errors() as error:
            contract = checks.kernel_contract_error(error)  # a registered kernel's output
            if contract is not None:
                raise contract from None
            raise
        return progress

    def add(self, batch) -> int:
        """Adds one batch of the data to the sums; returns its number of examples."""
        x, y, w = keras.utils.unpack_x_y_sample_weight(batch)
        nest = backend.nest()
        size = int(nest.flatten(x)[0].shape[0])
        if size == 0:
            return 0
        if self.estimator in _NEEDS_LABELS and y is None:
            raise ValueError(
                f"estimator={self.estimator!r} needs the true labels, but the data holds "
                "inputs only. Pass (x, y) or use estimator='exact' or 'sampled'."
            )
        if w is not None and tuple(w.shape) not in ((size,), (size, 1)):
            raise ValueError(
                f"Expected sample weights of shape ({size},) or ({size}, 1): one weight for "
                f"each example. Received sample weights of shape {tuple(w.shape)}."
            )
        if self.probe is None:
            # The first batch through the model: its outputs are checked against the
            # likelihood before anything is traced.
            # A few rows suffice, and keep an automatic batch's eager pass small.
            self.probe = _first_outputs(
                self.model, nest.map_structure(lambda t: t[:MIN_AUTO_BATCH_SIZE], x),
                self.distributed)
            checks.check_single_output(self.probe)
            checks.check_outputs(self.lik, self.probe, self.model)
        if y is not None and self.estimator in _NEEDS_LABELS:
            checks.check_label_shape(self.lik, [size] + list(self.probe.shape[1:]), y.shape)
        batch = _pack(x, y, w)
        if (self.step is None or (size > self.step.batch_size and not self.auto)
                or not self.step.accepts(batch)):
            # (A batch of other non-batch dimensions, e.g. padded to another length,
            # has a step of its own.)
            self._build(batch, size)
        if self.distributed:
            self._add_distributed(x, y, w, self.calls)
            self.calls += 1
        else:
            chunk = self.step.batch_size
            for start in range(0, size, chunk):
                part = batch if size <= chunk else nest.map_structure(
                    lambda t, start=start: None if t is None else t[start:start + chunk],
                    batch)
                self.state = self.step.function(self.state, part, self._seed())
                self.calls += 1
        self.batches += 1
        self.examples += size
        return size

    def _seed(self):
        """The step's `[seed, call]`: a tensor on TensorFlow, an array elsewhere."""
        if backend.is_tensorflow():
            return tf.constant([self.seed, self.calls], tf.int64)
        return np.array([self.seed, self.calls], np.int64)

    def _noise(self):
        """The sampled estimator's noise shape per example (None for the others), and
        the outputs' width, from the first rows' outputs."""
        self.num_outputs = self.lik.num_outputs(self.probe)
        if self.estimator != "sampled":
            return None
        return tuple(self.lik.noise_shape(self.probe, self.samples)[1:])

    def guessed_bytes(self, batch) -> int | None:
        """A guess of the step's bytes an example, as `_per_example_bytes` would count
        them, from what is cheap to count: a batched gradient step's bytes
        (`gradient_bytes`, a trace of 0.02 s on an MLP, 1-5 s on the zoo's CNNs) ×
        (the term columns the graph holds + `_GUESSED_OVERHEAD`). None where no guess
        is made: custom sums (the Kronecker factors), or a likelihood whose terms fail
        on the first rows (the step then says why). `automatic_step` traces first at the
        size it implies."""
        if self.sums is not None:
            return None
        if self.estimator == "exact":
            try:
                terms = self.lik.exact_terms(self.probe)
            except Exception:  # only a guess: the traced step raises, with context
                return None
            columns = int(np.prod(terms.shape[1:]))  # the engine's [B, T] of them
            if fast_module.loops_over(columns):
                columns = fast_module.COLUMNS_A_ROUND  # in a loop: one round counted
        elif self.estimator == "sampled":
            columns = int(self.samples or 1)
        else:
            columns = 1
        gradient = gradient_bytes(self.model, self.variables, batch)
        return int(gradient * (columns + _GUESSED_OVERHEAD))

    def _build(self, batch, size):
        noise = self._noise()
        spec = _relaxed_spec(batch)
        if self.state is None:
            self.state = (
                [tf.zeros(shape, tf.float32) for shape in self._shapes()],
                tf.constant(_EMPTY_MISC, tf.float64),
            )
        if self.distributed:
            self.step = _DistributedStep(self, noise)
            return
        if self.auto:
            # A power of two: data of other sizes reuse the trace (padded, at most 2×).
            size = min(AUTO_BATCH_SIZE,
                       max(MIN_AUTO_BATCH_SIZE, 1 << (int(size) - 1).bit_length()))
        what = (tuple(id(v) for v in self.variables) if self.sums is None
                else ("sums", self.sums.key))
        key = (what, self.estimator, _lik_key(self.lik), noise, int(size), _spec_key(spec),
               kernels.version())
        steps = _STEPS.setdefault(self.model, {})

        def step_at(batch_size):  # the cached step of `batch_size` examples, or a new one
            step_key = key[:4] + (int(batch_size),) + key[5:]
            if step_key not in steps:
                steps[step_key] = _Step(self.model, self.variables, self.lik,
                                        self.estimator, noise, int(batch_size), spec,
                                        self.num_outputs, self.sums)
            return steps[step_key]

        step = (automatic_step(self, batch, size, step_at, _Step.per_example_bytes)
                if self.auto else step_at(size))
        self.step = step
        self.paths = step.paths

    def _add_distributed(self, x, y, w, index):
        totals, misc = self.state
        sums, flags = self.step(x, y, w, index)
        self.state = ([a + b for a, b in zip(totals, sums)], _combine(misc, flags))

    def _shapes(self) -> list:
        if self.sums is not None:
            return list(self.sums.shapes)
        return [tuple(v.shape) for v in self.variables]

    def result(self) -> list:
        """The Fisher diagonal: the sums divided by the weight total, after the checks."""
        totals, denominator, finite = self.finish()
        for v, ok in zip(self.variables, finite):
            if not ok:
                raise ValueError(
                    f"The Fisher of variable {engine.variable_key(v)} is not finite (NaN "
                    "or Inf): the model's outputs or gradients overflow on this data."
                )
        return [t / denominator for t in totals]

    def finish(self) -> tuple:
        """`(sums, weight total, [whether each sum is finite])` after the data's checks:
        the one read-back of the loop. Raises when the data was bad or empty."""
        if self.state is None or self.batches == 0:
            raise ValueError(_NO_EXAMPLES)
        totals, misc = self.state
        misc, finite = self._read_back(totals, misc)
        low, high, nan = misc[7:]
        if nan or -low < 0 or high == np.inf:
            raise ValueError(
                f"Expected sample weights >= 0 and finite. Received weights in "
                f"[{-low:g}, {high:g}]{' with NaN' if nan else ''}. A zero weight removes "
                "an example; negative or non-finite weights have no meaning for a Fisher."
            )
        if misc[1]:
            raise ValueError(
                "The data's inputs contain NaN or Inf values; the Fisher would be "
                "meaningless. Clean the data first."
            )
        if misc[2]:
            raise ValueError(
                "The data's labels contain NaN or Inf values; the Fisher would be "
                "meaningless. Clean the data first."
            )
        if self.estimator in _NEEDS_LABELS:
            self.lik.check_label_summary(misc[3:7], self.num_outputs)
        denominator = float(misc[0])
        if denominator <= 0:
            raise ValueError(_NO_EXAMPLES)
        return totals, denominator, [bool(ok) for ok in finite]


    def _read_back(self, totals, misc) -> tuple:
        """`(misc as a float64 array, [whether each sum is finite])`: one read-back."""
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in totals])
        return misc.numpy(), finite.numpy()


class _Step:
    """The traced step for one (model, variables, estimator, likelihood, batch size)."""

    def __init__(self, model, variables, lik, estimator, noise, batch_size, spec,
                 num_outputs, custom=None):
        self.batch_size = batch_size
        self.paths = {}
        model_ref = weakref.ref(model)  # the cache must not keep the model alive
        variables = list(variables)
        terms = _weighted_terms(lik, estimator)
        batch_fn = _batch_fn(lik, estimator, noise, batch_size, num_outputs)
        shapes = custom.shapes if custom is not None else [v.shape for v in variables]
        state_spec = (
            [tf.TensorSpec(shape, tf.float32) for shape in shapes],
            tf.TensorSpec([_MISC], tf.float64),
        )
        paths = self.paths

        def step(state, batch, seed):
            model = model_ref()
            totals, misc = state
            inputs, extra, flags = batch_fn(batch, seed)
            if custom is not None:
                sums = custom.fn(model, terms, inputs, extra)
            elif estimator == "batched":
                sums = _batched_sums(model, variables, lik, inputs, extra)
                paths.update({engine.variable_key(v): "batched" for v in variables})
            else:
                layers = fast_module.plan(model, variables)
                sums = engine.sum_squared_grads(
                    model, layers, variables, terms, inputs, extra, paths)
            if estimator == "batched":
                flags = tf.concat([tf.cast(flags[:1] > 0, tf.float64), flags[1:]], 0)
            # A `Sums` may leave an entry None: nothing to add this batch.
            sums = [a if b is None else a + tf.cast(b, tf.float32)
                    for a, b in zip(totals, sums)]
            return sums, _combine(misc, flags)

        # No autograph, as Keras' own train step: nothing here branches on a tensor, and
        # converting the model's call tree costs seconds on the first call.
        self.function = tf.function(
            step, input_signature=[state_spec, spec, tf.TensorSpec([2], tf.int64)],
            autograph=False)
        self._per_example_bytes = None
        self.spec = spec

    def accepts(self, batch) -> bool:
        """Whether `batch` fits the traced signature (else it needs its own step)."""
        try:
            tf.nest.assert_same_structure(self.spec, batch)
        except (TypeError, ValueError):
            return False
        return all(s.is_compatible_with(tf.TensorSpec(t.shape, t.dtype))
                   for s, t in zip(tf.nest.flatten(self.spec), tf.nest.flatten(batch)))

    def per_example_bytes(self) -> int:
        """Bytes of the traced step's batch-sized tensors, per example (traces once)."""
        if self._per_example_bytes is None:
            graph = self.function.get_concrete_function().graph
            self._per_example_bytes = _per_example_bytes(graph, self.batch_size)
        return self._per_example_bytes


_GRADIENT_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_COUNTED_SIZE = 61
"""The batch size `gradient_bytes` traces at: odd, so that no weight's axis of 64 is
taken for the batch."""


_GUESSED_OVERHEAD = 1.25
"""`_Loop.guessed_bytes`: a step of T term columns counts about (T + this) batched
gradient steps' bytes an example. Counted at 128 examples on the zoo's CNNs
(benchmarks/model_zoo.py, 64×64 inputs; docs/fisher_speed.md): 9.4-15.7 gradient steps
for the exact Fisher of 10 classes, 2.3-4.5 for the empirical. The step is traced once
where the guess and the count allow the same power of two (MobileNetV2, EfficientNetB0,
ResNet50 and DenseNet121's exact there; DenseNet121's empirical, counted 4.5, twice)."""


def automatic_step(loop, batch, size, step_at, bytes_of, parts=1):
    """The automatic batch's step for data of `size` examples: `step_at(n)` (the step
    of n examples, traced when first counted or run), with n as large as the memory
    bounds allow (`affordable_examples`), a multiple of `parts`.

    Counting a step's bytes traces it, and a large model's trace is its first call's
    largest cost (EfficientNetB0: 23 s, against 2.5 s for a gradient step's). So the
    step is traced first at the size `loop.guessed_bytes` implies, and counted; traced
    again only where the count allows a different size: smaller, always; larger, kept
    only if its own count allows it (a `[B, B]` tensor counts more an example at a
    larger B), else the size between the two that count allows. Either backend's loop
    calls it; `bytes_of(step)` counts a step's bytes an example."""
    if size <= MIN_MEMORY_CHUNK:
        return step_at(size)

    def allowed(per_example):  # the call size `per_example` bytes allow, ≤ size
        affordable = affordable_examples(loop.model, loop.variables, batch, size,
                                         per_example)
        if affordable >= size:
            return size
        return min(size, -(-memory_chunk(affordable) // parts) * parts)

    guessed = loop.guessed_bytes(batch)
    first = size if guessed is None else allowed(guessed)
    step = step_at(first)
    chunk = allowed(bytes_of(step))
    if chunk < first:
        return step_at(chunk)
    if chunk > first:
        larger = step_at(chunk)
        allows = allowed(bytes_of(larger))
        if allows >= chunk:
            return larger
        if allows > first:  # between the two: its count at a larger size allows it
            return step_at(allows)
    return step


def affordable_examples(model, variables, batch, size, per_example) -> int:
    """How many examples a call of the automatic batch may take, for a step that holds
    `per_example` bytes an example (as counted) and data of `size` examples: as many as
    `MEMORY_BUDGET` allows, or, where that is fewer than `size` (a large model), as many
    as `GRADIENT_MEMORY_RATIO` batched gradient steps of `DEFAULT_BATCH_SIZE` examples
    hold, if more (`gradient_bytes`, cached a model). Either backend's loop calls it."""
    per_example = max(per_example, 1)
    affordable = MEMORY_BUDGET // per_example
    if affordable < size:
        affordable = max(affordable, GRADIENT_MEMORY_RATIO * DEFAULT_BATCH_SIZE
                         * gradient_bytes(model, variables, batch) // per_example)
    return affordable


def gradient_bytes(model, variables, batch) -> int:
    """Bytes a batched gradient step's tensors hold an example, as `_per_example_bytes`
    counts them: the gradient of the sum of `model(x, training=False)` with respect to
    the model's trainable floating-point variables (the step users train with; `variables`
    for a callable that is not a Keras model), traced (not run) at `_COUNTED_SIZE`
    examples of the packed `batch`'s inputs; cached a model."""
    cached = _GRADIENT_BYTES.setdefault(model, {})
    x = batch[0]
    trained = [v for v in (getattr(model, "trainable_variables", None) or variables)
               if keras.backend.is_float_dtype(v.dtype)]
    key = (str(backend.nest().map_structure(
        lambda t: (tuple(t.shape[1:]), str(t.dtype)), x)), tuple(id(v) for v in trained))
    if key not in cached:
        if backend.is_tensorflow():
            count = _tf_gradient_bytes
        else:
            from keras_ewc.backend.jax.fisher import gradient_bytes as count
        cached[key] = count(model, trained, x, _COUNTED_SIZE)
    return cached[key]


def _tf_gradient_bytes(model, variables, x, batch_size) -> int:
    """`gradient_bytes` on TensorFlow: the gradient's graph traced at `batch_size`."""
    def grad(x):  # traced once and dropped: nothing cached holds the model
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in
                             tf.nest.flatten(model(x, training=False))])
        return tape.gradient(loss, variables)

    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec([batch_size, *t.shape[1:]], t.dtype), x)
    graph = tf.function(grad, autograph=False).get_concrete_function(spec).graph
    return _per_example_bytes(graph, batch_size)


def _per_example_bytes(graph, batch_size) -> int:
    """Σ bytes of the graph's tensors with the batch as one of their first two axes, / B.

    Every such tensor counts, live or not, so this bounds the peak memory from above
    (a `[T, B, ...]` tensor is the gradient of T term columns). Nested function bodies
    (`tf.cond` branches, loops) are not counted, except the body of the engine's loop over
    the term columns (`fast.column_loop`), counted once: one iteration runs at a time.
    """
    total = _batch_bytes(graph, batch_size) + sum(
        _batch_bytes(body, batch_size, captured=False)
        for body in fast_module.loop_bodies(graph))
    return total // max(batch_size, 1)


def _batch_bytes(graph, batch_size, captured=True) -> int:
    """Σ bytes of `graph`'s batch-sized tensors; without `captured`, not counting its
    placeholders (a loop body's captures of tensors the outer graph counts)."""
    total = 0
    for op in graph.get_operations():
        if not captured and op.type == "Placeholder":
            continue
        for t in op.outputs:
            shape = t.shape
            if (shape.rank and shape.is_fully_defined() and t.dtype.size
                    and batch_size in shape.as_list()[:2]):
                total += shape.num_elements() * t.dtype.size
    return total


class _Cached:
    def __init__(self, function):
        self.function = function


class _Shape:
    """Something with a `.shape`, for `distribute_sum_fn`'s zeros on empty shards."""

    def __init__(self, shape):
        self.shape = tuple(shape)


class _DistributedStep:
    """Eager steps under a strategy with several replicas (see keras_ewc.distribute)."""

    def __init__(self, loop, noise):
        self.batch_size = float("inf")
        lik, estimator = loop.lik, loop.estimator
        self.batch_fn = _batch_fn(lik, estimator, noise, None, loop.num_outputs)
        if loop.sums is not None:
            custom = loop.sums
            steps = _STEPS.setdefault(loop.model, {})
            key = ("distributed", "sums", custom.key, estimator, _lik_key(lik),
                   kernels.version())
            if key not in steps:
                model = weakref.proxy(loop.model)  # the cache must not keep it alive
                terms = _weighted_terms(lik, estimator)

                def custom_fn(inputs, extra):
                    sums = custom.fn(model, terms, inputs, extra)
                    return [tf.zeros(shape) if s is None else s
                            for s, shape in zip(sums, custom.shapes)]

                # Each shard size traces once per model, as the one-device step.
                steps[key] = _Cached(tf.function(custom_fn, autograph=False))
            self.sum_fn = distribute.distribute_sum_fn(
                loop.strategy, steps[key].function, [_Shape(s) for s in custom.shapes])
        elif estimator == "batched":
            def sums(inputs, extra):
                return _batched_sums(loop.model, loop.variables, lik, inputs, extra)
            self.sum_fn = sums
        else:
            # Cached like the one-device step: each shard size traces once per model.
            steps = _STEPS.setdefault(loop.model, {})
            key = ("distributed", tuple(id(v) for v in loop.variables), estimator,
                   _lik_key(lik), kernels.version())
            if key not in steps:
                # A proxy: the cache, held by the model, must not keep it alive.
                steps[key] = _Cached(engine.build_sum_squared_grads(
                    weakref.proxy(loop.model), loop.variables, _weighted_terms(lik, estimator)))
            sum_fn = steps[key].function
            loop.paths = sum_fn.paths
            self.sum_fn = distribute.distribute_sum_fn(loop.strategy, sum_fn, loop.variables)
        self.estimator = estimator
        self.seed = loop.seed

    def accepts(self, batch) -> bool:
        return True  # eager: any shape

    def __call__(self, x, y, w, index):
        batch = _pack(x, y, w)
        inputs, extra, flags = self.batch_fn(batch, tf.constant([self.seed, index], tf.int64))
        sums = self.sum_fn(inputs, extra)
        if self.estimator == "batched":
            flags = tf.concat([tf.cast(flags[:1] > 0, tf.float64), flags[1:]], 0)
        return [tf.cast(s, tf.float32) for s in sums], tf.cast(flags, tf.float64)


def _batch_fn(lik, estimator, noise, batch_size, num_outputs):
    """`fn(batch, seed) -> (inputs, extra, flags)`: a batch made ready for the sums.

    `extra` is `(weights,)` or `(weights, target)`, target being the labels or the
    sampled estimator's noise; rows are padded to `batch_size` (when given) with copies
    of the first row at weight 0. `flags` is the misc state of this batch.
    """

    def fn(batch, seed):
        x, y, w = keras.utils.unpack_x_y_sample_weight(batch)
        size = tf.shape(tf.nest.flatten(x)[0])[0]
        weights = tf.constant([-np.inf, -np.inf, 0.0], tf.float64)
        if w is None:
            w = tf.ones([size], tf.float32)
        else:
            w = tf.reshape(tf.cast(w, tf.float32), [size])
            weights = _weight_summary(w)
            # Bad weights are reported at the end; meanwhile they must not poison the sums.
            w = tf.where(tf.math.is_finite(w) & (w >= 0), w, 0.0)
        bad_inputs = _any_not_finite(x)
        bad_labels = tf.constant(False)
        summary = tf.constant([-np.inf, -np.inf, 0.0, 0.0], tf.float64)
        target = None
        if estimator in _NEEDS_LABELS:
            target = y
            bad_labels = _any_not_finite(y)
            found = lik.label_summary(y, num_outputs)
            if found is not None:
                summary = found
        elif estimator == "sampled":
            target = tf.random.stateless_uniform(
                tf.concat([[size], tf.constant(noise, tf.int32)], 0), seed=seed)
        extra = (w,) if target is None else (w, target)
        if batch_size is not None:
            x = tf.nest.map_structure(lambda t: _pad(t, size, batch_size), x)
            extra = tf.nest.map_structure(lambda t: _pad(t, size, batch_size), extra)
            extra = (tf.where(tf.range(batch_size) < size, extra[0], 0.0),) + extra[1:]
        flags = tf.concat([
            tf.stack([tf.reduce_sum(tf.cast(w, tf.float64)),
                      tf.cast(bad_inputs, tf.float64), tf.cast(bad_labels, tf.float64)]),
            summary,
            weights,
        ], 0)
        return x, extra, flags

    return fn


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def memory_chunk(affordable: int) -> int:
    """The batch size of a call that holds `affordable` examples' worth of memory: a
    power of two (other sizes reuse its trace), at least `MIN_MEMORY_CHUNK`."""
    return max(MIN_MEMORY_CHUNK, 2 ** int(np.log2(max(affordable, 1))))


def _first_outputs(model, x, distributed):
    """`model(x, training=False)` on the first rows, for the checks: compiled once a
    model (so a continual run's later calls cost a compiled forward pass, not an eager
    one: an eager recurrent layer cost more than a whole gradient pass over 512
    examples), eager for a callable that is not a Keras model or under a `tf.distribute`
    strategy. Not `predict_on_batch`: a model's `predict_step` may serve something else
    (probabilities, a dict) than what the Fisher differentiates."""
    if not isinstance(model, keras.Model) or distributed:
        return model(x, training=False)
    forward = _FORWARDS.get(model)
    if forward is None:
        if keras.backend.backend() == "jax":
            from keras_ewc.backend.jax import fisher as jax_fisher

            forward = jax_fisher.compiled_forward(model)
        else:
            model_ref = weakref.ref(model)  # the cache must not keep the model alive
            forward = tf.function(lambda x: model_ref()(x, training=False),
                                  reduce_retracing=True, autograph=False)
        _FORWARDS[model] = forward
    return forward(x)


def _pack(x, y, w):
    """A batch as the traced step takes it: `(x, y, w)`, `(x, y)` or `(x,)`."""
    return (x, y, w) if w is not None else (x, y) if y is not None else (x,)


def _weight_summary(w):
    w = tf.cast(w, tf.float64)
    nan = tf.math.is_nan(w)
    inf = tf.constant(np.inf, tf.float64)
    return tf.stack([-tf.reduce_min(tf.where(nan, inf, w)),
                     tf.reduce_max(tf.where(nan, -inf, w)),
                     tf.cast(tf.reduce_any(nan), tf.float64)])


def _combine(misc, flags):
    """Adds a batch's weight total (or batch count) and takes the maximum of the rest."""
    return tf.concat([misc[:1] + flags[:1], tf.maximum(misc[1:], flags[1:])], 0)


def _combine_np(misc, flags):
    """`_combine` on the host, in float64 (the JAX loop's read-back-free state)."""
    misc, flags = np.asarray(misc, np.float64), np.asarray(flags, np.float64)
    return np.concatenate([misc[:1] + flags[:1], np.maximum(misc[1:], flags[1:])])


def _pad(t, size, batch_size):
    """`t` with rows `size..batch_size` filled with copies of its first row, static size."""
    t = tf.convert_to_tensor(t)
    filler = tf.repeat(t[:1], batch_size - size, axis=0)
    return tf.ensure_shape(tf.concat([t, filler], 0), [batch_size] + t.shape[1:])


def _weighted_terms(lik, estimator):
    """The engine's `terms_fn`: the likelihood's terms, each row scaled by √weight."""

    def terms(outputs, extra):
        target = extra[1] if len(extra) > 1 else None
        values = keras.ops.cast(lik.terms(estimator, outputs, target), "float32")
        return values * keras.ops.sqrt(keras.ops.cast(extra[0], "float32"))[:, None]

    return terms


def _batched_sums(model, variables, lik, inputs, extra):
    weights, y = extra
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=False)
        loss = tf.math.divide_no_nan(
            tf.reduce_sum(weights * lik.nll(outputs, y)), tf.reduce_sum(weights))
    grads = tape.gradient(loss, variables, unconnected_gradients="zero")
    return [tf.square(tf.cast(g, tf.float32)) for g in grads]


def _any_not_finite(tensors):
    flags = [tf.reduce_any(tf.logical_not(tf.math.is_finite(t)))
             for t in tf.nest.flatten(tensors) if t is not None and t.dtype.is_floating]
    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)


def _relaxed_spec(batch):
    """The batch's `TensorSpec`s with the batch dimension left free."""

    def spec(t):
        t = tf.convert_to_tensor(t)
        shape = t.shape
        if shape.rank:
            shape = tf.TensorShape([None]).concatenate(shape[1:])
        return tf.TensorSpec(shape, t.dtype)

    return tf.nest.map_structure(spec, batch)


def _lik_key(lik):
    """The likelihood itself when hashable (equal likelihoods share a trace), else its id."""
    try:
        hash(lik)
        return lik
    except TypeError:
        return ("id", id(lik))


def _spec_key(spec):
    return tuple((tuple(s.shape.as_list()), s.dtype.name) for s in tf.nest.flatten(spec)) + (
        str(tf.nest.map_structure(lambda _: 0, spec)),)


def loop_data(data, batch_size, steps, auto):
    """The data as the loop reads it: batched (`batch_size`), bounded by `steps`, and,
    with `auto`, re-cut into batches of up to `AUTO_BATCH_SIZE` examples.

    A `tf.data.Dataset` on TensorFlow, or for a dataset on any backend; arrays on another
    backend are cut in NumPy (`ArrayBatches`: the same batches, no TensorFlow)."""
    if auto and not backend.is_tf_dataset(data):
        batch_size = AUTO_BATCH_SIZE  # arrays: cut to the automatic size directly
    if not backend.is_tensorflow() and not backend.is_tf_dataset(data):
        return ArrayBatches(_arrays(data), int(batch_size or DEFAULT_BATCH_SIZE),
                            checks.check_steps(steps))
    dataset = checks.bound_steps(as_dataset(data, batch_size), steps)
    return rebatch(dataset, AUTO_BATCH_SIZE) if auto else dataset


def _graph_errors() -> tuple:
    """The errors of a TensorFlow graph (a kernel's in-graph assertion); none when
    TensorFlow is not imported (then nothing can raise them)."""
    if sys.modules.get("tensorflow") is None:
        return ()
    return (tf.errors.InvalidArgumentError,)


def is_interrupt(error: BaseException) -> bool:
    """Whether `error` is a Ctrl-C in disguise: a `KeyboardInterrupt` that lands while
    TensorFlow runs C++ code (the data iterator's next batch) comes out of pybind11 as
    `RuntimeError: pybind11::error_already_set: MISMATCH of original and normalized
    active exception types: ORIGINAL KeyboardInterrupt …`."""
    message = str(error)
    return "error_already_set" in message and "KeyboardInterrupt" in message


def rebatch(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """`dataset` re-cut into batches of `batch_size`, if its elements allow it.

    Only dense tensors whose non-batch dimensions are all known can be re-cut (batches
    of padded sequences may differ in length); any other dataset is returned as it is.
    """
    specs = tf.nest.flatten(dataset.element_spec)
    if not specs or not all(
        type(s) is tf.TensorSpec and s.shape.rank and s.shape[1:].is_fully_defined()
        for s in specs
    ):
        return dataset
    return dataset.rebatch(int(batch_size)).prefetch(1)


def as_dataset(data, batch_size=None) -> tf.data.Dataset:
    """A `tf.data.Dataset` of batches from a dataset, an array, or a tuple of arrays."""
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            return data.unbatch().batch(int(batch_size))
        return data
    return tf.data.Dataset.from_tensor_slices(_arrays(data)).batch(
        int(batch_size or DEFAULT_BATCH_SIZE)
    )


def _arrays(data):
    """`data` (an array, or a tuple or dict of them) checked: arrays sharing their first
    dimension; tensors stay tensors on TensorFlow, anything else becomes a NumPy array."""
    checks.check_data_type(data)
    nest = backend.nest()
    if backend.is_tensorflow():
        def convert(a):
            return a if tf.is_tensor(a) else np.asarray(a)
    else:
        convert = np.asarray  # a JAX (or TensorFlow) array is copied to the host
    try:
        structure = nest.map_structure(convert, data)
    except Exception as error:
        raise ValueError(
            "Expected data: a tf.data.Dataset, an array, or (x, y). Received an object "
            f"of type {type(data).__name__}."
        ) from error
    lengths = {int(a.shape[0]) if len(a.shape) else -1 for a in nest.flatten(structure)}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(
            "Expected arrays sharing their first (example) dimension. Received first "
            f"dimensions {sorted(lengths)}."
        )
    return structure


class ArrayBatches:
    """Consecutive batches of arrays, in order, as NumPy slices: the batches of
    `tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size).take(steps)` (the
    last one may be smaller), cut without TensorFlow for the loop on another backend.

    Args:
        arrays: an array, or a tuple or dict of arrays sharing their first dimension.
        batch_size: examples a batch.
        steps: the most batches to give, or None for all of them.

    Example:

    >>> batches = ArrayBatches((np.arange(5), np.arange(5) * 10), 2)
    >>> len(batches), [b[1].tolist() for b in batches]
    (3, [[0, 10], [20, 30], [40]])
    """

    def __init__(self, arrays, batch_size: int, steps: int | None = None):
        self.arrays = arrays
        self.batch_size = int(batch_size)
        examples = int(keras.tree.flatten(arrays)[0].shape[0])
        count = -(-examples // self.batch_size)
        self.count = count if steps is None else min(count, int(steps))

    def __len__(self) -> int:
        return self.count

    def cardinality(self) -> int:
        """The number of batches, as `tf.data.Dataset.cardinality` says it."""
        return self.count

    def __iter__(self):
        size = self.batch_size
        for start in range(0, self.count * size, size):
            yield keras.tree.map_structure(lambda a, s=start: a[s:s + size], self.arrays)


def _x_spec(data):
    """The inputs of one batch of `data`, as specs or arrays, for `checks.check_inputs`."""
    if backend.is_tf_dataset(data):
        spec = data.element_spec
    else:
        checks.check_data_type(data)
        spec = data
    x, _, _ = keras.utils.unpack_x_y_sample_weight(spec)
    return x


class _Progress:
    """Counts batches and examples for the user: integers, no control codes in files.

    On a terminal the line is redrawn in place (at most ten times a second); elsewhere
    (a log file, a pipe, a notebook's captured output) one line is printed at the end.
    """

    def __init__(self, dataset, verbose, what="Fisher diagonal"):
        self.enabled = verbose not in (0, False)
        self.what = what
        cardinality = int(dataset.cardinality())
        self.target = cardinality if cardinality > 0 else None
        self.terminal = bool(getattr(sys.stdout, "isatty", lambda: False)())
        self.start = self.shown = time.monotonic()

    def _line(self, batches, examples):
        done = f"{batches}/{self.target}" if self.target else f"{batches}"
        unit = "batch" if (self.target or batches) == 1 else "batches"
        return f"{self.what}: {done} {unit} - examples: {examples}"

    def update(self, batches, examples):
        if not (self.enabled and self.terminal):
            return
        now = time.monotonic()
        if now - self.shown >= 0.1:
            self.shown = now
            sys.stdout.write("\r" + self._line(batches, examples))
            sys.stdout.flush()

    def finish(self, batches, examples):
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        prefix = "\r" if self.terminal else ""
        sys.stdout.write(f"{prefix}{self._line(batches, examples)} - {elapsed:.1f}s\n")
        sys.stdout.flush()
