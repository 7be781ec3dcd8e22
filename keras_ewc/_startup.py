"""A quiet start for the command-line entry points: TensorFlow's start-up lines are hidden.

TensorFlow 2.21 writes its start-up lines (oneDNN, CUDA stubs, CPU features, cuInit) from
C++ before its logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` no longer hides them. The
`keras-ewc` command and the examples of this repository import TensorFlow with file
descriptor 2 redirected to a temporary file, then show whatever was captured except those
start-up lines. A plain `import keras_ewc` in a user's program is left alone.

`--tf-logs` on the command line, or `KERAS_EWC_TF_LOGS=1` in the environment, keeps
TensorFlow's own logs.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

LOGS_FLAG = "--tf-logs"
LOGS_ENV = "KERAS_EWC_TF_LOGS"

# absl's C++ line format (`I0000 00:00:1795628930.478635    5030 port.cc:153] ...`), the
# notice absl prints before its logging is initialised, and the CPU-feature line's tail.
_STARTUP_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions:)"
)


def tf_logs_requested(argv: list[str] | None = None) -> bool:
    """Whether the user asked for TensorFlow's logs (`--tf-logs` or `KERAS_EWC_TF_LOGS`)."""
    argv = sys.argv if argv is None else argv
    return LOGS_FLAG in argv or os.environ.get(LOGS_ENV, "") not in ("", "0")


def is_command() -> bool:
    """Whether this process runs the `keras-ewc` command (or `python -m keras_ewc.cli`)."""
    main = sys.argv[0] if sys.argv else ""
    if os.path.basename(main) in ("keras-ewc", "keras-ewc.exe"):
        return True
    # `python [options] -m keras_ewc.cli ...`: the `-m` must come before any script
    # (`python train.py -m keras_ewc` runs train.py, whose own arguments these are).
    orig = list(getattr(sys, "orig_argv", []))[1:]
    i = 0
    while i < len(orig):
        arg = orig[i]
        if arg == "-m":
            return i + 1 < len(orig) and orig[i + 1] in ("keras_ewc.cli", "keras_ewc")
        if arg == "-c" or not arg.startswith("-"):
            return False  # a program string or a script comes first
        i += 2 if arg in ("-W", "-X") else 1  # options that take a value
    return False


def is_entry_point() -> bool:
    """Whether this process runs the `keras-ewc` command or an example of this repository."""
    if is_command():
        return True
    main = sys.argv[0] if sys.argv else ""
    if not main or main in ("-c", "-m"):
        return False
    # An example of a keras-ewc checkout: <checkout>/examples/<script>.py next to
    # <checkout>/keras_ewc/, whether keras_ewc is imported from there or installed.
    folder = os.path.dirname(os.path.abspath(main))
    return (os.path.basename(folder) == "examples"
            and os.path.isfile(os.path.join(os.path.dirname(folder), "keras_ewc",
                                            "__init__.py")))


def strip_startup_lines(text: str) -> str:
    """Drops TensorFlow's start-up lines from captured standard error, keeps the rest."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not _STARTUP_LINE.match(line))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with standard error captured.

    What was captured is written back to standard error without the start-up lines; if
    the import fails, all of it is. Afterwards C++ logs below ERROR and Python logs of
    `tensorflow` and `absl` below ERROR stay hidden. Does nothing if TensorFlow is
    already imported or its logs were asked for.
    """
    if "tensorflow" in sys.modules or tf_logs_requested():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA initialises here (the cuInit line)
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            rest = text if failed else strip_startup_lines(text)
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()
    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl comes with TensorFlow; nothing to quiet without it
        pass


def quiet_if_entry_point() -> None:
    """Imports TensorFlow quietly when this process is an entry point (see module doc)."""
    if is_entry_point():
        import_tensorflow_quietly()
