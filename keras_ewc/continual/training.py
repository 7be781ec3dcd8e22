"""Learning a task sequence one task at a time, with or without EWC."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import keras

from keras_ewc.continual.evaluation import ContinualEvaluation
from keras_ewc.continual.masking import find_mask_layers, set_active_classes
from keras_ewc.continual.results import ContinualResults
from keras_ewc.continual.tasks import TaskSequence


def mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (400, 400),
        task_il: bool = False, seed: int | None = None, name: str = "mlp") -> keras.Model:
    """Builds the usual continual-learning MLP: Flatten, ReLU layers, linear logits.

    Args:
        input_shape: shape of one input, e.g. `(28, 28)`.
        num_outputs: output units (`TaskSequence.num_outputs`).
        hidden: width of each hidden layer (default 2×400, as in van de Ven 2025).
        task_il: append an `ActiveClassMask`, for Task-IL sequences.
        seed: seed of the initial weights.
        name: model name.

    Example:

    >>> from keras_ewc.continual import mlp
    >>> mlp((28, 28), 10, hidden=(32,)).output_shape
    (None, 10)
    """
    from keras_ewc.continual.masking import ActiveClassMask

    init = keras.initializers.GlorotUniform
    layers = [keras.Input(tuple(input_shape)), keras.layers.Flatten()]
    for k, width in enumerate(hidden):
        layers.append(keras.layers.Dense(
            width, activation="relu", name=f"hidden_{k}",
            kernel_initializer=init(seed=None if seed is None else seed + k)))
    layers.append(keras.layers.Dense(
        num_outputs, name="logits",
        kernel_initializer=init(seed=None if seed is None else seed + len(hidden))))
    if task_il:
        layers.append(ActiveClassMask(name="active_classes"))
    return keras.Sequential(layers, name=name)


def train_sequence(
    model,
    sequence: TaskSequence,
    epochs: int = 1,
    steps_per_task: int | None = None,
    batch_size: int = 128,
    consolidate: bool = True,
    estimator: str = "exact",
    fisher_examples: int | None = 1000,
    fisher_batch_size: int = 128,
    consolidate_last: bool = False,
    callbacks: list | None = None,
    log_dir=None,
    verbose: int = 1,
    seed: int = 0,
    label: str = "",
    print_fn: Callable[[str], None] = print,
) -> ContinualResults:
    """Trains `model` on each task of `sequence` in turn and returns the accuracy matrix.

    For each task: sets the active classes (Task-IL), `model.fit`s the task's training
    set, then, if the model has a `consolidate` method (an `keras_ewc.EWCModel`), computes
    the Fisher on up to `fisher_examples` training examples of the task and consolidates.
    A plain Keras model gives the fine-tuning baseline. After each task every task seen
    so far is tested (see `ContinualEvaluation`).

    Args:
        model: a compiled Keras model or `EWCModel` with `sequence.num_outputs` outputs; in
            Task-IL it must contain an `ActiveClassMask`.
        sequence: the task sequence.
        epochs: epochs a task (ignored when `steps_per_task` is given).
        steps_per_task: train each task for exactly this many batches instead.
        batch_size: training batch size.
        consolidate: consolidate after each task when the model can.
        estimator: Fisher estimator passed to `consolidate`.
        fisher_examples: examples of each task used for the Fisher (None: all).
        fisher_batch_size: batch size of the Fisher computation.
        consolidate_last: also consolidate after the last task (not needed to evaluate).
        callbacks: more Keras callbacks for every `fit`.
        log_dir: TensorBoard directory for per-task accuracies (see `ContinualEvaluation`);
            by default that of a `keras.callbacks.TensorBoard` in `callbacks`, if any.
        verbose: 0 silent, 1 a header and a progress bar per task, 2 one line per epoch.
            When standard output is not a terminal (a log file, a pipe), 1 acts as 2: Keras'
            bar would fill the log with carriage returns and colour codes.
        seed: seed of the shuffling and of the Fisher subset.
        label: the method's name in the results.
        print_fn: where the per-task headers go.

    Returns:
        A `ContinualResults`; `config["seconds"]` holds the wall time.

    Example:

    >>> import keras
    >>> from keras_ewc.continual import mlp, permuted_sequence, train_sequence
    >>> seq = permuted_sequence(num_tasks=2)
    >>> net = mlp(seq.input_shape, seq.num_outputs, hidden=(32,))
    >>> net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> res = train_sequence(net, seq, steps_per_task=5, verbose=0)
    >>> res.matrix.shape
    (2, 2)
    """
    if sequence.scenario == "task" and not find_mask_layers(model):
        raise ValueError(
            "A Task-IL sequence needs an ActiveClassMask layer on the model's logits, so that "
            "training and the Fisher see only the active task's classes. Add "
            "keras_ewc.continual.ActiveClassMask() as the last layer (or build the model "
            "with keras_ewc.continual.mlp(..., task_il=True))."
        )
    if steps_per_task is not None and steps_per_task < 1:
        raise ValueError(f"Expected steps_per_task >= 1. Received: {steps_per_task}")
    if log_dir is None:
        # A TensorBoard callback among `callbacks` gets the per-task accuracies too (it
        # already records loss and ewc_penalty every epoch).
        log_dir = next((c for c in callbacks or []
                        if isinstance(c, keras.callbacks.TensorBoard)), None)
    evaluation = ContinualEvaluation(sequence, log_dir=log_dir, label=label)
    can_consolidate = consolidate and hasattr(model, "consolidate")
    fit_verbose = _fit_verbose(verbose)
    start = time.perf_counter()
    for t, task in enumerate(sequence):
        if verbose:
            print_fn(f"{label + ': ' if label else ''}task {t + 1}/{len(sequence)} ({task.name})")
        if sequence.scenario == "task":
            set_active_classes(model, sequence.active_mask(t))
        fit_callbacks = [evaluation] + list(callbacks or [])
        if steps_per_task is not None:
            ds = task.dataset("train", batch_size, seed=seed + t, repeat=True)
            model.fit(ds, epochs=1, steps_per_epoch=steps_per_task, verbose=fit_verbose,
                      callbacks=fit_callbacks, shuffle=False)
        else:
            ds = task.dataset("train", batch_size, seed=seed + t)
            model.fit(ds, epochs=epochs, verbose=fit_verbose, callbacks=fit_callbacks,
                      shuffle=False)
        if can_consolidate and (t < len(sequence) - 1 or consolidate_last):
            data = task.dataset("train", fisher_batch_size, shuffle=False,
                                limit=fisher_examples, seed=seed)
            model.consolidate(data, estimator=estimator, verbose=0)
    results = evaluation.results
    results.config.update({
        "scenario": sequence.scenario, "sequence": sequence.kind,
        "dataset": sequence.dataset_name, "tasks": len(sequence),
        "epochs": None if steps_per_task else epochs, "steps_per_task": steps_per_task,
        "batch_size": batch_size, "seconds": round(time.perf_counter() - start, 2),
    })
    if can_consolidate:
        results.config.update({"estimator": estimator, "fisher_examples": fisher_examples,
                               "strength": _strength(model)})
    return results


def _fit_verbose(verbose: int) -> int:
    # Keras draws its bar with "\r" and ANSI colours whenever the "posix" module is loaded,
    # terminal or not; a log gets one plain line a task instead.
    if verbose == 1 and not _is_terminal(sys.stdout):
        return 2
    return verbose


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _strength(model):
    value = getattr(model, "strength", None)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
