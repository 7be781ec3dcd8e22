"""EWCModel: wraps any Keras model and trains it with Elastic Weight Consolidation."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import saving
from keras_ewc.fisher import diagonal, likelihoods
from keras_ewc.fisher import kronecker as kronecker_fisher
from keras_ewc.kronecker import KroneckerRegularizer
from keras_ewc.penalty import EWCRegularizer

STRUCTURES = ("diagonal", "kronecker")

Selector = Sequence[str] | Callable | None


@keras.saving.register_keras_serializable(package="keras_ewc")
class EWCModel(keras.Model):
    """Wraps a Keras model so that `fit` learns new tasks without forgetting old ones.

    The wrapper delegates `call` to the wrapped model and adds the EWC penalty
    `strength * (½ Σ P (θ − m)² + c)` to the compiled loss during training (scaled for
    `tf.distribute` exactly as Keras scales the loss, so it counts once, not once a
    replica). It logs the penalty as `ewc_penalty` (in `fit` and `evaluate`; only `fit`
    adds it to the logged `loss`). After each task, `consolidate(data)` computes the
    diagonal Fisher on the task's data and merges it, anchored at the current weights,
    into `regularizer`: non-trainable float32 variables that are saved with the model.

    Args:
        model: the Keras model to wrap (Sequential, Functional or subclassed).
        strength: λ ≥ 0, the weight of the penalty.
        mode: `"separate"` (the tasks' penalties add up; held as one quadratic) or
            `"online"` (precision decays by `gamma`; the anchor is the latest weights).
        gamma: decay of the precision in online mode, in (0, 1].
        include: which variables to regularise: layer names (a name covers every
            variable of that layer, nested layers included) or a predicate
            `fn(variable) -> bool`. Default: all trainable variables.
        exclude: variables to leave out, in the same forms as `include`.
        structure: `"diagonal"` (the Fisher diagonal, the default) or `"kronecker"`
            (Kronecker-factored blocks `A ⊗ G` for Dense and Conv layers, the exact
            diagonal for every other variable; see `keras_ewc.kronecker`). With
            `"kronecker"`, `regularizer` is a `KroneckerRegularizer`.
        max_tasks: with `structure="kronecker"` and `mode="separate"`, the number of
            tasks whose factors are kept (the state is allocated up front: `in² + out²
            + in·out` floats a layer a task). Ignored otherwise.

    Example:

    >>> import keras, numpy as np, keras_ewc
    >>> net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu"),
    ...                         keras.layers.Dense(3)])
    >>> model = keras_ewc.EWCModel(net, strength=100.0)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> rng = np.random.default_rng(0)
    >>> xa, ya = rng.normal(size=(64, 8)), rng.integers(0, 3, 64)
    >>> _ = model.fit(xa, ya, epochs=1, verbose=0)
    >>> _ = model.consolidate((xa, ya), verbose=0)      # Fisher on task A
    >>> int(model.regularizer.tasks.numpy())
    1
    >>> logs = model.fit(xa + 1.0, ya, epochs=1, verbose=0).history
    >>> sorted(logs)
    ['ewc_penalty', 'loss']
    """

    def __init__(
        self,
        model,
        strength: float = 1.0,
        mode: str = "separate",
        gamma: float = 1.0,
        include: Selector = None,
        exclude: Selector = None,
        structure: str = "diagonal",
        max_tasks: int = 10,
        **kwargs,
    ):
        selected = kwargs.pop("variable_indices", None)
        super().__init__(**kwargs)
        if structure not in STRUCTURES:
            raise ValueError(f"Expected structure in {list(STRUCTURES)}. Received: "
                             f"structure={structure!r}")
        self.structure = structure
        if not isinstance(model, keras.layers.Layer):
            raise ValueError(
                "Expected a Keras model (or layer) to wrap. Received: "
                f"model={model!r} of type {type(model).__name__}"
            )
        self.network = model
        if structure == "kronecker":
            self.regularizer = KroneckerRegularizer(strength=strength, mode=mode,
                                                    gamma=gamma, max_tasks=max_tasks,
                                                    name="ewc_state")
        else:
            self.regularizer = EWCRegularizer(strength=strength, mode=mode, gamma=gamma,
                                              name="ewc_state")
        self.include = _check_selector(include, "include")
        self.exclude = _check_selector(exclude, "exclude")
        self._selected_indices = None if selected is None else [int(i) for i in selected]
        self.penalty_tracker = keras.metrics.Mean(name="ewc_penalty")
        if model.built and model.weights:
            self._build_state()

    # --- building ------------------------------------------------------------------

    def build(self, input_shape=None):
        if not (self.network.built and self.network.weights):
            if input_shape is None:
                raise ValueError("Cannot build an EWCModel without an input shape.")
            # Any model, subclassed ones included, gets its weights from one call.
            self.network(_zeros_like_shape(input_shape), training=False)
        if not self.regularizer.built:
            self._build_state()
        self.built = True

    def _build_state(self):
        variables = self._regularised_variables()
        if self.structure == "kronecker":
            self.regularizer.build_for(variables, self.network)
        else:
            self.regularizer.build_for(variables)
        self.built = True

    def _regularised_variables(self) -> list:
        variables = list(self.network.trainable_variables)
        if not variables:
            raise ValueError(
                "The wrapped model has no trainable variables, so there is nothing for EWC "
                "to regularise."
            )
        if self._selected_indices is not None:
            if max(self._selected_indices, default=-1) >= len(variables):
                raise ValueError(
                    f"The saved EWC selection names variable {max(self._selected_indices)}, "
                    f"but the wrapped model has only {len(variables)} trainable variables."
                )
            return [variables[i] for i in self._selected_indices]
        owners = _layer_names_by_variable(self.network)
        chosen = variables
        if self.include is not None:
            keep = _match(self.include, variables, owners, "include")
            chosen = [v for v in variables if id(v) in keep]
        if self.exclude is not None:
            drop = _match(self.exclude, variables, owners, "exclude")
            chosen = [v for v in chosen if id(v) not in drop]
        if not chosen:
            raise ValueError(
                "include/exclude leave no variable to regularise. Received: "
                f"include={self.include!r}, exclude={self.exclude!r}"
            )
        ids = [id(v) for v in variables]
        self._selected_indices = [ids.index(id(v)) for v in chosen]
        return chosen

    @property
    def regularised_variables(self) -> list:
        """The wrapped model's variables that the penalty anchors."""
        return self.regularizer.targets

    # --- forward and loss ----------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        return self.network(inputs, training=training)

    def penalty(self) -> tf.Tensor:
        """The current EWC penalty (float32 scalar); 0 before any consolidation."""
        if not self.regularizer.built:
            return tf.constant(0.0, tf.float32)
        return self.regularizer.penalty()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        penalty = self.penalty()
        self.penalty_tracker.update_state(penalty)
        if training and loss is not None:
            # Keras divides each replica's loss by the number of replicas before the
            # gradients are summed; the penalty must be divided the same way.
            scaled = keras.src.losses.loss.scale_loss_for_distribution(penalty)
            loss = loss + tf.cast(scaled, loss.dtype)
        return loss

    def train_step(self, data):
        from keras_ewc import distribute

        return distribute.logs_for_reduction(self.distribute_strategy,
                                             super().train_step(data))

    def test_step(self, data):
        from keras_ewc import distribute

        return distribute.logs_for_reduction(self.distribute_strategy,
                                             super().test_step(data))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.15) reduces the first distributed batch with `strategy.reduce`, which
        # MultiWorkerMirroredStrategy cannot do for a nest of tensors; the build needs
        # only shapes, so one replica's shard does (see keras_ewc.distribute).
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            from keras_ewc import distribute

            data_batch = distribute.first_local_batch(self.distribute_strategy, iterator)
            if data_batch is not None:
                iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # --- consolidation -------------------------------------------------------------

    def consolidate(
        self,
        data,
        estimator: str = "exact",
        samples: int | None = None,
        batch_size: int | None = None,
        verbose="auto",
        likelihood=None,
        seed: int | None = None,
    ) -> list:
        """Computes the Fisher on `data` and anchors the current weights with it.

        The new task's Fisher diagonal `F` (see `keras_ewc.fisher_diagonal`) and the
        current weights `θ*` are merged into the state: in separate mode
        `P' = P + F`, `m' = (P m + F θ*) / P'` plus a constant offset, in online mode
        `P' = γ P + F`, `m' = θ*`. The Fisher is computed in full before any variable is
        assigned, so a failure (bad data, NaN) leaves the state as it was.

        Args:
            data: the task's data: a `tf.data.Dataset` of batches, an array of inputs,
                or `(x, y)`; the `empirical` and `batched` estimators need labels.
            estimator: `"exact"` (default), `"sampled"`, `"empirical"` or `"batched"`.
            samples: labels drawn per example by the `sampled` estimator (default 1).
            batch_size: examples a batch (bounds the memory used).
            verbose: 0 for silence, 1 or "auto" for a progress bar.
            likelihood: as in `fisher_diagonal`; inferred from the compiled loss when
                None.
            seed: seed for the `sampled` estimator.

        With `structure="kronecker"`, the Dense and Conv layers get Kronecker factors
        (`keras_ewc.kronecker_factors`) and the other variables the diagonal; the
        factors of a task are stored in its own slot (separate mode) or merged into one
        nearest-Kronecker pair a layer (online mode).

        Returns:
            The Fisher diagonal of this task, a list aligned with
            `regularised_variables`; with `structure="kronecker"`, a dict mapping each
            factored layer's path to `(A, G)` and each other variable's path to its
            Fisher diagonal.
        """
        if not self.regularizer.built:
            raise ValueError(
                "The EWCModel is not built: it has no weights to anchor yet. Train it, "
                "call it on a batch, or call `build(input_shape)` before `consolidate`."
            )
        if self.structure == "kronecker":
            return self._consolidate_kronecker(data, estimator, samples, batch_size,
                                               verbose, likelihood, seed)
        fisher = diagonal.fisher_diagonal(
            self.network,
            data,
            estimator=estimator,
            likelihood=likelihoods.get(likelihood, self),
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            verbose=verbose,
            variables=self.regularizer.targets,
            strategy=self.distribute_strategy,
        )
        # Outside `strategy.run`: cross-replica context, where mirrored state variables
        # are assigned on every replica at once.
        self.regularizer.consolidate(fisher)
        return fisher

    def _consolidate_kronecker(self, data, estimator, samples, batch_size, verbose,
                               likelihood, seed):
        import random

        reg = self.regularizer
        lik = likelihoods.get(likelihood, self)
        # One seed for both passes: the sampled labels are the same for both parts.
        seed = random.randrange(2**31) if seed is None else int(seed)
        common = dict(estimator=estimator, likelihood=lik, samples=samples,
                      batch_size=batch_size, seed=seed, verbose=verbose,
                      strategy=self.distribute_strategy)
        factors = kronecker_fisher.compute_factors(self.network, reg.plan, data, **common)
        rest = []
        if reg.rest:
            rest = diagonal.fisher_diagonal(self.network, data, variables=reg.rest,
                                            **common)
        reg.consolidate(factors, rest)
        result = dict(zip(reg.layer_keys, factors))
        result.update({v.path: f for v, f in zip(reg.rest, rest)})
        return result

    # --- configuration -------------------------------------------------------------

    @property
    def strength(self) -> float:
        return self.regularizer.strength

    @property
    def mode(self) -> str:
        return self.regularizer.mode

    @property
    def gamma(self) -> float:
        return self.regularizer.gamma

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.network),
            "strength": self.strength,
            "mode": self.mode,
            "gamma": self.gamma,
            "include": None if callable(self.include) else self.include,
            "exclude": None if callable(self.exclude) else self.exclude,
        }
        if self.structure != "diagonal":
            config["structure"] = self.structure
            config["max_tasks"] = self.regularizer.max_tasks
        config["format_version"] = saving.FORMAT_VERSION
        if self._selected_indices is not None:
            # The exact selection, so a reloaded model (also one selected by a
            # predicate, which cannot be serialised) rebuilds the same state layout.
            config["variable_indices"] = list(self._selected_indices)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = saving.check_format_version(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)

    # --- saving and loading (see keras_ewc/saving.py) --------------------------------

    def get_build_config(self):
        # A wrapper built in __init__ (around a model already built) records no input
        # shape of its own; the wrapped model's lets `load_model` build the state.
        config = super().get_build_config()
        if config is None:
            config = self.network.get_build_config()
        return config

    def build_from_config(self, config):
        if config and "input_shape" in config:
            self.build(config["input_shape"])
        elif config:
            super().build_from_config(config)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights, optimizer variables and EWC state: all of them, or none.

        If the file does not match (another architecture, other state shapes, a
        truncated or corrupted file), every variable is put back as it was before
        the call and the error says what did not match.
        """
        return saving.all_or_nothing(
            self,
            lambda: super(EWCModel, self).load_weights(
                filepath, skip_mismatch=skip_mismatch, **kwargs),
            filepath,
        )

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        """Exports for serving; a SavedModel also carries the EWC state.

        With `format="tf_saved_model"` the SavedModel has a `serve` endpoint (also
        `serving_default`) and the consolidated state as variable collections
        `ewc_anchors`, `ewc_precision`, `ewc_offset`, `ewc_tasks`, with the network's
        weights (`ewc_network_weights`) and the EWC configuration (`ewc_config`, JSON),
        so `EWCModel.from_saved_model` can go back to training. Other formats are
        Keras' own, exported from the wrapped model's input signature.

        Example:

        >>> import keras, numpy as np, tensorflow as tf, tempfile, keras_ewc
        >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model = keras_ewc.EWCModel(net, strength=5.0)
        >>> path = tempfile.mkdtemp() + "/served"
        >>> model.export(path)
        >>> served = tf.saved_model.load(path)
        >>> [tuple(a.shape) for a in served.ewc_anchors]
        [(4, 2), (2,)]
        >>> x = np.ones((3, 4), "float32")
        >>> bool(np.allclose(served.serve(x), model.predict(x, verbose=0)))
        True
        """
        if format in ("tf_saved_model", "saved_model"):
            if self.structure == "kronecker":
                raise NotImplementedError(
                    "Exporting a SavedModel with Kronecker EWC state is not supported yet. "
                    "Received: structure='kronecker'. Save with `model.save('x.keras')` "
                    "or `save_weights`, or export the wrapped model for serving: "
                    "`model.network.export(path)`."
                )
            return saving.export_saved_model(self, filepath, input_signature, verbose)
        if input_signature is None:
            input_signature = saving.serving_signature(self)
        return super().export(filepath, format=format, verbose=verbose,
                              input_signature=input_signature, **kwargs)

    @classmethod
    def from_saved_model(cls, filepath, model, **kwargs) -> EWCModel:
        """Rebuilds a trainable EWCModel from a SavedModel written by `export`.

        A SavedModel keeps the computation but not the Python model, so pass the
        architecture: `model`, a fresh instance of the wrapped model (built or not).
        Its weights and the consolidated state are set from the SavedModel, with
        the saved `strength`, `mode`, `gamma` and variable selection; compile it and
        `fit` the next task. Shapes are checked first: a mismatch raises an error
        naming the variables, and nothing is assigned.

        Args:
            filepath: the SavedModel's directory.
            model: the architecture to fill in.
            **kwargs: passed to `EWCModel` (e.g. `name`, or `strength` to override).

        Example:

        >>> import keras, tempfile, keras_ewc
        >>> def net():
        ...     return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model = keras_ewc.EWCModel(net(), strength=5.0)
        >>> path = tempfile.mkdtemp() + "/served"
        >>> model.export(path)
        >>> again = keras_ewc.EWCModel.from_saved_model(path, net())
        >>> again.strength, int(again.regularizer.tasks.numpy())
        (5.0, 0)
        """
        return saving.load_saved_model(cls, filepath, model, **kwargs)


def _check_selector(selector, what):
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        return [selector]
    try:
        names = list(selector)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"Expected {what} to be None, a list of layer names, or a predicate "
            f"fn(variable) -> bool. Received: {what}={selector!r}"
        )
    return names


def _layer_names_by_variable(network) -> dict:
    owners: dict = {}
    for layer in network._flatten_layers(include_self=True, recursive=True):
        for v in layer.trainable_variables:
            owners.setdefault(id(v), set()).add(layer.name)
    return owners


def _match(selector, variables, owners, what) -> set:
    if callable(selector):
        chosen = {id(v) for v in variables if selector(v)}
        if not chosen:
            raise ValueError(f"The {what} predicate matches no trainable variable.")
        return chosen
    known = set().union(*owners.values()) if owners else set()
    missing = [n for n in selector if n not in known]
    if missing:
        raise ValueError(
            f"{what} names layers that hold no trainable variable: {missing}. "
            f"Layers with trainable variables: {sorted(known)}"
        )
    return {id(v) for v in variables if owners.get(id(v), set()) & set(selector)}


def _zeros_like_shape(input_shape):
    if isinstance(input_shape, dict):
        return {k: _zeros_like_shape(s) for k, s in input_shape.items()}
    if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
        input_shape[0], (list, tuple, dict)
    ):
        return [_zeros_like_shape(s) for s in input_shape]
    shape = [1 if d is None else int(d) for d in input_shape]
    shape[0] = 1
    return np.zeros(shape, "float32")
