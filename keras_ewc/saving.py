"""Persistence of an EWCModel's consolidated state: format version, SavedModel, safe loads.

`.keras` files, weights files and `tf.train.Checkpoint` carry the state through the
ordinary Keras and TensorFlow machinery (the state is a set of variables of the
`EWCRegularizer` layer). This module adds what that machinery does not:

- a format version, written by `EWCModel.get_config` and checked on loading;
- `export_saved_model`: a serving SavedModel that also carries the state, under named
  variable collections, and the configuration needed to go back to training;
- `load_saved_model`: rebuilds a trainable `EWCModel` from such a SavedModel (both
  TensorFlow's: `keras_ewc.backend.tensorflow.saved_model`, refused elsewhere);
- `all_or_nothing`: runs a load and puts every variable back if it fails part-way;
- `write_then_rename`: writes a file beside its target and renames it into place.

Format version 2 records which variable each anchor and precision belongs to by a key
(see `keras_ewc.model.variable_keys`), in the config (`variable_keys`), in the saved
state (entries `anchor:<key>`, `precision:<key>`) and in checkpoints; version 1 matched
them by position and is still read.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import zipfile

import numpy as np

from keras_ewc import _private, backend

FORMAT_VERSION = 2
"""Version of the EWC state layout written into configs and SavedModels."""

# Names of the variable collections in an exported SavedModel.
ANCHORS = "ewc_anchors"
PRECISION = "ewc_precision"
OFFSET = "ewc_offset"
TASKS = "ewc_tasks"
NETWORK_WEIGHTS = "ewc_network_weights"
CONFIG = "ewc_config"
KRONECKER = "ewc_kronecker"  # structure="kronecker" only


def check_format_version(config: dict) -> dict:
    """Pops and checks the `format_version` of a saved EWCModel config.

    Configs written before the version existed count as version 1.
    """
    config = dict(config)
    version = config.pop("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"Unknown keras_ewc format version. Received: format_version={version!r}; this "
            f"keras_ewc reads versions 1 to {FORMAT_VERSION}. The file was written by "
            "another (newer?) keras_ewc: upgrade keras_ewc to load it."
        )
    return config


# --- all-or-nothing loading -------------------------------------------------------------


def _variables_of(model) -> list:
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _h5_shapes(filepath) -> dict:
    import h5py

    shapes = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes[name] = tuple(obj.shape)

    with h5py.File(filepath, "r") as f:
        f.visititems(visit)
    return shapes


def check_weights_file(model, filepath) -> None:
    """Compares a `.weights.h5` or `.keras` file with what `model` would write, before
    loading it with `load_weights`.

    Raises a ValueError that says which EWC state the file holds when it is not the
    model's (a diagonal state into a Kronecker model, or the reverse), or lists every
    variable present on one side only and every shape that differs, so a wrong file is
    refused before anything is assigned.
    """
    try:
        saved = _stored_shapes(filepath)
    except Exception as error:
        raise ValueError(
            f"Could not read the file {str(filepath)!r}: it is missing, truncated "
            f"or corrupted; nothing was loaded. Cause: {error}"
        ) from error
    if saved is None:
        return  # a layout this check does not read: Keras checks it, all or nothing
    with tempfile.TemporaryDirectory() as tmp:
        own = f"{tmp}/own.weights.h5"
        model.save_weights(own)
        expected = _h5_shapes(own)
    held, structure = _saved_structure(saved), getattr(model, "structure", "diagonal")
    if held is None and _saved_structure(expected) is not None:
        raise ValueError(
            f"The file {str(filepath)!r} holds no EWC state: it was saved from a plain "
            f"Keras model, not an EWCModel; nothing was loaded. Load it into the wrapped "
            "network (`model.network.load_weights(path)`), whose architecture it must "
            "have; the EWC state is left as it is."
        )
    if held is not None and held != structure:
        fix = ("`keras.models.load_model` rebuilds the model as it was saved, or load it "
               if str(filepath).endswith(".keras") else "Load it ")
        raise ValueError(
            f"The file {str(filepath)!r} holds a {held} EWC state; this model is "
            f"{structure} (structure={structure!r}); nothing was loaded. {fix}into an "
            f"EWCModel(..., structure={held!r}) of the same architecture."
        )
    # The optimizer's variables are checked only when both sides have them (Keras
    # leaves them alone when this model's optimizer is not built yet).
    optimizer = getattr(model, "optimizer", None)
    if not (any(k.startswith("optimizer/") for k in saved)
            and getattr(optimizer, "built", False)):
        saved = {k: v for k, v in saved.items() if not k.startswith("optimizer/")}
        expected = {k: v for k, v in expected.items() if not k.startswith("optimizer/")}
    # The EWC state's entries are checked by the state itself, by key (and positionally
    # for format version 1 files), before anything is assigned.
    state = _state_group(expected)
    if state is not None:
        saved = {k: v for k, v in saved.items() if not k.startswith(state)}
        expected = {k: v for k, v in expected.items() if not k.startswith(state)}
    # γ of a Kronecker state, saved since it is restored by loading, is absent from
    # older files, which still load (with the model's γ).
    expected = {k: v for k, v in expected.items()
                if k in saved or not k.endswith("/kronecker_gamma")}
    problems = [f"{k}: missing from the file (this model has shape {v})"
                for k, v in expected.items() if k not in saved]
    problems += [f"{k}: in the file (shape {v}) but not in this model"
                 for k, v in saved.items() if k not in expected]
    problems += [f"{k}: file has shape {saved[k]}, this model {v}"
                 for k, v in expected.items() if k in saved and saved[k] != v]
    if problems:
        raise ValueError(
            f"The file {str(filepath)!r} does not match the architecture of this "
            f"{type(model).__name__} (paths as in the file); nothing was loaded: "
            + "; ".join(problems[:12])
            + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        )


def _stored_shapes(filepath) -> dict | None:
    """The shapes of the weights a `.weights.h5` or `.keras` file (zipped or a folder)
    holds, by path; None for a layout not read here (sharded weights, a remote path)."""
    path = os.fspath(filepath)
    if path.endswith(".weights.h5"):
        return _h5_shapes(path)
    if not path.endswith(".keras") or "://" in path or not os.path.exists(path):
        return None  # (a missing `.keras` file: Keras' own error, all or nothing)
    if os.path.isdir(path):
        inner = os.path.join(path, "model.weights.h5")
        return _h5_shapes(inner) if os.path.exists(inner) else None
    with zipfile.ZipFile(path) as archive:
        if "model.weights.h5" not in archive.namelist():
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return _h5_shapes(archive.extract("model.weights.h5", tmp))


def _saved_structure(entries) -> str | None:
    """Which EWC state a file's entries hold: the regulariser's group is named after
    its class (`layers/ewc_regularizer/...`, `layers/kronecker_regularizer/...`)."""
    groups = {key.split("/")[1] for key in entries if key.startswith("layers/")}
    if "kronecker_regularizer" in groups:
        return "kronecker"
    if "ewc_regularizer" in groups:
        return "diagonal"
    return None


def _state_group(entries) -> str | None:
    """The h5 group (with a trailing '/') that holds the EWC state, if any."""
    for key in entries:
        if key.endswith("/format_version"):
            return key[: -len("format_version")]
    return None


def write_then_rename(filepath, overwrite, write, fallback, atomic=True, endings=()):
    """Writes a file with `write(temporary_path)` beside `filepath`, then renames it
    into place (`os.replace`), so a write that fails part-way leaves the previous file
    as it was. Paths that are not local files (or `atomic=False`) use `fallback()`.

    The result is what a plain write would leave: a symbolic link is written through
    (its target is replaced, the link stays), and the file gets the mode a plain
    `open(path, "w")` gives it (the replaced file's mode, or `0o666` less the umask
    for a new one), not the `0o600` of a temporary file. Errors name `filepath`, never
    the temporary file: a name Keras would refuse (not one of `endings`) goes to
    `fallback()`, whose error names it, and a folder that is missing or cannot be
    written to is refused before anything is written.
    """
    path = os.fspath(filepath)
    if not atomic or "://" in path or os.path.isdir(path):
        return fallback()
    if endings and not str(path).endswith(tuple(endings)):
        return fallback()  # Keras refuses the name, naming it
    if not overwrite and os.path.exists(path):
        return fallback()  # Keras asks before overwriting
    # Through symbolic links (also of folders on the way): the rename replaces the
    # target, as a plain write would, and the link keeps pointing at it.
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    # Errors name the folder as the user wrote it, or the link's target's.
    link = os.path.islink(path)
    through = f" (it links to {target!r})" if link else ""
    shown = folder if link else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            errno.ENOENT,
            f"Cannot save to {path!r}{through}: the folder {shown!r} does not exist. "
            "Create it first (`os.makedirs`) or save into an existing folder", path)
    mode = _plain_write_mode(target)
    name = os.path.basename(target)
    # The same file name ending (Keras checks `.keras`, `.weights.h5`).
    try:
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=folder)
    except OSError as error:
        raise type(error)(
            error.errno,
            f"Cannot save to {path!r}{through}: no file can be created in the folder "
            f"{shown!r} ({error.strerror}). Save into a folder you can write to",
            path) from error
    os.close(handle)
    try:
        result = write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        renamed = _naming_the_user_path(error, temporary, path)
        if renamed is not None:
            raise renamed from error
        raise
    return result


def _plain_write_mode(target) -> int:
    """The permission bits `open(target, "w")` would leave on `target`."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)  # replacing: keep the file's mode
    except FileNotFoundError:
        pass
    return 0o666 & ~_umask()  # a new file


def _umask() -> int:
    # Linux reports it; elsewhere it can only be read by setting it (and setting it
    # back), which another thread creating a file at that instant could notice.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _naming_the_user_path(error, temporary, path):
    """`error` again, its message naming `path` where it named the temporary file;
    None when it does not name it or cannot be rebuilt."""
    text = str(error)
    if temporary not in text:
        return None
    try:
        if isinstance(error, OSError) and error.errno is not None:
            return type(error)(error.errno, str(error.strerror).replace(temporary, path),
                               path)
        return type(error)(text.replace(temporary, path))
    except Exception:
        return None


def all_or_nothing(model, load, filepath):
    """Calls `load()`; if it raises, restores every variable of `model` (weights, EWC
    state, optimizer) to its value before the call, and re-raises a clear error."""
    if str(filepath).endswith((".weights.h5", ".keras")):
        check_weights_file(model, filepath)
    variables = _variables_of(model)
    saved = [np.array(v.numpy(), copy=True) for v in variables]
    # Hyperparameters a regularizer holds as Python values (the Kronecker γ) go back too.
    reg = getattr(model, "regularizer", None)
    held = dict(getattr(reg, "__dict__", {}))
    plain = {k: held[k] for k in ("_gamma", "_strength_set", "_gamma_set") if k in held}
    try:
        return load()
    except Exception as error:
        for v, value in zip(variables, saved):
            v.assign(value)
        if plain:
            reg.__dict__.update(plain)
        raise type(error)(
            f"Could not load {str(filepath)!r} into this {type(model).__name__}; nothing "
            f"was loaded (every weight and the EWC state are as before). Cause: {error}"
        ) from error


# --- SavedModel -------------------------------------------------------------------------


def serving_signature(model) -> list:
    """The input signature of the wrapped network, for the serving endpoint."""

    try:
        return _private.input_signature(model.network)
    except ValueError as error:
        raise ValueError(
            "Cannot tell the input signature of the wrapped model (a subclassed model "
            "that was never called?). Call the model on a batch first, or pass "
            "`input_signature=[keras.InputSpec(shape=(None, ...), dtype=...)]`. "
            f"Cause: {error}"
        ) from error


def export_saved_model(model, filepath, input_signature=None, verbose=None) -> None:
    """Writes `model` as a SavedModel with the EWC state (TensorFlow only); see
    `keras_ewc.backend.tensorflow.saved_model.export_saved_model`."""
    backend.require_tensorflow(
        "EWCModel.export(format='tf_saved_model') (a SavedModel)",
        "Save with `model.save('model.keras')` (the EWC state travels with it), or "
        "export another format (`model.export(path, format='onnx')`).")
    from keras_ewc.backend.tensorflow import saved_model

    return saved_model.export_saved_model(model, filepath, input_signature, verbose)


def read_saved_state(filepath) -> tuple[dict, dict]:
    """Reads the EWC config and the arrays of a SavedModel written by `export`."""
    backend.require_tensorflow("Reading a SavedModel", "Load a `.keras` file instead.")
    from keras_ewc.backend.tensorflow import saved_model

    return saved_model.read_saved_state(filepath)


def load_saved_model(cls, filepath, model, **kwargs):
    """Rebuilds a trainable `cls` (an EWCModel) around `model` from a SavedModel
    (TensorFlow only)."""
    backend.require_tensorflow(
        "EWCModel.from_saved_model (a SavedModel)",
        "Save with `model.save('model.keras')` and load with "
        "`keras.models.load_model` (the EWC state travels with it).")
    from keras_ewc.backend.tensorflow import saved_model

    return saved_model.load_saved_model(cls, filepath, model, **kwargs)
