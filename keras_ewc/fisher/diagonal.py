"""The diagonal of the Fisher information, from per-example gradients."""

from __future__ import annotations

import random
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import distribute
from keras_ewc.fisher import checks, engine
from keras_ewc.fisher import likelihoods as lik_module

ESTIMATORS = ("exact", "sampled", "empirical", "batched")
_NEEDS_LABELS = ("empirical", "batched")
DEFAULT_BATCH_SIZE = 64


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
) -> list[tf.Tensor]:
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
    non-finite weights are refused with an error that says what to do.

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
        batch_size: examples a batch; re-batches a dataset when given (default 64 for
            arrays, the dataset's own batches otherwise).
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

    Returns:
        A list of float32 tensors, aligned with `variables`.

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
    if samples is not None:
        if estimator != "sampled":
            raise ValueError(
                "`samples` applies only to estimator='sampled'. "
                f"Received: samples={samples!r} with estimator={estimator!r}"
            )
        if int(samples) != samples or samples < 1:
            raise ValueError(f"Expected samples >= 1. Received: samples={samples!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size!r}")
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
    # --- checks before the loop (keras_ewc.fisher.checks) ---
    checks.check_steps(steps)
    checks.check_single_output_model(model)
    checks.check_finite_weights(list(getattr(model, "weights", [])) + variables)
    checks.check_inputs(model, _x_spec(data))
    # --- end of checks ---

    dataset = checks.bound_steps(as_dataset(data, batch_size), steps)
    progbar = _progbar(dataset, verbose)
    totals = [tf.zeros(v.shape, tf.float32) for v in variables]
    num_examples = 0
    num_batches = 0
    total_weight = 0.0
    sum_fn = None
    probe = None
    for index, batch in enumerate(dataset):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(batch)
        _check_finite(x, "inputs")
        if estimator in _NEEDS_LABELS:
            if y is None:
                raise ValueError(
                    f"estimator={estimator!r} needs the true labels, but the data holds "
                    "inputs only. Pass (x, y) or use estimator='exact' or 'sampled'."
                )
            _check_finite(y, "labels")
        size = int(tf.shape(tf.nest.flatten(x)[0])[0])
        if size == 0:
            continue
        if weight is not None:
            weight = checks.check_sample_weight(weight, size)
            batch_weight = float(tf.reduce_sum(weight))
            if batch_weight == 0.0:
                continue
        if probe is None:
            # The first batch through the model: its outputs are checked against the
            # likelihood before anything is traced.
            probe = model(x, training=False)
            checks.check_single_output(probe)
            checks.check_outputs(lik, probe, model)
        if y is not None and estimator in _NEEDS_LABELS:
            checks.check_label_shape(lik, [size] + list(probe.shape[1:]), y.shape)
            lik.check_labels(probe, y)
        if estimator == "batched":
            sums = _batched_squared_mean_grad(model, variables, lik, x, y, weight)
        else:
            if sum_fn is None:
                terms_fn = _terms_fn(lik, estimator, samples)
                if weight is not None:
                    terms_fn = checks.weighted_terms(terms_fn)
                sum_fn = engine.build_sum_squared_grads(model, variables, terms_fn)
                if distribute.is_distributed(strategy):
                    sum_fn = distribute.distribute_sum_fn(strategy, sum_fn, variables)
            extra = None
            if estimator == "empirical":
                extra = tf.convert_to_tensor(y)
            elif estimator == "sampled":
                shape = lik.noise_shape(probe, samples)
                shape[0] = size
                extra = tf.random.stateless_uniform(shape, seed=[seed, index])
            if weight is not None:
                extra = checks.weighted_extra(extra, weight)
            sums = sum_fn(x, extra)
        totals = [a + b for a, b in zip(totals, sums)]
        num_examples += size
        num_batches += 1
        total_weight += size if weight is None else batch_weight
        if progbar is not None:
            progbar.update(num_batches, values=[("examples", num_examples)], finalize=False)
    if num_examples == 0:
        raise ValueError(
            "The data holds no examples (or only examples of sample weight 0): cannot "
            "compute a Fisher from nothing."
        )
    if progbar is not None:
        progbar.update(num_batches, finalize=True)
    denominator = num_batches if estimator == "batched" else total_weight
    fisher = [t / float(denominator) for t in totals]
    for v, f in zip(variables, fisher):
        if not bool(tf.reduce_all(tf.math.is_finite(f))):
            raise ValueError(
                f"The Fisher of variable {v.path if hasattr(v, 'path') else v.name} is not "
                "finite (NaN or Inf): the model's outputs or gradients overflow on this data."
            )
    return fisher


def _terms_fn(lik, estimator, samples):
    if estimator == "exact":
        return lambda outputs, _extra: lik.exact_terms(outputs)
    if estimator == "empirical":
        return lambda outputs, y: lik.nll(outputs, y)[:, None]
    scale = 1.0 / np.sqrt(samples)

    def sampled(outputs, noise):
        labels = lik.sample(outputs, noise)
        return lik.nll_of_samples(outputs, labels) * scale

    return sampled


def _batched_squared_mean_grad(model, variables, lik, x, y, weight=None):
    with tf.GradientTape() as tape:
        outputs = model(x, training=False)
        if weight is None:
            loss = tf.reduce_mean(lik.nll(outputs, y))
        else:  # the weighted mean loss of the batch
            loss = tf.reduce_sum(lik.nll(outputs, y) * weight) / tf.reduce_sum(weight)
    grads = tape.gradient(loss, variables, unconnected_gradients="zero")
    return [tf.square(tf.cast(g, tf.float32)) for g in grads]


def as_dataset(data, batch_size=None) -> tf.data.Dataset:
    """A `tf.data.Dataset` of batches from a dataset, an array, or a tuple of arrays."""
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            return data.unbatch().batch(int(batch_size))
        return data
    checks.check_data_type(data)
    try:
        structure = tf.nest.map_structure(
            lambda a: a if tf.is_tensor(a) else np.asarray(a), data
        )
    except Exception as error:
        raise ValueError(
            "Expected data: a tf.data.Dataset, an array, or (x, y). Received an object "
            f"of type {type(data).__name__}."
        ) from error
    lengths = {int(a.shape[0]) if len(a.shape) else -1 for a in tf.nest.flatten(structure)}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(
            "Expected arrays sharing their first (example) dimension. Received first "
            f"dimensions {sorted(lengths)}."
        )
    return tf.data.Dataset.from_tensor_slices(structure).batch(
        int(batch_size or DEFAULT_BATCH_SIZE)
    )


def _check_finite(tensors, what):
    for t in tf.nest.flatten(tensors):
        t = tf.convert_to_tensor(t)
        if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
            raise ValueError(
                f"The data's {what} contain NaN or Inf values; the Fisher would be "
                "meaningless. Clean the data first."
            )


def _x_spec(data):
    """The inputs of one batch of `data`, as specs or arrays, for `checks.check_inputs`."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
    else:
        checks.check_data_type(data)
        spec = data
    x, _, _ = keras.utils.unpack_x_y_sample_weight(spec)
    return x


def _progbar(dataset, verbose):
    if verbose in (0, False):
        return None
    cardinality = int(dataset.cardinality())
    target = cardinality if cardinality > 0 else None
    return keras.utils.Progbar(
        target,
        verbose=1 if verbose == "auto" else int(verbose),
        stateful_metrics=["examples"],
        unit_name="batch",
    )
