"""The README as a newcomer meets it: its snippets run as written, the quickstart prints
what the README shows, its commands are the ones CI runs, and the demo table is the
command's own format."""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
XDIST = "-n 2 --dist loadfile"  # the test command's pytest-xdist options
TOLERANCE = 0.03  # the README promises the quickstart's accuracies within this, any CPU


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Runs every python snippet of the README in order, in one namespace, as a reader
    pasting them into one session would; returns the namespace and the quickstart's
    printed output."""
    blocks = python_blocks()
    namespace = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme"))
    printed = io.StringIO()
    try:
        for k, block in enumerate(blocks):
            out = printed if k == 0 else io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"README.md python block {k + 1}", "exec"), namespace)
        where = os.getcwd()
    finally:
        os.chdir(cwd)
    yield namespace, printed.getvalue(), where
    keras.backend.clear_session()


def parse_quickstart_lines(text):
    rows = {}
    for line in text.strip().splitlines():
        m = re.fullmatch(r"(.+?)\s+task A (\d\.\d\d)\s+task B (\d\.\d\d)", line.strip())
        assert m, f"unexpected quickstart line: {line!r}"
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_there_are_python_snippets_and_the_quickstart_comes_first():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert README.index("## Quickstart") < README.index("```python")


def test_quickstart_prints_the_output_shown_in_the_readme(session):
    _, printed, _ = session
    shown = re.search(r"## Quickstart.*?```text\n(.*?)```", README, re.S).group(1)
    expected, got = parse_quickstart_lines(shown), parse_quickstart_lines(printed)
    assert list(got) == list(expected) == ["fine-tuning", "EWC"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=TOLERANCE), name
    # What the README says the output shows: EWC keeps clearly more of task A.
    assert got["EWC"][0] > got["fine-tuning"][0] + 0.05


def test_saving_and_distribute_snippets_did_what_they_say(session):
    namespace, _, where = session
    # Everything the snippets write is in their scratch folder, which git ignores.
    assert os.listdir(where) == ["keras-ewc-out"]
    assert "/keras-ewc-out/" in (ROOT / ".gitignore").read_text().split()
    scratch = os.path.join(where, "keras-ewc-out", "readme")
    assert {"learner.keras", "learner.weights.h5", "ckpt", "served"} <= set(
        os.listdir(scratch))
    assert os.path.exists(os.path.join(scratch, "ckpt", "c.index"))
    # The saved learner carries task A's consolidated state.
    saved = keras.models.load_model(os.path.join(scratch, "learner.keras"))
    assert int(saved.regularizer.tasks.numpy()) == 1
    assert float(np.sum([np.sum(p) for p in saved.regularizer.precision])) > 0
    model = namespace["model"]  # the distribute snippet's model, consolidated once
    assert int(model.regularizer.tasks.numpy()) == 1 and float(model.strength) == 100.0


def test_serving_snippet_serves_and_learns_on_from_the_saved_model(session):
    namespace, _, _ = session
    served, learner = namespace["served"], namespace["learner"]
    assert tuple(namespace["logits"].shape) == (5, 3)
    assert int(served.ewc_tasks[0].numpy()) == 1
    # The model rebuilt from the SavedModel has its state (fit does not change it).
    assert int(learner.regularizer.tasks.numpy()) == 1
    for mine, theirs in [(learner.regularizer.precision, served.ewc_precision),
                         (learner.regularizer.anchors, served.ewc_anchors)]:
        assert len(mine) == len(theirs) == 4
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(float(np.sum(p)) for p in learner.regularizer.precision) > 0


def test_kernel_snippet_registers_an_exact_kernel(session):
    """The README's kernel for its own layer is taken, and gives the oracle's Fisher."""
    import oracle

    from keras_ewc.fisher import fisher_diagonal

    namespace, _, _ = session
    scaled = namespace["scaled"]
    scaled.layers[0].w.assign(np.linspace(0.5, 1.5, 20).astype("float32"))
    x = np.random.default_rng(0).normal(size=(6, 20)).astype("float32")
    fisher, paths = fisher_diagonal(scaled, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert set(paths.values()) == {"fast"}
    oracle.assert_close(fisher, oracle.categorical_exact(
        scaled, scaled.trainable_variables, x))


def test_readme_states_the_format_version_the_code_writes_and_reads():
    from keras_ewc import saving

    section = README.split("\n## Saving", 1)[1].split("\n## ", 1)[0]
    stated = int(re.search(r"carry a format version\s+\(now (\d+);", section).group(1))
    assert stated == saving.FORMAT_VERSION
    for version in range(1, stated + 1):  # "this format version and every earlier one"
        saving.check_format_version({"format_version": version})
    with pytest.raises(ValueError, match="upgrade keras_ewc"):
        saving.check_format_version({"format_version": stated + 1})


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"<!-- (main|test) command -->\n```bash\n(.*?)\n```", README)
    assert [kind for kind, _ in commands] == ["main", "test"]
    assert README.count("<!-- main command -->") == 1
    assert README.count("<!-- test command -->") == 1
    main_command, test_command = commands[0][1], commands[1][1]
    # .ci/run's own extraction, run on this README, finds the test command.
    found = subprocess.run(
        ["bash", "-c", "grep -A2 '<!-- test command -->' README.md | grep -m1 '^pip install'"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert found == test_command
    # Both passes run in two worker processes, whole test files a worker (pytest-xdist,
    # in the test extra), so a module fixture runs once.
    assert test_command.count(f"python -m pytest {XDIST}") == 2
    assert test_command.endswith(f"python -m pytest {XDIST}")
    assert main_command.endswith("keras-ewc demo")
    if tomllib is not None:
        with open(ROOT / "pyproject.toml", "rb") as f:
            project = tomllib.load(f)["project"]
        assert project["scripts"]["keras-ewc"] == "keras_ewc.cli:main"
        assert any(d.startswith("pytest-xdist")
                   for d in project["optional-dependencies"]["test"])
        for command in (main_command, test_command):
            extra = re.search(r'pip install -e "\.\[(\w+)\]"', command).group(1)
            assert extra in project["optional-dependencies"], extra


def test_demo_output_in_the_readme_is_in_the_commands_format():
    from keras_ewc.continual import ContinualResults, results_table

    block = re.search(r"<!-- demo output -->\n```text\n(.*?)```", README, re.S).group(1)
    lines = block.strip().splitlines()
    nan = float("nan")
    # Column widths follow the cells: a negative BWT, as in any run that forgets.
    matrix = [[(0.9 if j == i else 0.5) if j <= i else nan for j in range(5)]
              for i in range(5)]
    table = results_table([ContinualResults(matrix, label="fine-tuning"),
                           ContinualResults(matrix, label="EWC (λ=1000)")])
    assert lines[0] == table.splitlines()[0]
    for line in lines[1:]:
        label, cells = re.fullmatch(r"(.+?)\s{2,}(.*)", line).groups()
        values = [float(v) for v in cells.split()]
        assert label in ("fine-tuning", "EWC (λ=1000)") and len(values) == 8
        # The average accuracy is the mean of the five final accuracies (to rounding).
        assert values[5] == pytest.approx(np.mean(values[:5]), abs=0.0015), line


def test_readme_offers_a_fast_subset_by_a_declared_marker():
    import configparser

    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    fast = [b for b in blocks if "pytest" in b and ' -m "' in b]  # a marker expression
    assert fast == ['python -m pytest -m "not slow" && '
                    'KERAS_BACKEND=jax python -m pytest -m "not slow"']
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    markers = ini["pytest"]["markers"]
    assert re.search(r"^\s*slow:", markers, re.M)
    # Whole-suite command first in CI: the fast one is not behind the test marker.
    assert README.index("<!-- test command -->") < README.index(fast[0])
