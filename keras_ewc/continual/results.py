"""The accuracy matrix of a run, its metrics, and JSON/CSV files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import textwrap
from typing import Any

import numpy as np

from keras_ewc.continual import metrics


@dataclasses.dataclass
class ContinualResults:
    """The accuracy matrix of one continual-learning run, with its metrics.

    Args:
        matrix: `R[i][j]` = accuracy on task j after training task i; NaN where task j
            was not evaluated (by default the tasks not yet seen).
        task_names: a name for each task (column).
        label: the method's name, e.g. `"EWC (λ=1000)"`.
        config: anything worth keeping with the numbers (strength, estimator, ...).

    Example:

    >>> from keras_ewc.continual import ContinualResults
    >>> res = ContinualResults([[0.9, float("nan")], [0.6, 0.8]], label="finetune")
    >>> res.average_accuracy, res.backward_transfer
    (0.7, -0.3)
    """

    matrix: Any
    task_names: list[str] | None = None
    label: str = ""
    config: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        if self.matrix.ndim != 2:
            raise ValueError(
                f"Expected a 2-D accuracy matrix. Received: shape={self.matrix.shape}"
            )
        if self.task_names is None:
            self.task_names = [f"task {j + 1}" for j in range(self.matrix.shape[1])]
        self.task_names = list(self.task_names)

    @property
    def average_accuracy(self) -> float:
        return metrics.average_accuracy(self.matrix)

    @property
    def backward_transfer(self) -> float:
        return metrics.backward_transfer(self.matrix)

    @property
    def forgetting(self) -> float:
        return metrics.forgetting(self.matrix)

    @property
    def final_accuracies(self) -> list[float]:
        """Accuracy on each seen task after the last task trained."""
        n = self.matrix.shape[0]
        return [float(a) for a in self.matrix[n - 1, :n]]

    def summary(self) -> dict[str, float]:
        return metrics.summarize(self.matrix)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "task_names": self.task_names,
            "accuracy_matrix": [[None if math.isnan(v) else float(v) for v in row]
                                for row in self.matrix],
            **{k: (None if math.isnan(v) else v) for k, v in self.summary().items()},
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ContinualResults:
        matrix = [[float("nan") if v is None else v for v in row]
                  for row in d["accuracy_matrix"]]
        return cls(matrix, d.get("task_names"), d.get("label", ""), d.get("config", {}))

    def to_json(self, path: str | None = None) -> str:
        """Returns the results as JSON text, and writes them to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str) -> ContinualResults:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_csv(self, path: str) -> None:
        """Writes the matrix as CSV: one row per task trained (`after_task` from 1, as in
        `results_table` and the plots), one column per task."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            write_matrix_rows(csv.writer(f), self, header=True)


def write_matrix_rows(writer, results: ContinualResults, header: bool) -> None:
    if header:
        writer.writerow(["label", "after_task"] + results.task_names)
    # Tasks are numbered from 1, as in the table and the plots (0.1.0 wrote from 0).
    for i, row in enumerate(results.matrix):
        writer.writerow([results.label, i + 1]
                        + ["" if math.isnan(v) else f"{v:.6f}" for v in row])


def save_results(results: list[ContinualResults], json_path: str | None = None,
                 csv_path: str | None = None) -> None:
    """Writes several runs to one JSON file (a list) and/or one CSV file.

    The CSV has one line per (run, task trained): `label, after_task, <accuracy per task>`,
    `after_task` numbered from 1 as in `results_table` and the plots.

    Args:
        results: the runs.
        json_path: where to write the JSON list, or None.
        csv_path: where to write the CSV, or None.

    Example:

    >>> from keras_ewc.continual import ContinualResults, save_results
    >>> path = "r.csv"
    >>> save_results([ContinualResults([[0.5]], label="a")], csv_path=path)
    >>> open(path).read().splitlines()[1]
    'a,1,0.500000'
    """
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in results], f, indent=2, ensure_ascii=False)
            f.write("\n")
    if csv_path is not None:
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for k, r in enumerate(results):
                write_matrix_rows(writer, r, header=(k == 0))


METRICS_FOOTNOTE = (
    "avg acc: mean final accuracy over the tasks. BWT: mean change of each earlier task's "
    "accuracy from just after it was learned to the end (negative: it was forgotten). "
    "forgetting: mean drop from each earlier task's best accuracy to its final one; "
    "negative when earlier tasks ended above their best earlier accuracy (later tasks "
    "helped them)."
)


def results_table(results: list[ContinualResults], footnote: bool = False) -> str:
    """A plain-text table: one line per run, final accuracy per task and the metrics.

    Tasks are numbered 1..T in the header, as in the plots; `task_names` says what each is.
    With `footnote=True`, a line after the table defines the metrics (`METRICS_FOOTNOTE`),
    negative forgetting included.

    Example:

    >>> from keras_ewc.continual import ContinualResults, results_table
    >>> print(results_table([ContinualResults([[0.9, float("nan")], [0.6, 0.8]], label="ft")]))
    method  task 1  task 2  avg acc  BWT     forgetting
    ft      0.600   0.800   0.700    -0.300  0.300
    """
    names = results[0].task_names if results else []
    header = ["method"] + [f"task {j + 1}" for j in range(len(names))]
    header += ["avg acc", "BWT", "forgetting"]
    rows = []
    for r in results:
        n = r.matrix.shape[0]
        cells = [r.label]
        cells += [f"{r.matrix[n - 1, j]:.3f}" if j < n else "-" for j in range(len(names))]
        cells += [_fmt(r.average_accuracy), _fmt(r.backward_transfer), _fmt(r.forgetting)]
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header] + rows]
    if footnote:
        lines.append(textwrap.fill(METRICS_FOOTNOTE, width=90))
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"
