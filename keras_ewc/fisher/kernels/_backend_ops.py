"""The few kernel ops `keras.ops` lacks, one function each, dispatched on the backend.

Everything else in the kernels is written once in `keras.ops`. Each function here has
the TensorFlow form the kernels have always used and a JAX form (`jax.lax`) that computes
the same values; TensorFlow and JAX are imported inside the function, so that neither is
imported on the other backend. A new backend adds a branch to each function.
"""

from __future__ import annotations

import keras


def _unsupported(name):
    return NotImplementedError(
        f"`{name}` has a TensorFlow and a JAX form. Received backend "
        f"{keras.backend.backend()!r}. Use KERAS_BACKEND=tensorflow or jax, or register "
        "a kernel of your own for this layer."
    )


def extract_patches(x, kernel_size, strides, dilation):
    """`[B, *out, K * C]`: the "valid" patches of `x` (`[B, *S, C]`, 1 to 3 spatial axes).

    Offsets are ordered as the kernel's spatial axes, channels fastest, like the rows
    of a convolution kernel reshaped to `[K * C, filters]`. 3D patches with dilations
    are not taken here (see `conv.patches`).
    """
    rank = len(kernel_size)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if rank <= 2:
            # tf.image.extract_patches is 2D; a 1D input is an image of height 1.
            y = x[:, None] if rank == 1 else x
            lift = (lambda v: [1, 1, v[0], 1]) if rank == 1 else (lambda v: [1, *v, 1])
            y = tf.image.extract_patches(
                y, lift(kernel_size), lift(strides), lift(dilation), "VALID"
            )
            return y[:, 0] if rank == 1 else y
        if any(d != 1 for d in dilation):
            raise ValueError(
                "Expected unit dilations for 3D patches (tf.extract_volume_patches has "
                f"none). Received: dilation={tuple(dilation)}"
            )
        return tf.extract_volume_patches(x, [1, *kernel_size, 1], [1, *strides, 1], "VALID")
    if backend == "jax":
        import jax

        spatial = "DHW"[3 - rank:]
        dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated_patches(
            x, tuple(kernel_size), tuple(strides), "VALID", rhs_dilation=tuple(dilation),
            dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST)
        # JAX orders the patch features channels slowest, [C, *K]: put channels fastest.
        channels = int(x.shape[-1])
        out = tuple(int(d) for d in y.shape[:-1])
        y = y.reshape(out + (channels, -1))
        return jax.numpy.swapaxes(y, -1, -2).reshape(out + (-1,))
    raise _unsupported("extract_patches")


def depthwise_filter_grad(x, filter_shape, g, strides):
    """`[kh, kw, C, M]`: the filter gradient of a "valid" 2D depthwise convolution.

    `x` is `[B, H, W, C]`, `g` the gradient at the output `[B, P, Q, C * M]`, `strides`
    two integers; no dilation (the kernels take the dense kernel spanning a dilated one).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.nn.depthwise_conv2d_backprop_filter(
            x, list(filter_shape), g, [1, *strides, 1], "VALID")
    if backend == "jax":
        import jax

        kh, kw, channels, multiplier = (int(d) for d in filter_shape)

        def conv(w):
            # Depthwise: one group a channel, output channel c * M + m as in Keras.
            return jax.lax.conv_general_dilated(
                x, w.reshape(kh, kw, 1, channels * multiplier), tuple(strides), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
                precision=jax.lax.Precision.HIGHEST)

        # The convolution is linear in w: its vjp at any w (zeros) is the filter gradient.
        zeros = jax.numpy.zeros((kh, kw, channels, multiplier), x.dtype)
        _, pullback = jax.vjp(conv, zeros)
        return pullback(g.astype(x.dtype))[0]
    raise _unsupported("depthwise_filter_grad")


def unique_keys(keys):
    """`(unique keys, each key's index among them, how many there are)` of a 1D tensor.

    TensorFlow keeps its dynamic count of distinct keys (`tf.unique`). JAX traces static
    shapes only, so there every key has a slot: the unused slots hold key 0 and no index
    points to them, so whatever is summed into them is zero.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        unique, index = keras.ops.unique(keys, sorted=False, return_inverse=True)
        return unique, index, keras.ops.shape(unique)[0]
    if backend == "jax":
        count = int(keys.shape[0])
        unique, index = keras.ops.unique(keys, return_inverse=True, size=count, fill_value=0)
        return unique, keras.ops.reshape(index, [-1]), count
    raise _unsupported("unique_keys")
