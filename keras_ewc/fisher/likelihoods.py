"""Likelihoods: how a model's outputs define p(y | x, θ), for the Fisher estimators.

Each likelihood gives, for a batch of outputs, the pseudo-losses ("terms", `[B, T]`)
whose squared per-example gradients sum to the Fisher of one estimator:

- `exact_terms(outputs)`: Σ_t (∇ term_t)² = E_{y∼p(y|x)} (∇ log p(y|x))², in closed form
  over the model's predictive distribution (C − 1 terms for C classes, K for K
  Bernoulli or Gaussian outputs).
- `nll(outputs, y)`: −log p(y|x) per example, for the `empirical` (true labels) and
  `sampled` (labels drawn from the model) estimators.
- `sample(outputs, noise)`: labels drawn from the model, deterministic given `noise`,
  whose shape is `noise_shape(outputs, k)` for k draws per example.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

_EPS = 1e-7

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


def _rank(t) -> int | None:
    shape = getattr(t, "shape", None)
    return None if shape is None or getattr(shape, "rank", 0) is None else len(shape)


def _flat(outputs):
    """Outputs as `[B, K]`."""
    outputs = ops.cast(outputs, "float32")
    if _rank(outputs) == 1:
        return outputs[:, None]
    if _rank(outputs) > 2:
        return ops.reshape(outputs, (ops.shape(outputs)[0], -1))
    return outputs


class Likelihood:
    """How a model's outputs define p(y | x, θ), and the Fisher estimators' terms.

    Subclasses implement `exact_terms`, `nll`, `noise_shape`, `sample` and
    `nll_of_samples`; `terms` combines them for each estimator, and
    `label_summary`/`check_label_summary` validate labels inside a traced loop.

    Args:
        from_logits: whether the model outputs logits (True) or probabilities.
    """

    name = "base"
    # Where the likelihood came from (e.g. the compiled loss), and that loss's Keras
    # class: the checks name them in their errors. None for an explicit instance.
    origin: str | None = None
    loss_class: str | None = None

    def __init__(self, from_logits: bool = True):
        self.from_logits = bool(from_logits)

    def __repr__(self):
        return f"{type(self).__name__}(from_logits={self.from_logits})"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def num_outputs(self, outputs) -> int:
        return int(_flat(outputs).shape[-1])

    def terms(self, estimator: str, outputs, extra=None):
        """The `[B, T]` pseudo-losses of `estimator` for a batch of outputs.

        Their per-example gradients, squared and summed over the T columns, are one
        example's contribution to the Fisher diagonal; row n depends on example n alone.

        Args:
            estimator: `"exact"` (closed form over the predictive distribution; `extra`
                unused), `"empirical"` (`extra`: the true labels) or `"sampled"`
                (`extra`: uniform noise of shape `noise_shape(outputs, k)`; k labels
                are drawn an example and each counts 1/k).
            outputs: the model's outputs, `[B, ...]`.
            extra: as the estimator needs.

        Example:

        >>> import numpy as np
        >>> lik = Categorical(from_logits=True)
        >>> lik.terms("empirical", np.zeros((2, 3), "float32"), np.array([0, 2])).shape
        TensorShape([2, 1])
        """
        if estimator == "exact":
            return self.exact_terms(outputs)
        if estimator == "empirical":
            return self.nll(outputs, extra)[:, None]
        if estimator == "sampled":
            labels = self.sample(outputs, extra)
            samples = int(extra.shape[1])
            return self.nll_of_samples(outputs, labels) * (1.0 / np.sqrt(samples))
        raise ValueError(
            "Expected estimator in ('exact', 'empirical', 'sampled'). Received: "
            f"estimator={estimator!r}"
        )

    def exact_terms(self, outputs):
        raise NotImplementedError(f"{type(self).__name__} must implement `exact_terms`.")

    def nll(self, outputs, y):
        raise NotImplementedError(f"{type(self).__name__} must implement `nll`.")

    def noise_shape(self, outputs, k):
        return [int(outputs.shape[0]), k, self.num_outputs(outputs)]

    def sample(self, outputs, noise):
        raise NotImplementedError(f"{type(self).__name__} must implement `sample`.")

    def nll_of_samples(self, outputs, labels):
        raise NotImplementedError(f"{type(self).__name__} must implement `nll_of_samples`.")

    def label_summary(self, y, num_outputs: int):
        """Traceable summary of a batch of labels, or None when labels need no check.

        A float64 `[4]` tensor: (−min, max, whether any is not an integer, whether any
        is not finite); summaries of several batches combine by elementwise maximum.
        """
        return None

    def check_label_summary(self, summary, num_outputs: int) -> None:
        """Raises a ValueError when the combined `label_summary` shows bad labels."""
        return


def _summary(y):
    # float64 where the backend has it; JAX without x64 computes in float32, exact for
    # integer labels below 2**24 (the summary holds label values, not counts).
    dtype = "float64" if keras.backend.backend() != "jax" else "float32"
    y = ops.cast(ops.reshape(y, (-1,)), dtype)
    finite = ops.isfinite(y)
    clean = ops.where(finite, y, ops.zeros_like(y))
    if y.shape[0] == 0:  # (an empty dynamic size reduces to the same ±inf)
        return ops.convert_to_tensor([-np.inf, -np.inf, 0.0, 0.0], dtype)
    return ops.stack([
        -ops.min(clean), ops.max(clean),
        ops.cast(ops.any(ops.not_equal(clean, ops.round(clean))), dtype),
        ops.cast(ops.any(ops.logical_not(finite)), dtype),
    ])


def _sigmoid_cross_entropy(labels, logits):
    """−[y log σ(z) + (1 − y) log(1 − σ(z))], stable for large |z| (as TensorFlow's)."""
    return ops.relu(logits) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


class Categorical(Likelihood):
    """One label out of C classes; outputs are logits or probabilities, `[B, C]`."""

    name = "categorical"

    def log_probs(self, outputs):
        outputs = ops.cast(outputs, "float32")
        if self.from_logits:
            return ops.log_softmax(outputs, axis=-1)
        probs = outputs / ops.sum(outputs, axis=-1, keepdims=True)
        return ops.log(ops.clip(probs, _EPS, 1.0))

    def exact_terms(self, outputs):
        # Σ_c p_c (∇ log p_c)² = Σ_c (∇ [sg(√p_c) log p_c])²: one term a class, u_c.
        log_p = self.log_probs(outputs)
        root = ops.stop_gradient(ops.sqrt(ops.exp(log_p)))
        terms = root * log_p
        classes = terms.shape[-1]
        if classes is None or classes < 2:
            return terms
        # The columns' gradients U = [∇u_c] satisfy U √p = Σ_c p_c ∇log p_c = ∇ Σ_c p_c
        # = 0, so U Uᵀ = U Q Qᵀ Uᵀ for any Q whose C − 1 orthonormal columns span the
        # complement of √p: C − 1 terms, one backward pass fewer. Q is the Householder
        # reflection H = I − 2 v vᵀ / vᵀv, v = √p + e_C (H √p = −e_C), less its last
        # column; |v| ≥ 1, so it is well conditioned.
        v = root + ops.one_hot(classes - 1, classes)
        scale = 2.0 * ops.sum(terms * v, -1, keepdims=True) / ops.sum(
            v * v, -1, keepdims=True)
        return terms[:, :-1] - v[:, :-1] * scale

    def nll(self, outputs, y):
        log_p = self.log_probs(outputs)
        y = ops.convert_to_tensor(y)
        if _is_one_hot(y, log_p):
            return -ops.sum(ops.cast(y, "float32") * log_p, axis=-1)
        # A one-hot product, not a gather: a label out of range gives 0 instead of
        # failing inside a traced loop, which reports bad labels once, at its end.
        y = ops.one_hot(ops.reshape(ops.cast(y, "int32"), (-1,)), int(log_p.shape[-1]))
        return -ops.sum(y * log_p, axis=-1)

    def noise_shape(self, outputs, k):
        return [int(outputs.shape[0]), k, int(outputs.shape[-1])]

    def sample(self, outputs, noise):
        # Gumbel-max: argmax(log p + G) is a draw from p; noise is uniform in (0, 1).
        log_p = ops.stop_gradient(self.log_probs(outputs))
        u = ops.clip(ops.cast(noise, "float32"), 1e-12, 1.0 - 1e-7)
        gumbel = -ops.log(-ops.log(u))
        return ops.cast(ops.argmax(log_p[:, None, :] + gumbel, axis=-1), "int32")

    def nll_of_samples(self, outputs, labels):
        """`[B, k]` negative log-likelihoods of `[B, k]` sampled labels."""
        log_p = self.log_probs(outputs)
        return -ops.take_along_axis(log_p, ops.cast(labels, "int32"), axis=-1)

    def label_summary(self, y, num_outputs):
        y = ops.convert_to_tensor(y)
        if _rank(y) is not None and _rank(y) > 1 and y.shape[-1] == num_outputs:
            return None  # one-hot (or soft) labels
        return _summary(y)

    def check_label_summary(self, summary, num_outputs):
        low, high, fractional, infinite = (float(v) for v in np.asarray(summary))
        if low == -np.inf:
            return
        if infinite or fractional:
            raise ValueError(
                "Expected integer class labels for a categorical likelihood. Received "
                "labels with non-integer values."
            )
        if -low < 0 or high >= num_outputs:
            raise ValueError(
                f"Expected labels in [0, {num_outputs}) for a model with {num_outputs} "
                f"outputs. Received labels in [{-low:g}, {high:g}]."
            )


class Bernoulli(Likelihood):
    """K independent binary labels; outputs are logits or probabilities, `[B, K]`."""

    name = "bernoulli"

    def logits(self, outputs):
        outputs = _flat(outputs)
        if self.from_logits:
            return outputs
        p = ops.clip(outputs, _EPS, 1.0 - _EPS)
        return ops.log(p) - ops.log1p(-p)

    def exact_terms(self, outputs):
        # E_y (∇ log p(y))² = σ(1-σ) (∇z)² for each output; the outputs are independent
        # and each score has zero mean, so cross terms vanish.
        z = self.logits(outputs)
        s = ops.sigmoid(z)
        return ops.stop_gradient(ops.sqrt(s * (1.0 - s))) * z

    def nll(self, outputs, y):
        z = self.logits(outputs)
        y = ops.reshape(ops.cast(y, "float32"), (-1,) + tuple(z.shape[1:]))
        return ops.sum(_sigmoid_cross_entropy(y, z), -1)

    def noise_shape(self, outputs, k):
        return [int(outputs.shape[0]), k, self.num_outputs(outputs)]

    def sample(self, outputs, noise):
        z = ops.stop_gradient(self.logits(outputs))
        return ops.cast(ops.cast(noise, "float32") < ops.sigmoid(z)[:, None, :], "float32")

    def nll_of_samples(self, outputs, labels):
        z = self.logits(outputs)[:, None, :]
        return ops.sum(_sigmoid_cross_entropy(labels, z + 0 * labels), -1)

    def label_summary(self, y, num_outputs):
        return _summary(y)

    def check_label_summary(self, summary, num_outputs):
        low, high, _, infinite = (float(v) for v in np.asarray(summary))
        if low != -np.inf and (infinite or -low < 0 or high > 1):
            raise ValueError(
                "Expected binary labels in [0, 1] for a bernoulli likelihood. Received "
                f"labels in [{-low:g}, {high:g}]" + (" and non-finite ones." if infinite else ".")
            )


class Gaussian(Likelihood):
    """Regression targets with unit variance around the outputs: −log p = ½‖y − f‖²."""

    name = "gaussian"

    def __init__(self, from_logits: bool = True):
        super().__init__(True)

    def exact_terms(self, outputs):
        # E_y ((y − f)ᵀ ∇f)² = Σ_k (∇f_k)² for y ∼ N(f, I).
        return _flat(outputs)

    def nll(self, outputs, y):
        f = _flat(outputs)
        y = ops.reshape(ops.cast(y, "float32"), (-1,) + tuple(f.shape[1:]))
        return 0.5 * ops.sum(ops.square(y - f), axis=-1)

    def noise_shape(self, outputs, k):
        return [int(outputs.shape[0]), k, self.num_outputs(outputs)]

    def sample(self, outputs, noise):
        # noise is uniform in (0, 1): map it to a standard normal.
        u = ops.clip(ops.cast(noise, "float32"), 1e-7, 1.0 - 1e-7)
        eps = float(np.sqrt(2.0)) * ops.erfinv(2.0 * u - 1.0)
        return ops.stop_gradient(_flat(outputs))[:, None, :] + eps

    def nll_of_samples(self, outputs, labels):
        f = _flat(outputs)[:, None, :]
        return 0.5 * ops.sum(ops.square(labels - f), axis=-1)


def _is_one_hot(y, log_p) -> bool:
    return _rank(y) == _rank(log_p) and _rank(y) > 1 and (
        y.shape[-1] == log_p.shape[-1] and y.shape[-1] != 1
    )


_CLASSES = {"categorical": Categorical, "bernoulli": Bernoulli, "gaussian": Gaussian}

_LOSS_NAMES = {
    "sparse_categorical_crossentropy": "categorical",
    "categorical_crossentropy": "categorical",
    "sparsecategoricalcrossentropy": "categorical",
    "categoricalcrossentropy": "categorical",
    "binary_crossentropy": "bernoulli",
    "binarycrossentropy": "bernoulli",
    "mean_squared_error": "gaussian",
    "meansquarederror": "gaussian",
    "mse": "gaussian",
}

_LOSS_CLASSES = {
    "sparsecategoricalcrossentropy": "SparseCategoricalCrossentropy",
    "categoricalcrossentropy": "CategoricalCrossentropy",
    "binarycrossentropy": "BinaryCrossentropy",
}


def get(likelihood, model=None) -> Likelihood:
    """Resolves `likelihood` (an instance, a name, or None: from the compiled loss)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood is None:
        found = _from_compiled_loss(model)
        if found is None:
            raise ValueError(_not_inferred(model))
        return found
    if isinstance(likelihood, str) and likelihood.lower() in _CLASSES:
        name = likelihood.lower()
        compiled = _from_compiled_loss(model)
        if compiled is not None and compiled.name == name:
            return compiled
        found = _CLASSES[name](from_logits=_guess_from_logits(getattr(model, "network", model)))
        found.origin = f"likelihood={likelihood!r} (from_logits={found.from_logits}, guessed)"
        return found
    raise ValueError(
        f"Unknown likelihood. Expected one of {list(LIKELIHOODS)} or a Likelihood "
        f"instance. Received: likelihood={likelihood!r}"
    )


def _not_inferred(model) -> str:
    """Why no likelihood follows from `model`'s compiled loss: what was found, what
    was expected, and how to fix it."""
    loss = getattr(model, "loss", None) if model is not None else None
    fix = f"Pass likelihood= one of {list(LIKELIHOODS)} (or a Likelihood instance)."
    expected = f"one of the losses {sorted(set(_LOSS_NAMES))}"
    if isinstance(loss, (list, tuple, dict)):
        items = loss.items() if isinstance(loss, dict) else enumerate(loss)
        shown = ", ".join(f"{k}: {_loss_name(v)}" for k, v in items)
        return (
            f"Could not infer the likelihood: the model is compiled with "
            f"{len(loss)} losses, one for each of its outputs ({shown}), but the Fisher "
            f"takes one likelihood, for a model with a single output, compiled with "
            f"{expected}. Consolidate a model with the one output to anchor (e.g. "
            "keras_ewc.EWCModel(keras.Model(net.inputs, net.outputs[0]))), and pass its "
            f"likelihood. {fix}"
        )
    if loss is None:
        found = "the model is not compiled (no loss)"
    else:
        found = f"the model is compiled with the loss {_loss_name(loss)}"
    return f"Could not infer the likelihood: {found}; expected {expected}. {fix}"


def _loss_name(loss) -> str:
    if isinstance(loss, str) or loss is None:
        return repr(loss)
    fn = getattr(loss, "fn", None)  # a loss function wrapped by Keras
    if type(loss).__name__ == "LossFunctionWrapper" and fn is not None:
        return fn.__name__
    return getattr(loss, "__name__", None) or type(loss).__name__


def _from_compiled_loss(model):
    loss = getattr(model, "loss", None) if model is not None else None
    if loss is None:
        return None
    if isinstance(loss, (list, tuple, dict)):
        return None
    if isinstance(loss, str):
        name = _LOSS_NAMES.get(loss.lower())
        if name is None:
            return None
        return _with_origin(_CLASSES[name](from_logits=False), loss.lower(),
                            f"the compiled loss {loss!r} (which means from_logits=False)")
    key = type(loss).__name__.lower()
    if key == "lossfunctionwrapper" and getattr(loss, "fn", None) is not None:
        key = loss.fn.__name__.lower()
    elif callable(loss) and hasattr(loss, "__name__"):
        key = loss.__name__.lower()
    name = _LOSS_NAMES.get(key)
    if name is None:
        return None
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    from_logits = bool(config.get("from_logits", False))
    shown = type(loss).__name__ if key == type(loss).__name__.lower() else key
    return _with_origin(_CLASSES[name](from_logits=from_logits), key,
                        f"the compiled loss {shown}(from_logits={from_logits})")


def _with_origin(likelihood, key, origin):
    likelihood.origin = origin
    likelihood.loss_class = _LOSS_CLASSES.get(key.replace("_", ""))
    return likelihood


def _guess_from_logits(model) -> bool:
    """Logits unless the model's last layer applies a softmax or sigmoid."""
    layers = getattr(model, "layers", None)
    if not layers:
        return True
    activation = getattr(layers[-1], "activation", None)
    name = getattr(activation, "__name__", "")
    if name in ("softmax", "sigmoid"):
        return False
    return type(layers[-1]).__name__ not in ("Softmax",)
