"""EWCModel: wraps any Keras model and trains it with Elastic Weight Consolidation."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Sequence

import keras
import numpy as np
from keras import ops

from keras_ewc import _private, backend, saving
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

    The state knows which variable each anchor and precision belongs to (a key: the
    variable's position in the wrapped model's `weights` and its name), so freezing or
    unfreezing layers changes nothing about what is anchored, and loading refuses a
    state that belongs to other variables. The wrapped model may change: at the next
    `fit`, `evaluate`, `consolidate` or `save`, variables that left it are dropped from
    the state with a `UserWarning` naming them, and new trainable variables (a new head)
    that `include`/`exclude` select join it with zero precision (free until the next
    consolidation). `regularised_variables` always reflects the model as it is.

    The wrapped model can also be replaced: `model.network = keras.Sequential([...])`
    (say, a new network around some of the old layers and a new head) makes the
    wrapper wrap the new network only (the old one is no longer saved with it), and
    the state follows at once as above: variables the two networks share keep their
    anchors and precision, the others leave (with the warning) or join (at zero).
    Compile again before `fit` if the new network has new variables (the optimizer
    knows only the old ones, as in Keras).

    `strength` and `gamma` can be assigned at any time (`model.strength = 10.0`, also
    from a callback): like an optimizer's learning rate they are variables, used by the
    next step without recompiling, and saved with the model. A strength so large that
    the penalty's gradient would overflow float32 is refused.

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
            tasks whose factors are kept. All `max_tasks` slots are allocated when the
            model is built: `4 · (in² + out² + in·out)` bytes a factored layer a slot
            (`in` counting the bias row), e.g. 6.6 MiB a slot, 66 MiB for the default
            10, on MLP 784-400-400-10, whose diagonal state is 3.7 MiB in all;
            `regularizer.state_size()` counts them. Ignored otherwise (online keeps
            one slot).

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
    >>> model.strength = 30.0                         # used by the next step
    >>> logs = model.fit(xa + 1.0, ya, epochs=1, verbose=0).history
    >>> sorted(logs)
    ['ewc_penalty', 'loss']
    >>> model.regularizer.keys                          # what each anchor belongs to
    ['0:kernel', '1:bias', '2:kernel', '3:bias']
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
        keys = kwargs.pop("variable_keys", None)
        selected = kwargs.pop("variable_indices", None)  # format version 1
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
        self._saved_keys = None if keys is None else [str(k) for k in keys]
        self._selected_indices = None if selected is None else [int(i) for i in selected]
        self._signature = None
        self.penalty_tracker = keras.metrics.Mean(name="ewc_penalty")
        if model.built and model.weights:
            self._build_state()

    # --- replacing the wrapped network --------------------------------------------

    def __setattr__(self, name, value):
        if name == "network" and "network" in self.__dict__:
            self._replace_network(value)
        else:
            super().__setattr__(name, value)

    def _replace_network(self, new) -> None:
        """`model.network = new`: wraps `new` in place of the current network.

        Replacing is supported rather than refused because it is how a Keras user
        changes a model that cannot be edited in place (a functional model, or a new
        `keras.Sequential` around some of the old layers and a new head), and the state
        already follows a changed network by variable identity (see `_sync_state`):
        what the two networks share keeps its anchor and precision. The old network is
        untracked, so it is no longer one of this model's layers, weights or saved
        objects (a file would otherwise carry it and load its weights into the new
        network's layers), and the traced steps, which called the old network, are
        traced again. Refused, with the wrapper left as it was: something that is not
        a Keras layer, a network without weights while the state is built (it cannot
        tell which variables it shares), and a change under `structure="kronecker"`
        (whose state is shaped per layer; wrap the new network in a new EWCModel).
        """
        old = self.__dict__["network"]
        if new is old:
            return
        if not isinstance(new, keras.layers.Layer) or new is self or new is self.regularizer:
            raise ValueError(
                "Expected a Keras model (or layer) to wrap in place of the current "
                f"network. Received: network={new!r} of type {type(new).__name__}"
            )
        reg = self.regularizer
        if reg.built and self.structure == "kronecker":
            raise ValueError(
                "structure='kronecker' does not follow a replaced network: its state is "
                "shaped per layer of the network it was built for. Wrap the new network "
                "in a new EWCModel (`keras_ewc.EWCModel(new_network, "
                "structure='kronecker', ...)`), or use structure='diagonal'. The model "
                "still wraps the old network."
            )
        if reg.built and not (new.built and new.weights):
            raise ValueError(
                f"The new network {new.name!r} has no weights yet, so the EWC state "
                "cannot tell which of its variables it anchors. Build it first (call it "
                "on a batch, or `new_network.build(input_shape)`), then assign it. The "
                "model still wraps the old network."
            )
        _private.swap_layer(self, old, new)
        super().__setattr__("network", new)
        try:
            # The warning for dropped variables is held until the swap is complete: a
            # warning turned into an error (`-W error`) must not interrupt it half-way.
            with warnings.catch_warnings(record=True) as held:
                warnings.simplefilter("always")
                if reg.built:
                    self._sync_state()
                elif new.built and new.weights:
                    self._build_state()
        except BaseException:
            _private.swap_layer(self, new, old)
            super().__setattr__("network", old)
            self._signature = self._model_signature() if reg.built else None
            raise
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        # The traced steps call the old network: Keras traces them again when None.
        self.train_function = self.test_function = self.predict_function = None

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
        variables, keys = self._regularised_variables()
        if self.structure == "kronecker":
            # The state is told which layers the factor engine factors.
            plan = kronecker_fisher.factored_layers(self.network, variables)
            self.regularizer.build_for(
                variables, self.network, keys, plan=plan,
                layer_keys=[kronecker_fisher.layer_key(layer, self.network)
                            for layer, _, _ in plan])
        else:
            self.regularizer.build_for(variables, keys)
        self._signature = self._model_signature()
        self.built = True

    def _regularised_variables(self) -> tuple[list, list]:
        if self._saved_keys is not None:
            variables = variable_for_keys(self.network, self._saved_keys)
            return variables, list(self._saved_keys)
        variables = list(self.network.trainable_variables)
        if not variables:
            raise ValueError(
                "The wrapped model has no trainable variables, so there is nothing for EWC "
                "to regularise."
            )
        if self._selected_indices is not None:  # a format version 1 file
            if max(self._selected_indices, default=-1) >= len(variables):
                raise ValueError(
                    f"The saved EWC selection names variable {max(self._selected_indices)}, "
                    f"but the wrapped model has only {len(variables)} trainable variables."
                )
            chosen = [variables[i] for i in self._selected_indices]
            return chosen, variable_keys(self.network, chosen)
        chosen = self._select(variables, strict=True)
        if not chosen:
            raise ValueError(
                "include/exclude leave no variable to regularise. Received: "
                f"include={self.include!r}, exclude={self.exclude!r}"
            )
        return chosen, variable_keys(self.network, chosen)

    def _select(self, variables, strict) -> list:
        """Applies include/exclude to `variables`; `strict` refuses names that match
        no layer (at wrapping time; variables added later need not match)."""
        owners = _layer_names_by_variable(self.network)
        chosen = list(variables)
        if self.include is not None:
            keep = _match(self.include, variables, owners, "include", strict)
            chosen = [v for v in variables if id(v) in keep]
        if self.exclude is not None:
            drop = _match(self.exclude, variables, owners, "exclude", strict)
            chosen = [v for v in chosen if id(v) not in drop]
        return chosen

    def _model_signature(self) -> tuple:
        # Cheap to compute and compare: which variables the model holds and which of
        # them train. Nothing is rebuilt while it stays the same.
        return (tuple(id(w) for w in self.network.weights),
                tuple(id(v) for v in self.network.trainable_variables))

    def _sync_state(self) -> bool:
        """Follows the wrapped model if its variables changed since the state was built.

        Variables that left the model are dropped from the state with a warning naming
        them; new trainable variables (a new head, an unfrozen layer that was frozen
        when wrapped) that include/exclude select join it with zero precision. Frozen
        variables keep their state. Returns whether the state changed.
        """
        if not self.regularizer.built:
            return False
        signature = self._model_signature()
        if signature == self._signature:
            return False
        if self.structure == "kronecker":
            return self._check_kronecker_unchanged(signature)
        weights = list(self.network.weights)
        present = {id(w) for w in weights}
        reg = self.regularizer
        held = {id(t) for t in reg.targets}
        removed = [(k, t) for k, t in zip(reg.keys, reg.targets) if id(t) not in present]
        candidates = [v for v in self.network.trainable_variables if id(v) not in held]
        added = {id(v) for v in self._select(candidates, strict=False)} if candidates else set()
        keep = (held & present) | added
        targets = [w for w in weights if id(w) in keep]
        keys = variable_keys(self.network, targets)
        if not targets:
            raise ValueError(
                "The wrapped model no longer holds any of the regularised variables "
                f"({[k for k, _ in removed]}) and has no new trainable variable to "
                "regularise. Wrap the new model in a new EWCModel."
            )
        changed = bool(removed or added) or keys != reg.keys
        if changed:
            with self._strategy_scope():
                reg.rebind(targets, keys)
            if removed:
                warnings.warn(
                    "These regularised variables are no longer part of the wrapped "
                    "model; their EWC state (anchor and precision) is dropped: "
                    + ", ".join(f"{k} ({t.path})" for k, t in removed),
                    UserWarning, stacklevel=3,
                )
        self._signature = signature
        return changed

    def make_train_function(self, force=False):
        # `fit` and `train_on_batch` come here first: follow a model that changed
        # (which retraces), else keep the traced step.
        changed = self._sync_state()
        return super().make_train_function(force=self._stale("train", force or changed))

    def make_test_function(self, force=False):
        changed = self._sync_state()
        return super().make_test_function(force=self._stale("test", force or changed))

    def make_predict_function(self, force=False):
        return super().make_predict_function(force=self._stale("predict", force))

    def _stale(self, step, force) -> bool:
        """Whether the traced `step` ("train", "test", "predict") must be traced again:
        a traced step calls the network as it was when traced, so after a head is
        replaced in place (`pop`, `add`) each step is retraced once, whichever of
        `fit`, `evaluate` or `predict` notices the change first (`_sync_state` tells
        only the first caller)."""
        signature = self._model_signature()
        traced = self.__dict__.setdefault("_traced_for", {})  # untracked by Keras
        stale = traced.get(step) != signature
        traced[step] = signature
        return force or stale

    def _check_kronecker_unchanged(self, signature) -> bool:
        """Kronecker state is shaped per layer: refuse variables added or removed."""
        present = {id(w) for w in self.network.weights}
        reg = self.regularizer
        held = {id(t) for t in reg.targets}
        removed = [k for k, t in zip(reg.keys, reg.targets) if id(t) not in present]
        candidates = [v for v in self.network.trainable_variables if id(v) not in held]
        added = self._select(candidates, strict=False) if candidates else []
        if removed or added:
            raise ValueError(
                "structure='kronecker' does not follow a wrapped model whose variables "
                f"change. Removed: {removed}; added: {[v.path for v in added]}. Wrap the "
                "changed model in a new EWCModel, or use structure='diagonal' (which "
                "follows such changes)."
            )
        self._signature = signature
        return False

    def _tf_strategy(self):
        """The `tf.distribute` strategy the model was created under (TensorFlow); None
        on other backends, whose Fisher engine distributes through
        `keras.distribution`."""
        return self.distribute_strategy if backend.is_tensorflow() else None

    def _strategy_scope(self):
        # New state variables are created in the scope of the model's strategy (mirrored
        # like the others); elsewhere, in the current scope.
        strategy = self._tf_strategy()
        return contextlib.nullcontext() if strategy is None else strategy.scope()

    @property
    def regularised_variables(self) -> list:
        """The wrapped model's variables that the penalty anchors, as the model is now."""
        self._sync_state()
        return self.regularizer.targets

    # --- forward and loss ----------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        return self.network(inputs, training=training)

    def penalty(self):
        """The current EWC penalty (float32 scalar); 0 before any consolidation.

        The penalty the next training step would use: a wrapped model that changed
        is followed first, as `fit` follows it (a removed head leaves the state, with a
        warning; with `structure="kronecker"` the change is refused, as `fit` refuses it).
        """
        if not self.regularizer.built:
            return ops.zeros((), "float32")
        self._sync_state()
        return self.regularizer.penalty()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        # The state was synced by `make_train_function` before tracing.
        penalty = (self.regularizer.penalty() if self.regularizer.built
                   else ops.zeros((), "float32"))
        self.penalty_tracker.update_state(penalty)
        if training and loss is not None:
            if backend.is_tensorflow():
                # Keras divides each replica's loss by the number of replicas before
                # the gradients are summed; the penalty must be divided the same way.
                from keras_ewc.backend.tensorflow import distribute

                replicas = distribute.replicas_in_sync()
                if replicas > 1:
                    penalty = penalty * (1.0 / replicas)
            # On JAX, `keras.distribution` computes the loss on the global batch
            # (sharded by the compiler, not per replica): nothing to scale.
            loss = loss + ops.cast(penalty, loss.dtype)
        return loss

    if backend.is_tensorflow():
        # Only TensorFlow's `train_step(data)` and `test_step(data)` are overridden,
        # to make the logs reducible under `tf.distribute`; JAX's steps
        # (`train_step(state, data)`, stateless) are Keras' own, and the penalty enters
        # them through `compute_loss`, as on TensorFlow.
        def train_step(self, data):
            from keras_ewc.backend.tensorflow import distribute

            return distribute.logs_for_reduction(self.distribute_strategy,
                                                 super().train_step(data))

        def test_step(self, data):
            from keras_ewc.backend.tensorflow import distribute

            return distribute.logs_for_reduction(self.distribute_strategy,
                                                 super().test_step(data))

    # Overrides Keras 3.15's private `Trainer._maybe_symbolic_build` (pinned in
    # tests/test_private.py through `_private.symbolic_build`).
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.15) reduces the first distributed batch with `strategy.reduce`, which
        # MultiWorkerMirroredStrategy cannot do for a nest of tensors; the build needs
        # only shapes, so one replica's shard does (see keras_ewc.distribute).
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            from keras_ewc.backend.tensorflow import distribute

            data_batch = distribute.first_local_batch(self.distribute_strategy, iterator)
            if data_batch is not None:
                iterator = None
        return _private.symbolic_build(self, iterator=iterator, data_batch=data_batch)

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
        steps: int | None = None,
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
            batch_size: examples a batch (default: chosen for speed within a memory
                bound; see `fisher_diagonal`).
            verbose: 0 for silence, 1 or "auto" for a progress bar.
            likelihood: as in `fisher_diagonal`; inferred from the compiled loss when
                None.
            seed: seed for the `sampled` estimator.
            steps: batches to read from `data` (None: all of them), as in `evaluate`.

        With `structure="kronecker"`, the Dense and Conv layers get Kronecker factors
        (`keras_ewc.kronecker_factors`) and the other variables the diagonal; the
        factors of a task are stored in its own slot (separate mode) or merged into one
        nearest-Kronecker pair a layer (online mode).

        Thread-safe: calls on one model (and `regularizer.assign_state`) run one at a
        time, each merging its task into the state the previous one left; none is lost.

        Returns:
            The Fisher diagonal of this task, a list aligned with
            `regularised_variables`; with `structure="kronecker"`, a dict mapping each
            factored layer's key (its path relative to the wrapped model, as in
            `regularizer.layer_keys` and `keras_ewc.kronecker_factors`) to `(A, G)`,
            and each other variable's key (as in `regularizer.keys`, e.g. `"4:gamma"`)
            to its Fisher diagonal.
        """
        # A re-entrant lock a state: concurrent calls are serialised, not refused.
        with self.regularizer._state_lock:
            return self._consolidate(data, estimator, samples, batch_size, verbose,
                                     likelihood, seed, steps)

    def _consolidate(self, data, estimator, samples, batch_size, verbose, likelihood,
                     seed, steps):
        if not self.regularizer.built:
            raise ValueError(
                "The EWCModel is not built: it has no weights to anchor yet. Train it, "
                "call it on a batch, or call `build(input_shape)` before `consolidate`."
            )
        self._sync_state()
        options = {} if steps is None else {"steps": steps}
        if self.structure == "kronecker":
            return self._consolidate_kronecker(data, estimator, samples, batch_size,
                                               verbose, likelihood, seed, options)
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
            strategy=self._tf_strategy(),
            **options,
        )
        # Outside `strategy.run`: cross-replica context, where mirrored state variables
        # are assigned on every replica at once.
        self.regularizer.consolidate(fisher)
        return fisher

    def _consolidate_kronecker(self, data, estimator, samples, batch_size, verbose,
                               likelihood, seed, options):
        import random

        reg = self.regularizer
        lik = likelihoods.get(likelihood, self)
        # One seed for both passes: the sampled labels are the same for both parts.
        seed = random.randrange(2**31) if seed is None else int(seed)
        common = dict(estimator=estimator, likelihood=lik, samples=samples,
                      batch_size=batch_size, seed=seed, verbose=verbose,
                      strategy=self._tf_strategy(), **options)
        factors = kronecker_fisher.compute_factors(self.network, reg.plan, data, **common)
        rest = []
        if reg.rest:
            rest = diagonal.fisher_diagonal(self.network, data, variables=reg.rest,
                                            **common)
        reg.consolidate(factors, rest)
        # The state's keys, relative to the wrapped model: layer keys for the factored
        # layers (as `kronecker_factors` gives them), variable keys for the others.
        keys = {id(v): k for v, k in zip(reg.targets, reg.keys)}
        result = dict(zip(reg.layer_keys, factors))
        result.update({keys[id(v)]: f for v, f in zip(reg.rest, rest)})
        return result

    # --- configuration -------------------------------------------------------------

    @property
    def strength(self) -> float:
        """λ: assign to change it; the next step uses it, with no recompiling."""
        return self.regularizer.strength

    @strength.setter
    def strength(self, value) -> None:
        self._sync_state()
        self.regularizer.strength = value

    @property
    def mode(self) -> str:
        return self.regularizer.mode

    @property
    def gamma(self) -> float:
        """γ (online mode): assign to change it for the next consolidation."""
        return self.regularizer.gamma

    @gamma.setter
    def gamma(self, value) -> None:
        self.regularizer.gamma = value

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
        if self.regularizer.built:
            # The exact selection, by key, so a reloaded model (also one selected by a
            # predicate, which cannot be serialised) rebuilds the same state layout.
            config["variable_keys"] = self.regularizer.keys
        elif self._saved_keys is not None:
            config["variable_keys"] = list(self._saved_keys)
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

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the model; the file is written beside `filepath` and renamed into place,
        so a save that fails part-way leaves the previous file as it was.

        As with a plain write, a symbolic link is written through (its target is
        replaced) and the file keeps the mode it had (a new one: `0o666` less the
        umask); see `keras_ewc.saving.write_then_rename`."""
        self._sync_state()
        return saving.write_then_rename(
            filepath, overwrite,
            lambda path: super(EWCModel, self).save(path, overwrite=True, zipped=zipped,
                                                    **kwargs),
            fallback=lambda: super(EWCModel, self).save(
                filepath, overwrite=overwrite, zipped=zipped, **kwargs),
            atomic=zipped is not False and not kwargs,
            endings=(".keras", ".h5", ".hdf5"))

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves weights and EWC state, written beside `filepath` and renamed into place
        (through symbolic links, keeping the file's mode, as `save` does)."""
        self._sync_state()
        return saving.write_then_rename(
            filepath, overwrite,
            lambda path: super(EWCModel, self).save_weights(path, overwrite=True),
            fallback=lambda: super(EWCModel, self).save_weights(
                filepath, overwrite=overwrite, max_shard_size=max_shard_size),
            atomic=max_shard_size is None, endings=(".weights.h5",))

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights, optimizer variables and EWC state: all of them, or none.

        If the file does not match (another architecture, other state shapes, a
        truncated or corrupted file), every variable is put back as it was before
        the call and the error says what did not match.
        """
        self._sync_state()
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
        so `EWCModel.from_saved_model` can go back to training. With
        `structure="kronecker"` the factored layers' slots follow as `ewc_kronecker`
        (see `keras_ewc.saving.export_saved_model`). Other formats are Keras' own,
        exported from the wrapped model's input signature.

        Example:

        >>> import keras, numpy as np, tensorflow as tf, keras_ewc
        >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model = keras_ewc.EWCModel(net, strength=5.0)
        >>> path = "served"
        >>> model.export(path)
        >>> served = tf.saved_model.load(path)
        >>> [tuple(a.shape) for a in served.ewc_anchors]
        [(4, 2), (2,)]
        >>> x = np.ones((3, 4), "float32")
        >>> bool(np.allclose(served.serve(x), model.predict(x, verbose=0)))
        True
        """
        self._sync_state()
        if format in ("tf_saved_model", "saved_model"):
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
            **kwargs: passed to `EWCModel` (e.g. `name`, or `strength` or `gamma`
                to override). `structure`, `mode` and `max_tasks` are the file's: a
                value equal to it is accepted, another is refused with a ValueError
                naming both (the state could not be loaded into it), as are
                `include`/`exclude` (the file says what is anchored).

        Example:

        >>> import keras, keras_ewc
        >>> def net():
        ...     return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model = keras_ewc.EWCModel(net(), strength=5.0)
        >>> path = "served"
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
    # Every nested layer: `layers` stops at the first level (see keras_ewc._private).
    for layer in _private.flatten_layers(network):
        for v in layer.trainable_variables:
            owners.setdefault(id(v), set()).add(layer.name)
    return owners


def _match(selector, variables, owners, what, strict=True) -> set:
    if callable(selector):
        chosen = {id(v) for v in variables if selector(v)}
        if not chosen and strict:
            raise ValueError(f"The {what} predicate matches no trainable variable.")
        return chosen
    known = set().union(*owners.values()) if owners else set()
    missing = [n for n in selector if n not in known]
    if missing and strict:
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


# A key is the variable's position in the wrapped model's `weights` and its name
# ("2:kernel"). Positions in `weights` are the order Keras' own `get_weights` /
# `set_weights` use and rely on when copying weights between two instances of one
# architecture; they do not move when a layer is frozen or unfrozen (unlike positions
# in `trainable_variables`), and unlike `Variable.path` they do not depend on
# auto-generated names (`sequential_3/dense_7/kernel`), which differ between processes
# and between two instances built in one process. The name guards against a file from
# a model whose weights are ordered otherwise. A file's state that belongs to other
# variables has other keys, whatever the shapes, and is refused.


def variable_keys(network, variables) -> list:
    """The key of each of `variables` in `network`: `"{position in weights}:{name}"`."""
    index = {id(w): i for i, w in enumerate(network.weights)}
    missing = [v.path for v in variables if id(v) not in index]
    if missing:
        raise ValueError(f"These variables are not weights of the wrapped model: {missing}")
    return [f"{index[id(v)]}:{stable_name(v.name)}" for v in variables]


def stable_name(name: str) -> str:
    """A variable's name as keys hold it: Keras numbers unnamed weights per process
    (`variable`, `variable_18`: ConvNeXt's layer scales), so those are all `variable`."""
    return "variable" if re.fullmatch(r"variable(_\d+)?", name) else name


def variable_for_keys(network, keys) -> list:
    """The variables of `network` that `keys` (from `variable_keys`) name."""
    weights = list(network.weights)
    found, wrong = [], []
    for key in keys:
        head, _, name = str(key).partition(":")
        i = int(head) if head.isdigit() else -1
        if 0 <= i < len(weights) and stable_name(weights[i].name) == stable_name(name):
            found.append(weights[i])
        else:
            have = (f"weight {i} is {weights[i].name!r} ({weights[i].path})"
                    if 0 <= i < len(weights) else f"the model has {len(weights)} weights")
            wrong.append(f"{key} ({have})")
    if wrong:
        raise ValueError(
            "The saved EWC state names variables this model does not have: "
            + "; ".join(wrong) + ". Load it into the architecture it was saved from."
        )
    return found
