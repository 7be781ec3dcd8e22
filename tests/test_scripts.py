"""scripts/results_protocol.py and protocol_table.py: runs recorded, tables, --resume."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.test_continual_datasets import write_mnist_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    path = os.path.join(ROOT, "scripts", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(path):
    with open(path) as f:
        lines = [line for line in f.read().splitlines()[2:] if line]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_protocol_records_every_run_and_resumes(tmp_path, capsys):
    protocol = load_script("results_protocol")
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

    # Resuming with other settings would mix protocols in one file: refused, file untouched.
    with pytest.raises(ValueError, match="Cannot resume.*'iterations': 3"):
        protocol.main([c if c != "3" else "4" for c in common] + ["--resume"])
    with open(out / "runs.json") as f:
        assert json.load(f)["runs"] == runs

    # The table gives, per row, the strength with the best mean over the seeds.
    rows = table_rows(out / "table.md")
    accs = {s: [r["average_accuracy"] for r in runs
                if r["method"] == "exact" and r["strength"] == s] for s in (10.0, 1000.0)}
    best = max(accs, key=lambda s: np.mean(accs[s]))
    assert rows["EWC (exact)"][0] == f"{best:g} (of 10, 1000)"
    se = np.std(accs[best], ddof=1) / np.sqrt(2)
    assert rows["EWC (exact)"][1] == f"{100 * np.mean(accs[best]):.2f} ± {100 * se:.2f}"
    assert rows["EWC (exact)"][2] == ", ".join(f"{100 * a:.2f}" for a in accs[best])
    none = [r["average_accuracy"] for r in runs if r["method"] == "none"]
    assert rows["None (fine-tuning)"][1].startswith(f"{100 * np.mean(none):.2f} ± ")
    assert rows["None (fine-tuning)"][0] == "–"


def test_protocol_table_merges_files_and_checks_them(tmp_path, capsys):
    table = load_script("protocol_table")
    args = {"protocol": "split", "tasks": None, "iterations": 5, "batch_size": 8,
            "lr": 1e-3, "fisher_examples": 8}

    def run(method, strength, seed, acc):
        return {"method": method, "strength": strength, "seed": seed,
                "average_accuracy": acc, "seconds": 60.0}

    a = tmp_path / "a"
    b = tmp_path / "b"
    for d, runs in ((a, [run("none", None, 0, 0.5), run("none", None, 1, 0.7)]),
                    (b, [run("exact", 1.0, 0, 0.8), run("exact", 1.0, 1, 0.9),
                         run("exact", 10.0, 0, 0.95), run("exact", 10.0, 1, 0.85),
                         run("exact", 100.0, 0, 0.99)])):  # 100: one seed, left out
        d.mkdir()
        with open(d / "runs.json", "w") as f:
            json.dump({"args": args, "runs": runs}, f)
    assert table.main([str(a), str(b / "runs.json"), "--detail"]) == 0
    out = capsys.readouterr().out
    assert "7 runs, 7 min" in out
    assert "| None (fine-tuning) | – | 60.00 ± 10.00 | 50.00, 70.00 |" in out
    # 10 has the best mean (0.90 against 0.85 for 1); 100 lacks a seed, so takes no part.
    assert "| EWC (exact) | 10 (of 1, 10, 100) | 90.00 ± 5.00 | 95.00, 85.00 |" in out
    assert "| EWC (exact) | 100 | 99.00 ± nan | 99.00 |" in out

    # Runs of another protocol, or the same run twice, are refused.
    c = tmp_path / "c"
    c.mkdir()
    with open(c / "runs.json", "w") as f:
        json.dump({"args": dict(args, iterations=6), "runs": []}, f)
    with pytest.raises(ValueError, match="other settings"):
        table.load_runs([str(a), str(c)])
    with pytest.raises(ValueError, match="more than one file"):
        table.load_runs([str(a), str(a)])
    assert [table.strength_text(s) for s in (None, 100.0, 1e6, 2.5e-5, 1e10)] == [
        "–", "100", "1e6", "2.5e-5", "1e10"]
    with pytest.raises(FileNotFoundError, match="runs.json"):
        table.load_runs([str(tmp_path / "nothing")])
