"""What differs between Keras backends, behind one seam.

The training core (`keras_ewc.penalty`, `keras_ewc.model`) is written in `keras.ops` and
asks this module only which backend runs and for the few pieces a backend provides
itself. What is TensorFlow's by nature (SavedModel export, `tf.distribute`,
`tf.train.Checkpoint` hooks, the penalty's closed-form gradient as a
`tf.custom_gradient`, a state committed in one graph call) lives in
`keras_ewc.backend.tensorflow`, imported only when TensorFlow is the backend; a
TensorFlow-only feature used on another backend raises `BackendError`, naming the
backend and what to do instead.

>>> from keras_ewc import backend
>>> backend.name() in ("tensorflow", "jax")
True
"""

from __future__ import annotations

import keras

SUPPORTED = ("tensorflow", "jax")


class BackendError(RuntimeError):
    """A feature the running Keras backend does not provide."""


def name() -> str:
    """The Keras backend of this process (`keras.backend.backend()`)."""
    return keras.backend.backend()


def is_tensorflow() -> bool:
    return name() == "tensorflow"


def is_jax() -> bool:
    return name() == "jax"


def nest():
    """The nested-structure functions (`flatten`, `map_structure`,
    `assert_same_structure`) of the backend: `tf.nest` on TensorFlow, as keras_ewc always
    used there; elsewhere `keras.tree`, so that the JAX path needs no TensorFlow.

    >>> nest().flatten({"b": 2, "a": (1, None)})
    [1, None, 2]
    """
    if is_tensorflow():
        from keras_ewc.backend.tensorflow import core

        return core.nest()
    return keras.tree


def is_tf_dataset(data) -> bool:
    """Whether `data` is a `tf.data.Dataset`; False, without importing TensorFlow, when
    TensorFlow is not imported (then no dataset can exist)."""
    import sys

    module = sys.modules.get("tensorflow")
    return module is not None and isinstance(data, module.data.Dataset)


def require_tensorflow(feature: str, fix: str) -> None:
    """Raises `BackendError` unless TensorFlow is the backend.

    Args:
        feature: what was asked for, e.g. `"EWCModel.export(format='tf_saved_model')"`.
        fix: what to do instead on this backend.
    """
    if is_tensorflow():
        return
    raise BackendError(
        f"{feature} needs the TensorFlow backend; this process runs Keras on "
        f"{name()!r} (KERAS_BACKEND={name()}). {fix} Or run it in a process started "
        "with KERAS_BACKEND=tensorflow: `.keras` and `.weights.h5` files move between "
        "backends with their EWC state."
    )


def tensor(x):
    """`x` (a variable, array or tensor) as a tensor of the backend: its value.

    On TensorFlow, `tf.convert_to_tensor` (a variable is read; `keras.ops` would hand
    the variable itself back); elsewhere `keras.ops.convert_to_tensor` (in a JAX step,
    a variable's traced value).
    """
    if is_tensorflow():
        from keras_ewc.backend.tensorflow import core

        return core.tensor(x)
    return keras.ops.convert_to_tensor(x)


def index_dtype() -> str:
    """The dtype of counters held in variables (the task count): int64, except on JAX
    without `jax_enable_x64`, where an int64 variable silently holds int32 (and warns
    at every creation); a task count never comes near 2**31."""
    return "int64" if has_64_bit() else "int32"


def has_64_bit() -> bool:
    """Whether the backend computes in 64-bit types: always on TensorFlow; on JAX only
    with `jax_enable_x64` (without it a cast to float64 or int64 silently gives float32
    or int32)."""
    if is_jax():
        import jax

        return bool(jax.config.jax_enable_x64)
    return True


def float64_on_cpu() -> bool:
    """Whether the backend computes float64 on the CPU: float64 there (`has_64_bit`)
    and no accelerator visible (on an accelerator float64 is slow, or on a TPU absent)."""
    if not has_64_bit():
        return False
    if is_jax():
        import jax

        return jax.default_backend() == "cpu"
    if is_tensorflow():
        from keras_ewc.backend.tensorflow import core

        return not core.accelerator_visible()
    return False
