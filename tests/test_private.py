"""Every private Keras/TensorFlow use in keras_ewc/_private.py, checked on the installed
Keras: a test here fails, by name, when an upgrade removes or changes one."""

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import _private


def _nested():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="inner_dense")],
                             name="inner")
    return keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1, name="top")],
                            name="outer")


def test_flatten_layers_walks_nested_models():
    model = _nested()
    names = [layer.name for layer in _private.flatten_layers(model)]
    assert names[0] == "outer"
    assert {"inner", "inner_dense", "top"} <= set(names)


def test_child_layers_are_direct_children_only():
    model = _nested()
    names = [layer.name for layer in _private.child_layers(model)]
    assert "inner" in names and "top" in names and "inner_dense" not in names


def test_an_instance_call_replaces_the_class_call_and_is_restored():
    layer = keras.layers.Dense(2)
    x = np.ones((1, 3), "float32")
    original = layer(x)
    assert not _private.has_instance_call(layer)
    _private.set_instance_call(layer, lambda inputs, **kwargs: inputs[:, :2] * 0 + 7.0)
    assert _private.has_instance_call(layer)
    np.testing.assert_array_equal(layer(x), np.full((1, 2), 7.0))
    assert not any(v is None for v in layer.trainable_variables)
    _private.restore_instance_call(layer)
    assert not _private.has_instance_call(layer)
    np.testing.assert_array_equal(layer(x), original)


def test_remat_mode_is_none_for_a_plain_layer_and_set_under_remat():
    assert _private.remat_mode(keras.layers.Dense(2)) is None
    with keras.RematScope(mode="full"):
        layer = keras.layers.Dense(2)
    assert _private.remat_mode(layer) is not None


def test_symbolic_build_builds_optimizer_and_metrics_from_a_batch():
    # Keras builds early only under a strategy (EWCModel overrides it for that case).
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("adam", "mse", metrics=["mae"])
    assert not model.optimizer.built
    _private.symbolic_build(model, data_batch=(np.ones((2, 3), "float32"),
                                               np.ones((2, 2), "float32")))
    assert model.optimizer.built and model.optimizer.variables


def test_is_multi_worker_is_false_off_a_cluster():
    assert not _private.is_multi_worker(tf.distribute.get_strategy())
    assert not _private.is_multi_worker(tf.distribute.MirroredStrategy(["/cpu:0"]))


def test_input_signature_of_a_functional_model():
    model = keras.Sequential([keras.Input((3,), name="features"), keras.layers.Dense(2)])
    signature = _private.input_signature(model)
    spec = tf.nest.flatten(signature)[0]
    assert tuple(spec.shape) == (None, 3)


def test_untrack_variable_removes_a_weight_from_the_layer():
    layer = keras.layers.Layer()
    kept = layer.add_weight(shape=(2,), initializer="zeros", name="kept")
    gone = layer.add_weight(shape=(3,), initializer="zeros", name="gone")
    _private.untrack_variable(layer, gone)
    assert [w.name for w in layer.weights] == ["kept"]
    assert layer.weights[0] is kept


def test_trackable_children_name_a_layers_weights_for_checkpoints():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    children = _private.trackable_children(layer)
    assert any(child is layer.kernel for child in children.values())


def test_swap_layer_puts_the_new_layer_in_the_old_ones_place():
    class Holder(keras.Model):
        def call(self, x):
            return x

    holder = Holder()
    first, old, last = keras.layers.Dense(2), keras.layers.Dense(3), keras.layers.Dense(4)
    holder.first, holder.old, holder.last = first, old, last
    for layer in (first, old, last):
        layer.build((None, 5))
    new = keras.layers.Dense(6)
    new.build((None, 5))
    _private.swap_layer(holder, old, new)
    assert holder.layers == [first, new, last]
    assert [tuple(w.shape) for w in holder.weights][::2] == [(5, 2), (5, 6), (5, 4)]
