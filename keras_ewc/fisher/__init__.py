"""The Fisher engine: estimators, likelihoods and per-example squared gradients."""

from keras_ewc.fisher.diagonal import ESTIMATORS, fisher_diagonal
from keras_ewc.fisher.kronecker import kronecker_factors
from keras_ewc.fisher.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood

__all__ = [
    "ESTIMATORS",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "fisher_diagonal",
    "kronecker_factors",
]
