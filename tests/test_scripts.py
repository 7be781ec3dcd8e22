"""scripts/results_protocol.py: the runs it records, the table it derives, and --resume."""

import importlib.util
import json
import os

import numpy as np

from tests.test_continual_datasets import write_mnist_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_protocol():
    path = os.path.join(ROOT, "scripts", "results_protocol.py")
    spec = importlib.util.spec_from_file_location("results_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(path):
    with open(path) as f:
        lines = [line for line in f.read().splitlines()[2:] if line]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_protocol_records_every_run_and_resumes(tmp_path, capsys):
    protocol = load_protocol()
    data = tmp_path / "fmnist"
    write_mnist_dir(str(data), gz=False, n=60, m=20)
    out = tmp_path / "out"
    common = [str(data), "--protocol", "permuted", "--tasks", "2", "--iterations", "3",
              "--batch-size", "8", "--fisher-examples", "8", "--seeds", "0,1",
              "--steps-per-execution", "2", "--out", str(out)]
    assert protocol.main(common + ["--methods", "none,exact", "--strengths", "1e1"]) == 0
    with open(out / "runs.json") as f:
        first = json.load(f)["runs"]
    assert [(r["method"], r["strength"], r["seed"]) for r in first] == [
        ("none", None, 0), ("none", None, 1), ("exact", 10.0, 0), ("exact", 10.0, 1)]
    for r in first:
        matrix = np.array(r["accuracy_matrix"], dtype=float)
        assert matrix.shape == (2, 2)
        assert abs(r["average_accuracy"] - np.nanmean(matrix[-1])) < 1e-6

    # Resuming with a wider grid runs only what is missing and keeps the earlier records.
    capsys.readouterr()
    assert protocol.main(common + ["--methods", "none,exact", "--strengths", "1e1,1e3",
                                   "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resuming: 4 runs" in printed
    assert "none      strength None" not in printed  # not run again
    with open(out / "runs.json") as f:
        runs = json.load(f)["runs"]
    assert runs[:4] == first
    assert [(r["method"], r["strength"]) for r in runs[4:]] == [("exact", 1000.0)] * 2
    assert not os.path.exists(out / "runs.json.tmp")

    # The table gives, per row, the strength with the best mean over the seeds.
    rows = table_rows(out / "table.md")
    means = {s: np.mean([r["average_accuracy"] for r in runs
                         if r["method"] == "exact" and r["strength"] == s])
             for s in (10.0, 1000.0)}
    best = max(means, key=means.get)
    assert rows["EWC (exact)"][0] == f"{best:g}"
    assert rows["EWC (exact)"][1].startswith(f"{100 * means[best]:.2f} ± ")
    none = [r["average_accuracy"] for r in runs if r["method"] == "none"]
    assert rows["None (fine-tuning)"][1].startswith(f"{100 * np.mean(none):.2f} ± ")
    assert rows["None (fine-tuning)"][2] == "2"
