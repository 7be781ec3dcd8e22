"""TensorFlow's answers to the seam's small questions (see `keras_ewc.backend`)."""

import tensorflow as tf


def tensor(x) -> tf.Tensor:
    """`x` as a tensor: a variable is read (`keras.ops.convert_to_tensor` would hand the
    Keras variable itself back)."""
    return tf.convert_to_tensor(x)


def nest():
    """`tf.nest`, the nested-structure functions keras_ewc uses on TensorFlow."""
    return tf.nest


def accelerator_visible() -> bool:
    """Whether TensorFlow sees a GPU or a TPU."""
    return any(tf.config.list_logical_devices(kind) for kind in ("GPU", "TPU"))
