"""The docstring examples of keras_ewc.continual run as written."""

import doctest
import importlib

import pytest

MODULES = ["datasets", "evaluation", "idx", "masking", "metrics", "plots", "results",
           "tasks", "training"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"keras_ewc.continual.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
