"""pyproject.toml builds a wheel (PEP 517) that carries the code, the bundled data and its
licence, the command, and the version floors the suite runs on."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_carries_code_data_licence_and_command(tmp_path):
    pytest.importorskip("setuptools", minversion="64")  # the backend, used in place
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    # A copy, so that the build's build/ and egg-info folders never land in the checkout.
    shutil.copytree(os.path.join(ROOT, "keras_ewc"), src / "keras_ewc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    assert "absent from the `packages` configuration" not in log
    assert "Building wheel for keras-ewc (pyproject.toml)" in log  # PEP 517, not legacy
    (wheel,) = os.listdir(tmp_path / "dist")
    assert wheel == "keras_ewc-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
        names = set(z.namelist())
        metadata = z.read("keras_ewc-0.2.0.dist-info/METADATA").decode()
        entry_points = z.read("keras_ewc-0.2.0.dist-info/entry_points.txt").decode()
    sources = {os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
               for d, _, files in os.walk(src / "keras_ewc") for f in files}
    assert sources <= names, sorted(sources - names)
    for data in ("fashion_mnist_subset.npz", "LICENSE.fashion-mnist", "README.txt"):
        assert f"keras_ewc/data/{data}" in names
    assert "keras-ewc = keras_ewc.cli:main" in entry_points
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    assert sorted(requires) == ["keras<3.16,>=3.15", "numpy>=2.4", "tensorflow<2.22,>=2.21"]
    assert "Requires-Python: >=3.11" in metadata and "License: Apache-2.0" in metadata


def test_declared_floors_are_the_versions_installed_here():
    # The floors say what the suite has run on: the installed versions must satisfy them
    # and sit on the floor's minor version.
    import keras
    import numpy
    import tensorflow as tf

    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    for name, version in (("tensorflow", tf.__version__), ("keras", keras.__version__),
                          ("numpy", numpy.__version__)):
        major_minor = ".".join(version.split(".")[:2])
        assert f'"{name}>={major_minor}' in text, (name, version)


def test_deprecation_warnings_from_keras_ewc_fail_the_suite():
    import warnings

    with pytest.raises(DeprecationWarning, match="going away"):
        warnings.warn_explicit("going away", DeprecationWarning, "keras_ewc/x.py", 1,
                               module="keras_ewc.x")
    with warnings.catch_warnings(record=True) as caught:
        # Others' deprecations stay ignored (pytest.ini), so no error and nothing recorded.
        warnings.warn_explicit("elsewhere", DeprecationWarning, "other/y.py", 1,
                               module="other.y")
    assert [str(w.message) for w in caught] == []


def test_one_version_in_pyproject_the_package_and_the_changelog():
    import tomllib

    import keras_ewc

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert keras_ewc.__version__ == version
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        headings = [line for line in f if line.startswith("## ")]
    # Newest first: what is not released yet, then this version.
    assert headings[0].strip() == "## Unreleased"
    assert headings[1].startswith(f"## {version} ")
