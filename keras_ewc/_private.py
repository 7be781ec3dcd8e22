"""Every private Keras or TensorFlow API the package relies on, one function each.

Each function says why no public API serves. `tests/test_private.py` checks every one
against the installed Keras, so an upgrade that removes or changes one fails there,
with its name, rather than somewhere deep in the engine.
"""

from __future__ import annotations

import keras


def flatten_layers(model) -> list:
    """Every layer inside `model`, itself included, nested models searched.

    Why private: `model.layers` lists only direct children; Keras has no public
    recursive walk, and a subclassed model's layers are found only by tracking.
    """
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        return []
    return list(flatten(include_self=True, recursive=True))


def child_layers(layer) -> list:
    """The direct children of `layer` (tracked attributes of any layer, not only models).

    Why private: as for `flatten_layers`; `layer.layers` exists on models only.
    """
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    return list(flatten(include_self=False, recursive=False))


def has_instance_call(layer) -> bool:
    """Whether `call` was replaced on this instance (not its class).

    Why private: Keras dispatches `Layer.__call__` to `self.call`, so an instance
    attribute replaces it; nothing public says whether one is set.
    """
    return "call" in vars(layer)


def set_instance_call(layer, fn) -> None:
    """Makes `layer.__call__` run `fn` in place of the class's `call`, until restored.

    Why private: the Fisher engine records each supported layer's inputs and
    pre-activation outputs while the model runs, for any model (Sequential, functional,
    subclassed, nested); Keras has no public hook around a layer's call. Keras' own
    `__setattr__` would track the function, so it is set on the instance directly.
    """
    object.__setattr__(layer, "call", fn)


def restore_instance_call(layer) -> None:
    """Undoes `set_instance_call`."""
    layer.__dict__.pop("call", None)


def remat_mode(layer):
    """The layer's rematerialisation mode (None when its call is not rematerialised).

    Why private: `Layer._remat_mode` has no public accessor; a rematerialised layer
    runs `call` through a wrapper the engine cannot record.
    """
    return getattr(layer, "_remat_mode", None)


def symbolic_build(model, iterator=None, data_batch=None):
    """Runs `keras.Model._maybe_symbolic_build` (builds optimizer and metrics from data).

    Why private: `EWCModel` overrides this hook of `fit` to feed it one replica's shard
    under `MultiWorkerMirroredStrategy`, where Keras' own reduction fails; there is no
    public hook between the data iterator and the build.
    """
    return keras.Model._maybe_symbolic_build(model, iterator=iterator, data_batch=data_batch)


def is_multi_worker(strategy) -> bool:
    """Whether Keras treats `strategy` as multi-worker collective all-reduce.

    Why private: Keras reduces each step's logs differently under that strategy; the
    package must make the same decision as Keras, with Keras' own test.
    """
    from keras.src.backend.tensorflow import trainer

    return bool(trainer._collective_all_reduce_multi_worker(strategy))


def input_signature(model) -> list:
    """The input signature Keras' `model.export` would use for `model`.

    Why private: the SavedModel export of an `EWCModel` serves the wrapped network
    with the same signature `model.export()` infers; Keras keeps that inference in
    `keras.src.export.export_utils`.
    """
    from keras.src.export.export_utils import get_input_signature

    return get_input_signature(model)


def untrack_variable(layer, variable) -> None:
    """Makes `layer` forget a weight it created (it is no longer saved or listed).

    Why private: the EWC state drops the anchor and precision of a variable removed
    from the wrapped model; Keras has no public way for a layer to remove a weight.
    """
    layer._untrack_variable(variable)


def swap_layer(model, old, new) -> None:
    """Puts `new` in `old`'s place among `model`'s tracked layers; `old` leaves them
    (it is no longer listed, weighed or saved as part of `model`).

    Why private: `EWCModel.network` can be replaced; Keras keeps every layer ever
    assigned to an attribute among the model's tracked layers (so its weights are
    listed, and saved into `.keras` files beside the new network's), and has no
    public way to remove one. The position is kept so `model.weights` (and
    `get_weights`) stay in the order a freshly built model has.
    """
    tracker, layers = model._tracker, model._layers
    position = next((i for i, layer in enumerate(layers) if layer is old), len(layers))
    tracker.untrack(old)
    if not tracker.is_in_store("layers", new):
        locked = tracker.locked
        tracker.unlock()
        try:
            tracker.add_to_store("layers", new)
        finally:
            if locked:
                tracker.lock()
        layers.insert(position, layers.pop())


def trackable_children(obj, save_type="checkpoint", **kwargs) -> dict:
    """`keras.layers.Layer._trackable_children`: what a checkpoint saves of `obj`.

    Why private: `tf.train.Checkpoint` does not look inside Keras' tracked lists; the
    EWC state names its anchors and precisions by key through this TensorFlow hook,
    which has no public counterpart.
    """
    return keras.layers.Layer._trackable_children(obj, save_type, **kwargs)
