"""The kernel registry: which layer classes have a fast Fisher kernel."""

from __future__ import annotations

import keras

from keras_ewc import _private


class Kernel:
    """Sums of squared per-example gradients for one layer kind, from one batched pass.

    A kernel re-runs the layer's forward pass with its pre-activation output `z`
    exposed, and turns what it recorded and the gradients at `z` into
    Σ_n Σ_t (∂ terms[n, t] / ∂ v)² for each of the layer's variables. Subclass it and
    register it with `keras_ewc.fisher.register_kernel`; a layer with no kernel takes
    the layer-local path (the layer alone, re-run per example), exact for any layer but
    slower.

    Methods to implement:

    - `params(layer) -> dict[name, variable]`: the variables the kernel covers.
    - `forward(layer, args, kwargs) -> (record, z, finish)` or None (not covered for
      this call: the layer's own `call` runs): whatever `sum_squared` needs from the
      inputs, the pre-activation output `z` (`[B, ...]`), and the function mapping `z`
      to the layer's output. Write it in `keras.ops`, so that it runs on every
      backend, and read variables through `keras.ops.stop_gradient`, so that
      differentiation sees them only where they are used outside the layer.
    - `sum_squared(layer, records, grads) -> dict[name, tensor]`: `records` and `grads`
      list the layer's calls in the forward pass; `grads[c]` is `[T, B, *z.shape[1:]]`,
      the gradients of T term columns at call c's `z`. Row n of a gradient is
      example n's own. The batch size B and the number of terms T are static
      (Python loops and slices over them are fine on every backend). The result must
      be a sum over the columns: TensorFlow's engine may call `sum_squared` on a few
      columns at a time (inside a graph loop, columns past the last being zeros) and
      add the results.
    - `supports(layer) -> bool` (optional): whether this instance's configuration is
      covered (default: every instance).
    """

    # Whether this class's `sum_squared` takes the columns' gradients kept apart
    # (`_common.Columns`) where the engine has them so; see `reads_columns_apart`.
    _columns_apart = False

    def supports(self, layer) -> bool:
        return True

    def params(self, layer) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement `params`.")

    def forward(self, layer, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement `forward`.")

    def sum_squared(self, layer, records, grads) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement `sum_squared`.")


def reads_columns_apart(kernel) -> bool:
    """Whether `kernel.sum_squared` takes `_common.Columns`: only where the class that
    defines `sum_squared` says so (a built-in kernel). A user's kernel, a subclass of a
    built-in one that overrides `sum_squared`, or a kernel not derived from `Kernel`
    gets `[T, B, *z]` tensors, as the contract says."""
    for cls in type(kernel).__mro__:
        if "sum_squared" in vars(cls):
            return bool(vars(cls).get("_columns_apart", False))
    return False


# Layer class -> (kernel instance, names of the methods a subclass must not override).
_REGISTRY: dict = {}
_VERSION = [0]  # bumped by each registration: cached Fisher steps keyed by it retrace


def version() -> int:
    """How many registrations the registry has seen (part of the Fisher cache's key)."""
    return _VERSION[0]


def register_kernel(*layer_classes: type, methods: tuple = ()):
    """Registers a `Kernel` (class or instance) for `layer_classes`; use as a decorator.

    A subclass of a registered layer class uses the kernel too, unless it overrides
    `call` or one of `methods` (the methods the kernel relies on, such as a `kernel`
    property): then it computes something else and takes the reference path.

    Args:
        *layer_classes: the Keras layer classes the kernel handles.
        methods: names of further methods a subclass must not override.

    Returns:
        A decorator that registers the kernel and returns it unchanged.

    Example:

    >>> import keras
    >>> from keras_ewc.fisher import Kernel, register_kernel
    >>> class Scale(keras.layers.Layer):  # y = x * w, elementwise
    ...     def build(self, input_shape):
    ...         self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")
    ...     def call(self, x):
    ...         return x * self.w
    >>> @register_kernel(Scale)
    ... class ScaleKernel(Kernel):
    ...     def params(self, layer):
    ...         return {"w": layer.w}
    ...     def forward(self, layer, args, kwargs):
    ...         x = args[0]
    ...         return x, x * keras.ops.stop_gradient(layer.w), lambda z: z
    ...     def sum_squared(self, layer, records, grads):
    ...         # Example n's gradient of w is Σ_calls x[n] g[t, n]: sum calls, square.
    ...         per_example = sum(x[None] * g for x, g in zip(records, grads))
    ...         return {"w": keras.ops.sum(keras.ops.square(per_example), axis=[0, 1])}
    """
    if not layer_classes:
        raise ValueError("Expected at least one Keras layer class. Received none.")
    for cls in layer_classes:
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise ValueError(
                "Expected Keras layer classes (subclasses of keras.layers.Layer). "
                f"Received: {cls!r}"
            )

    def decorator(kernel):
        instance = kernel() if isinstance(kernel, type) else kernel
        missing = [m for m in ("params", "forward", "sum_squared")
                   if not callable(getattr(instance, m, None))]
        if missing:
            raise ValueError(
                f"Expected a Kernel with `params`, `forward` and `sum_squared`. Received "
                f"{kernel!r}, which lacks {missing}. Subclass keras_ewc.fisher.Kernel."
            )
        for cls in layer_classes:
            _REGISTRY[cls] = (instance, ("call",) + tuple(methods))
        _VERSION[0] += 1
        return kernel

    return decorator


def registry() -> dict:
    """A copy of the registry: each layer class with its kernel instance."""
    return {cls: kernel for cls, (kernel, _) in _REGISTRY.items()}


def lookup(layer):
    """The kernel for `layer`, or None when its variables must take the reference path.

    A subclass of a registered class qualifies only when it overrides none of the
    methods the kernel relies on (`call` first of all).
    """
    if _private.has_instance_call(layer) or _private.remat_mode(layer) is not None:
        return None  # a patched instance, or a rematerialised call: not plain Keras.
    for cls in type(layer).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is None:
            continue
        kernel, methods = entry
        for name in methods:
            if getattr(type(layer), name, None) is not getattr(cls, name, None):
                return None
        return kernel if kernel.supports(layer) else None
    return None
