"""Nothing the suite writes outlives it: doctests write in their tmp_path, and pytest
removes every tmp_path when the tests pass."""

import getpass
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Doctests that write files: an IDX file, a gzipped one, a CSV.
WRITERS = ["keras_ewc/continual/idx.py", "keras_ewc/continual/results.py"]


def test_doctests_leave_nothing_in_the_temporary_directory(tmp_path):
    fresh = tmp_path / "tmp"
    fresh.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", os.path.join(ROOT, "pytest.ini"),
         "--rootdir", ROOT, *[os.path.join(ROOT, w) for w in WRITERS]],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(fresh)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout, result.stdout
    # pytest's own per-user folder may stay, empty; no file anywhere, no other folder.
    left = [os.path.relpath(os.path.join(d, f), fresh)
            for d, _, files in os.walk(fresh) for f in files]
    assert left == [], left
    assert set(os.listdir(fresh)) <= {f"pytest-of-{getpass.getuser()}"}
    assert os.listdir(cwd) == []


def _collected(*args):
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_fast_subset_leaves_out_every_listed_slow_test():
    every, fast = _collected(), _collected("-m", "not slow")
    with open(os.path.join(ROOT, "tests", "slow_tests.txt"), encoding="utf-8") as f:
        listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    bases = {i.split("[", 1)[0] for i in every}
    assert [i for i in sorted(listed) if i not in every and i not in bases] == []  # no stale id
    assert not {i for i in fast if i in listed or i.split("[", 1)[0] in listed}
    # Tests that share the README session fixture are slow together.
    assert not any(i.startswith("tests/test_readme.py::test_serving") for i in fast)
    assert "tests/test_readme.py::test_readme_offers_a_fast_subset_by_a_declared_marker" in fast
    assert len(fast) > len(every) / 2  # the fast subset is most of the tests, not a token
