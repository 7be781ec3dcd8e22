"""The examples: --help only helps, outputs go under --out, and a tiny run works quietly."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
STARTUP = re.compile(r"absl::InitializeLog|oneDNN|cuda|cuInit|cpu_feature_guard|"
                     r"^[IWE]0000 ", re.M | re.I)


def run_example(name, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "0"})


def option_blocks(help_text):
    """Splits argparse's help into one block of text per option."""
    options = help_text.split("options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    return [" ".join(b.split()) for b in blocks]


def test_there_are_four_examples():
    assert EXAMPLES == ["multi_gpu.py", "permuted_mnist.py", "save_and_resume.py",
                        "split_mnist.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_only_helps(name, tmp_path):
    result = run_example(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}")
    assert os.listdir(tmp_path) == []  # no "--help" directory, no PNG, nothing
    assert "tensorflow" not in result.stderr.lower()  # answered before TensorFlow loads
    blocks = option_blocks(result.stdout)
    assert any(b.startswith("--tf-logs") for b in blocks)
    for block in blocks:
        option = block.split()[0]
        words = block.split()
        takes_value = len(words) > 1 and words[1].isupper()
        assert len(block) > len(option) + 10, f"{name}: {option} has no help"
        if takes_value:
            assert "(default: " in block, f"{name}: {option} shows no default"
    if name != "multi_gpu.py":  # it writes no files
        assert any(b.startswith("--out OUT") and "keras-ewc-out" in b for b in blocks)
    # A flag shows no "(default: False)" after its help, e.g. "(hidden by default)".
    assert "(default: False)" not in " ".join(blocks)
    hidden = [b for b in blocks if b.startswith("--hidden")]
    if name in ("permuted_mnist.py", "split_mnist.py"):  # keras-ewc's syntax
        assert "comma-separated" in hidden[0] and "(default: 400,400)" in hidden[0], hidden


@pytest.mark.parametrize("name", ["permuted_mnist.py", "split_mnist.py"])
def test_hidden_widths_are_comma_separated_as_for_the_command(name, tmp_path):
    # The old space-separated form and a bad width are usage errors, answered at once.
    for args, message in [(["--hidden", "8", "8"], "unrecognized arguments: 8"),
                          (["--hidden", "8,x"], "expected comma-separated widths >= 1"),
                          (["--hidden", "0"], "expected comma-separated widths >= 1")]:
        result = run_example(name, *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "tensorflow" not in result.stderr.lower()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_tiny_split_run_shows_progress_for_every_task(tmp_path):
    out = tmp_path / "out"
    result = run_example("split_mnist.py", "--scenario", "task", "--steps", "2",
                         "--hidden", "8,8", "--fisher-examples", "8", "--out", str(out),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # A line a task and method while it trains (to a pipe: plain lines, no \r).
    for label in ("fine-tuning", "EWC λ=10000"):
        lines = [line for line in result.stdout.splitlines() if label in line
                 and "task" in line.lower()]
        assert len(lines) >= 5, result.stdout
    assert "\r" not in result.stdout
    assert sorted(os.listdir(out / "task")) == ["accuracy.png", "results.csv", "results.json"]
    data = json.loads((out / "task" / "results.json").read_text())
    assert [d["label"] for d in data] == ["fine-tuning", "EWC λ=10000"]


def test_tiny_permuted_run_writes_only_under_out_and_starts_quietly(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    result = run_example("permuted_mnist.py", "--tasks", "2", "--steps", "2", "--hidden", "8",
                         "--fisher-examples", "8", "--out", str(out), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert not STARTUP.search(result.stderr), result.stderr
    assert os.listdir(cwd) == []
    assert sorted(os.listdir(out)) == ["accuracy.png", "results.csv", "results.json"]
    data = json.loads((out / "results.json").read_text())
    assert [d["label"] for d in data] == ["fine-tuning", "EWC λ=1000"]
    assert "Permuted Fashion-MNIST (bundled subset), 2 tasks, Domain-IL" in result.stdout
    assert "TaskSequence(" not in result.stdout
    # Progress to a pipe: one plain line a task, no carriage returns or colour codes.
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
