"""The Fisher engine: estimators, likelihoods and per-example squared gradients."""

from keras_ewc.fisher.diagonal import ESTIMATORS, fisher_diagonal, kernel_paths
from keras_ewc.fisher.kernels import Kernel, register_kernel
from keras_ewc.fisher.kronecker import kronecker_factors
from keras_ewc.fisher.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood

__all__ = [
    "ESTIMATORS",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Kernel",
    "Likelihood",
    "fisher_diagonal",
    "kernel_paths",
    "kronecker_factors",
    "register_kernel",
]
