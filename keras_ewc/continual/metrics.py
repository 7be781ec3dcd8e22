"""Continual-learning metrics on an accuracy matrix."""

from __future__ import annotations

import numpy as np


def _matrix(r) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[0] > r.shape[1]:
        raise ValueError(
            "Expected an accuracy matrix R of shape (tasks trained, tasks) with "
            f"1 <= rows <= columns. Received: shape={r.shape}"
        )
    return r


def average_accuracy(r) -> float:
    """Mean accuracy over the tasks seen so far, after the last task trained.

    With `n` rows (tasks trained): `mean_j R[n-1, j]` for `j < n`.

    Args:
        r: the accuracy matrix, `R[i][j]` = accuracy on task j after training task i.

    Example:

    >>> from keras_ewc.continual import average_accuracy
    >>> average_accuracy([[0.9, float("nan")], [0.6, 0.8]])
    0.7
    """
    r = _matrix(r)
    n = r.shape[0]
    return round(float(np.mean(r[n - 1, :n])), 12)


def backward_transfer(r) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): how later tasks changed earlier ones.

    `BWT = 1/(n-1) Σ_{j<n-1} (R[n-1, j] − R[j, j])`; negative means forgetting.
    NaN with a single task.

    Args:
        r: the accuracy matrix, `R[i][j]` = accuracy on task j after training task i.

    Example:

    >>> from keras_ewc.continual import backward_transfer
    >>> backward_transfer([[0.9, float("nan")], [0.6, 0.8]])
    -0.3
    """
    r = _matrix(r)
    n = r.shape[0]
    if n < 2:
        return float("nan")
    return round(float(np.mean([r[n - 1, j] - r[j, j] for j in range(n - 1)])), 12)


def forgetting(r) -> float:
    """Average forgetting (Chaudhry et al. 2018): best earlier accuracy minus final one.

    `F = 1/(n-1) Σ_{j<n-1} max_{j<=l<n-1} R[l, j] − R[n-1, j]`. NaN with a single task.

    Args:
        r: the accuracy matrix, `R[i][j]` = accuracy on task j after training task i.

    Example:

    >>> from keras_ewc.continual import forgetting
    >>> forgetting([[0.9, 0.1, 0.1], [0.95, 0.8, 0.1], [0.5, 0.7, 0.9]])
    0.275
    """
    r = _matrix(r)
    n = r.shape[0]
    if n < 2:
        return float("nan")
    drops = [np.max(r[j:n - 1, j]) - r[n - 1, j] for j in range(n - 1)]
    return round(float(np.mean(drops)), 12)


def summarize(r) -> dict[str, float]:
    """Returns `average_accuracy`, `backward_transfer` and `forgetting` of `r` as a dict."""
    return {
        "average_accuracy": average_accuracy(r),
        "backward_transfer": backward_transfer(r),
        "forgetting": forgetting(r),
    }
