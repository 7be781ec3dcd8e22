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
