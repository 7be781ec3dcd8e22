"""Doctests of keras_ewc run in a temporary directory, so files they write vanish.

A doctest's working directory, `TMPDIR` and `tempfile.gettempdir()` are its `tmp_path`, so
relative paths and any temporary file land there; pytest.ini's
`tmp_path_retention_policy = failed` removes every `tmp_path` when the suite passes
(tests/test_suite_files.py checks it).
"""

import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _doctests_in_tmp_path(request, tmp_path, monkeypatch):
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield
