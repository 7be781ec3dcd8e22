"""The README's "On JAX" section: the Quickstart, run on JAX, prints what it shows."""

import contextlib
import io
import re

import pytest

from tests.test_readme import README, TOLERANCE, parse_quickstart_lines, python_blocks

pytestmark = [
    pytest.mark.jax_only,
]


def test_the_quickstart_prints_on_jax_what_the_jax_section_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(python_blocks()[0], "README.md python block 1", "exec"),
             {"__name__": "__readme__"})
    shown = re.search(r"## On JAX.*?```text\n(.*?)```", README, re.S).group(1)
    expected, got = parse_quickstart_lines(shown), parse_quickstart_lines(printed.getvalue())
    assert list(got) == list(expected) == ["fine-tuning", "EWC"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=TOLERANCE), name
    assert got["EWC"][0] > got["fine-tuning"][0] + 0.05
