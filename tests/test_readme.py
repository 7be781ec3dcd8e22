"""The README's quickstart runs as written, and its commands are the ones CI runs."""

import pathlib
import re

import keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_quickstart_runs_and_remembers_task_a():
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert int(model.regularizer.tasks.numpy()) == 1
    acc_a = model.evaluate(namespace["xa"], namespace["ya"], verbose=0, return_dict=True)
    # Fine-tuning alone keeps about 0.4 of task A on this data; EWC keeps more.
    assert acc_a["accuracy"] > 0.55
    keras.backend.clear_session()


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"<!-- (main|test) command -->\n```bash\n(.*?)\n```", README)
    assert [kind for kind, _ in commands] == ["main", "test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test command -->" in ci
    assert commands[1][1].startswith("pip install") and "pytest" in commands[1][1]
