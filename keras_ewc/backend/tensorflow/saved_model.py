"""SavedModel export with the EWC state, and back to a trainable EWCModel (TensorFlow).

A SavedModel is TensorFlow's format: `keras_ewc.saving` hands these two functions
through, and `EWCModel.export(format="tf_saved_model")` / `EWCModel.from_saved_model`
refuse other backends with a `keras_ewc.backend.BackendError`. The layout is described
in `export_saved_model`.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import saving
from keras_ewc.saving import (
    ANCHORS,
    CONFIG,
    KRONECKER,
    NETWORK_WEIGHTS,
    OFFSET,
    PRECISION,
    TASKS,
    serving_signature,
)


def export_saved_model(model, filepath, input_signature=None, verbose=None) -> None:
    """Writes `model` as a SavedModel with a `serve` endpoint and the EWC state.

    Besides the `serve` endpoint (and its `serving_default` alias), the SavedModel holds
    these variable collections, attributes of the object `tf.saved_model.load` returns:

    - `ewc_anchors`, `ewc_precision`: lists aligned with the regularised variables;
    - `ewc_offset`, `ewc_tasks`: one-element lists (the scalar offset, the task count);
    - `ewc_network_weights`: the wrapped network's weights, in `network.weights` order;
    - `ewc_config`: one string variable, a JSON object with the format version,
      `strength`, `mode`, `gamma`, `variable_keys` (the key of each regularised
      variable, aligned with `ewc_anchors`) and the weights' paths and shapes.

    With `structure="kronecker"`, `ewc_anchors` and `ewc_precision` hold the diagonal
    part (aligned with `regularizer.rest`), `ewc_kronecker` the per-layer slots
    `[A, G, anchor]` of every factored layer in order (`regularizer.kronecker_state`),
    and the config adds `structure`, `max_tasks`, `layer_keys` and the paths and shapes
    of both (`diagonal`, `kronecker`).
    """
    if not model.regularizer.built:
        raise ValueError("Cannot export an EWCModel that is not built. Call it on a batch "
                         "or call `build(input_shape)` first.")
    signature = serving_signature(model) if input_signature is None else input_signature
    reg = model.regularizer
    archive = keras.export.ExportArchive()
    archive.track(model)
    if len(signature) == 1:
        def serve(x):
            return model(x, training=False)
    else:
        def serve(*xs):
            return model.network(*xs, training=False)
    archive.add_endpoint("serve", serve, signature)
    config = {
        "format_version": saving.FORMAT_VERSION,
        "strength": reg.strength,
        "mode": reg.mode,
        "gamma": reg.gamma,
        "variable_keys": list(reg.keys),
        "network_weights": [[w.path, list(w.shape)] for w in model.network.weights],
        "regularised": [[v.path, list(v.shape)] for v in reg.targets],
        "input_shape": _single_input_shape(signature),
    }
    if getattr(model, "structure", "diagonal") == "kronecker":
        kronecker = [v for trio in reg.kronecker_state for v in trio]
        config.update({
            "structure": "kronecker",
            "max_tasks": reg.max_tasks,
            "layer_keys": list(reg.layer_keys),
            "diagonal": [[v.path, list(v.shape)] for v in reg.rest],
            "kronecker": [[v.path, list(v.shape)] for v in kronecker],
        })
        archive.add_variable_collection(KRONECKER, kronecker)
    archive.add_variable_collection(ANCHORS, list(reg.anchors))
    archive.add_variable_collection(PRECISION, list(reg.precision))
    archive.add_variable_collection(OFFSET, [reg.offset])
    archive.add_variable_collection(TASKS, [reg.tasks])
    archive.add_variable_collection(NETWORK_WEIGHTS, list(model.network.weights))
    archive.add_variable_collection(
        CONFIG, [tf.Variable(json.dumps(config), trainable=False, name=CONFIG)])
    archive.write_out(str(filepath), verbose=bool(verbose))


def _single_input_shape(signature):
    if len(signature) != 1:
        return None
    spec = signature[0]
    shape = getattr(spec, "shape", None)
    return None if shape is None else [None if d is None else int(d) for d in shape]


def read_saved_state(filepath) -> tuple[dict, dict]:
    """Reads the EWC config and the arrays of a SavedModel written by `export`."""
    try:
        loaded = tf.saved_model.load(str(filepath))
    except Exception as error:
        raise ValueError(
            f"Could not read a SavedModel at {str(filepath)!r} (missing, truncated or "
            f"corrupted). Cause: {error}"
        ) from error
    names = (ANCHORS, PRECISION, OFFSET, TASKS, NETWORK_WEIGHTS, CONFIG)
    missing = [n for n in names if not hasattr(loaded, n)]
    if missing:
        raise ValueError(
            f"The SavedModel at {str(filepath)!r} carries no EWC state (missing "
            f"{missing}). Expected one written by `EWCModel.export`."
        )
    config = json.loads(getattr(loaded, CONFIG)[0].numpy().decode("utf-8"))
    if config.get("structure", "diagonal") == "kronecker":
        if not hasattr(loaded, KRONECKER):
            raise ValueError(
                f"The SavedModel at {str(filepath)!r} says structure='kronecker' but "
                f"carries no {KRONECKER!r} collection (truncated or edited?). Expected "
                "one written by `EWCModel.export`."
            )
        names += (KRONECKER,)
    arrays = {n: [v.numpy() for v in getattr(loaded, n)] for n in names if n != CONFIG}
    return config, arrays


def load_saved_model(cls, filepath, model, **kwargs):
    """Rebuilds a trainable `cls` (an EWCModel) around `model` from a SavedModel."""
    config, arrays = read_saved_state(filepath)
    config = saving.check_format_version(config)
    selection = ({"variable_keys": config["variable_keys"]} if "variable_keys" in config
                 else {"variable_indices": config["variable_indices"]})  # version 1
    kronecker = config.get("structure", "diagonal") == "kronecker"
    if kronecker:
        selection.update(structure="kronecker", max_tasks=int(config["max_tasks"]))
    _check_arguments_against_the_file(config, kwargs, filepath)
    ewc = cls(
        model,
        strength=kwargs.pop("strength", config["strength"]),
        mode=kwargs.pop("mode", config["mode"]),
        gamma=kwargs.pop("gamma", config["gamma"]),
        **selection,
        **kwargs,
    )
    if not ewc.regularizer.built:
        # A lazily built (subclassed) model: build it for the served input shape.
        if config.get("input_shape") is None:
            raise ValueError("Build the model before `from_saved_model` (call it on a "
                             "batch or call `model.build(input_shape)`).")
        ewc.build(tuple(config["input_shape"]))
    weights = list(ewc.network.weights)
    saved = arrays[NETWORK_WEIGHTS]
    _check_match("network weights", [tuple(w.shape) for w in weights],
                 [tuple(a.shape) for a in saved], [w.path for w in weights],
                 [p for p, _ in config["network_weights"]], filepath)
    reg = ewc.regularizer
    diagonal_names = [p for p, _ in config["diagonal" if kronecker else "regularised"]]
    for name, variables in ((ANCHORS, reg.anchors), (PRECISION, reg.precision)):
        _check_match(name, [tuple(v.shape) for v in variables],
                     [tuple(a.shape) for a in arrays[name]], [v.path for v in variables],
                     diagonal_names, filepath)
    if kronecker:
        slots = [v for trio in reg.kronecker_state for v in trio]
        _check_match("Kronecker slots", [tuple(v.shape) for v in slots],
                     [tuple(a.shape) for a in arrays[KRONECKER]], [v.path for v in slots],
                     [p for p, _ in config["kronecker"]], filepath)
        state = ([tuple(arrays[KRONECKER][i:i + 3])
                  for i in range(0, len(arrays[KRONECKER]), 3)],)
    else:
        state = ()
    # The saved weights go in first, so that the state's strength bound is checked at
    # the weights the penalty will see; the state checks everything before it assigns
    # anything, and if it refuses, the network gets its own weights back.
    before = [np.array(w.numpy(), copy=True) for w in weights]
    for w, a in zip(weights, saved):
        w.assign(a)
    try:
        reg.assign_state(*state, arrays[PRECISION], arrays[ANCHORS], arrays[OFFSET][0],
                         int(arrays[TASKS][0]))
    except BaseException:
        for w, a in zip(weights, before):
            w.assign(a)
        raise
    return ewc


def _check_arguments_against_the_file(config, kwargs, filepath) -> None:
    """Refuses `from_saved_model` arguments that contradict what the SavedModel holds.

    The file fixes the state's layout: its structure, mode, slots and regularised
    variables. An argument equal to the file's value is accepted (and changes
    nothing); another value is refused, naming both, since the state could not be
    loaded into it. `strength` and `gamma` may be overridden (they can be set at any
    time); `max_tasks` with a diagonal state is ignored, as `EWCModel` ignores it.
    """
    structure = config.get("structure", "diagonal")
    fixed = {"structure": structure, "mode": config["mode"]}
    if structure == "kronecker":
        fixed["max_tasks"] = int(config["max_tasks"])
    for name, held in fixed.items():
        if name in kwargs and kwargs[name] != held:
            raise ValueError(
                f"The SavedModel at {str(filepath)!r} holds a {structure} EWC state with "
                f"{name}={held!r}; from_saved_model was given {name}={kwargs[name]!r}. "
                f"Leave `{name}` out (the file says it); for another {name}, wrap the "
                "network in a new EWCModel and consolidate its tasks again."
            )
        kwargs.pop(name, None)
    chosen = [n for n in ("include", "exclude", "variable_keys", "variable_indices")
              if kwargs.get(n) is not None]
    if chosen:
        raise ValueError(
            f"The SavedModel at {str(filepath)!r} says which variables its EWC state "
            f"anchors ({config.get('variable_keys', config.get('variable_indices'))}); "
            f"from_saved_model cannot choose others. Received: {chosen}. Leave them out."
        )
    for name in ("include", "exclude"):
        kwargs.pop(name, None)


def _check_match(what, expected, received, expected_names, saved_names, filepath):
    if len(expected) != len(received):
        raise ValueError(
            f"The SavedModel at {str(filepath)!r} does not match this architecture: it "
            f"holds {len(received)} {what} ({saved_names}), the model has "
            f"{len(expected)} ({expected_names})."
        )
    wrong = [f"{n}: saved shape {r}, expected {e}"
             for n, e, r in zip(expected_names, expected, received) if e != r]
    if wrong:
        raise ValueError(
            f"The SavedModel at {str(filepath)!r} does not match this architecture; "
            f"{what} differ: " + "; ".join(wrong)
        )
