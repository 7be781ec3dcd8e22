"""Doctests of keras_ewc run in a temporary directory, so files they write vanish; the
tests listed in tests/slow_tests.txt are marked slow; under a Keras backend other than
TensorFlow (`KERAS_BACKEND=jax python -m pytest`) only the tests marked
`backend_neutral` (or `jax_only`) run.

A doctest's working directory, `TMPDIR` and `tempfile.gettempdir()` are its `tmp_path`, so
relative paths and any temporary file land there; pytest.ini's
`tmp_path_retention_policy = failed` removes every `tmp_path` when the suite passes
(tests/test_suite_files.py checks it).
"""

import os
import pathlib
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


ROOT = pathlib.Path(__file__).resolve().parent
# Module fixtures that run a whole process (two-replica clusters) or every README snippet
# once: each test that uses one waits for it, so all of them are slow.
SLOW_FIXTURES = {("tests/test_distribute.py", "checks"),
                 ("tests/test_kronecker_distribute.py", "distributed"),
                 ("tests/test_readme.py", "session")}


def slow_test_ids() -> set:
    """The node ids in tests/slow_tests.txt (see its header for how they were chosen)."""
    text = (ROOT / "tests" / "slow_tests.txt").read_text(encoding="utf-8")
    return {line.strip() for line in text.splitlines()
            if line.strip() and not line.startswith("#")}


# Doctests that run on every backend (their modules use no TensorFlow-only feature).
NEUTRAL_DOCTESTS = {"keras_ewc/penalty.py", "keras_ewc/backend/__init__.py"}

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        # Without TensorFlow its backend folder cannot even be imported for doctests.
        collect_ignore_glob = ["keras_ewc/backend/tensorflow/*"]


def _backend() -> str:
    import keras

    return keras.backend.backend()


def pytest_collection_modifyitems(config, items):
    listed = slow_test_ids()
    # The suite is TensorFlow's; on another backend only the tests marked
    # `backend_neutral` (and the doctests of NEUTRAL_DOCTESTS) run, the rest are skipped.
    other = _backend() != "tensorflow"
    for item in items:
        if other and not (item.get_closest_marker("backend_neutral") is not None
                          or item.get_closest_marker("jax_only") is not None or (
                isinstance(item, pytest.DoctestItem)
                and item.nodeid.split("::", 1)[0] in NEUTRAL_DOCTESTS)):
            item.add_marker(pytest.mark.skip(
                reason=f"TensorFlow only (KERAS_BACKEND={_backend()}; not marked "
                       "backend_neutral)"))
        if _backend() != "jax" and item.get_closest_marker("jax_only") is not None:
            item.add_marker(pytest.mark.skip(
                reason=f"JAX only (KERAS_BACKEND={_backend()})"))
        path = item.nodeid.split("::", 1)[0]
        fixtures = set(getattr(item, "fixturenames", ()))
        if (item.nodeid in listed or item.nodeid.split("[", 1)[0] in listed
                or any(path == p and f in fixtures for p, f in SLOW_FIXTURES)):
            item.add_marker(pytest.mark.slow)
