"""Evaluation: accuracy per task and scenario, the callback, TensorBoard, training, plots."""

import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ewc.continual import (
    ArrayDataset,
    ContinualEvaluation,
    ContinualResults,
    evaluate_tasks,
    mlp,
    plot_results,
    split_sequence,
    train_sequence,
)


def data4():
    # 4 classes, test labels 0,1,2,3 twice each.
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4), 5)
    yt = np.tile(np.arange(4), 2)
    return ArrayDataset(rng.random((20, 2, 2)).astype("float32"), y,
                        rng.random((8, 2, 2)).astype("float32"), yt)


def constant_model(bias, task_il):
    """Ignores its input and always outputs `bias` as logits."""
    layers = [keras.Input((2, 2)), keras.layers.Flatten(),
              keras.layers.Dense(len(bias), kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant(bias))]
    if task_il:
        from keras_ewc.continual import ActiveClassMask

        layers.append(ActiveClassMask())
    return keras.Sequential(layers)


def test_task_il_chooses_within_the_task_class_il_among_all():
    bias = [0.0, 5.0, 0.0, 3.0]
    task_il = split_sequence(data4(), num_tasks=2, scenario="task")
    # Masked: task 0 predicts class 1, task 1 predicts class 3 -> half right each.
    model = constant_model(bias, task_il=True)
    assert evaluate_tasks(model, task_il) == [0.5, 0.5]
    # The mask is restored after evaluating.
    assert np.asarray(model.layers[-1].mask).tolist() == [1, 1, 1, 1]
    class_il = split_sequence(data4(), num_tasks=2, scenario="class")
    # Unmasked: always class 1 -> task 1 (classes 2, 3) is never right.
    assert evaluate_tasks(constant_model(bias, False), class_il) == [0.5, 0.0]
    domain = split_sequence(data4(), num_tasks=2, scenario="domain")
    assert evaluate_tasks(constant_model([1.0, 0.0], False), domain, tasks=[1]) == [0.5]
    with pytest.raises(ValueError, match="has 3 outputs.*needs 4"):
        evaluate_tasks(constant_model([0.0, 1.0, 2.0], False), class_il)


def test_callback_fills_lower_triangle_and_logs_tensorboard(tmp_path):
    seq = split_sequence(data4(), num_tasks=2, scenario="class")
    model = constant_model([0.0, 5.0, 0.0, 3.0], False)
    model.compile(keras.optimizers.SGD(0.0),  # lr 0: predictions stay known
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    try:
        import tensorboard  # noqa: F401

        log_dir = keras.callbacks.TensorBoard(str(tmp_path))
        extra = [log_dir]  # records the per-epoch task accuracies and ewc_penalty too
    except ImportError:  # tensorflow alone: the callback still writes its scalars
        log_dir, extra = str(tmp_path), []
    cb = ContinualEvaluation(seq, log_dir=log_dir, per_epoch=True, label="const")
    history = None
    for task in seq:
        history = model.fit(task.dataset(batch_size=4), epochs=1, verbose=0,
                            callbacks=[cb, *extra])
    r = cb.results.matrix
    assert r[0, 0] == 0.5 and math.isnan(r[0, 1]) and r[1].tolist() == [0.5, 0.0]
    assert cb.results.label == "const"
    assert history.history["task_1_accuracy"] == [0.0]  # per-epoch logs reach History
    tags = {}
    for path in glob.glob(str(tmp_path / "continual" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(
                    (event.step, float(tf.make_ndarray(v.tensor))))
    assert tags["task_accuracy/classes_2_3"] == [(1, 0.0)]
    assert tags["average_accuracy"] == [(0, 0.5), (1, 0.25)]
    with pytest.raises(ValueError, match="more fits than the sequence has tasks"):
        model.fit(seq[0].dataset(batch_size=4), epochs=1, verbose=0, callbacks=[cb])


def test_train_sequence_finetune_and_task_il_needs_mask():
    seq = split_sequence(data4(), num_tasks=2, scenario="task")
    plain = keras.Sequential([keras.Input((2, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="needs an ActiveClassMask"):
        train_sequence(plain, seq, steps_per_task=1, verbose=0)
    model = mlp(seq.input_shape, seq.num_outputs, hidden=(8,), task_il=True, seed=0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lines = []
    res = train_sequence(model, seq, steps_per_task=2, batch_size=4, verbose=1,
                         label="ft", print_fn=lines.append)
    assert lines == ["ft: task 1/2 (classes 0,1)", "ft: task 2/2 (classes 2,3)"]
    assert res.matrix.shape == (2, 2) and math.isnan(res.matrix[0, 1])
    assert res.config["steps_per_task"] == 2 and "strength" not in res.config
    # Task-IL with 2 classes a task and 4 test examples each: multiples of 1/4.
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in res.final_accuracies)


def test_plot_writes_png(tmp_path):
    a = ContinualResults([[0.9, float("nan")], [0.6, 0.8]], label="fine-tuning")
    b = ContinualResults([[0.9, float("nan")], [0.85, 0.8]], label="EWC")
    path = plot_results([a, b], str(tmp_path / "p.png"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        plot_results([], str(tmp_path / "q.png"))


def test_train_sequence_with_ewc_consolidates_between_tasks():
    import keras_ewc

    if not hasattr(keras_ewc, "EWCModel"):
        pytest.skip("keras_ewc.EWCModel not available")
    seq = split_sequence(data4(), num_tasks=2, scenario="task")
    net = mlp(seq.input_shape, seq.num_outputs, hidden=(8,), task_il=True, seed=0)
    model = keras_ewc.EWCModel(net, strength=5.0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert continual_masks(model) == 1  # found through the wrapper
    res = train_sequence(model, seq, steps_per_task=2, batch_size=4, verbose=0,
                         fisher_examples=8, label="ewc")
    # One consolidation: after task 0, none after the last task.
    assert int(np.asarray(model.regularizer.tasks)) == 1
    assert res.config["strength"] == 5.0 and res.config["estimator"] == "exact"
    # Task 0's classes only: the Fisher of the other task's logit columns is zero.
    precision = [np.asarray(p) for p in model.regularizer.precision]
    logits_kernel = next(p for p in precision if p.shape == (8, 4))
    assert np.all(logits_kernel[:, 2:] == 0) and np.any(logits_kernel[:, :2] > 0)


def continual_masks(model):
    from keras_ewc.continual import set_active_classes

    return set_active_classes(model, None)
