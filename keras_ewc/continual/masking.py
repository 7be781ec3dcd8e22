"""Masking of the output units outside the active task (Task-IL)."""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from keras_ewc import _private


@keras.saving.register_keras_serializable(package="keras_ewc")
class ActiveClassMask(keras.layers.Layer):
    """Masks the output units that are not active in the current task.

    Put it after the last layer of a Task-IL model. It holds a 0/1 mask in a non-trainable
    variable (saved with the model) that `set_active_classes` sets per task. Masked logits
    become a large negative number, so the softmax gives them probability 0: the loss, the
    predictions (argmax) and an exact Fisher, which sums over the model's predictive
    distribution, all see only the active classes. With `from_logits=False` the layer
    expects probabilities and renormalises them over the active classes instead.

    Args:
        from_logits: whether the inputs are logits (default) or probabilities.
        **kwargs: base layer keyword arguments (e.g. `name`).

    Example:

    >>> import keras, numpy as np
    >>> from keras_ewc.continual import ActiveClassMask, set_active_classes
    >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), ActiveClassMask()])
    >>> _ = set_active_classes(net, [2, 3])
    >>> probs = keras.ops.softmax(net(np.ones((1, 3), "float32")))
    >>> np.asarray(probs)[0, :2].tolist()
    [0.0, 0.0]
    """

    def __init__(self, from_logits: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.from_logits = bool(from_logits)

    def build(self, input_shape):
        units = input_shape[-1]
        if units is None:
            raise ValueError(
                "ActiveClassMask needs a known number of output units. "
                f"Received: input_shape={input_shape}"
            )
        self.mask = self.add_weight(
            name="active_mask", shape=(units,), initializer="ones",
            trainable=False, dtype="float32",
        )

    def call(self, inputs):
        mask = keras.ops.cast(self.mask, inputs.dtype)
        active = keras.ops.greater(mask, 0)
        if self.from_logits:
            # exp underflows to exactly 0 well before these values; 16-bit floats get a
            # value they can hold.
            low = -1e4 if keras.backend.standardize_dtype(inputs.dtype) in (
                "float16", "bfloat16") else -1e9
            return keras.ops.where(active, inputs, keras.ops.cast(low, inputs.dtype))
        kept = inputs * mask
        return kept / keras.ops.maximum(
            keras.ops.sum(kept, axis=-1, keepdims=True), keras.backend.epsilon())

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"from_logits": self.from_logits})
        return config


def find_mask_layers(model) -> list[ActiveClassMask]:
    """Returns every `ActiveClassMask` inside `model` (searching nested models)."""
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, ActiveClassMask):
            found.append(layer)
        for child in _private.child_layers(layer):
            visit(child)

    visit(model)
    return found


def set_active_classes(model, classes: Iterable[int] | np.ndarray | None) -> int:
    """Sets the active output units of every `ActiveClassMask` in `model`.

    Args:
        model: a Keras model (an `EWCModel` wrapper is searched too).
        classes: the active unit indices, a 0/1 mask as long as the output, or None for
            all units.

    Returns:
        The number of mask layers set (0 if the model has none).

    Example:

    >>> import keras
    >>> from keras_ewc.continual import ActiveClassMask, set_active_classes
    >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), ActiveClassMask()])
    >>> set_active_classes(net, [0, 1])
    1
    """
    layers = find_mask_layers(model)
    for layer in layers:
        if not layer.built:
            raise ValueError(
                f"ActiveClassMask {layer.name!r} is not built yet; build the model first "
                "(call it on a batch or give it an Input)."
            )
        units = int(layer.mask.shape[0])
        layer.mask.assign(_as_mask(classes, units))
    return len(layers)


def _as_mask(classes, units: int) -> np.ndarray:
    if classes is None:
        return np.ones(units, np.float32)
    arr = np.asarray(classes)
    if arr.dtype == bool or (arr.ndim == 1 and len(arr) == units and arr.dtype.kind == "f"
                             and set(np.unique(arr)) <= {0.0, 1.0}):
        if len(arr) != units:
            raise ValueError(
                f"Expected a mask of length {units}. Received: length {len(arr)}"
            )
        return arr.astype(np.float32)
    idx = arr.astype(np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= units:
        raise ValueError(
            f"Expected active classes in [0, {units}) and at least one. "
            f"Received: classes={idx.tolist()}"
        )
    mask = np.zeros(units, np.float32)
    mask[idx] = 1.0
    return mask
