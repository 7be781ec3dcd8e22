"""EWCRegularizer: the consolidated state (anchors, precision, offset) and its penalty."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

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
    new_p, new_m, added = [], [], tf.constant(0.0, tf.float32)
    for p, m, f, t in zip(precision, anchor, fisher, theta):
        p_new = p + f
        positive = p_new > 0
        safe = tf.where(positive, p_new, tf.ones_like(p_new))
        # m + F (θ* − m) / P' is (P m + F θ*) / P', and exactly θ* for a first task.
        new_m.append(tf.where(p > 0, m + f * (t - m) / safe, t))
        added += 0.5 * tf.reduce_sum(tf.where(positive, p * f * tf.square(m - t) / safe, 0.0))
        new_p.append(p_new)
    return new_p, new_m, offset + added


def merge_online(precision, anchor, offset, fisher, theta, gamma):
    """Online EWC (Schwarz et al. 2018): P' = γ P + F, m' = θ*, no offset."""
    del anchor, offset
    new_p = [gamma * p + f for p, f in zip(precision, fisher)]
    return new_p, [tf.identity(t) for t in theta], tf.constant(0.0, tf.float32)


def quadratic(precision, anchor, offset, theta):
    """½ Σ P (θ − m)² + c, in float32 whatever the dtype of θ."""
    total = tf.cast(offset, tf.float32)
    for p, m, t in zip(precision, anchor, theta):
        total += 0.5 * tf.reduce_sum(p * tf.square(tf.cast(t, tf.float32) - m))
    return total


# --- the Keras object -----------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_ewc")
class EWCRegularizer(keras.layers.Layer):
    """Holds the consolidated EWC state and computes the quadratic penalty.

    The penalty is `strength * (½ Σ_i P_i (θ_i − m_i)² + c)`: `P` is the `precision`
    (accumulated Fisher diagonal), `m` the `anchors`, `c` the `offset`. The state is held
    in non-trainable float32 variables, created by `build()`, so that it is saved,
    checkpointed and distributed with the model. The offset is stored without the
    strength, so changing `strength` later rescales the whole penalty consistently.

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
    """

    def __init__(self, strength: float = 1.0, mode: str = "separate", gamma: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.strength = validate_strength(strength)
        self.mode = validate_mode(mode)
        self.gamma = validate_gamma(gamma)
        self._refs = _Refs([])
        self.anchors: list = []
        self.precision: list = []
        self.offset = None
        self.tasks = None

    def build_for(self, variables: Sequence) -> None:
        """Creates the state variables for the regularised `variables`."""
        if self.built:
            raise ValueError("This EWCRegularizer already holds a state; it cannot be rebuilt.")
        variables = list(variables)
        if not variables:
            raise ValueError("Expected at least one variable to regularise. Received none.")
        self._refs = _Refs(variables)
        for i, v in enumerate(variables):
            shape = tuple(v.shape)
            label = _label(v, i)
            self.anchors.append(self.add_weight(
                shape=shape, initializer="zeros", dtype="float32", trainable=False,
                name=f"anchor_{label}"))
            self.precision.append(self.add_weight(
                shape=shape, initializer="zeros", dtype="float32", trainable=False,
                name=f"precision_{label}"))
        self.offset = self.add_weight(shape=(), initializer="zeros", dtype="float32",
                                      trainable=False, name="offset")
        self.tasks = self.add_weight(shape=(), initializer="zeros", dtype="int64",
                                     trainable=False, name="tasks")
        self.built = True

    @property
    def targets(self) -> list:
        """The regularised variables (owned by the model, not by this layer)."""
        return list(self._refs.items)

    def build(self, input_shape=None):
        # The state is shaped after the regularised variables: see `build_for`.
        pass

    def call(self, *args, **kwargs):
        return self.penalty()

    def _check_built(self):
        if not self.targets:
            raise ValueError(
                "The EWCRegularizer holds no state yet: call `build_for(variables)` first "
                "(an EWCModel does this when it is built)."
            )

    def penalty(self, variables: Sequence | None = None) -> tf.Tensor:
        """The current penalty, a float32 scalar; 0 before any consolidation.

        Args:
            variables: the weights to evaluate at (default: the regularised variables).
        """
        self._check_built()
        theta = self.targets if variables is None else list(variables)
        value = quadratic(_tensors(self.precision), _tensors(self.anchors),
                          tf.convert_to_tensor(self.offset), _tensors(theta))
        return tf.cast(self.strength, tf.float32) * value

    def consolidate(self, fisher: Sequence, theta: Sequence | None = None) -> None:
        """Merges a task's Fisher diagonal, anchored at `theta` (default: the current
        weights), into the state. All variables are assigned together, after every new
        value is computed and checked finite, so the state is never half-written."""
        self._check_built()
        fisher = [tf.cast(tf.convert_to_tensor(f), tf.float32) for f in fisher]
        theta = [tf.cast(tf.convert_to_tensor(t), tf.float32)
                 for t in (self.targets if theta is None else theta)]
        if len(fisher) != len(self.targets) or len(theta) != len(self.targets):
            raise ValueError(
                f"Expected {len(self.targets)} Fisher and weight tensors, one per "
                f"regularised variable. Received {len(fisher)} and {len(theta)}."
            )
        for v, f, t in zip(self.targets, fisher, theta):
            if tuple(f.shape) != tuple(v.shape) or tuple(t.shape) != tuple(v.shape):
                raise ValueError(
                    f"Expected a Fisher and weights of shape {tuple(v.shape)} for variable "
                    f"{_label(v, 0)}. Received {tuple(f.shape)} and {tuple(t.shape)}."
                )
        for f in fisher:
            if not bool(tf.reduce_all(tf.math.is_finite(f))) or bool(tf.reduce_any(f < 0)):
                raise ValueError("Expected a finite, non-negative Fisher diagonal.")
        state = (_tensors(self.precision), _tensors(self.anchors),
                 tf.convert_to_tensor(self.offset))
        if self.mode == "separate":
            new = merge_separate(*state, fisher, theta)
        else:
            new = merge_online(*state, fisher, theta, self.gamma)
        self.assign_state(*new, tasks=int(self.tasks.numpy()) + 1)

    def assign_state(self, precision, anchors, offset, tasks) -> None:
        """Assigns a whole state at once (checked first, so nothing is half-written)."""
        self._check_built()
        values = [tf.convert_to_tensor(x, tf.float32) for x in list(precision) + list(anchors)]
        values.append(tf.convert_to_tensor(offset, tf.float32))
        if not all(bool(tf.reduce_all(tf.math.is_finite(x))) for x in values):
            raise ValueError("The new EWC state is not finite; the state is left unchanged.")
        for var, value in zip(self.precision, precision):
            var.assign(value)
        for var, value in zip(self.anchors, anchors):
            var.assign(value)
        self.offset.assign(offset)
        self.tasks.assign(tasks)

    def reset(self) -> None:
        """Forgets every consolidated task: the penalty is 0 again."""
        self._check_built()
        zeros = [tf.zeros(p.shape) for p in self.precision]
        self.assign_state(zeros, zeros, 0.0, 0)

    def get_config(self):
        config = super().get_config()
        config.update({"strength": self.strength, "mode": self.mode, "gamma": self.gamma})
        return config

    # --- persistence ---------------------------------------------------------------

    def load_own_variables(self, store):
        # Checks every saved value before assigning any, so a mismatched file leaves
        # the state as it was and the error names the variable that does not match.
        variables = self._trainable_variables + self._non_trainable_variables
        failed = getattr(self, "_load_failure", None)
        if len(store.keys()) == 0 and failed is not None and failed[0] is store:
            # Keras visits this layer a second time (as the model's attribute) after a
            # failure; repeat the real cause rather than "0 variables".
            self.__dict__["_load_failure"] = None
            raise failed[1]
        try:
            self._load_state_from(store, variables)
            self.__dict__["_load_failure"] = None
        except ValueError as error:
            # Kept out of Keras' tracking: a plain note for the second visit.
            self.__dict__["_load_failure"] = (store, error)
            raise

    def _load_state_from(self, store, variables):
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"The saved EWC state holds {len(store.keys())} variables, but this model's "
                f"state has {len(variables)} (an anchor and a precision for each of "
                f"{len(self.anchors)} regularised variables, the offset and the task "
                "count). The file was saved from a model that regularises other variables."
            )
        values = [store[str(i)] for i in range(len(variables))]
        wrong = [f"{v.path}: saved shape {tuple(x.shape)}, expected {tuple(v.shape)}"
                 for v, x in zip(variables, values) if tuple(x.shape) != tuple(v.shape)]
        if wrong:
            raise ValueError("The saved EWC state does not match the regularised "
                             "variables: " + "; ".join(wrong))
        for v, x in zip(variables, values):
            v.assign(x)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # `tf.train.Checkpoint` does not look inside Keras' tracked lists; name the
        # anchors and precisions so checkpoints (and SavedModels) carry them.
        children = dict(super()._trackable_children(save_type, **kwargs))
        for i, (anchor, precision) in enumerate(zip(self.anchors, self.precision)):
            children[f"anchor_{i}"] = anchor
            children[f"precision_{i}"] = precision
        return children


def _tensors(variables) -> list:
    return [tf.convert_to_tensor(v) for v in variables]


class _Refs:
    """Holds the regularised variables without Keras tracking them as our own weights."""

    def __init__(self, items):
        self.items = tuple(items)


def _label(variable, index) -> str:
    path = getattr(variable, "path", None) or getattr(variable, "name", f"variable_{index}")
    return str(path).replace("/", "_").replace(":", "_")


def validate_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"Expected strength >= 0 (finite). Received: strength={strength!r}")
    return value


def validate_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"Expected mode in {list(MODES)}. Received: mode={mode!r}")
    return mode


def validate_gamma(gamma) -> float:
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Expected gamma in (0, 1]. Received: gamma={gamma!r}")
    return value
