"""Kronecker-factored EWC: the state (factors and anchors per layer) and its penalty.

For a layer with Kronecker factors `(A, G)` (see `keras_ewc.kronecker_factors`) and
weights `W̄ = [kernel; bias]` (kernel reshaped to `[in, out]`, the bias as the LAST row),
one task's penalty is

    ½ vec(ΔW̄)ᵀ (A ⊗ G) vec(ΔW̄) = ½ tr(ΔW̄ᵀ A ΔW̄ G),    ΔW̄ = W̄ − W̄*,

two matrix products a layer; its gradient is `A ΔW̄ G`. Nothing is ever inverted.

Several tasks, as the `mode` of `KroneckerRegularizer` says:

- `separate`: every task keeps its own `(A_t, G_t, W̄*_t)`; the penalty is the exact sum
  of the tasks' penalties. A sum of Kronecker products is not one, so the state grows:
  `in² + out² + in·out` floats a layer a task, allocated up front for `max_tasks` tasks,
  and each training step costs one `A ΔW̄ G` a layer a consolidated task.
- `online` (Ritter, Botev & Barber 2018): the anchor moves to the latest weights and the
  precision `γ A_old ⊗ G_old + A_new ⊗ G_new` is replaced by its nearest Kronecker
  product (Van Loan & Pitsianis 1993): one pair a layer whatever the number of tasks.

Variables with no Kronecker factors (embeddings, normalisation, custom layers) keep the
exact diagonal, merged as `keras_ewc.EWCRegularizer` merges it (`keras_ewc.penalty`).

The functions below are pure (tensors in, tensors out) and tested on their own; the
Keras layer holds the state as non-trainable float32 variables.
"""

from __future__ import annotations

import threading
from typing import Sequence

import keras
import numpy as np
from keras import ops

from keras_ewc import _private, backend
from keras_ewc import penalty as diag

MODES = ("separate", "online")


# --- pure functions -------------------------------------------------------------------


def augment(kernel, bias=None):
    """`W̄ = [kernel; bias]` as float32 `[in (+1), out]`: a conv kernel is flattened to
    `[kernel_size × channels, filters]`, the bias (if any) is the LAST row."""
    kernel = ops.cast(kernel, "float32")
    wbar = ops.reshape(kernel, (-1, kernel.shape[-1]))
    if bias is not None:
        wbar = ops.concatenate([wbar, ops.cast(bias, "float32")[None]], axis=0)
    return wbar


def split(wbar, kernel_shape, has_bias: bool) -> list:
    """The inverse of `augment`: `[kernel]` or `[kernel, bias]` from `W̄`."""
    if has_bias:
        return [ops.reshape(wbar[:-1], tuple(kernel_shape)), wbar[-1]]
    return [ops.reshape(wbar, tuple(kernel_shape))]


def wbar_shape(params) -> tuple:
    """`(rows, out)` of W̄ = [W; bᵀ]: the kernel's input size (+1 with a bias) and width."""
    kernel = params["kernel"]
    rows = int(np.prod(kernel.shape[:-1])) + (1 if "bias" in params else 0)
    return rows, int(kernel.shape[-1])


def kronecker_gradient(a, g, delta):
    """`A ΔW̄ G`: the gradient of `½ tr(ΔW̄ᵀ A ΔW̄ G)` (A and G symmetric)."""
    return ops.matmul(ops.matmul(a, delta), g)


def kronecker_quadratic(a, g, delta):
    """`½ tr(ΔW̄ᵀ A ΔW̄ G) = ½ vec(ΔW̄)ᵀ (A ⊗ G) vec(ΔW̄)`, a float32 scalar."""
    return 0.5 * ops.sum(delta * kronecker_gradient(a, g, delta))


def kronecker_penalty(wbar, pairs):
    """`Σ_k ½ tr((W̄ − W̄*_k)ᵀ A_k (W̄ − W̄*_k) G_k)` for `pairs = [(A_k, G_k, W̄*_k)]`.

    Differentiable in `wbar`. On TensorFlow the gradient `Σ_k A_k ΔW̄_k G_k` is formed
    in the forward pass and reused (a custom gradient), so back-propagation adds no
    matrix product; elsewhere it is autodiff's.
    """
    if backend.is_tensorflow():
        from keras_ewc.backend.tensorflow import kronecker as tf_kronecker

        return tf_kronecker.kronecker_penalty(wbar, pairs)
    w = ops.cast(wbar, "float32")
    total = ops.zeros((), "float32")
    for a, g, anchor in pairs:
        total = total + kronecker_quadratic(a, g, w - anchor)
    return total


def nearest_kronecker(pairs, iterations: int = 100) -> tuple:
    """The nearest Kronecker product `A ⊗ G` to `Σ_k A_k ⊗ G_k` (Frobenius norm).

    Van Loan & Pitsianis: with the rearrangement `R = Σ_k vec(A_k) vec(G_k)ᵀ`, the best
    `A ⊗ G` is the top singular pair of R. Power iterations on the factors alone,
    `a ← Σ_k A_k ⟨G_k, g⟩`, `g ← Σ_k G_k ⟨A_k, a⟩`, keep `a = Σ c_k A_k` and
    `g = Σ d_k G_k`, so they run on the K coefficients with the Gram matrices
    `⟨A_i, A_j⟩`, `⟨G_i, G_j⟩` (computed in float64). For positive semi-definite factors
    the Grams are non-negative, so from positive coefficients the iteration stays in
    the non-negative cone and A and G are positive semi-definite.

    Args:
        pairs: a list of `(A_k, G_k)` (square, symmetric).
        iterations: power iterations (on K×K matrices: negligible cost).

    Returns:
        `(A, G, relative_error)`: float32 factors (scaled to equal Frobenius norms) and
        `‖Σ_k A_k ⊗ G_k − A ⊗ G‖_F / ‖Σ_k A_k ⊗ G_k‖_F` (a float, 0 for one pair).

    Example:

    >>> import numpy as np
    >>> from keras_ewc.kronecker import nearest_kronecker
    >>> a, g = np.eye(2, dtype="float32"), np.diag([1.0, 2.0]).astype("float32")
    >>> A, G, err = nearest_kronecker([(a, g), (2 * a, 2 * g)])   # = 5 (a ⊗ g)
    >>> bool(np.allclose(np.kron(A, G), 5 * np.kron(a, g), atol=1e-5)), round(err, 6)
    (True, 0.0)
    """
    # In NumPy, float64: a JAX process computes no float64 without `jax_enable_x64`.
    a_list = [np.asarray(ops.convert_to_numpy(a), np.float64) for a, _ in pairs]
    g_list = [np.asarray(ops.convert_to_numpy(g), np.float64) for _, g in pairs]
    if not a_list:
        raise ValueError("Expected at least one (A, G) pair. Received none.")
    ga = _gram(a_list)
    gg = _gram(g_list)
    norm2 = float(np.sum(ga * gg))
    if norm2 <= 0.0:
        return (ops.zeros(a_list[0].shape, "float32"), ops.zeros(g_list[0].shape, "float32"),
                0.0)
    c = np.ones(len(a_list))
    for _ in range(int(iterations)):
        c = gg @ (ga @ c)
        c = c / np.sqrt(max(c @ ga @ c, 1e-300))
    d = ga @ c
    cross = float((ga @ c) @ (gg @ d))        # ⟨Σ, A ⊗ G⟩ = Σ_k ⟨A_k, A⟩⟨G_k, G⟩
    norm_a2, norm_g2 = float(c @ ga @ c), float(d @ gg @ d)
    error2 = max(norm2 - 2.0 * cross + norm_a2 * norm_g2, 0.0)
    scale = (norm_g2 / norm_a2) ** 0.25 if norm_a2 > 0 and norm_g2 > 0 else 1.0
    a = sum(float(ck * scale) * x for ck, x in zip(c, a_list))
    g = sum(float(dk / scale) * x for dk, x in zip(d, g_list))
    return (ops.convert_to_tensor(a.astype("float32")),
            ops.convert_to_tensor(g.astype("float32")), float(np.sqrt(error2 / norm2)))


def _gram(mats) -> np.ndarray:
    k = len(mats)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = float(np.sum(mats[i] * mats[j]))
    return out


def merge_online(a_old, g_old, a_new, g_new, gamma: float, iterations: int = 100) -> tuple:
    """Online Kronecker EWC: `A ⊗ G ≈ γ A_old ⊗ G_old + A_new ⊗ G_new` (one pair).

    Returns `(A, G, relative_error)` as `nearest_kronecker`.
    """
    return nearest_kronecker([(gamma * ops.cast(a_old, "float32"), g_old), (a_new, g_new)],
                             iterations)


# --- the Keras object -----------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_ewc")
class KroneckerRegularizer(keras.layers.Layer):
    """Holds Kronecker-factored EWC state (per-layer factors and anchors) and its penalty.

    The penalty is `strength * (Σ_layers Σ_tasks ½ tr(ΔW̄ᵀ A ΔW̄ G) + diagonal part)`,
    where the diagonal part, `½ Σ P (θ − m)² + c`, covers the regularised variables of
    layers without Kronecker factors. State lives in non-trainable float32 variables
    created by `build_for`, so it is saved, checkpointed and distributed with the model.

    Memory a factored layer with `in` inputs (+1 with a bias) and `out` outputs:
    `in² + out² + in·out` float32 (`4 · (in² + out² + in·out)` bytes) for each of
    `max_tasks` slots (`separate`), or once (`online`). Separate mode allocates all
    `max_tasks` slots when the state is built, used or not, so that every file format
    and `tf.distribute` see a fixed set of variables (empty slots cost memory, not
    time). On MLP 784-400-400-10 a slot is 1,736,337 floats (6.6 MiB): 66 MiB for
    `max_tasks=10`, against 3.7 MiB for the whole diagonal state. `state_size()` counts
    them.

    Args:
        strength: λ ≥ 0, the weight of the penalty.
        mode: `"separate"` (every task keeps its factors and anchor; exact sum) or
            `"online"` (one nearest-Kronecker pair a layer; anchor at the latest
            weights; precision `γ old + new`).
        gamma: decay of the old precision in online mode, in (0, 1].
        max_tasks: task slots allocated in separate mode (ignored online).

    Example:

    >>> import keras, numpy as np, keras_ewc
    >>> from keras_ewc.kronecker import KroneckerRegularizer
    >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> reg = KroneckerRegularizer(strength=10.0, max_tasks=2)
    >>> reg.build_for(net.trainable_variables, net)
    >>> reg.consolidate([(np.eye(4, dtype="float32"), np.eye(2, dtype="float32"))], [])
    >>> _ = net.layers[0].bias.assign([1.0, 1.0])
    >>> round(float(reg.penalty()), 4)     # 10 * ½ * ‖ΔW̄‖² with ΔW̄ = [0; 0; 0; 1 1]
    10.0
    """

    def __init__(self, strength: float = 1.0, mode: str = "separate", gamma: float = 1.0,
                 max_tasks: int = 10, **kwargs):
        super().__init__(**kwargs)
        strength = diag.validate_strength(strength)
        # λ lives in a variable, like an optimizer's learning rate: assigning
        # `strength` takes effect at the next step without retracing.
        self._strength_variable = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(strength), dtype="float32",
            trainable=False, name="strength")
        self.__dict__["_strength_set"] = strength  # the float as given, for the config
        if mode not in MODES:
            raise ValueError(f"Expected mode in {list(MODES)}. Received: mode={mode!r}")
        self.mode = mode
        self.__dict__["_gamma"] = diag.validate_gamma(gamma)
        # One thread at a time reads, merges and assigns the state (see `consolidate`).
        self.__dict__["_state_lock"] = threading.RLock()
        if not isinstance(max_tasks, (int, np.integer)) or max_tasks < 1:
            raise ValueError(f"Expected max_tasks >= 1 (an integer). Received: "
                             f"max_tasks={max_tasks!r}")
        self.max_tasks = int(max_tasks)
        self._plan = _Refs([])
        self._rest = _Refs([])
        # Per factored layer: (A [S, in, in], G [S, out, out], anchor [S, in, out]),
        # S = `num_slots`; slot t holds task t (separate) or the merged pair (online).
        self.kronecker_state: list = []
        self.precision: list = []    # diagonal part
        self.anchors: list = []
        self.offset = None
        self.tasks = None
        self.last_merge_errors: dict = {}
        self.layer_keys: list = []
        self._keys: list = []

    @property
    def strength(self) -> float:
        """λ, the weight of the penalty; assign to change it at the next step."""
        # The variable is what the penalty uses (a load may have changed it).
        return diag._python_value(self._strength_variable, self.__dict__["_strength_set"])

    @strength.setter
    def strength(self, value) -> None:
        value = diag.validate_strength(value)
        with self._state_lock:
            if self.built:
                self._check_strength(value, self._used(), self._current_slots(),
                                     _tensors(self.precision), _tensors(self.anchors),
                                     ops.convert_to_tensor(self.offset))
            self._strength_variable.assign(value)
            self.__dict__["_strength_set"] = value

    @property
    def gamma(self) -> float:
        """γ, the decay of the old precision in online mode (used at consolidation)."""
        return self.__dict__["_gamma"]

    @gamma.setter
    def gamma(self, value) -> None:
        value = diag.validate_gamma(value)
        with self._state_lock:  # not in the middle of an online merge
            self.__dict__["_gamma"] = value

    @property
    def num_slots(self) -> int:
        return 1 if self.mode == "online" else self.max_tasks

    def build_for(self, variables: Sequence, model,
                  keys: Sequence[str] | None = None, plan: Sequence | None = None,
                  layer_keys: Sequence[str] | None = None) -> None:
        """Creates the state for the regularised `variables` of `model`.

        The layers in `plan` (`[(layer, kernel, params)]`, `params` the layer's
        `{"kernel", "bias"}` variables) get Kronecker slots; the other variables get a
        diagonal precision and anchor. The state is told which layers are factored (an
        `EWCModel` passes the factor engine's choice,
        `keras_ewc.fisher.kronecker.factored_layers`, with the layers' keys in
        `layer_keys`); left out, the engine is asked here. `keys` (aligned with
        `variables`) name what each variable is in the model, for the config (see
        `EWCModel`); default: the paths.
        """
        if self.built:
            raise ValueError("This KroneckerRegularizer already holds a state; it cannot be "
                             "rebuilt.")
        variables = list(variables)
        if not variables:
            raise ValueError("Expected at least one variable to regularise. Received none.")
        if plan is None or layer_keys is None:
            # Only for a state built by hand: the layers the factor engine factors.
            from keras_ewc.fisher import kronecker as factors_module

            if plan is None:
                plan = factors_module.factored_layers(model, variables)
            if layer_keys is None:
                layer_keys = [factors_module.layer_key(layer, model)
                              for layer, _, _ in plan]
        plan, layer_keys = list(plan), [str(k) for k in layer_keys]
        if len(layer_keys) != len(plan):
            raise ValueError(f"Expected one layer key a factored layer ({len(plan)}). "
                             f"Received: layer_keys={layer_keys}")
        chosen = {id(v) for v in variables}
        outside = [layer.name for layer, _, params in plan
                   if any(id(v) not in chosen for v in params.values())]
        if outside:
            raise ValueError(f"Every variable of a factored layer must be regularised. "
                             f"Received a plan with layers {outside} whose variables are "
                             "not all among `variables`.")
        covered = {id(v) for _, _, params in plan for v in params.values()}
        self._plan = _Refs(plan)
        self.layer_keys = layer_keys
        self._rest = _Refs([v for v in variables if id(v) not in covered])
        if keys is None:
            keys = [getattr(v, "path", v.name) for v in variables]
        if len(keys) != len(variables):
            raise ValueError(f"Expected one key a variable. Received {len(keys)} keys for "
                             f"{len(variables)} variables.")
        by_id = {id(v): str(k) for v, k in zip(variables, keys)}
        self._keys = [by_id[id(v)] for v in self.targets]
        slots = self.num_slots
        for (_, _, params), key in zip(plan, self.layer_keys):
            rows, out = wbar_shape(params)
            self.kronecker_state.append(tuple(
                self.add_weight(shape=(slots,) + shape, initializer="zeros",
                                dtype="float32", trainable=False,
                                name=f"{kind}_{_label(key)}")
                for kind, shape in (("A", (rows, rows)), ("G", (out, out)),
                                    ("anchor", (rows, out)))))
        for v in self._rest.items:
            label = _label(getattr(v, "path", v.name))
            self.anchors.append(self.add_weight(shape=tuple(v.shape), initializer="zeros",
                                                dtype="float32", trainable=False,
                                                name=f"anchor_{label}"))
            self.precision.append(self.add_weight(shape=tuple(v.shape), initializer="zeros",
                                                  dtype="float32", trainable=False,
                                                  name=f"precision_{label}"))
        self.offset = self.add_weight(shape=(), initializer="zeros", dtype="float32",
                                      trainable=False, name="offset")
        self.tasks = self.add_weight(shape=(), initializer="zeros",
                                     dtype=backend.index_dtype(),
                                     trainable=False, name="tasks")
        self.built = True

    def build(self, input_shape=None):
        pass  # shaped after the regularised variables: see `build_for`

    def call(self, *args, **kwargs):
        return self.penalty()

    # --- what is regularised --------------------------------------------------------

    @property
    def factored(self) -> list:
        """`[(layer, params)]`: the layers with Kronecker state, in slot order."""
        return [(layer, params) for layer, _, params in self._plan.items]

    @property
    def plan(self) -> list:
        """`[(layer, kernel module, params)]`, as `factored_layers` returns them."""
        return list(self._plan.items)

    @property
    def rest(self) -> list:
        """The regularised variables with a diagonal precision."""
        return list(self._rest.items)

    @property
    def targets(self) -> list:
        """Every regularised variable: the factored layers' kernels (and biases), then
        the diagonal ones."""
        return [v for _, params in self.factored for v in params.values()] + self.rest

    @property
    def keys(self) -> list:
        """What each of `targets` is in the wrapped model (aligned with `targets`)."""
        return list(self._keys)

    def state_size(self) -> dict:
        """Floats of state: `{"per_task": …, "total": …}` (Kronecker slots and diagonal)."""
        per_slot = sum(int(np.prod(v.shape[1:])) for trio in self.kronecker_state
                       for v in trio)
        diagonal = sum(2 * int(np.prod(v.shape)) for v in self.rest)
        return {"per_task": per_slot, "diagonal": diagonal,
                "total": per_slot * self.num_slots + diagonal + 2}

    # --- penalty and gradient -------------------------------------------------------

    def _check_built(self):
        if not self.built:
            raise ValueError(
                "The KroneckerRegularizer holds no state yet: call "
                "`build_for(variables, model)` first (an EWCModel does this when built)."
            )

    def _layer_weights(self, variables=None) -> list:
        """`[W̄]` per factored layer, from `variables` (aligned with `targets`) or the
        current weights."""
        values = self.targets if variables is None else list(variables)
        out, i = [], 0
        for _, params in self.factored:
            k = len(params)
            out.append(augment(*values[i:i + k]))
            i += k
        return out, values[i:]

    def slot(self, index: int) -> list:
        """`[(A, G, anchor)]` of slot `index` (task `index` in separate mode, the merged
        pair online), one triple a factored layer, as float32 tensors."""
        return [tuple(ops.convert_to_tensor(v)[index] for v in trio)
                for trio in self.kronecker_state]

    def _value_and_grads(self, wbars) -> tuple:
        """`(Σ ½ tr(ΔW̄ᵀ A ΔW̄ G), [Σ A ΔW̄ G per layer])` over the used slots."""
        if backend.is_tensorflow():
            from keras_ewc.backend.tensorflow import kronecker as tf_kronecker

            return tf_kronecker.value_and_grads(self.kronecker_state, wbars, self.tasks,
                                                self.num_slots)
        used = ops.minimum(ops.cast(ops.convert_to_tensor(self.tasks), "int32"),
                           self.num_slots)
        total, grads = ops.zeros((), "float32"), []
        for trio, wbar in zip(self.kronecker_state, wbars):
            a_all, g_all, anchors = (ops.convert_to_tensor(v) for v in trio)

            def body(k, value, grad, wbar=wbar, a_all=a_all, g_all=g_all,
                     anchors=anchors):
                delta = wbar - anchors[k]
                m = kronecker_gradient(a_all[k], g_all[k], delta)
                return k + 1, value + 0.5 * ops.sum(delta * m), grad + m

            # Only the slots of consolidated tasks are visited: empty ones cost nothing.
            _, value, grad = ops.while_loop(
                lambda k, *_: k < used, body,
                (ops.zeros((), "int32"), ops.zeros((), "float32"), ops.zeros_like(wbar)))
            total += value
            grads.append(grad)
        return total, grads

    def _kronecker_value(self, wbars):
        if backend.is_tensorflow():
            from keras_ewc.backend.tensorflow import kronecker as tf_kronecker

            return tf_kronecker.kronecker_value(self.kronecker_state, wbars, self.tasks,
                                                self.num_slots)
        if not wbars:
            return ops.zeros((), "float32")

        # A loop whose length is a traced value (the used slots) is not reverse-
        # differentiable on JAX: the gradient A ΔW̄ G is formed with the value instead.
        @ops.custom_gradient
        def value(*wbars):
            total, grads = self._value_and_grads(wbars)

            def grad(*args, upstream=None):
                upstream = args[-1] if upstream is None else upstream
                return [upstream * g for g in grads]

            return total, grad

        return value(*wbars)

    def penalty(self, variables: Sequence | None = None):
        """The current penalty, a float32 scalar; 0 before any consolidation.

        Args:
            variables: weights to evaluate at, aligned with `targets` (default: the
                regularised variables themselves).
        """
        self._check_built()
        wbars, rest = self._layer_weights(variables)
        value = self._kronecker_value(wbars)
        value += diag.quadratic(_tensors(self.precision), _tensors(self.anchors),
                                _tensors([self.offset])[0], _tensors(rest))
        return _tensors([self._strength_variable])[0] * value

    def gradients(self, variables: Sequence | None = None) -> list:
        """The penalty's gradient, aligned with `targets`, without differentiating:
        `λ Σ_tasks A ΔW̄ G` split into kernel and bias, and `λ P (θ − m)` for the rest."""
        self._check_built()
        wbars, rest = self._layer_weights(variables)
        _, grads = self._value_and_grads(wbars)
        out = []
        for (_, params), grad in zip(self.factored, grads):
            out += split(grad, params["kernel"].shape, "bias" in params)
        for p, m, t in zip(self.precision, self.anchors, rest):
            out.append(ops.convert_to_tensor(p) * (ops.cast(t, "float32") - m))
        return [ops.convert_to_tensor(self._strength_variable) * g for g in out]

    # --- consolidation --------------------------------------------------------------

    def consolidate(self, factors: Sequence, fisher_rest: Sequence,
                    theta: Sequence | None = None) -> None:
        """Merges one task: `factors` `[(A, G)]` aligned with `factored`, the diagonal
        Fisher `fisher_rest` aligned with `rest`, anchored at `theta` (aligned with
        `targets`; default: the current weights). Every new value is computed and checked
        before any variable is assigned, then all are assigned in one step, so a failure
        (or a Ctrl-C) leaves the state as it was. Thread-safe: a lock held from reading
        the state to committing the new one serialises concurrent calls."""
        with self._state_lock:
            self._consolidate(factors, fisher_rest, theta)

    def _consolidate(self, factors, fisher_rest, theta) -> None:
        self._check_built()
        factors = [(ops.cast(a, "float32"), ops.cast(g, "float32")) for a, g in factors]
        fisher_rest = [ops.cast(ops.convert_to_tensor(f), "float32") for f in fisher_rest]
        if len(factors) != len(self.factored) or len(fisher_rest) != len(self.rest):
            raise ValueError(
                f"Expected {len(self.factored)} (A, G) pairs (one per factored layer) and "
                f"{len(self.rest)} diagonal Fisher tensors. Received {len(factors)} and "
                f"{len(fisher_rest)}."
            )
        theta = [ops.cast(ops.convert_to_tensor(t), "float32")
                 for t in (self.targets if theta is None else theta)]
        if len(theta) != len(self.targets):
            raise ValueError(f"Expected {len(self.targets)} weight tensors (aligned with "
                             f"`targets`). Received {len(theta)}.")
        wbars, theta_rest = self._layer_weights(theta)
        for (_, params), (a, g), key in zip(self.factored, factors, self.layer_keys):
            rows, out = wbar_shape(params)
            if tuple(a.shape) != (rows, rows) or tuple(g.shape) != (out, out):
                raise ValueError(
                    f"Expected factors of shapes {(rows, rows)} and {(out, out)} for layer "
                    f"{key}. Received {tuple(a.shape)} and "
                    f"{tuple(g.shape)}."
                )
            for m in (a, g):
                if not bool(ops.all(ops.isfinite(m))) or bool(
                        ops.any(ops.diagonal(m) < 0)):
                    raise ValueError(
                        "Expected finite positive semi-definite factors (non-negative "
                        f"diagonal) for layer {key}.")
        for v, f in zip(self.rest, fisher_rest):
            if tuple(f.shape) != tuple(v.shape):
                raise ValueError(f"Expected a Fisher of shape {tuple(v.shape)} for {v.path}. "
                                 f"Received {tuple(f.shape)}.")
            if not bool(ops.all(ops.isfinite(f))) or bool(ops.any(f < 0)):
                raise ValueError("Expected a finite, non-negative Fisher diagonal.")
        tasks = int(np.asarray(self.tasks.numpy()))
        if self.mode == "separate" and tasks >= self.max_tasks:
            raise ValueError(
                f"All {self.max_tasks} task slots are used (separate mode keeps every task's "
                f"factors). Received a task number {tasks + 1}. Build the model with a "
                "larger `max_tasks`, or use mode='online' (one pair a layer)."
            )
        # New values first.
        assignments, errors = [], {}
        slot = 0 if self.mode == "online" else tasks
        for index, (key, (a, g), wbar) in enumerate(zip(self.layer_keys, factors, wbars)):
            if self.mode == "online" and tasks > 0:
                a_old, g_old, _ = (ops.convert_to_tensor(v)[0]
                                   for v in self.kronecker_state[index])
                a, g, err = merge_online(a_old, g_old, a, g, self.gamma)
                errors[key] = err
            for var, value in zip(self.kronecker_state[index], (a, g, wbar)):
                assignments.append((var, ops.slice_update(
                    ops.convert_to_tensor(var), (slot,) + (0,) * (len(var.shape) - 1),
                    value[None])))
        state = (_tensors(self.precision), _tensors(self.anchors),
                 ops.convert_to_tensor(self.offset))
        if self.mode == "separate":
            new_p, new_m, new_c = diag.merge_separate(*state, fisher_rest, theta_rest)
        else:
            new_p, new_m, new_c = diag.merge_online(*state, fisher_rest, theta_rest,
                                                    self.gamma)
        assignments += list(zip(self.precision, new_p)) + list(zip(self.anchors, new_m))
        assignments.append((self.offset, new_c))
        if not all(bool(ops.all(ops.isfinite(v))) for _, v in assignments):
            raise ValueError("The new Kronecker EWC state is not finite; the state is left "
                             "unchanged.")
        count = len(self.kronecker_state)
        slots = [tuple(v for _, v in assignments[3 * i: 3 * i + 3]) for i in range(count)]
        self._check_strength(self.strength, min(tasks + 1, self.num_slots), slots, new_p,
                             new_m, new_c)
        diag.commit(self, [v for v, _ in assignments] + [self.tasks],
                    [x for _, x in assignments] + [tasks + 1])
        self.last_merge_errors = errors

    def _used(self) -> int:
        return min(int(np.asarray(self.tasks.numpy())), self.num_slots)

    def _current_slots(self) -> list:
        return [tuple(ops.convert_to_tensor(v) for v in trio) for trio in self.kronecker_state]

    def _check_strength(self, strength, used, slots, precision, anchors, offset) -> None:
        """Refuses a strength whose penalty or gradient overflows float32 on this state.

        The bound of `keras_ewc.penalty.check_strength`, as `EWCRegularizer`: the
        gradient a weight gets when it is `reach` from its anchor (the current largest
        distance, at least 1) along the largest diagonal entry of the precision
        (`max diag A · max diag G` of a used slot, or the diagonal part's largest
        precision), and the penalty itself, must stay finite in float32. `slots` are
        `[(A, G, anchor)]` of `[num_slots, …]` tensors, the first `used` in use.
        """
        wbars, rest = self._layer_weights()
        p_max, reach, value = 0.0, 1.0, 0.0
        for (a_all, g_all, anchor_all), wbar in zip(slots, wbars):
            for k in range(used):
                a, g = a_all[k], g_all[k]
                p_max = max(p_max, float(ops.max(ops.diagonal(a)))
                            * float(ops.max(ops.diagonal(g))))
                delta = wbar - anchor_all[k]
                reach = max(reach, float(ops.max(ops.abs(delta))))
                value += float(kronecker_quadratic(a, g, delta))
        rest = [ops.cast(t, "float32") for t in rest]
        for p, m, t in zip(precision, anchors, rest):
            p_max = max(p_max, float(ops.max(p)))
            reach = max(reach, float(ops.max(ops.abs(t - m))))
        value += float(diag.quadratic(list(precision), list(anchors), offset, rest))
        if p_max == 0.0 and float(offset) == 0.0:
            return  # no task yet: the penalty is 0 at any strength
        diag.check_strength(strength, p_max, reach, value, "Kronecker EWC state")

    def assign_state(self, kronecker, precision, anchors, offset, tasks, strength=None,
                     gamma=None) -> None:
        """Assigns a whole state at once (as loading a SavedModel does): `kronecker`
        `[(A, G, anchor)]` of `[num_slots, …]` arrays aligned with `kronecker_state`,
        the diagonal part aligned with `rest`, the offset and the task count (and
        `strength` and `gamma`, when given). Every count, shape and value, and the
        strength (the new or the current one) against the bound of
        `keras_ewc.penalty.check_strength`, is checked before any variable is assigned;
        then all are assigned in one step. Thread-safe (one lock a state)."""
        with self._state_lock:
            self._assign_state(kronecker, precision, anchors, offset, tasks, strength,
                               gamma)

    def _assign_state(self, kronecker, precision, anchors, offset, tasks, strength,
                      gamma) -> None:
        self._check_built()
        kronecker = [tuple(ops.convert_to_tensor(x, "float32") for x in trio)
                     for trio in kronecker]
        precision = [ops.convert_to_tensor(x, "float32") for x in precision]
        anchors = [ops.convert_to_tensor(x, "float32") for x in anchors]
        offset = ops.convert_to_tensor(offset, "float32")
        if (len(kronecker) != len(self.kronecker_state)
                or any(len(trio) != 3 for trio in kronecker)
                or len(precision) != len(self.rest) or len(anchors) != len(self.rest)):
            raise ValueError(
                f"Expected {len(self.kronecker_state)} (A, G, anchor) triples (one per "
                f"factored layer, {self.layer_keys}) and {len(self.rest)} precision and "
                f"anchor arrays. Received {len(kronecker)} triples, {len(precision)} and "
                f"{len(anchors)} arrays; the state is left unchanged.")
        pairs = [(var, x) for vars_, xs in zip(self.kronecker_state, kronecker)
                 for var, x in zip(vars_, xs)]
        pairs += list(zip(self.precision, precision)) + list(zip(self.anchors, anchors))
        wrong = [f"{var.path}: shape {tuple(x.shape)}, expected {tuple(var.shape)}"
                 for var, x in pairs + [(self.offset, offset)]
                 if tuple(x.shape) != tuple(var.shape)]
        if wrong:
            raise ValueError("The new Kronecker EWC state does not fit the regularised "
                             "variables; the state is left unchanged: " + "; ".join(wrong))
        if not all(bool(ops.all(ops.isfinite(x))) for _, x in pairs + [
                (None, offset)]):
            raise ValueError("The new Kronecker EWC state is not finite; the state is left "
                             "unchanged.")
        tasks = diag.validate_tasks(
            tasks, precision, offset, self.max_tasks if self.mode == "separate" else None)
        strength = self.strength if strength is None else diag.validate_strength(strength)
        gamma = self.gamma if gamma is None else diag.validate_gamma(gamma)
        self._check_strength(strength, min(tasks, self.num_slots), kronecker, precision,
                             anchors, offset)
        diag.commit(self, [v for v, _ in pairs] + [self.offset, self.tasks,
                                                   self._strength_variable],
                    [x for _, x in pairs] + [offset, tasks, strength])
        self.__dict__["_strength_set"] = strength
        self.__dict__["_gamma"] = gamma

    def reset(self) -> None:
        """Forgets every consolidated task: the penalty is 0 again."""
        with self._state_lock:
            self._check_built()
            state = [v for v in self.non_trainable_variables
                     if v is not self._strength_variable]
            diag.commit(self, state, [ops.zeros(v.shape, v.dtype) for v in state])

    # --- persistence ---------------------------------------------------------------

    def save_own_variables(self, store):
        # Keras' layout (the variables by position), and γ: a Python float here, which
        # `load_weights` must restore as the diagonal state's variable is.
        super().save_own_variables(store)
        store[GAMMA_ENTRY] = np.array(self.gamma, "float64")

    def load_own_variables(self, store):
        # As `EWCRegularizer.load_own_variables`: Keras visits this layer a second time
        # (as the model's attribute) after a failure; repeat the real cause rather than
        # "received 0 variables".
        failed = self.__dict__.get("_load_failure")
        if len(store.keys()) == 0 and failed is not None and failed[0] is store:
            self.__dict__["_load_failure"] = None
            raise failed[1]
        try:
            self._load_from(store)
            self.__dict__["_load_failure"] = None
        except ValueError as error:
            self.__dict__["_load_failure"] = (store, error)
            raise

    def _load_from(self, store):
        # Every value is read and checked, and the saved strength checked against the
        # saved state (`check_strength`), before anything is assigned; then the state,
        # the strength and γ are assigned in one step.
        names = [n for n in store.keys() if n != GAMMA_ENTRY]
        variables = self._trainable_variables + self._non_trainable_variables
        if len(names) != len(variables) or not self.built:
            return super().load_own_variables(_Without(store, GAMMA_ENTRY))
        values = {id(v): store[str(i)] for i, v in enumerate(variables)}
        wrong = [f"{v.path}: saved shape {tuple(values[id(v)].shape)}, expected "
                 f"{tuple(v.shape)}" for v in variables
                 if tuple(values[id(v)].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError("The saved Kronecker EWC state does not fit this model's: "
                             + "; ".join(wrong))
        gamma = (float(np.asarray(store[GAMMA_ENTRY])) if GAMMA_ENTRY in store.keys()
                 else None)  # files written before γ was saved
        self.assign_state(
            [tuple(values[id(v)] for v in trio) for trio in self.kronecker_state],
            [values[id(p)] for p in self.precision], [values[id(m)] for m in self.anchors],
            values[id(self.offset)], int(np.asarray(values[id(self.tasks)])),
            strength=float(np.asarray(values[id(self._strength_variable)])), gamma=gamma)

    def get_config(self):
        config = super().get_config()
        config.update({"strength": self.strength, "mode": self.mode, "gamma": self.gamma,
                       "max_tasks": self.max_tasks})
        return config

    # Overrides TensorFlow's private `Trackable._trackable_children`, the hook checkpoints
    # use (pinned in tests/test_private.py through `_private.trackable_children`).
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # `tf.train.Checkpoint` does not look inside Keras' tracked lists: name the state.
        children = dict(_private.trackable_children(self, save_type, **kwargs))
        for i, var in enumerate(self.non_trainable_variables):
            children[f"state_{i}"] = var
        return children


GAMMA_ENTRY = "kronecker_gamma"
"""The entry of γ in a Kronecker state's saved variables (absent from older files)."""


class _Without:
    """A read-only view of a Keras weights store without one entry."""

    def __init__(self, store, name):
        self._store, self._name = store, name

    def keys(self):
        return [k for k in self._store.keys() if k != self._name]

    def __getitem__(self, key):
        return self._store[key]




class _Refs:
    """Holds model objects without Keras tracking them as this layer's own."""

    def __init__(self, items):
        self.items = tuple(items)


def _label(path) -> str:
    return str(path).replace("/", "_").replace(":", "_")


def _tensors(variables) -> list:
    return [backend.tensor(v) for v in variables]
