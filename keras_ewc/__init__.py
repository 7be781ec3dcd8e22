"""Elastic Weight Consolidation for Keras 3: continual learning with `model.fit`."""

from keras_ewc import _startup

# Before TensorFlow loads: the `keras-ewc` command and the examples start quietly. A
# program that merely imports keras_ewc is left alone (see keras_ewc/_startup.py).
_startup.quiet_if_entry_point()

from keras_ewc import continual  # noqa: E402
from keras_ewc.fisher import fisher_diagonal, kronecker_factors  # noqa: E402
from keras_ewc.model import EWCModel  # noqa: E402
from keras_ewc.penalty import EWCRegularizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["EWCModel", "EWCRegularizer", "continual", "fisher_diagonal",
           "kronecker_factors", "__version__"]
