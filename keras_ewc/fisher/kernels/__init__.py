"""Per-layer kernels for sums of squared per-example gradients, BackPACK-style.

Each module handles one layer kind and registers its `Kernel` with `register_kernel`
(see `_registry.Kernel` for the contract). Adding a layer kind means adding one module
here and importing it below; a user's own layer registers the same way.
"""

from keras_ewc.fisher.kernels import conv, dense, einsum_dense, embedding, normalization  # noqa: F401, I001  (registers the built-in kernels)
from keras_ewc.fisher.kernels import conv_transpose, depthwise, group_norm, separable  # noqa: F401, I001
from keras_ewc.fisher.kernels import recurrent  # noqa: F401, I001
from keras_ewc.fisher.kernels._registry import (
    Kernel,
    lookup,
    reads_columns_apart,
    register_kernel,
    registry,
    version,
)

__all__ = ["Kernel", "lookup", "reads_columns_apart", "register_kernel", "registry", "version"]
