"""The `keras-ewc` command: what it prints and writes, and its errors."""

import csv
import json
import os

import pytest

import keras_ewc
from keras_ewc.cli import main

needs_core = pytest.mark.skipif(not hasattr(keras_ewc, "EWCModel"),
                                reason="keras_ewc.EWCModel not available")
TINY = ["--tasks", "2", "--steps", "3", "--hidden", "16", "--fisher-examples", "32",
        "--batch-size", "32", "--quiet"]


@needs_core
def test_demo_prints_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--strength", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 permuted Fashion-MNIST tasks (bundled subset, 6000 training images a task)" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split()[-3:] == ["acc", "BWT", "forgetting"]
    assert any(line.startswith("fine-tuning ") for line in lines)
    assert any(line.startswith("EWC (λ=10) ") for line in lines)
    assert "points; forgetting" in text
    data = json.loads((out / "results.json").read_text())
    assert [d["label"] for d in data] == ["fine-tuning", "EWC (λ=10)"]
    assert data[1]["config"]["strength"] == 10.0 and data[1]["config"]["estimator"] == "exact"
    assert data[0]["accuracy_matrix"][0][1] is None and len(data[0]["accuracy_matrix"]) == 2
    # The printed table shows the same final accuracies as the JSON.
    ewc_row = next(line for line in lines if line.startswith("EWC (λ=10) "))
    assert ewc_row.split()[2] == f"{data[1]['accuracy_matrix'][1][0]:.3f}"
    with open(out / "results.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 2 * 2 and rows[0][:2] == ["label", "after_task"]
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


@needs_core
def test_run_sweeps_strength_and_reports_best(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--sequence", "split", "--scenario", "task", "--tasks", "2",
            "--strength", "1,100", "--estimator", "empirical", "--no-baseline",
            "--out", str(out), *TINY[2:]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "split fashion_mnist_subset, 2 tasks, Task-IL, 10 outputs; estimator empirical" in text
    data = json.loads((out / "results.json").read_text())
    assert [d["config"]["strength"] for d in data] == [1.0, 100.0]
    best = max(data, key=lambda d: d["average_accuracy"])
    assert f"Best strength: {best['config']['strength']:g} (average accuracy " \
           f"{best['average_accuracy']:.3f}" in text
    assert data[0]["task_names"] == ["classes 0,1", "classes 2,3,4,5,6,7,8,9"] or \
        data[0]["task_names"] == ["classes 0,1,2,3,4", "classes 5,6,7,8,9"]


@pytest.mark.parametrize("argv,message", [
    (["run", "--dataset", "no_such_dataset"], "Unknown dataset.*'no_such_dataset'"),
    (["run", "--scenario", "instance"], "Unknown scenario.*'instance'"),
    (["run", "--sequence", "shuffled"], "Unknown sequence.*shuffled"),
    (["run", "--sequence", "split", "--tasks", "11"], "More tasks than classes allow"),
    (["run", "--estimator", "magic"], "Unknown estimator.*magic"),
    (["run", "--strength", "1e2,abc"], "comma-separated numbers.*'1e2,abc'"),
    (["run", "--strength", "-1"], "--strength >= 0"),
    (["demo", "--tasks", "0"], "--tasks >= 1. Received: 0"),
    (["demo", "--hidden", "400,x"], "--hidden as comma-separated integers"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-ewc: error: ")
    import re

    assert re.search(message, err), err


def test_missing_idx_file(tmp_path, capsys):
    os.makedirs(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert main(["run", "--dataset", str(tmp_path / "mnist")]) == 2
    err = capsys.readouterr().err
    assert "Missing IDX file for 'y_train'" in err and "train-labels-idx1-ubyte" in err


def test_usage_errors_return_codes(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["demo", "--help"]) == 0
    assert "--strength" in capsys.readouterr().out
