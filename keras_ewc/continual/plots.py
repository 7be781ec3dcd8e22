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
    task j; the value in each cell; one colour bar, labelled). Bottom: the accuracy on
    each task as training proceeds, one line per task, from the task's own training
    onwards, with the legend below the plots. Tasks are numbered 1..T in both panels.

    Args:
        results: one `ContinualResults` or a list of them (e.g. fine-tuning and EWC).
        path: where to write the PNG.
        title: a figure title, e.g. `TaskSequence.title`.

    Returns:
        `path`.

    Example:

    >>> import os
    >>> from keras_ewc.continual import ContinualResults
    >>> from keras_ewc.continual.plots import plot_results
    >>> res = ContinualResults([[0.9, float("nan")], [0.6, 0.8]], label="finetune")
    >>> path = plot_results(res, "r.png")
    >>> os.path.getsize(path) > 0
    True
    """
    plt = _pyplot()
    runs = [results] if isinstance(results, ContinualResults) else list(results)
    if not runs:
        raise ValueError("Expected at least one ContinualResults to plot. Received: []")
    n = len(runs)
    cols = max(run.matrix.shape[1] for run in runs)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n + 1.6, 8.2), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    colours = plt.get_cmap("tab10")
    numbers = list(range(1, cols + 1))  # tasks are numbered 1..T in both panels
    im = None
    for k, run in enumerate(runs):
        r = run.matrix
        rows, width = r.shape
        ax = axes[0][k]
        im = ax.imshow(np.ma.masked_invalid(r), vmin=0.0, vmax=1.0, cmap=cmap)
        ax.set_title(f"{run.label or 'run'}\navg acc {_fmt(run.average_accuracy)}, "
                     f"BWT {_fmt(run.backward_transfer)}", fontsize=10)
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        ax.set_xticks(range(width), [str(j + 1) for j in range(width)])
        ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
        if width <= 12:
            for i in range(rows):
                for j in range(width):
                    if not math.isnan(r[i, j]):
                        ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center",
                                fontsize=8, color="white" if r[i, j] < 0.6 else "black")
        ax = axes[1][k]
        for j in range(width):
            steps = np.arange(j, rows)
            if len(steps):
                ax.plot(steps + 1, r[j:rows, j], marker="o", ms=3, color=colours(j % 10),
                        label=_legend_label(j, run.task_names[j]))
        ax.set_ylim(0.0, 1.02)
        ax.set_xlim(0.7, max(rows, 1) + 0.3)
        ax.set_xlabel("after training task")
        ax.set_ylabel("test accuracy")
        ax.set_xticks(numbers[:rows])
        ax.grid(alpha=0.3)
    colourbar = fig.colorbar(im, ax=list(axes[0]), shrink=0.85)
    colourbar.set_label("test accuracy")
    if cols <= 10:
        # One legend for every run (the tasks are the same), below the plots, off the lines.
        handles, labels = axes[1][n - 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(cols, 3),
                   fontsize=8, title="accuracy on", title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_label(j: int, name: str) -> str:
    number = f"task {j + 1}"
    return number if name in (number, f"task {j}") else f"{number}: {name}"


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"
