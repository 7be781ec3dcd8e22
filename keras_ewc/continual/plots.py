"""Plots of continual-learning results (needs matplotlib)."""

from __future__ import annotations

import math

import numpy as np

from keras_ewc.continual.results import ContinualResults


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "Plots need matplotlib: pip install matplotlib (or 'keras-ewc[examples]')."
        ) from e
    return plt


def plot_results(results: ContinualResults | list[ContinualResults], path: str,
                 title: str | None = None) -> str:
    """Writes a PNG: the accuracy matrix of each run as a heat map, and per-task curves.

    One column per run. Top: `R` as a heat map (rows: after training task i; columns:
    task j; the value in each cell). Bottom: the accuracy on each task as training
    proceeds, one line per task, from the task's own training onwards.

    Args:
        results: one `ContinualResults` or a list of them (e.g. fine-tuning and EWC).
        path: where to write the PNG.
        title: a figure title.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile
    >>> from keras_ewc.continual import ContinualResults
    >>> from keras_ewc.continual.plots import plot_results
    >>> res = ContinualResults([[0.9, float("nan")], [0.6, 0.8]], label="finetune")
    >>> path = plot_results(res, os.path.join(tempfile.mkdtemp(), "r.png"))
    >>> os.path.getsize(path) > 0
    True
    """
    plt = _pyplot()
    runs = [results] if isinstance(results, ContinualResults) else list(results)
    if not runs:
        raise ValueError("Expected at least one ContinualResults to plot. Received: []")
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for k, run in enumerate(runs):
        r = run.matrix
        rows, cols = r.shape
        ax = axes[0][k]
        im = ax.imshow(np.ma.masked_invalid(r), vmin=0.0, vmax=1.0, cmap=cmap)
        ax.set_title(f"{run.label or 'run'}\navg acc {_fmt(run.average_accuracy)}, "
                     f"BWT {_fmt(run.backward_transfer)}", fontsize=10)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
        if cols <= 12:
            for i in range(rows):
                for j in range(cols):
                    if not math.isnan(r[i, j]):
                        ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center",
                                fontsize=8, color="white" if r[i, j] < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax = axes[1][k]
        for j in range(cols):
            steps = np.arange(j, rows)
            if len(steps):
                ax.plot(steps + 1, r[j:rows, j], marker="o", ms=3,
                        label=run.task_names[j], color=plt.get_cmap("tab10")(j % 10))
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("test accuracy")
        ax.set_xticks(range(1, rows + 1))
        ax.grid(alpha=0.3)
        if cols <= 10:
            ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"
