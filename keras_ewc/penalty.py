"""EWCRegularizer: the consolidated state (anchors, precision, offset) and its penalty."""

from __future__ import annotations

import threading
from typing import Sequence

import keras
import numpy as np
from keras import ops

from keras_ewc import _private, backend

MODES = ("separate", "online")


# --- pure state updates -------------------------------------------------------------


def merge_separate(precision, anchor, offset, fisher, theta):
    """Merges one task (Fisher `fisher` at weights `theta`) into one quadratic.

    The sum of per-task penalties ½ Σ_t F_t (θ − θ*_t)² equals ½ P (θ − m)² + c with
    P = Σ F_t, m = Σ F_t θ*_t / P and a constant c. Adding a task:

        P' = P + F,   m' = (P m + F θ*) / P'  (θ* where P' = 0),
        c' = c + ½ Σ P F (m − θ*)² / P'.

    Args are float32 tensors (lists aligned with the variables for the first four
    arrays; `offset` a scalar). Returns `(precision', anchor', offset')`.
    """
    new_p, new_m, added = [], [], ops.zeros((), "float32")
    for p, m, f, t in zip(precision, anchor, fisher, theta):
        p_new = p + f
        positive = p_new > 0
        safe = ops.where(positive, p_new, ops.ones_like(p_new))
        # m + F (θ* − m) / P' is (P m + F θ*) / P', and exactly θ* for a first task.
        new_m.append(ops.where(p > 0, m + f * (t - m) / safe, t))
        added += 0.5 * ops.sum(ops.where(positive, p * f * ops.square(m - t) / safe, 0.0))
        new_p.append(p_new)
    return new_p, new_m, offset + added


def merge_online(precision, anchor, offset, fisher, theta, gamma):
    """Online EWC (Schwarz et al. 2018): P' = γ P + F, m' = θ*, no offset."""
    del anchor, offset
    new_p = [gamma * p + f for p, f in zip(precision, fisher)]
    return new_p, [ops.copy(t) for t in theta], ops.zeros((), "float32")


def quadratic(precision, anchor, offset, theta):
    """½ Σ P (θ − m)² + c, in float32 whatever the dtype of θ."""
    total = ops.cast(offset, "float32")
    for p, m, t in zip(precision, anchor, theta):
        total += 0.5 * ops.sum(p * ops.square(ops.cast(t, "float32") - m))
    return total


# --- the Keras object -----------------------------------------------------------------

# Largest |gradient| whose square is still a finite float32 (Adam and RMSprop square the
# gradients: past this bound their second moment overflows and the weights turn to NaN).
GRADIENT_LIMIT = float(np.sqrt(np.finfo(np.float32).max))


@keras.saving.register_keras_serializable(package="keras_ewc")
class EWCRegularizer(keras.layers.Layer):
    """Holds the consolidated EWC state and computes the quadratic penalty.

    The penalty is `strength * (½ Σ_i P_i (θ_i − m_i)² + c)`: `P` is the `precision`
    (accumulated Fisher diagonal), `m` the `anchors`, `c` the `offset`. The state is held
    in non-trainable float32 variables, created by `build_for()`, so that it is saved,
    checkpointed and distributed with the model. Each anchor and precision records the
    variable it belongs to by a key (`keys`), written into every file; loading matches
    the keys and refuses a state that belongs to other variables. The offset is stored
    without the strength, so changing `strength` later rescales the whole penalty.

    `strength` and `gamma` live in non-trainable float32 variables, like an optimizer's
    learning rate: assigning `reg.strength = 10.0` takes effect at the next step, with
    no retracing. A strength so large that the penalty's gradient would overflow
    float32 is refused. The penalty's gradient, `strength * P (θ − m)`, is given
    directly, so training does not differentiate through a chain of small operations
    per variable: on TensorFlow as a `tf.custom_gradient`, on JAX as a `jax.custom_jvp`
    (whose jitted step then saves no weight-sized residuals; see
    `keras_ewc.backend.jax.penalty`).

    Args:
        strength: λ ≥ 0, the weight of the penalty.
        mode: `"separate"` (Kirkpatrick et al.: the tasks' penalties add up, held as one
            quadratic) or `"online"` (Schwarz et al.: precision decays by `gamma`, the
            anchor moves to the latest weights).
        gamma: decay of the precision in online mode, in (0, 1].

    Example:

    >>> import keras, numpy as np, keras_ewc
    >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> reg = keras_ewc.EWCRegularizer(strength=10.0)
    >>> reg.build_for(net.trainable_variables)
    >>> float(reg.penalty())
    0.0
    >>> fisher = [np.ones(v.shape, "float32") for v in net.trainable_variables]
    >>> reg.consolidate(fisher)            # anchors at the current weights
    >>> _ = net.layers[0].bias.assign([1.0, 1.0])
    >>> round(float(reg.penalty()), 4)     # 10 * ½ * (1² + 1²)
    10.0
    >>> reg.strength = 2.0                 # takes effect at once
    >>> round(float(reg.penalty()), 4)
    2.0
    """

    def __init__(self, strength: float = 1.0, mode: str = "separate", gamma: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        strength = validate_strength(strength)
        self.mode = validate_mode(mode)
        gamma = validate_gamma(gamma)
        self._strength_variable = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(strength), dtype="float32",
            trainable=False, name="strength")
        self._gamma_variable = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(gamma), dtype="float32",
            trainable=False, name="gamma")
        # The Python floats as given, so configs round-trip exactly (the variables
        # hold them in float32); kept out of Keras' attribute tracking.
        self.__dict__["_strength_set"] = strength
        self.__dict__["_gamma_set"] = gamma
        # One thread at a time reads, merges and assigns the state (see `consolidate`).
        self.__dict__["_state_lock"] = threading.RLock()
        self._state = _State()
        self.offset = None
        self.tasks = None

    # --- hyperparameters -------------------------------------------------------------

    @property
    def strength(self) -> float:
        """λ, the weight of the penalty; assign to change it at the next step."""
        return _python_value(self._strength_variable, self.__dict__.get("_strength_set"))

    @strength.setter
    def strength(self, value) -> None:
        value = validate_strength(value)
        with self._state_lock:
            if self.built:
                self._check_strength(value, _tensors(self.precision),
                                     _tensors(self.anchors),
                                     _tensors([self.offset])[0],
                                     _tensors(self.targets))
            self._strength_variable.assign(value)
            self.__dict__["_strength_set"] = value

    @property
    def gamma(self) -> float:
        """γ, the decay of the precision in online mode; assign to change it."""
        return _python_value(self._gamma_variable, self.__dict__.get("_gamma_set"))

    @gamma.setter
    def gamma(self, value) -> None:
        value = validate_gamma(value)
        with self._state_lock:
            self._gamma_variable.assign(value)
            self.__dict__["_gamma_set"] = value

    # --- the state ---------------------------------------------------------------------

    @property
    def anchors(self) -> list:
        """The anchors m, one float32 variable a regularised variable."""
        return list(self._state.anchors)

    @property
    def precision(self) -> list:
        """The precision P (accumulated Fisher), one float32 variable a regularised one."""
        return list(self._state.precision)

    @property
    def targets(self) -> list:
        """The regularised variables (owned by the model, not by this layer)."""
        return list(self._state.targets)

    @property
    def keys(self) -> list:
        """The key of each regularised variable, as written into files."""
        return list(self._state.keys)

    def build_for(self, variables: Sequence, keys: Sequence[str] | None = None) -> None:
        """Creates the state variables for the regularised `variables`.

        Args:
            variables: the variables to anchor.
            keys: a stable key for each variable, recorded in files (default:
                `"{position}:{name}"` in `variables`).
        """
        if self.built:
            raise ValueError("This EWCRegularizer already holds a state; it cannot be rebuilt.")
        variables = list(variables)
        if not variables:
            raise ValueError("Expected at least one variable to regularise. Received none.")
        keys = _check_keys(variables, keys)
        self.offset = self.add_weight(shape=(), initializer="zeros", dtype="float32",
                                      trainable=False, name="offset")
        self.tasks = self.add_weight(shape=(), initializer="zeros",
                                     dtype=backend.index_dtype(),
                                     trainable=False, name="tasks")
        self._state = _State(variables, keys, *self._new_entries(variables, keys))
        self.built = True

    def _new_entries(self, variables, keys):
        anchors, precision = [], []
        for v, key in zip(variables, keys):
            label = key.replace(":", "_")
            # The anchor of a variable with zero precision does not count; the current
            # weights make it a sensible value to read.
            anchors.append(self.add_weight(
                shape=tuple(v.shape), dtype="float32", trainable=False,
                initializer=keras.initializers.Constant(0.0), name=f"anchor_{label}"))
            # A copy: on JAX a cast to the same dtype is the same buffer, and a state
            # variable sharing the weight's buffer breaks the step's buffer donation.
            anchors[-1].assign(ops.copy(ops.cast(ops.convert_to_tensor(v), "float32")))
            precision.append(self.add_weight(
                shape=tuple(v.shape), initializer="zeros", dtype="float32", trainable=False,
                name=f"precision_{label}"))
        return anchors, precision

    def rebind(self, variables: Sequence, keys: Sequence[str]) -> list:
        """Follows a model that changed: keeps the state of `variables` already held,
        adds zero precision for new ones, drops the rest. Returns the dropped keys.

        Variables are matched by identity (the same variable object), so a variable
        keeps its anchor and precision whatever its new key.
        """
        with self._state_lock:
            self._check_built()
            variables = list(variables)
            if not variables:
                raise ValueError("Expected at least one variable to regularise. Received none.")
            keys = _check_keys(variables, keys)
            held = {id(t): (a, p) for t, a, p in zip(self.targets, self.anchors, self.precision)}
            new = [(v, k) for v, k in zip(variables, keys) if id(v) not in held]
            fresh = iter(zip(*self._new_entries([v for v, _ in new], [k for _, k in new])))
            anchors, precision = [], []
            for v in variables:
                a, p = held[id(v)] if id(v) in held else next(fresh)
                anchors.append(a)
                precision.append(p)
            kept = {id(v) for v in variables}
            dropped = [(k, a, p) for t, k, a, p in zip(self.targets, self.keys, self.anchors,
                                                       self.precision) if id(t) not in kept]
            for _, a, p in dropped:
                _private.untrack_variable(self, a)
                _private.untrack_variable(self, p)
            self._state = _State(variables, keys, anchors, precision)
            return [k for k, _, _ in dropped]

    def build(self, input_shape=None):
        # The state is shaped after the regularised variables: see `build_for`.
        pass

    def call(self, *args, **kwargs):
        return self.penalty()

    def _check_built(self):
        if not self.built or not self.targets:
            raise ValueError(
                "The EWCRegularizer holds no state yet: call `build_for(variables)` first "
                "(an EWCModel does this when it is built)."
            )

    def penalty(self, variables: Sequence | None = None):
        """The current penalty, a float32 scalar; 0 before any consolidation.

        Its gradient with respect to the variables is `strength * P (θ − m)`, given in
        closed form.

        Args:
            variables: the weights to evaluate at (default: the regularised variables).
        """
        self._check_built()
        theta = self.targets if variables is None else list(variables)
        # No task consolidated (`tasks` is 0) means a zero state: `assign_state` keeps
        # that invariant, so the step can skip the arithmetic.
        if backend.is_tensorflow():
            from keras_ewc.backend.tensorflow import penalty as tf_penalty

            return tf_penalty.penalty(self._strength_variable, self.precision,
                                      self.anchors, self.offset, theta, self.tasks)
        if backend.is_jax():
            from keras_ewc.backend.jax import penalty as jax_penalty

            return jax_penalty.penalty(_tensors([self._strength_variable])[0],
                                       _tensors(self.precision), _tensors(self.anchors),
                                       _tensors([self.offset])[0], _tensors(theta),
                                       backend.tensor(self.tasks))

        def value():
            return penalty_value(_tensors([self._strength_variable])[0],
                                 _tensors(self.precision), _tensors(self.anchors),
                                 _tensors([self.offset])[0], _tensors(theta))

        # Any other backend: the same expression, autodiff for its gradient; as on
        # TensorFlow and JAX, a step with no task skips the arithmetic.
        return ops.cond(backend.tensor(self.tasks) > 0, value,
                        lambda: ops.zeros((), "float32"))

    def consolidate(self, fisher: Sequence, theta: Sequence | None = None) -> None:
        """Merges a task's Fisher diagonal, anchored at `theta` (default: the current
        weights), into the state. All variables are assigned together, after every new
        value is computed and checked finite, so the state is never half-written.

        Thread-safe: a lock held from reading the state to committing the new one
        serialises concurrent calls (and `assign_state`), so none is lost."""
        with self._state_lock:
            self._consolidate(fisher, theta)

    def _consolidate(self, fisher, theta) -> None:
        self._check_built()
        fisher = [ops.cast(ops.convert_to_tensor(f), "float32") for f in fisher]
        theta = [ops.cast(ops.convert_to_tensor(t), "float32")
                 for t in (self.targets if theta is None else theta)]
        if len(fisher) != len(self.targets) or len(theta) != len(self.targets):
            raise ValueError(
                f"Expected {len(self.targets)} Fisher and weight tensors, one per "
                f"regularised variable. Received {len(fisher)} and {len(theta)}."
            )
        for key, v, f, t in zip(self.keys, self.targets, fisher, theta):
            if tuple(f.shape) != tuple(v.shape) or tuple(t.shape) != tuple(v.shape):
                raise ValueError(
                    f"Expected a Fisher and weights of shape {tuple(v.shape)} for variable "
                    f"{key} ({v.path}). Received {tuple(f.shape)} and {tuple(t.shape)}."
                )
        for f in fisher:
            if not bool(ops.all(ops.isfinite(f))) or bool(ops.any(f < 0)):
                raise ValueError("Expected a finite, non-negative Fisher diagonal.")
        state = (_tensors(self.precision), _tensors(self.anchors),
                 _tensors([self.offset])[0])
        if self.mode == "separate":
            new = merge_separate(*state, fisher, theta)
        else:
            new = merge_online(*state, fisher, theta, _tensors([self._gamma_variable])[0])
        # `assign_state` checks the strength against the new state, then commits it.
        self.assign_state(*new, tasks=int(np.asarray(self.tasks.numpy())) + 1)

    def _check_strength(self, strength, precision, anchors, offset, theta) -> None:
        """Refuses a strength whose penalty or gradient overflows float32 on this state
        (`check_strength`, the bound every way into the state applies)."""
        if not precision:
            return
        p_max = max(float(ops.max(p)) for p in precision)
        if p_max == 0.0 and float(offset) == 0.0:
            return  # no task yet: the penalty is 0 at any strength
        theta = [ops.cast(t, "float32") for t in theta]
        reach = max([1.0] + [float(ops.max(ops.abs(t - m))) for t, m in
                             zip(theta, anchors)])
        check_strength(strength, p_max, reach,
                       float(quadratic(precision, anchors, offset, theta)), "EWC state")

    def assign_state(self, precision, anchors, offset, tasks, strength=None,
                     gamma=None) -> None:
        """Assigns a whole state at once: the count, shape and finiteness of every
        entry, and the strength (`strength`, or the current one) against the bound of
        `check_strength`, are checked before any variable is assigned; then every
        variable (with `strength` and `gamma` when given) is assigned in one step, so
        nothing is half-written, not even by a Ctrl-C. Thread-safe (one lock a state)."""
        with self._state_lock:
            self._assign_state(precision, anchors, offset, tasks, strength, gamma)

    def _assign_state(self, precision, anchors, offset, tasks, strength, gamma) -> None:
        self._check_built()
        precision, anchors = list(precision), list(anchors)
        count = len(self.targets)
        if len(precision) != count or len(anchors) != count:
            raise ValueError(
                f"Expected {count} precision and {count} anchor arrays, one per "
                f"regularised variable ({self.keys}). Received {len(precision)} and "
                f"{len(anchors)}; the state is left unchanged."
            )
        values = [ops.convert_to_tensor(x, "float32") for x in precision + anchors]
        shapes = [tuple(v.shape) for v in self.targets] * 2
        wrong = [f"{'precision' if i < count else 'anchor'} of {self.keys[i % count]}: "
                 f"shape {tuple(x.shape)}, expected {s}"
                 for i, (x, s) in enumerate(zip(values, shapes)) if tuple(x.shape) != s]
        offset = ops.convert_to_tensor(offset, "float32")
        if len(offset.shape) != 0:
            wrong.append(f"offset: shape {tuple(offset.shape)}, expected ()")
        if wrong:
            raise ValueError("The new EWC state does not fit the regularised variables; "
                             "the state is left unchanged: " + "; ".join(wrong))
        if not all(bool(ops.all(ops.isfinite(x))) for x in values + [offset]):
            raise ValueError("The new EWC state is not finite; the state is left unchanged.")
        tasks = validate_tasks(tasks, values[:count], offset)
        strength = self.strength if strength is None else validate_strength(strength)
        gamma = self.gamma if gamma is None else validate_gamma(gamma)
        self._check_strength(strength, values[:count], values[count:], offset,
                             _tensors(self.targets))
        commit(self, self.precision + self.anchors + [
            self.offset, self.tasks, self._strength_variable, self._gamma_variable],
            values + [offset, tasks, strength, gamma])
        self.__dict__["_strength_set"] = strength
        self.__dict__["_gamma_set"] = gamma

    def reset(self) -> None:
        """Forgets every consolidated task: the penalty is 0 again."""
        with self._state_lock:
            self._check_built()
            zeros = [ops.zeros(p.shape) for p in self.precision]
            self.assign_state(zeros, zeros, 0.0, 0)

    def get_config(self):
        config = super().get_config()
        config.update({"strength": self.strength, "mode": self.mode, "gamma": self.gamma})
        return config

    # --- persistence ---------------------------------------------------------------

    def save_own_variables(self, store):
        # Entries are named by key, so loading matches them by the variable they belong
        # to, never by position (format version 2).
        store["format_version"] = np.array(STORE_VERSION, "int64")
        store["strength"] = self._strength_variable.numpy()
        store["gamma"] = self._gamma_variable.numpy()
        if not self.built:
            return
        store["offset"] = self.offset.numpy()
        store["tasks"] = self.tasks.numpy()
        for key, a, p in zip(self.keys, self.anchors, self.precision):
            store[f"anchor:{key}"] = a.numpy()
            store[f"precision:{key}"] = p.numpy()

    def load_own_variables(self, store):
        # Checks every saved value before assigning any, so a mismatched file leaves
        # the state as it was and the error names the variables that do not match.
        failed = getattr(self, "_load_failure", None)
        if len(store.keys()) == 0 and failed is not None and failed[0] is store:
            # Keras visits this layer a second time (as the model's attribute) after a
            # failure; repeat the real cause rather than "0 variables".
            self.__dict__["_load_failure"] = None
            raise failed[1]
        try:
            self._load_state_from(store)
            self.__dict__["_load_failure"] = None
        except ValueError as error:
            # Kept out of Keras' tracking: a plain note for the second visit.
            self.__dict__["_load_failure"] = (store, error)
            raise

    def _load_state_from(self, store):
        names = list(store.keys())
        if "format_version" in names:
            strength, gamma, state = self._read_keyed(store, names)
        else:
            strength, gamma, state = None, None, self._read_positional(store, names)
        if state is not None:
            # The saved strength is checked against the saved state, and both are
            # assigned in one step (a file cannot bring an overflowing strength in).
            self.assign_state(*state, strength=strength, gamma=gamma)
        elif strength is not None:
            strength, gamma = validate_strength(strength), validate_gamma(gamma)
            self._strength_variable.assign(strength)
            self._gamma_variable.assign(gamma)
            self.__dict__["_strength_set"] = strength
            self.__dict__["_gamma_set"] = gamma

    def _read_keyed(self, store, names):
        version = int(np.asarray(store["format_version"]))
        if version > STORE_VERSION:
            raise ValueError(
                f"Unknown keras_ewc format version of the saved EWC state. Received: "
                f"format_version={version}; this keras_ewc reads versions 1 to "
                f"{STORE_VERSION}. Upgrade keras_ewc to load it.")
        strength = float(np.asarray(store["strength"]))
        gamma = float(np.asarray(store["gamma"]))
        saved = [n[len("anchor:"):] for n in names if n.startswith("anchor:")]
        if not self.built:
            if saved:
                raise ValueError(
                    f"The saved EWC state anchors {sorted(saved, key=_key_order)}, but this "
                    "model's state is not built. Build the model before loading.")
            return strength, gamma, None
        if sorted(saved, key=_key_order) != sorted(self.keys, key=_key_order):
            raise ValueError(state_mismatch(saved, self.keys, self.targets))
        wrong = []
        for key, v in zip(self.keys, self.targets):
            for kind in ("anchor", "precision"):
                shape = tuple(store[f"{kind}:{key}"].shape)
                if shape != tuple(v.shape):
                    wrong.append(f"{kind}:{key}: saved shape {shape}, expected "
                                 f"{tuple(v.shape)} ({v.path})")
        if wrong:
            raise ValueError("The saved EWC state does not match the regularised "
                             "variables: " + "; ".join(wrong))
        state = ([store[f"precision:{k}"] for k in self.keys],
                 [store[f"anchor:{k}"] for k in self.keys],
                 store["offset"], int(np.asarray(store["tasks"])))
        return strength, gamma, state

    def _read_positional(self, store, names):
        # Format version 1: an anchor and a precision a regularised variable, in the
        # order of the variables, then the offset and the task count.
        count = len(self.targets)
        if len(names) != 2 * count + 2:
            raise ValueError(
                f"The saved EWC state (format version 1) holds {len(names)} variables, "
                f"but this model's state has {2 * count + 2} (an anchor and a precision "
                f"for each of {count} regularised variables, the offset and the task "
                "count). The file was saved from a model that regularises other variables."
            )
        values = [store[str(i)] for i in range(2 * count + 2)]
        wrong = [f"{kind}_{key} (vars/{2 * i + j}): saved shape "
                 f"{tuple(values[2 * i + j].shape)}, expected {tuple(v.shape)}"
                 for i, (key, v) in enumerate(zip(self.keys, self.targets))
                 for j, kind in enumerate(("anchor", "precision"))
                 if tuple(values[2 * i + j].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError("The saved EWC state does not match the regularised "
                             "variables: " + "; ".join(wrong))
        return (values[1:2 * count:2], values[0:2 * count:2], values[2 * count],
                int(np.asarray(values[2 * count + 1])))

    # Overrides TensorFlow's private `Trackable._trackable_children`, the hook checkpoints
    # use (pinned in tests/test_private.py through `_private.trackable_children`).
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # `tf.train.Checkpoint` does not look inside Keras' tracked lists; name the
        # anchors and precisions by key so checkpoints (and SavedModels) carry them and
        # a checkpoint restores them only into the variables they belong to.
        children = dict(_private.trackable_children(self, save_type, **kwargs))
        children["strength"] = self._strength_variable
        children["gamma"] = self._gamma_variable
        for key, anchor, precision in zip(self.keys, self.anchors, self.precision):
            children[f"anchor_{key}"] = anchor
            children[f"precision_{key}"] = precision
        return children


STORE_VERSION = 2
"""Version of the layout `save_own_variables` writes (1: entries by position)."""


def check_strength(strength, p_max, reach, value, what="EWC state") -> None:
    """The bound on `strength` that every way into a state applies (the constructor and
    the `strength` setter, `consolidate`, `assign_state`, loading a file or a
    SavedModel), for the diagonal and the Kronecker state alike.

    `p_max` is the largest (diagonal) precision of the state, `reach` how far the
    weights are from their anchors (the largest distance, at least 1) and `value` the
    penalty without the strength. The gradient a weight `reach` away from its anchor
    gets, `strength * p_max * reach`, must have a finite square in float32 (Adam and
    RMSprop square it: past the bound their second moment overflows and the weights
    turn to NaN), and the penalty `strength * value` must be finite in float32.
    Raises a ValueError naming the strength and the largest one allowed.
    """
    gradient = float(np.float64(strength) * p_max * reach)
    total = float(np.float64(strength) * value)
    if gradient < GRADIENT_LIMIT and total < float(np.finfo(np.float32).max):
        return
    limit = GRADIENT_LIMIT / (p_max * reach) if p_max > 0 else float("inf")
    raise ValueError(
        f"strength={strength:g} is too large for this {what}: the penalty's gradient "
        f"strength * P * (θ − m) reaches {gradient:.3g} (largest precision {p_max:.3g}, "
        f"weights up to {reach:.3g} from their anchors) and the penalty {total:.3g}; "
        f"float32 overflows (Adam and RMSprop square the gradient) and the weights "
        f"would turn to NaN. Expected strength < {limit:.3g}. Received: "
        f"strength={strength!r}. The state and the weights are unchanged."
    )


def commit(owner, variables, values) -> None:
    """Assigns `values` to `variables`: a new state whole, or (on an error) nothing.

    On TensorFlow the assignments run in ONE graph call (a `tf.function` traced once a
    set of variables), so a Ctrl-C (`KeyboardInterrupt`, which Python delivers between
    bytecodes, never inside a running TensorFlow call) lands before every assignment or
    after all of them. On other backends every value is converted to its variable's
    dtype and shape-checked first (anything that can fail, fails before the first
    assignment), then the variables are assigned one by one: an exception cannot split
    the state, but a Ctrl-C that lands between two of those assignments can.
    """
    if backend.is_tensorflow():
        from keras_ewc.backend.tensorflow import penalty as tf_penalty

        return tf_penalty.commit(owner, variables, values)
    variables = list(variables)
    # Copies: a value may be another variable's buffer (the weights, as anchors), and
    # JAX's training step donates each variable's buffer; two variables must not share.
    ready = [ops.copy(ops.convert_to_tensor(x, v.dtype)) for v, x in zip(variables, values)]
    wrong = [f"{v.path}: {tuple(x.shape)} for {tuple(v.shape)}"
             for v, x in zip(variables, ready) if tuple(x.shape) != tuple(v.shape)]
    if wrong:
        raise ValueError("Cannot commit values whose shapes differ from their "
                         "variables': " + "; ".join(wrong))
    for v, x in zip(variables, ready):
        v.assign(x)


def penalty_value(strength, precision, anchor, offset, theta):
    """`strength * (½ Σ P (θ − m)² + c)` in `keras.ops`, float32 whatever θ's dtype.

    Its gradient is autodiff's, `strength * P (θ − m)`. A training step uses the
    backend's closed form instead (`keras_ewc.backend.tensorflow.penalty`,
    `keras_ewc.backend.jax.penalty`), with the same value and gradients.
    """
    total = ops.zeros((), "float32")
    for p, m, t in zip(precision, anchor, theta):
        d = ops.cast(t, "float32") - m
        total = total + ops.sum(p * d * d)
    return strength * (offset + 0.5 * total)


def penalty_with_gradient(strength, precision, anchor, offset, theta, active=None):
    """The penalty with the gradient `strength * P (θ − m)`; see
    `keras_ewc.backend.tensorflow.penalty.penalty_with_gradient` (TensorFlow) and
    `penalty_value` (other backends, where `active` changes nothing: a state with no
    task is 0 everywhere)."""
    if backend.is_tensorflow():
        from keras_ewc.backend.tensorflow import penalty as tf_penalty

        return tf_penalty.penalty_with_gradient(strength, precision, anchor, offset,
                                                theta, active)
    return penalty_value(strength, precision, anchor, offset, theta)


def state_mismatch(saved, own, targets) -> str:
    """The error for a saved state that belongs to other variables than `own`."""
    paths = {k: getattr(v, "path", "?") for k, v in zip(own, targets)}
    saved = sorted(saved, key=_key_order)
    own = sorted(own, key=_key_order)
    only_file = [k for k in saved if k not in own]
    only_model = [f"{k} ({paths[k]})" for k in own if k not in saved]
    return (
        f"The saved EWC state belongs to other variables than this model regularises. "
        f"The file anchors {saved}; this model regularises "
        f"{[f'{k} ({paths[k]})' for k in own]}. Only in the file: {only_file}; only in "
        f"this model: {only_model}. (A key is the variable's position in the wrapped "
        "model's `weights` and its name.) Load the file into a model that regularises the "
        "same variables (the same architecture and include/exclude)."
    )


def _key_order(key):
    head = str(key).split(":", 1)[0]
    return (int(head) if head.isdigit() else 1 << 62, str(key))


def _check_keys(variables, keys):
    if keys is None:
        return [f"{i}:{getattr(v, 'name', 'variable')}" for i, v in enumerate(variables)]
    keys = [str(k) for k in keys]
    if len(keys) != len(variables) or len(set(keys)) != len(keys):
        raise ValueError(f"Expected one distinct key a variable ({len(variables)}). "
                         f"Received: keys={keys}")
    bad = [k for k in keys if "/" in k]
    if bad:
        raise ValueError(f"Expected keys without '/'. Received: {bad}")
    return keys


def _python_value(variable, given) -> float:
    """`given` while the float32 `variable` still holds it (not reloaded since)."""
    held = float(variable.numpy())
    return given if given is not None and float(np.float32(given)) == held else held


def _tensors(variables) -> list:
    return [backend.tensor(v) for v in variables]


class _State:
    """The regularised variables, their keys and their state, kept out of Keras'
    attribute tracking (the state variables are tracked as this layer's weights)."""

    def __init__(self, targets=(), keys=(), anchors=(), precision=()):
        self.targets, self.keys = tuple(targets), tuple(keys)
        self.anchors, self.precision = tuple(anchors), tuple(precision)


def validate_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= 0 or value > float(np.finfo(np.float32).max):
        raise ValueError(f"Expected strength >= 0, finite in float32. Received: "
                         f"strength={strength!r}")
    return value


def validate_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"Expected mode in {list(MODES)}. Received: mode={mode!r}")
    return mode


def validate_tasks(tasks, precision, offset, most=None) -> int:
    """The task count of a state about to be assigned: an integer >= 0 (and <= `most`
    when given), with a zero `precision` and `offset` when it is 0. Raises, naming
    what was given, before anything is assigned."""
    try:
        tasks = int(tasks)
    except (TypeError, ValueError):
        tasks = -1
    if tasks < 0 or (most is not None and tasks > most):
        bound = f" <= max_tasks={most}" if most is not None else ""
        raise ValueError(f"Expected a task count >= 0{bound}. Received: tasks={tasks!r}; "
                         "the state is left unchanged.")
    if tasks == 0 and (any(bool(ops.any(p != 0)) for p in precision)
                       or float(offset) != 0.0):
        raise ValueError(
            "Expected a zero precision and offset with tasks=0 (no task consolidated "
            "means no penalty). Received: tasks=0 with a non-zero precision or offset; "
            "pass the number of tasks the state holds. The state is left unchanged.")
    return tasks


def validate_gamma(gamma) -> float:
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Expected gamma in (0, 1]. Received: gamma={gamma!r}")
    return value
