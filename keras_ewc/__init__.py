"""Elastic Weight Consolidation for Keras 3: continual learning with `model.fit`."""

from keras_ewc import continual
from keras_ewc.fisher import fisher_diagonal, kronecker_factors
from keras_ewc.model import EWCModel
from keras_ewc.penalty import EWCRegularizer

__version__ = "0.1.0"

__all__ = ["EWCModel", "EWCRegularizer", "continual", "fisher_diagonal",
           "kronecker_factors", "__version__"]
