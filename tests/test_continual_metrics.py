"""Metrics and results on hand-computed accuracy matrices."""

import csv
import json
import math

import numpy as np
import pytest

from keras_ewc.continual import (
    ContinualResults,
    average_accuracy,
    backward_transfer,
    forgetting,
    results_table,
    save_results,
)

NAN = float("nan")
# R[i][j]: accuracy on task j after training task i (upper triangle not evaluated).
R = [
    [0.90, NAN, NAN],
    [0.70, 0.80, NAN],
    [0.60, 0.85, 0.95],
]


def test_average_accuracy_uses_the_last_row_over_seen_tasks():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    assert average_accuracy(R[:2]) == pytest.approx((0.70 + 0.80) / 2)  # after task 1


def test_backward_transfer_hand_computed():
    # ((0.60 - 0.90) + (0.85 - 0.80)) / 2 = -0.125
    assert backward_transfer(R) == pytest.approx(-0.125)
    assert math.isnan(backward_transfer([[0.5]]))


def test_forgetting_uses_best_earlier_accuracy_not_the_diagonal():
    # Task 0 peaks at 0.95 after task 1, not at its diagonal 0.90.
    r = [[0.90, NAN, NAN], [0.95, 0.80, NAN], [0.50, 0.70, 0.90]]
    # ((0.95 - 0.50) + (0.80 - 0.70)) / 2 = 0.275; BWT would give -0.25.
    assert forgetting(r) == pytest.approx(0.275)
    assert backward_transfer(r) == pytest.approx(-0.25)
    # Improvement on a task is negative forgetting.
    assert forgetting(R) == pytest.approx(((0.90 - 0.60) + (0.80 - 0.85)) / 2)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="shape=\\(3,\\)"):
        average_accuracy([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1 <= rows <= columns"):
        forgetting(np.zeros((3, 2)))


def test_results_json_roundtrip_and_csv(tmp_path):
    res = ContinualResults(R, ["a", "b", "c"], label="ewc", config={"strength": 100.0})
    path = tmp_path / "r.json"
    res.to_json(str(path))
    loaded = json.loads(path.read_text())
    assert loaded["accuracy_matrix"][0] == [0.9, None, None]
    assert loaded["backward_transfer"] == pytest.approx(-0.125)
    again = ContinualResults.from_json(str(path))
    assert np.allclose(again.matrix, res.matrix, equal_nan=True)
    assert again.config == {"strength": 100.0} and again.task_names == ["a", "b", "c"]
    res.to_csv(str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["label", "after_task", "a", "b", "c"]
    # Row i is after task i, numbered from 1 as in the table's header and the plots.
    assert rows[1] == ["ewc", "1", "0.900000", "", ""]
    assert rows[2] == ["ewc", "2", "0.700000", "0.800000", ""]
    assert [r[1] for r in rows[1:]] == ["1", "2", "3"]


def test_save_results_and_table(tmp_path):
    a = ContinualResults(R, label="finetune")
    b = ContinualResults([[1.0, NAN], [0.5, 0.5]], ["task 0", "task 1"], label="x")
    save_results([a, b], json_path=str(tmp_path / "all.json"),
                 csv_path=str(tmp_path / "all.csv"))
    data = json.loads((tmp_path / "all.json").read_text())
    assert [d["label"] for d in data] == ["finetune", "x"]
    lines = (tmp_path / "all.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 + 2 and lines[-1].startswith("x,2,0.500000,0.500000")
    table = results_table([a])
    assert table.splitlines()[1].split() == ["finetune", "0.600", "0.850", "0.950", "0.800",
                                             "-0.125", "0.125"]


def test_table_footnote_defines_the_metrics_and_negative_forgetting():
    # Task 1 ends above its best earlier accuracy: forgetting -0.05, BWT +0.05.
    res = ContinualResults([[0.80, NAN], [0.85, 0.90]], label="ewc")
    assert res.forgetting == pytest.approx(-0.05) and res.backward_transfer == pytest.approx(0.05)
    plain, noted = results_table([res]), results_table([res], footnote=True)
    assert noted.startswith(plain + "\n") and "-0.050" in plain.splitlines()[1]
    note = " ".join(noted.splitlines()[2:])  # wrapped at 90 columns
    assert max(len(line) for line in noted.splitlines()) <= 90
    assert "forgetting: mean drop from each earlier task's best accuracy to its final one; " \
           "negative when" in note and "BWT:" in note
