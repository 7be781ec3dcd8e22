"""The `keras-ewc` command: what it prints and writes, and its errors."""

import argparse
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from keras_ewc import _startup, cli
from keras_ewc.cli import grid_edge_note, little_gain_note, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's start-up lines, written independently of keras_ewc._startup's own pattern.
STARTUP = re.compile(r"absl::InitializeLog|oneDNN|cuda|cuInit|cpu_feature_guard|"
                     r"^[IWE]0000 ", re.M | re.I)
TINY = ["--tasks", "2", "--steps", "3", "--hidden", "16", "--fisher-examples", "32",
        "--batch-size", "32", "--quiet"]


def test_demo_prints_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--strength", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 permuted Fashion-MNIST tasks (bundled subset, 6000 training images a task)" in text
    # What training does, in batches and passes: 3 batches of 32 are 96 of 6,000 images.
    assert "each task trained for 3 batches of 32 (0.016 passes over its 6,000 images)." in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "task", "1", "task", "2", "avg", "acc", "BWT",
                              "forgetting"]
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


def test_run_sweeps_strength_and_reports_best(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--sequence", "split", "--scenario", "task", "--tasks", "2",
            "--strength", "1,100", "--estimator", "empirical", "--no-baseline",
            "--out", str(out), *TINY[2:]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "split Fashion-MNIST (bundled subset), 2 tasks, Task-IL, 10 outputs; " \
        "estimator empirical" in text
    data = json.loads((out / "results.json").read_text())
    assert [d["config"]["strength"] for d in data] == [1.0, 100.0]
    best = max(data, key=lambda d: d["average_accuracy"])
    accuracies = {d["config"]["strength"]: d["average_accuracy"] for d in data}
    # Two split tasks of the bundled subset: 2 x 500 test images.
    tie = cli.sampling_margin(best["average_accuracy"], 1000)
    if cli.choose_strength(accuracies, tie)[0] is None:
        assert "Best strength" not in text and "Try --strength" not in text
        assert "No strength is clearly best: 1, 100 are within " \
               f"{tie:.3f} of the top average accuracy {best['average_accuracy']:.3f} " \
               "(two standard errors of an accuracy measured on 1,000 test examples" in text
        return
    assert f"Best strength: {best['config']['strength']:g} (average accuracy " \
           f"{best['average_accuracy']:.3f}" in text
    assert f"; the others are more than {tie:.3f} below)." in text
    # With two strengths the best is at an end of the grid, and the command says so.
    if best["config"]["strength"] == 100.0:
        assert "largest of the grid: a larger one may be better. Try --strength " \
               "100,1e4,1e6." in text
    else:
        assert "smallest of the grid: a smaller one may be better. Try --strength " \
               "1e-4,0.01,1." in text
    assert data[0]["task_names"] == ["classes 0,1,2,3,4", "classes 5,6,7,8,9"]


@pytest.mark.parametrize("argv,message", [
    (["run", "--dataset", "no_such_dataset"], "Unknown dataset.*'no_such_dataset'"),
    (["run", "--scenario", "instance"], "Unknown scenario.*'instance'"),
    (["run", "--sequence", "shuffled"], "Unknown sequence.*shuffled"),
    (["run", "--sequence", "split", "--tasks", "11"], "More tasks than classes allow"),
    (["run", "--estimator", "magic"], "Unknown estimator.*magic"),
    (["run", "--strength", "1e2,abc"], "comma-separated numbers.*'1e2,abc'"),
    (["run", "--strength", "-1"], "--strength >= 0"),
    (["run", "--tie", "-0.1"], "--tie >= 0. Received: -0.1"),
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


@pytest.mark.parametrize("grid,best,expected", [
    ([1e2, 1e3, 1e4], 1e3, None),
    ([1e2, 1e3, 1e4], 1e4, "The best strength is the largest of the grid: a larger one may "
                           "be better. Try --strength 1e4,1e5,1e6."),
    ([1e4, 1e2, 1e3], 1e2, "The best strength is the smallest of the grid: a smaller one may "
                           "be better. Try --strength 1,10,100."),
    ([1, 3, 10], 10, "The best strength is the largest of the grid: a larger one may be "
                     "better. Try --strength 10,33.3333,111.111."),
    ([500.0], 500.0, "Only one strength was tried. Try --strength 50,500,5000."),
    ([0, 1e2], 0, "The best strength is 0: EWC did not help on this sequence at these "
                  "settings."),
])
def test_grid_edge_note(grid, best, expected):
    assert grid_edge_note(grid, best) == expected


@pytest.mark.parametrize("accuracies,tie,best,tied", [
    # The Class-IL sweep of the report: 0.001 apart is no best strength.
    ({1e2: 0.196, 1e3: 0.197, 1e4: 0.195}, 0.025, None, [1e2, 1e3, 1e4]),
    ({1e2: 0.60, 1e3: 0.72, 1e4: 0.65}, 0.012, 1e3, [1e3]),
    ({1e2: 0.70, 1e3: 0.72, 1e4: 0.50}, 0.012, 1e3, [1e3]),   # 0.02 > 0.012
    ({1e2: 0.71, 1e3: 0.72, 1e4: 0.50}, 0.012, None, [1e2, 1e3]),
    ({1e2: 0.71, 1e3: 0.72}, 0.0, 1e3, [1e3]),                 # tie=0: any difference
    ({1e2: 0.72, 1e3: 0.72}, 0.0, None, [1e2, 1e3]),
    ({500.0: 0.4}, 0.05, 500.0, [500.0]),
])
def test_a_strength_is_called_best_only_beyond_the_tie(accuracies, tie, best, tied):
    assert cli.choose_strength(accuracies, tie) == (best, tied)


def test_sampling_margin_is_two_standard_errors_of_the_test_accuracy():
    assert cli.sampling_margin(0.2, 1000) == pytest.approx(2 * (0.2 * 0.8 / 1000) ** 0.5)
    assert cli.sampling_margin(0.2, 1000) == pytest.approx(0.0253, abs=1e-4)
    assert cli.sampling_margin(0.78, 5000) == pytest.approx(0.0117, abs=1e-4)
    assert cli.sampling_margin(1.0, 100) == 0.0


def test_run_with_a_tie_calls_no_strength_best_and_suggests_no_grid(tmp_path, capsys):
    argv = ["run", "--sequence", "split", "--scenario", "class", "--tasks", "2",
            "--strength", "1,10", "--no-baseline", "--tie", "1.0", "--out", str(tmp_path),
            *TINY[2:]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "No strength is clearly best: 1, 10 are within 1.000 of the top" in text
    assert "Best strength" not in text and "Try --strength" not in text


def test_little_gain_note_names_the_scenario_and_stays_quiet_otherwise():
    assert little_gain_note("task", 0.0) is None
    assert little_gain_note("domain", 0.05) is None
    domain = little_gain_note("domain", 0.012)
    assert domain.startswith("EWC gained +1.2 points: expected, in Domain-IL")
    cls = little_gain_note("class", -0.004)
    assert cls.startswith("EWC gained -0.4 points: expected, in Class-IL")
    assert "van de Ven, Tuytelaars & Tolias" in cls


def test_run_in_class_il_explains_a_small_gain(tmp_path, capsys):
    argv = ["run", "--sequence", "split", "--scenario", "class", "--tasks", "2",
            "--strength", "1", "--out", str(tmp_path), *TINY[2:]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    gain = data[1]["average_accuracy"] - data[0]["average_accuracy"]
    note = little_gain_note("class", gain)
    assert (note in text) if note else ("EWC gained" not in text)
    assert "Only one strength was tried. Try --strength 0.1,1,10." in text
    # One strength: called best without a claim about others.
    assert re.search(r"Best strength: 1 \(average accuracy [\d.]+, forgetting -?[\d.]+\)\.",
                     text), text


def _options(parser):
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices


@pytest.mark.parametrize("command", ["demo", "run"])
def test_every_option_has_help_and_its_default_is_shown(command, capsys):
    sub = _options(cli._build_parser())[command]
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 8, action.dest
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, action.dest
    for option in ("--tasks", "--batch-size", "--seed", "--lr", "--out", "--tf-logs"):
        assert option in text


def test_demo_help_states_the_measured_duration(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Offline; 1 to 2½ minutes on 2 CPU cores." in text
    assert "a few minutes" not in text


def test_entry_points_are_recognised_and_a_plain_import_is_not(monkeypatch, tmp_path):
    # Another checkout, whose keras_ewc may be installed rather than imported from it.
    (tmp_path / "keras_ewc").mkdir()
    (tmp_path / "keras_ewc" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "examples" / "split_mnist.py")])
    assert _startup.is_entry_point()
    monkeypatch.setattr(sys, "orig_argv", ["python", "my_script.py"], raising=False)
    for argv0, expected in [("/venv/bin/keras-ewc", True),
                            (os.path.join(ROOT, "examples", "split_mnist.py"), True),
                            (os.path.join(ROOT, "my_script.py"), False),
                            (os.path.join(ROOT, "tests", "examples", "x.py"), False),
                            ("-c", False), ("", False)]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert _startup.is_entry_point() is expected, argv0
    monkeypatch.setattr(sys, "argv", ["/x/keras_ewc/cli.py"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "keras_ewc.cli", "demo"])
    assert _startup.is_entry_point()


def test_only_a_leading_dash_m_makes_the_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    for orig, expected in [(["python", "-m", "keras_ewc.cli", "demo"], True),
                           (["python", "-W", "ignore", "-X", "importtime", "-m", "keras_ewc"],
                            True),
                           (["python", "train.py", "-m", "keras_ewc"], False),
                           (["python", "-c", "pass", "-m", "keras_ewc.cli"], False),
                           (["python", "-m", "pytest", "-m", "keras_ewc"], False)]:
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        assert _startup.is_command() is expected, orig


def test_tf_logs_requested(monkeypatch):
    monkeypatch.delenv(_startup.LOGS_ENV, raising=False)
    assert not _startup.tf_logs_requested(["keras-ewc", "demo"])
    assert _startup.tf_logs_requested(["keras-ewc", "demo", "--tf-logs"])
    monkeypatch.setenv(_startup.LOGS_ENV, "1")
    assert _startup.tf_logs_requested(["keras-ewc", "demo"])
    monkeypatch.setenv(_startup.LOGS_ENV, "0")
    assert not _startup.tf_logs_requested(["keras-ewc", "demo"])


def test_strip_startup_lines_keeps_everything_else():
    captured = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1795628930.478635    5030 port.cc:153] oneDNN custom operations are on.\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n"
        "E0000 00:00:1795628933.340022    5030 cuda_platform.cc:52] failed call to cuInit\n"
        "/x/y.py:3: UserWarning: something the user should see\n"
    )
    assert _startup.strip_startup_lines(captured) == (
        "/x/y.py:3: UserWarning: something the user should see\n")


def _command(*args, env=None):
    return subprocess.run([sys.executable, "-m", "keras_ewc.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def test_command_starts_quietly_unless_tf_logs_are_asked_for(tmp_path):
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}  # the user's environment does not quiet anything
    quiet = _command("demo", "--tasks", "1", "--steps", "2", "--hidden", "8",
                     "--fisher-examples", "8", "--quiet", "--out", str(tmp_path), env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert not STARTUP.search(quiet.stderr), quiet.stderr
    assert "keras-ewc demo: 1 permuted" in quiet.stdout
    # The same run with --tf-logs shows TensorFlow's lines: the quiet run hid real ones.
    loud = _command("--tf-logs", "demo", "--tasks", "1", "--steps", "2", "--hidden", "8",
                    "--fisher-examples", "8", "--quiet", "--out", str(tmp_path), env=env)
    assert loud.returncode == 0, loud.stderr
    assert STARTUP.search(loud.stderr), loud.stderr


def _imported_modules(importtime_stderr):
    # `python -X importtime` writes "import time: self | cumulative | module" a module.
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("args,code,shown", [
    (["--help"], 0, "usage: keras-ewc"),
    (["demo", "--help"], 0, "--strength"),
    (["run", "--help"], 0, "--estimator"),
    (["demo", "--tasks", "0"], 2, "--tasks >= 1. Received: 0"),
    (["run", "--estimator", "magic"], 2, "Unknown estimator"),
    (["run", "--sequence", "shuffled"], 2, "Unknown sequence"),
    (["run", "--strength", "1e2,abc"], 2, "comma-separated numbers"),
    (["demo", "--tasks", "x"], 2, "invalid int value"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_help_and_argument_errors_answer_before_tensorflow_loads(args, code, shown):
    result = _command(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})  # = -X importtime
    assert result.returncode == code, result.stderr
    assert shown in result.stdout + result.stderr
    modules = _imported_modules(result.stderr)
    assert "keras_ewc.cli" in modules or "keras_ewc" in modules  # the probe sees imports
    assert not {"tensorflow", "keras", "numpy"} & modules, sorted(modules)


def test_a_plain_import_still_registers_the_model_for_load_model():
    # Outside the command, `import keras_ewc` imports its public names at once:
    # keras.models.load_model finds EWCModel only once its module has registered it.
    code = ("import keras, keras_ewc, sys; "
            "print('tensorflow' in sys.modules, "
            "keras.saving.get_registered_object('keras_ewc>EWCModel') is keras_ewc.EWCModel, "
            "sorted(n for n in dir(keras_ewc) if not n.startswith('_')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    loaded, registered, names = result.stdout.strip().split(" ", 2)
    assert (loaded, registered) == ("True", "True")
    for name in ("EWCModel", "EWCRegularizer", "continual", "fisher_diagonal",
                 "kronecker_factors"):
        assert repr(name) in names
    assert "importlib" not in names


def test_the_command_knows_the_sequences_of_keras_ewc_continual():
    from keras_ewc.continual import SEQUENCES

    assert cli.SEQUENCES == SEQUENCES
