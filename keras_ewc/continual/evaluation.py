"""Accuracy on every task of a sequence: a plain function and a Keras callback."""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np

from keras_ewc.continual.masking import find_mask_layers, set_active_classes
from keras_ewc.continual.results import ContinualResults
from keras_ewc.continual.tasks import TaskSequence


def _predict_logits(model, ds) -> np.ndarray:
    outs = [np.asarray(model(x, training=False)) for x, _ in ds]
    return np.concatenate(outs)


def evaluate_tasks(model, sequence: TaskSequence, tasks: Sequence[int] | None = None,
                   batch_size: int = 512) -> list[float]:
    """Returns the test accuracy of `model` on tasks of `sequence`.

    Accuracy is the fraction of test examples whose arg-max output is the label. In
    Task-IL each task is evaluated with its own classes active (the model's
    `ActiveClassMask` is set per task, then restored); in the other scenarios all
    outputs compete.

    Args:
        model: a Keras model whose output has `sequence.num_outputs` units.
        sequence: the task sequence.
        tasks: indices of the tasks to evaluate (default: all).
        batch_size: examples a batch.

    Returns:
        One accuracy per task evaluated, in the order given.

    Example:

    >>> import keras
    >>> from keras_ewc.continual import evaluate_tasks, split_sequence
    >>> seq = split_sequence(num_tasks=2, scenario="class")
    >>> net = keras.Sequential([keras.Input(seq.input_shape), keras.layers.Flatten(),
    ...                         keras.layers.Dense(seq.num_outputs)])
    >>> len(evaluate_tasks(net, seq))
    2
    """
    indices = range(len(sequence)) if tasks is None else list(tasks)
    masks = find_mask_layers(model)
    if sequence.scenario == "task" and not masks:
        masked = False
    else:
        masked = sequence.scenario == "task"
    saved = [np.asarray(m.mask) for m in masks if m.built]
    out = []
    try:
        for j in indices:
            task = sequence[j]
            if masked:
                set_active_classes(model, sequence.active_mask(j))
            logits = _predict_logits(model, task.dataset("test", batch_size, shuffle=False))
            if sequence.scenario == "task" and not masked:
                # No mask layer: Task-IL still means choosing among the task's classes.
                logits = np.where(sequence.active_mask(j) > 0, logits, -np.inf)
            if logits.shape[-1] != sequence.num_outputs:
                raise ValueError(
                    f"The model has {logits.shape[-1]} outputs; this {sequence.scenario}-IL "
                    f"sequence needs {sequence.num_outputs}."
                )
            out.append(float(np.mean(np.argmax(logits, axis=-1) == task.y_test)))
    finally:
        for m, value in zip([m for m in masks if m.built], saved):
            m.mask.assign(value)
    return out


class ContinualEvaluation(keras.callbacks.Callback):
    """Fills the accuracy matrix: after each `fit` (one task), tests every task seen.

    Each call to `model.fit` with this callback counts as training the next task of the
    sequence: at the end of the i-th `fit`, the callback evaluates tasks 0..i and stores
    row i of `R`. `results` returns the matrix with its metrics. With `log_dir` (or a
    `keras.callbacks.TensorBoard` instance) it also writes `task_accuracy/<task>` and
    `average_accuracy` scalars for TensorBoard, one step per task trained; with
    `per_epoch=True` it adds `task_<j>_accuracy` to the epoch logs, which a TensorBoard
    callback placed after it in the list then records alongside `ewc_penalty`.

    Args:
        sequence: the task sequence being learned.
        batch_size: evaluation batch size.
        log_dir: a TensorBoard log directory, a `keras.callbacks.TensorBoard`, or None.
        per_epoch: also evaluate the seen tasks at the end of every epoch.
        evaluate_unseen: also evaluate the tasks not trained yet (upper triangle of R).
        label: the method's name for `results`.

    Example:

    >>> import keras
    >>> from keras_ewc.continual import ContinualEvaluation, permuted_sequence
    >>> seq = permuted_sequence(num_tasks=2)
    >>> net = keras.Sequential([keras.Input(seq.input_shape), keras.layers.Flatten(),
    ...                         keras.layers.Dense(10)])
    >>> net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> cb = ContinualEvaluation(seq)
    >>> for task in seq:
    ...     _ = net.fit(task.dataset(limit=256), epochs=1, callbacks=[cb], verbose=0)
    >>> cb.results.matrix.shape
    (2, 2)
    """

    def __init__(self, sequence: TaskSequence, batch_size: int = 512, log_dir=None,
                 per_epoch: bool = False, evaluate_unseen: bool = False, label: str = ""):
        super().__init__()
        self.sequence = sequence
        self.batch_size = batch_size
        self.per_epoch = per_epoch
        self.evaluate_unseen = evaluate_unseen
        self.label = label
        if isinstance(log_dir, keras.callbacks.TensorBoard):
            log_dir = log_dir.log_dir
        self.log_dir = None if log_dir is None else os.path.join(os.fspath(log_dir),
                                                                  "continual")
        self._writer = None
        self.rows: list[list[float]] = []

    @property
    def task_index(self) -> int:
        """The task the next (or current) `fit` trains."""
        return len(self.rows)

    def _evaluate(self, upto: int) -> list[float]:
        n = len(self.sequence)
        cols = range(n) if self.evaluate_unseen else range(upto + 1)
        accs = evaluate_tasks(self.model, self.sequence, cols, self.batch_size)
        row = [float("nan")] * n
        for j, a in zip(cols, accs):
            row[j] = a
        return row

    def on_epoch_end(self, epoch, logs=None):
        if not self.per_epoch or logs is None:
            return
        row = self._evaluate(min(self.task_index, len(self.sequence) - 1))
        for j, a in enumerate(row):
            if not np.isnan(a):
                logs[f"task_{j}_accuracy"] = a

    def on_train_end(self, logs=None):
        if self.task_index >= len(self.sequence):
            raise ValueError(
                f"ContinualEvaluation saw more fits than the sequence has tasks "
                f"({len(self.sequence)}). Use a new callback for a new run."
            )
        row = self._evaluate(self.task_index)
        self.rows.append(row)
        if self.log_dir is not None:
            self._write_summaries(len(self.rows) - 1, row)

    def _write_summaries(self, step: int, row: list[float]) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for name, a in zip(self.sequence.task_names, row):
                if not np.isnan(a):
                    _scalar(f"task_accuracy/{_tag(name)}", a, step)
            _scalar("average_accuracy", self.results.average_accuracy, step)
        self._writer.flush()

    @property
    def results(self) -> ContinualResults:
        if not self.rows:
            raise ValueError("No task has been trained yet: call fit with this callback.")
        return ContinualResults(np.array(self.rows), self.sequence.task_names, self.label)


def _scalar(tag: str, value: float, step: int) -> None:
    """Writes a scalar TensorBoard shows; needs no `tensorboard` package installed.

    `tf.summary.scalar` lives in the tensorboard package; this writes the same record
    (a float32 tensor tagged for the "scalars" plugin) with TensorFlow alone.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


def _tag(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")
