"""Continual learning with EWC: task sequences, scenarios, evaluation, plots."""

from keras_ewc.continual.datasets import (
    ArrayDataset,
    load_bundled,
    load_dataset,
    load_tfds,
)
from keras_ewc.continual.evaluation import ContinualEvaluation, evaluate_tasks
from keras_ewc.continual.idx import load_idx_dataset, read_idx, write_idx
from keras_ewc.continual.masking import ActiveClassMask, set_active_classes
from keras_ewc.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
)
from keras_ewc.continual.plots import plot_results
from keras_ewc.continual.results import (
    ContinualResults,
    results_table,
    save_results,
)
from keras_ewc.continual.tasks import (
    SCENARIOS,
    SEQUENCES,
    Task,
    TaskSequence,
    class_splits,
    make_sequence,
    permutations,
    permuted_sequence,
    rotate_images,
    rotated_sequence,
    split_sequence,
)
from keras_ewc.continual.training import mlp, train_sequence

__all__ = [
    "SCENARIOS",
    "SEQUENCES",
    "ActiveClassMask",
    "ArrayDataset",
    "ContinualEvaluation",
    "ContinualResults",
    "Task",
    "TaskSequence",
    "average_accuracy",
    "backward_transfer",
    "class_splits",
    "evaluate_tasks",
    "forgetting",
    "load_bundled",
    "load_dataset",
    "load_idx_dataset",
    "load_tfds",
    "make_sequence",
    "mlp",
    "permutations",
    "permuted_sequence",
    "plot_results",
    "read_idx",
    "results_table",
    "rotate_images",
    "rotated_sequence",
    "save_results",
    "set_active_classes",
    "split_sequence",
    "train_sequence",
    "write_idx",
]
