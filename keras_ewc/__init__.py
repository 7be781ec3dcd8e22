"""Elastic Weight Consolidation for Keras 3: continual learning with `model.fit`."""

import importlib as _importlib

from keras_ewc import _startup

__version__ = "0.2.0"

# Public name -> the module that defines it. They are imported on first use (PEP 562) in
# the `keras-ewc` command, so that `--help` and argument errors answer before TensorFlow
# loads; anywhere else `import keras_ewc` imports them at once (below), because
# `keras.models.load_model` finds EWCModel only once its module has registered it.
_PUBLIC = {
    "EWCModel": "keras_ewc.model",
    "EWCRegularizer": "keras_ewc.penalty",
    "continual": "keras_ewc.continual",
    "fisher_diagonal": "keras_ewc.fisher",
    "kronecker_factors": "keras_ewc.fisher",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keras_ewc' has no attribute {name!r}")
    _startup.quiet_if_entry_point()
    module = _importlib.import_module(_PUBLIC[name])
    value = module if name == "continual" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if not _startup.is_command():
    # Before TensorFlow loads: the examples start quietly. A program that merely imports
    # keras_ewc is left alone (see keras_ewc/_startup.py).
    _startup.quiet_if_entry_point()
    for _name in _PUBLIC:
        __getattr__(_name)
    del _name
