"""Checks that refuse data, models and likelihoods that would give a wrong Fisher.

Each check is a pure function of shapes, specs or tensors that raises a `ValueError`
saying what it received and what to do; `fisher_diagonal` calls them before its loop
(on the data's type and spec, the model's outputs and weights) and on each batch (labels,
sample weights), so nothing reaches a traced function that would fail inside it.

The likelihood check (`check_outputs`) decides from the first batch's outputs whether
they are probabilities. Rules, with `rows` the outputs reshaped to `[-1, C]`:

- `from_logits=False` (categorical): every output in `[0, 1]` (to `RANGE_TOL`) and every
  row summing to 1 (to `SUM_TOL`, `SUM_TOL_16` for 16-bit outputs); otherwise the outputs
  are not probabilities and the error says so.
- `from_logits=False` (bernoulli): every output in `[0, 1]` (to `RANGE_TOL`).
- `from_logits=True` (categorical): refused only when EVERY row is a probability vector
  (entries in `[0, 1]`, sum within `LOGITS_SUM_TOL` = 1e-4 of 1). A genuine logit model
  meets that on every row of a batch only by a coincidence of measure close to zero.
- `from_logits=True` (either): refused when the model's last layer applies a softmax or
  sigmoid and every output lies in `[0, 1]`: the outputs are probabilities by
  construction.
- A categorical likelihood over a single output is refused: log p = 0 for every label,
  so its Fisher is zero whatever the weights.
"""

from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np

from keras_ewc import backend
from keras_ewc._tensorflow import tf
from keras_ewc.fisher.kernels import _common

RANGE_TOL = 1e-5
SUM_TOL = 1e-3
SUM_TOL_16 = 2e-2
LOGITS_SUM_TOL = 1e-4

_FIX_DATA = (
    "Pass a tf.data.Dataset of batches, an array of inputs, or a tuple (x, y) or "
    "(x, y, sample_weight) of arrays."
)


# --- the data's type and size ------------------------------------------------------


def check_data_type(data) -> None:
    """Refuses a file path, a Python list or None as the Fisher's data.

    Args:
        data: what was passed as `data`.

    Example:

    >>> check_data_type("train.npz")
    Traceback (most recent call last):
    ...
    ValueError: Expected data in memory, not a file path. Received: data='train.npz'. ...
    """
    if data is None:
        raise ValueError(f"Expected data. Received: data=None. {_FIX_DATA}")
    if isinstance(data, (str, bytes, os.PathLike)):
        raise ValueError(
            f"Expected data in memory, not a file path. Received: data={data!r}. Load it "
            "first (e.g. `np.load`, or `tf.data.TFRecordDataset` with a parsing `map`), "
            f"then: {_FIX_DATA}"
        )
    if isinstance(data, list):
        kinds = sorted({type(item).__name__ for item in data}) or ["nothing"]
        raise ValueError(
            f"Expected an array, a tuple or a tf.data.Dataset. Received a Python list of "
            f"{len(data)} items ({', '.join(kinds)}). A list is ambiguous (inputs and "
            "labels, or several inputs?): pass `np.asarray(data)` for inputs alone, a "
            "tuple `(x, y)` for inputs and labels, or `((x1, x2), y)` for a model with "
            "several inputs."
        )


def check_sampling_arguments(estimator: str, samples, batch_size) -> None:
    """Checks `samples` (only with `estimator="sampled"`, an int >= 1) and `batch_size`.

    >>> check_sampling_arguments("sampled", 2, 32)
    >>> check_sampling_arguments("exact", 2, None)
    Traceback (most recent call last):
    ...
    ValueError: `samples` applies only to estimator='sampled'. Received: samples=2 ...
    """
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


def check_steps(steps) -> int | None:
    """Validates `steps` (batches to draw, as in Keras' `evaluate`); returns it as int.

    Args:
        steps: None, or an integer >= 1.

    Example:

    >>> check_steps(3)
    3
    >>> check_steps(0)
    Traceback (most recent call last):
    ...
    ValueError: Expected steps: an integer >= 1 or None. Received: steps=0
    """
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"Expected steps: an integer >= 1 or None. Received: steps={steps!r}")
    return int(steps)


def bound_steps(dataset: tf.data.Dataset, steps: int | None) -> tf.data.Dataset:
    """Limits `dataset` to `steps` batches; refuses an infinite dataset without `steps`.

    Args:
        dataset: a `tf.data.Dataset` of batches.
        steps: batches to draw, or None for all of them.

    Example:

    >>> ds = tf.data.Dataset.range(8).batch(2).repeat()
    >>> int(bound_steps(ds, 3).cardinality())
    3
    """
    steps = check_steps(steps)
    if steps is None:
        if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            raise ValueError(
                "The dataset is infinite (its cardinality is INFINITE, e.g. after "
                "`.repeat()`), so the Fisher would never finish. Pass steps= (the number "
                "of batches to use), or remove the `.repeat()`."
            )
        return dataset
    return dataset.take(steps)


# --- the model ---------------------------------------------------------------------


def check_single_output_model(model) -> None:
    """Refuses a model with several outputs, from its declared `outputs` when it has them.

    Args:
        model: a Keras model.
    """
    outputs = getattr(model, "outputs", None)
    if outputs is None:
        return
    flat = backend.nest().flatten(outputs)
    if len(flat) > 1:
        names = [getattr(t, "name", "?") for t in flat]
        raise ValueError(_multi_output_message(len(flat), names))


def check_single_output(outputs) -> None:
    """Refuses outputs that are not a single tensor (a list or dict of heads)."""
    flat = backend.nest().flatten(outputs)
    if len(flat) != 1:
        names = sorted(outputs) if isinstance(outputs, dict) else None
        raise ValueError(_multi_output_message(len(flat), names))


def _multi_output_message(count, names):
    named = f" ({', '.join(map(str, names))})" if names else ""
    return (
        "Expected a model with a single output tensor for the Fisher. Received a model "
        f"with {count} outputs{named}. Compute the Fisher of one head with a model that "
        "shares its weights, e.g. `keras.Model(net.inputs, net.outputs[0])`, and pass "
        "that model."
    )


def check_finite_weights(variables: Sequence) -> None:
    """Refuses weights holding NaN or Inf, naming the first such variable.

    Args:
        variables: the model's variables (trainable and not: moving statistics too).

    Example:

    >>> import keras
    >>> v = keras.Variable([1.0, float("nan")], name="kernel")
    >>> check_finite_weights([v])
    Traceback (most recent call last):
    ...
    ValueError: The model's weights are not finite: variable 'kernel' holds NaN or Inf ...
    """
    seen = set()
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        found = _not_finite_count(v)
        if found is not None:
            bad, size = found
            raise ValueError(
                f"The model's weights are not finite: variable {_name(v)!r} holds NaN or "
                f"Inf values ({bad} of {size}). A Fisher of such a model is "
                "meaningless. Restore finite weights (e.g. from a checkpoint) and train "
                "again with a lower learning rate or gradient clipping."
            )


def _not_finite_count(v) -> tuple[int, int] | None:
    """`(values that are NaN or Inf, values)` of a float variable holding any, else None."""
    if backend.is_tensorflow():
        value = tf.convert_to_tensor(v)
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            return (int(tf.reduce_sum(tf.cast(~tf.math.is_finite(value), tf.int32))),
                    int(tf.size(value)))
        return None
    value = keras.ops.convert_to_tensor(v)
    if not keras.backend.is_float_dtype(value.dtype):
        return None
    finite = keras.ops.isfinite(value)
    if bool(keras.ops.all(finite)):
        return None
    return (int(keras.ops.sum(keras.ops.cast(keras.ops.logical_not(finite), "int32"))),
            int(np.prod(value.shape)))


def _input_structure(model):
    """The nest of input tensors a functional model was built on (None if unknown)."""
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def check_inputs(model, x_spec) -> None:
    """Checks a batch's inputs against the model's declared inputs, before any tracing.

    Refuses a dict whose keys are not the model's input names, the wrong number of
    inputs, inputs without a batch dimension (an un-batched dataset, or a single
    example), and inputs whose feature dimensions differ from the model's. Models that
    declare no inputs (subclassed models) are left to their own checks.

    Args:
        model: a Keras model.
        x_spec: the inputs of one batch: a nest of `tf.TensorSpec`, tensors or arrays.

    Example:

    >>> import keras
    >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> check_inputs(net, tf.TensorSpec([4]))
    Traceback (most recent call last):
    ...
    ValueError: Expected batches of inputs of shape (None, 4). Received inputs of shape (4,)...
    """
    declared = getattr(model, "inputs", None)
    if not declared:
        return
    declared = list(declared)
    names = [getattr(t, "name", None) for t in declared]
    struct = _input_structure(model)
    if isinstance(x_spec, dict) and isinstance(struct, dict) and set(struct) <= set(x_spec):
        # A model built on a dict of inputs takes a dict with the same keys, whatever
        # the names of its input tensors (KerasHub backbones: `token_ids`, ...).
        declared = [struct[k] for k in struct]
        names = list(struct)
        x_spec = [x_spec[k] for k in struct]
    elif isinstance(x_spec, dict):
        if len(declared) == 1 and set(x_spec) == {names[0]}:
            x_spec = [x_spec[names[0]]]
        elif not set(names) <= set(x_spec):
            raise ValueError(
                f"The data's inputs are a dict with keys {sorted(x_spec)}, but the model's "
                f"inputs are named {names}. Key the dict by the model's input names, or "
                "pass the inputs themselves; for a dataset of dicts that also hold the "
                "labels, map it to tuples, e.g. `ds.map(lambda d: (d['image'], d['label']))`."
            )
        else:
            x_spec = [x_spec[n] for n in names]
    flat = backend.nest().flatten(x_spec)
    if len(flat) != len(declared):
        raise ValueError(
            f"The model takes {len(declared)} input(s) ({names}). Received {len(flat)} input "
            "tensors in each batch. Pass one array per model input, as a tuple inside the "
            "data: `((x1, x2), y)`."
        )
    for spec, expected in zip(flat, declared):
        shape = _dims(getattr(spec, "shape", None))
        want = _dims(expected.shape)
        if shape is None or want is None:
            continue
        if len(shape) == len(want) - 1 and _compatible(shape, want[1:]):
            if want[-1] == 1 and _compatible(shape, want[:-1]):
                continue  # Keras adds a trailing axis of size 1 itself.
            raise ValueError(
                f"Expected batches of inputs of shape {_shape(want)}. Received inputs of "
                f"shape {_shape(shape)}: the data has no batch dimension. For a "
                "tf.data.Dataset, batch it (`ds.batch(32)`); for an array holding one "
                "example, add a leading axis (`x[None]`)."
            )
        if len(shape) == len(want) and not _compatible(shape[1:], want[1:]):
            raise ValueError(
                f"Expected batches of inputs of shape {_shape(want)} for this model. "
                f"Received inputs of shape {_shape(shape)}. Pass the data the model was "
                "built for."
            )


# --- the likelihood against the outputs ---------------------------------------------


def check_outputs(likelihood, outputs, model=None) -> None:
    """Refuses outputs that contradict the likelihood: probabilities read as logits, etc.

    The rules are in this module's docstring. `model` (optional) lets the check see
    whether the last layer applies a softmax or sigmoid.

    Args:
        likelihood: a `keras_ewc.fisher.Likelihood`.
        outputs: the model's outputs on the first batch.
        model: the model, or None.

    Example:

    >>> from keras_ewc.fisher import likelihoods
    >>> probs = tf.constant([[0.2, 0.8], [0.5, 0.5]])
    >>> check_outputs(likelihoods.Categorical(from_logits=False), probs)
    >>> check_outputs(likelihoods.Categorical(from_logits=True), probs)
    Traceback (most recent call last):
    ...
    ValueError: The model's outputs look like probabilities ...
    """
    name = getattr(likelihood, "name", None)
    if name not in ("categorical", "bernoulli"):
        return
    if backend.is_tensorflow():
        itemsize = tf.as_dtype(outputs.dtype).size
        values = np.asarray(tf.cast(outputs, tf.float32))
    else:
        itemsize = np.dtype(keras.backend.standardize_dtype(outputs.dtype)).itemsize
        values = keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
    if values.size == 0:
        return
    classes = int(values.shape[-1]) if values.ndim > 1 else 1
    if name == "categorical" and classes == 1:
        raise ValueError(
            f"A categorical likelihood over a single output has a zero Fisher (log p = 0 "
            f"for the only class). Received outputs of shape {tuple(outputs.shape)} with "
            f"{_origin(likelihood)}. For one binary output, use a bernoulli likelihood "
            "(`binary_crossentropy`); for C classes, give the model C outputs."
        )
    in_range = bool(np.all((values >= -RANGE_TOL) & (values <= 1 + RANGE_TOL)))
    if likelihood.from_logits:
        ends_in_probs = model is not None and _last_layer_gives_probabilities(model)
        if name == "categorical":
            sums = values.reshape(-1, classes).sum(axis=-1)
            all_rows = in_range and bool(np.all(np.abs(sums - 1.0) <= LOGITS_SUM_TOL))
        else:
            all_rows = False
        if all_rows or (ends_in_probs and in_range):
            why = (
                "the model's last layer applies a softmax or sigmoid"
                if ends_in_probs
                else f"every row lies in [0, 1] and sums to 1 (to {LOGITS_SUM_TOL:g})"
            )
            raise ValueError(
                f"The model's outputs look like probabilities ({why}), but the Fisher "
                f"would read them as logits: {_origin(likelihood)} says from_logits=True. "
                f"The Fisher would be wrong by a large factor. Either compile with "
                f"`{_loss_class(likelihood)}(from_logits=False)` (or pass "
                f"likelihood={type(likelihood).__name__}(from_logits=False)), or remove "
                "the final softmax/sigmoid so that the model outputs logits."
            )
        return
    sum_ok = True
    worst = 0.0
    if name == "categorical":
        tol = SUM_TOL_16 if itemsize <= 2 else SUM_TOL
        sums = values.reshape(-1, classes).sum(axis=-1)
        worst = float(np.max(np.abs(sums - 1.0)))
        sum_ok = worst <= tol
    if not in_range or not sum_ok:
        seen = (
            f"outputs in [{values.min():.4g}, {values.max():.4g}]"
            + (f", rows summing to 1 only within {worst:.3g}" if not sum_ok else "")
        )
        raise ValueError(
            f"The model's outputs are not probabilities ({seen}), but "
            f"{_origin(likelihood)} says from_logits=False, so the Fisher would read them "
            "as probabilities and be wrong. If the model outputs logits, compile with "
            f"`{_loss_class(likelihood)}(from_logits=True)` (the string "
            f"'{_loss_string(likelihood)}' means from_logits=False) or pass "
            f"likelihood={type(likelihood).__name__}(from_logits=True); otherwise end the "
            f"model with a {'softmax' if name == 'categorical' else 'sigmoid'}."
        )


def _last_layer_gives_probabilities(model) -> bool:
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    name = getattr(getattr(last, "activation", None), "__name__", "")
    return name in ("softmax", "sigmoid") or type(last).__name__ == "Softmax"


def _origin(likelihood) -> str:
    origin = getattr(likelihood, "origin", None)
    return origin or f"likelihood={likelihood!r}"


def _loss_class(likelihood) -> str:
    found = getattr(likelihood, "loss_class", None)
    if found:
        return f"keras.losses.{found}"
    return {
        "categorical": "keras.losses.SparseCategoricalCrossentropy",
        "bernoulli": "keras.losses.BinaryCrossentropy",
    }[likelihood.name]


def _loss_string(likelihood) -> str:
    found = getattr(likelihood, "loss_class", None) or ""
    return {
        "CategoricalCrossentropy": "categorical_crossentropy",
        "BinaryCrossentropy": "binary_crossentropy",
    }.get(found, "binary_crossentropy" if likelihood.name == "bernoulli"
          else "sparse_categorical_crossentropy")


# --- labels and sample weights --------------------------------------------------------


def check_label_shape(likelihood, outputs_shape, labels_shape) -> None:
    """Refuses labels whose shape does not fit the model's outputs.

    Categorical: sparse labels `[B]` or `[B, 1]`, or one-hot `[B, C]` like the outputs.
    Bernoulli and Gaussian: one label for each output, `B × K` in all.

    Args:
        likelihood: a `keras_ewc.fisher.Likelihood`.
        outputs_shape: the shape of a batch's outputs, `[B, ...]`.
        labels_shape: the shape of the same batch's labels.

    Example:

    >>> from keras_ewc.fisher import likelihoods
    >>> check_label_shape(likelihoods.Categorical(), (8, 4), (8,))
    >>> check_label_shape(likelihoods.Categorical(), (8, 4), (8, 3))
    Traceback (most recent call last):
    ...
    ValueError: Expected labels of shape (8,) or (8, 1) (class indices) or (8, 4) ...
    """
    out = tuple(int(d) for d in outputs_shape)
    got = tuple(int(d) for d in labels_shape)
    batch = out[0]
    if getattr(likelihood, "name", None) == "categorical":
        sparse = (out[:-1], out[:-1] + (1,))
        if got in sparse or (got == out and len(out) > 1):
            return
        raise ValueError(
            f"Expected labels of shape {sparse[0]} or {sparse[1]} (class indices) or "
            f"{out} (one-hot) for outputs of shape {out}. Received labels of shape {got}. "
            "Pass one class index per example, or one-hot rows as wide as the outputs."
        )
    if getattr(likelihood, "name", None) in ("bernoulli", "gaussian"):
        if got[:1] == (batch,) and int(np.prod(got)) == int(np.prod(out)):
            return
        raise ValueError(
            f"Expected labels with one value for each output, shape {out}, for a "
            f"{likelihood.name} likelihood. Received labels of shape {got}. Pass labels "
            "shaped like the model's outputs."
        )


def check_sample_weight(weight, size: int) -> tf.Tensor:
    """Validates a batch's sample weights and returns them as a float32 `[B]` tensor.

    Args:
        weight: the batch's `sample_weight`: one finite value >= 0 for each example.
        size: the batch size B.

    Example:

    >>> check_sample_weight(np.array([2.0, 0.0, 1.0]), 3).numpy()
    array([2., 0., 1.], dtype=float32)
    >>> check_sample_weight(np.array([1.0, -1.0]), 2)
    Traceback (most recent call last):
    ...
    ValueError: Expected sample weights >= 0 and finite. Received weights in [-1, 1]...
    """
    w = tf.convert_to_tensor(weight)
    shape = tuple(w.shape)
    if shape not in ((size,), (size, 1)):
        raise ValueError(
            f"Expected sample weights of shape ({size},) or ({size}, 1): one weight for "
            f"each example. Received sample weights of shape {shape}."
        )
    w = tf.reshape(tf.cast(w, tf.float32), [size])
    values = w.numpy()
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(
            f"Expected sample weights >= 0 and finite. Received weights in "
            f"[{np.nanmin(values):g}, {np.nanmax(values):g}]"
            f"{' with NaN' if np.isnan(values).any() else ''}. A zero weight removes an "
            "example; negative or non-finite weights have no meaning for a Fisher."
        )
    return w


def weighted_terms(terms_fn):
    """Wraps `terms_fn(outputs, extra)` to scale example n's terms by `√w_n`.

    The wrapped function takes `extra = {"sqrt_weight": [B], "extra": inner}` ("extra"
    absent when the inner function takes None), so its squared gradients are those of
    `terms_fn` times `w_n`.
    """

    def weighted(outputs, extra):
        terms = terms_fn(outputs, extra.get("extra"))
        return terms * tf.cast(extra["sqrt_weight"], terms.dtype)[:, None]

    return weighted


def weighted_extra(extra, weight) -> dict:
    """The `extra` of `weighted_terms` for a batch's inner `extra` and weights `[B]`."""
    packed = {"sqrt_weight": tf.sqrt(tf.cast(weight, tf.float32))}
    if extra is not None:
        packed["extra"] = extra
    return packed


def _name(variable) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?"))


def _dims(shape) -> tuple | None:
    """A shape (a tuple, a `tf.TensorShape`, None) as a tuple of ints and Nones (unknown
    dimensions); None when even its rank is unknown. No TensorFlow needed."""
    if shape is None or getattr(shape, "rank", 0) is None:
        return None
    if hasattr(shape, "as_list"):
        shape = shape.as_list()
    return tuple(None if d is None else int(d) for d in shape)


def _compatible(a: tuple, b: tuple) -> bool:
    """Whether two shapes of `_dims` can be the same (as `TensorShape.is_compatible_with`)."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _shape(shape) -> str:
    return str(_dims(shape))



# --- a registered kernel's output (`register_kernel`) -----------------------------------

KERNEL_CONTRACT = "keras_ewc kernel contract"
"""Marks the in-graph assertions of `checked_sum_squared`, so the Fisher loop can tell
them from other errors of the step and raise their message as a ValueError."""


LAZY_INPUT_CHECK = True
"""`checked_sum_squared` reads the kernel's inputs only when a sum is not finite (False:
on every batch, as before; kept for A/B timings)."""


def checked_sum_squared(layer, kernel, params, records, grads) -> dict:
    """`kernel.sum_squared(layer, records, grads)`, with its contract checked.

    Called while the Fisher step is traced, so the static part costs nothing per
    batch: the result must be a dict whose keys are names of `kernel.params(layer)`
    and include every name of `params` (the variables it must cover), each value a
    float tensor of its variable's shape. An error the kernel raises while traced is
    re-raised naming the layer, the kernel and its class. Finite and >= 0 (a sum of
    squares) is checked in the graph on every batch (a reduction a variable, and, when
    a sum is not finite, one over the kernel's inputs: a non-finite sum from non-finite
    inputs is the data's or the model's fault, which the loop's own checks name), by an
    assertion whose message `fisher_diagonal` raises as a ValueError.

    Not checked: sums that are well-formed but wrong (the wrong maths, or over part of
    the batch); compare a new kernel with the per-example oracle, as the tests of the
    built-in kernels do (tests/test_fisher_kernels.py).
    """
    who, values, known = kernel_sums_keyed(layer, kernel, params, records, grads)
    converted = {}
    for name, value in values.items():
        variable = known[name]
        what = f"its sum for variable {name!r} ({_name(variable)})"
        try:
            value = tf.convert_to_tensor(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{who}: {what} is not a tensor ({error}).") from error
        if not value.dtype.is_floating:
            raise ValueError(
                f"{who}: {what} has dtype {value.dtype.name}; expected a float tensor "
                "(squared gradients). Cast it, or compute it in float.")
        if not value.shape.is_compatible_with(variable.shape):
            raise ValueError(
                f"{who}: {what} has shape {_shape(value.shape)}; expected "
                f"{_shape(variable.shape)}, the variable's shape (sum over the batch and "
                "the terms).")
        converted[name] = (what, tf.reshape(tf.cast(value, tf.float32), variable.shape))
    # A NaN in the data or the model reaches the kernel's inputs: blame the kernel for a
    # non-finite sum only when what it was given was finite (the loop's own checks name
    # the data or the weights otherwise). The inputs (the T columns' gradients, [T, B,
    # *z] a call) are read only when some sum is not finite: read on every batch, that
    # test was about a tenth of the exact Fisher's step on MobileNetV2
    # (docs/fisher_speed.md); when every sum is finite, its value is moot.
    given = [t for t in tf.nest.flatten((records, [_common.terms_of(g) if isinstance(
                 g, _common.Columns) else g for g in grads]))
             if tf.is_tensor(t) and t.dtype.is_floating]

    def given_finite():
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in given]
                             ) if given else tf.constant(True)

    finite = {name: tf.reduce_all(tf.math.is_finite(value))
              for name, (_, value) in converted.items()}
    sums_finite = tf.reduce_all(list(finite.values())) if finite else tf.constant(True)
    blame = (tf.cond(sums_finite, lambda: tf.constant(True), given_finite)
             if LAZY_INPUT_CHECK else given_finite())
    checked = {}
    for name, (what, value) in converted.items():
        ok = tf.logical_not(tf.reduce_any(value < 0.0)) & (
            finite[name] | tf.logical_not(blame))
        check = tf.debugging.Assert(ok, [
            f"{KERNEL_CONTRACT}: {broken_contract_message(who, what)}"])
        with tf.control_dependencies([check]):
            checked[name] = tf.identity(value)
    return checked


def broken_contract_message(who: str, what: str) -> str:
    """The error for a kernel's sum that holds negative, NaN or Inf values."""
    return (f"{who}: {what} holds negative, NaN or Inf values; expected finite sums of "
            "squares >= 0. Fix `sum_squared`; or, if the kernel is right, the per-example "
            "gradients overflow float32 (an untrained or diverged model whose outputs "
            "explode): check the model's outputs on this data.")


def kernel_sums_keyed(layer, kernel, params, records, grads) -> tuple:
    """`(who, sums, the kernel's variables by name)`: `kernel.sum_squared`'s dict, its keys
    checked against `params` (the static half of the contract, on every backend)."""
    who = (f"the Fisher kernel {type(kernel).__name__} registered for layer "
           f"{layer.name!r} ({type(layer).__name__})")
    try:
        values = kernel.sum_squared(layer, records, grads)
    except Exception as error:
        raise ValueError(
            f"{who} raised {type(error).__name__} in `sum_squared`: {error}. Fix the "
            "kernel (see keras_ewc.fisher.Kernel for its contract)."
        ) from error
    if not isinstance(values, dict):
        raise ValueError(f"Expected {who} to return a dict {{variable name: tensor}} from "
                         f"`sum_squared`. Received a {type(values).__name__}.")
    known = dict(kernel.params(layer))
    unknown = [k for k in values if k not in known]
    missing = [k for k in params if k not in values]
    if unknown or missing:
        raise ValueError(
            f"Expected {who} to return sums keyed by its variables' names "
            f"{sorted(known)} (from `params`). Received keys {sorted(map(str, values))}: "
            f"unknown {unknown}, missing {missing}. Fix the keys in `sum_squared`.")
    return who, values, known


def kernel_contract_error(error: BaseException) -> ValueError | None:
    """The ValueError for an in-graph assertion of `checked_sum_squared`, else None."""
    message = str(getattr(error, "message", None) or error)
    start = message.find(KERNEL_CONTRACT)
    if start < 0:
        return None
    # TensorFlow's message quotes the assertion's string with escaped quotes.
    text = message[start + len(KERNEL_CONTRACT) + 2:].replace("\\'", "'")
    end = text.find("Fix `sum_squared`.")
    return ValueError(text[: end + len("Fix `sum_squared`.")] if end >= 0 else text)
