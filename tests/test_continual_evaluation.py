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


def test_train_sequence_finetune_and_task_il_needs_mask(capsys):
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
    # The final accuracies are those of the trained model, one test example at a time,
    # each task with its own two classes active (an oracle independent of evaluate_tasks).
    from keras_ewc.continual import set_active_classes

    expected = []
    for j, task in enumerate(seq):
        set_active_classes(model, seq.active_mask(j))
        right = [int(np.argmax(model(task.x_test[k:k + 1], training=False)[0])) ==
                 task.y_test[k] for k in range(len(task.y_test))]
        expected.append(sum(right) / len(right))
    assert res.final_accuracies == pytest.approx(expected, abs=1e-12)
    # Output captured by pytest is not a terminal: one plain line a task from Keras, no
    # carriage returns or colour codes.
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert len([line for line in out.splitlines() if line.startswith("2/2 - ")]) == 2


def test_plot_numbers_tasks_from_one_and_labels_everything(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    a = ContinualResults([[0.9, float("nan")], [0.6, 0.8]], ["first", "second"],
                         label="fine-tuning")
    b = ContinualResults([[0.9, float("nan")], [0.85, 0.8]], ["first", "second"], label="EWC")
    path = plot_results([a, b], str(tmp_path / "p.png"), title="Split MNIST, 2 tasks")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # closed figures lose their canvas
    heat, curves = fig.axes[0], fig.axes[2]
    assert fig.get_suptitle() == "Split MNIST, 2 tasks"
    assert heat.get_title() == "fine-tuning\navg acc 0.700, BWT -0.300"
    # Tasks 1..T on both kinds of panel.
    assert [t.get_text() for t in heat.get_xticklabels()] == ["1", "2"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["1", "2"]
    assert [int(t) for t in curves.get_xticks()] == [1, 2]
    colourbars = [ax for ax in fig.axes if ax.get_ylabel() == "test accuracy"
                  and ax not in (curves, fig.axes[3])]
    assert len(colourbars) == 1
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["task 1: first", "task 2: second"]
    # The legend lies below every axes (not over a line), and nothing is outside the figure.
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert all(box.y1 <= ax.get_window_extent(renderer).y0 for ax in fig.axes[2:4])
    whole = fig.bbox
    for artist in [*fig.axes, legend, fig._suptitle]:
        extent = artist.get_window_extent(renderer)
        assert extent.x0 >= whole.x0 - 1 and extent.x1 <= whole.x1 + 1, artist
        assert extent.y0 >= whole.y0 - 1 and extent.y1 <= whole.y1 + 1, artist
    with pytest.raises(ValueError, match="at least one"):
        plot_results([], str(tmp_path / "q.png"))


def test_train_sequence_with_ewc_consolidates_between_tasks():
    import keras_ewc

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
