"""Task sequences (permuted, split, rotated) in the three continual-learning scenarios."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_ewc.continual.datasets import ArrayDataset, load_dataset

SCENARIOS = ("task", "domain", "class")
SEQUENCES = ("permuted", "split", "rotated")
_SCENARIO_ALIASES = {
    "task": "task", "task-il": "task", "task_il": "task", "taskil": "task",
    "domain": "domain", "domain-il": "domain", "domain_il": "domain", "domainil": "domain",
    "class": "class", "class-il": "class", "class_il": "class", "classil": "class",
}


def normalize_scenario(scenario: str) -> str:
    """Maps `"task"`, `"Task-IL"`, `"domain_il"`, ... to `"task"`, `"domain"` or `"class"`."""
    key = str(scenario).lower()
    if key not in _SCENARIO_ALIASES:
        raise ValueError(
            "Unknown scenario. Expected one of 'task' (Task-IL), 'domain' (Domain-IL), "
            f"'class' (Class-IL). Received: scenario={scenario!r}"
        )
    return _SCENARIO_ALIASES[key]


@dataclasses.dataclass
class Task:
    """One task of a sequence: its data, already in the scenario's label space.

    Inputs are kept in their stored dtype (uint8 images stay uint8, which keeps long
    sequences small); `x_train`/`x_test` and `dataset()` give float32 scaled by `scale`.

    Args:
        index: position in the sequence, from 0.
        name: a short name, e.g. `"permutation 2"` or `"classes 4-5"`.
        raw_x_train: training inputs as stored.
        y_train: integer labels in the sequence's output space.
        raw_x_test: test inputs as stored.
        y_test: integer test labels.
        classes: the output units this task's labels use (the active classes in Task-IL).
        scale: factor applied to inputs when converted to float32 (1/255 for uint8).
    """

    index: int
    name: str
    raw_x_train: np.ndarray
    y_train: np.ndarray
    raw_x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[int, ...]
    scale: float = 1.0

    @property
    def x_train(self) -> np.ndarray:
        return self.raw_x_train.astype(np.float32) * np.float32(self.scale)

    @property
    def x_test(self) -> np.ndarray:
        return self.raw_x_test.astype(np.float32) * np.float32(self.scale)

    def dataset(
        self,
        split: str = "train",
        batch_size: int = 128,
        shuffle: bool | None = None,
        seed: int | None = None,
        repeat: bool = False,
        limit: int | None = None,
    ):
        """Returns a batched `tf.data.Dataset` of `(x, y)`, inputs as float32.

        Args:
            split: `"train"` or `"test"`.
            batch_size: examples a batch.
            shuffle: shuffle each epoch (default: True for train, False for test).
            seed: shuffle seed.
            repeat: repeat forever (for a fixed number of steps).
            limit: keep only the first `limit` examples (after a seeded shuffle for train).
        """
        import tensorflow as tf

        if split not in ("train", "test"):
            raise ValueError(f"Expected split 'train' or 'test'. Received: split={split!r}")
        x = self.raw_x_train if split == "train" else self.raw_x_test
        y = self.y_train if split == "train" else self.y_test
        if shuffle is None:
            shuffle = split == "train"
        if limit is not None and limit < len(x):
            pick = np.random.default_rng(seed).permutation(len(x))[:limit]
            x, y = x[np.sort(pick)], y[np.sort(pick)]
        scale = np.float32(self.scale)
        ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(batch_size)
        ds = ds.map(lambda a, b: (tf.cast(a, tf.float32) * scale, b),
                    num_parallel_calls=tf.data.AUTOTUNE)
        # No autotuning (AUTOTUNE then means a fixed default; the pipeline is a cast):
        # with it, destroying the iterator at the end of an epoch stalled for about 2.5 s
        # in one epoch out of two (TensorFlow 2.21, 2 cores), as long as the epoch.
        options = tf.data.Options()
        options.autotune.enabled = False
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


_DISPLAY_NAMES = {
    "fashion_mnist_subset": "Fashion-MNIST (bundled subset)",
    "fashion_mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "kmnist": "Kuzushiji-MNIST",
    "emnist": "EMNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}


def display_name(dataset_name: str) -> str:
    """The name of a dataset as a reader knows it, for titles and reports.

    Args:
        dataset_name: the name a dataset was loaded under (`ArrayDataset.name`).

    Example:

    >>> from keras_ewc.continual.tasks import display_name
    >>> display_name("fashion_mnist_subset"), display_name("mnist"), display_name("my_data")
    ('Fashion-MNIST (bundled subset)', 'MNIST', 'my_data')
    """
    return _DISPLAY_NAMES.get(dataset_name.split(":")[0].lower(), dataset_name or "data")


class TaskSequence:
    """An ordered list of tasks in one continual-learning scenario.

    The three scenarios of van de Ven & Tolias ("Three scenarios for continual learning",
    2019) differ in what the model must output:

    - `"task"` (Task-IL): the task identity is given at test time. Every task has its own
      output units (`task.classes`); the model is trained and evaluated with the units of
      the other tasks masked out (see `ActiveClassMask`).
    - `"domain"` (Domain-IL): the task identity is not given and not needed; every task
      uses the same output units (for split sequences: the position of the class within
      its task, e.g. "first or second class").
    - `"class"` (Class-IL): the task identity is not given and must be inferred; every
      task has its own output units and the model chooses among all of them.

    Build one with `permuted_sequence`, `split_sequence`, `rotated_sequence` or
    `make_sequence`.

    Args:
        tasks: the tasks, in order.
        scenario: `"task"`, `"domain"` or `"class"`.
        num_outputs: output units a model for this sequence needs.
        kind: `"permuted"`, `"split"`, `"rotated"` or any other description.
        dataset_name: name of the source dataset.
    """

    def __init__(self, tasks: Sequence[Task], scenario: str, num_outputs: int,
                 kind: str = "custom", dataset_name: str = ""):
        self.tasks = list(tasks)
        self.scenario = normalize_scenario(scenario)
        self.num_outputs = int(num_outputs)
        self.kind = kind
        self.dataset_name = dataset_name
        if not self.tasks:
            raise ValueError("Expected at least one task. Received: 0 tasks")

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def __iter__(self):
        return iter(self.tasks)

    def __repr__(self) -> str:
        return (f"TaskSequence(kind={self.kind!r}, scenario={self.scenario!r}, "
                f"tasks={len(self)}, num_outputs={self.num_outputs}, "
                f"dataset={self.dataset_name!r})")

    @property
    def title(self) -> str:
        """A title for reports and plots, e.g. `Permuted Fashion-MNIST (bundled subset),
        5 tasks, Domain-IL`."""
        return (f"{self.kind.capitalize()} {display_name(self.dataset_name)}, "
                f"{len(self)} task{'s' if len(self) != 1 else ''}, "
                f"{self.scenario.capitalize()}-IL")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.tasks[0].raw_x_train.shape[1:])

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def active_mask(self, index: int) -> np.ndarray:
        """The 0/1 mask of output units allowed for task `index` (all ones unless Task-IL)."""
        mask = np.zeros(self.num_outputs, np.float32)
        if self.scenario == "task":
            mask[list(self.tasks[index].classes)] = 1.0
        else:
            mask[:] = 1.0
        return mask


def _check_tasks(num_tasks: int) -> int:
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"Expected num_tasks >= 1. Received: num_tasks={num_tasks!r}")
    return int(num_tasks)


def _scale_for(x: np.ndarray) -> float:
    return 1.0 / 255.0 if x.dtype == np.uint8 else 1.0


def _transformed_sequence(data: ArrayDataset, num_tasks: int, scenario: str, transforms,
                          names: list[str], kind: str) -> TaskSequence:
    """Tasks that transform the inputs and keep the labels (permuted, rotated)."""
    c = data.num_classes
    tasks = []
    for t, (fn, name) in enumerate(zip(transforms, names)):
        # Domain-IL shares the C units; Task-IL and Class-IL give each task C units of its
        # own (Task-IL then masks the others: a shared-trunk "head per task").
        offset = 0 if scenario == "domain" else t * c
        tasks.append(Task(
            index=t, name=name,
            raw_x_train=fn(data.x_train), y_train=data.y_train + offset,
            raw_x_test=fn(data.x_test), y_test=data.y_test + offset,
            classes=tuple(range(offset, offset + c)), scale=_scale_for(data.x_train),
        ))
    outputs = c if scenario == "domain" else c * num_tasks
    return TaskSequence(tasks, scenario, outputs, kind=kind, dataset_name=data.name)


def permutations(num_pixels: int, num_tasks: int, seed: int = 0,
                 first_identity: bool = True) -> list[np.ndarray]:
    """The pixel permutations of a permuted sequence: fixed by `seed`.

    Task t uses permutation t; with `first_identity`, task 0 sees the original images (as
    in van de Ven et al.), so the first task is the unpermuted dataset. Permutation t is
    drawn from `numpy.random.default_rng([seed, t])`, so it does not depend on how many
    tasks there are.

    Args:
        num_pixels: input size (e.g. 784).
        num_tasks: number of permutations.
        seed: integer seed.
        first_identity: whether task 0 is left unpermuted.

    Example:

    >>> from keras_ewc.continual import permutations
    >>> [p.tolist() for p in permutations(4, 2, seed=0)][0]
    [0, 1, 2, 3]
    """
    out = []
    for t in range(_check_tasks(num_tasks)):
        if t == 0 and first_identity:
            out.append(np.arange(num_pixels))
        else:
            out.append(np.random.default_rng([seed, t]).permutation(num_pixels))
    return out


def permuted_sequence(data: Any = None, num_tasks: int = 10, scenario: str = "domain",
                      seed: int = 0, first_identity: bool = True) -> TaskSequence:
    """Builds a permuted sequence: each task applies its own fixed pixel permutation.

    Args:
        data: anything `load_dataset` accepts (default: the bundled Fashion-MNIST subset).
        num_tasks: number of tasks.
        scenario: `"domain"` (the usual one for permuted sequences), `"task"` or `"class"`.
        seed: seed of the permutations (see `permutations`).
        first_identity: whether task 0 is the unpermuted dataset.

    Example:

    >>> from keras_ewc.continual import permuted_sequence
    >>> seq = permuted_sequence(num_tasks=3)
    >>> len(seq), seq.num_outputs, seq.scenario
    (3, 10, 'domain')
    """
    data = load_dataset(data)
    scenario = normalize_scenario(scenario)
    num_tasks = _check_tasks(num_tasks)
    shape = data.input_shape
    perms = permutations(int(np.prod(shape)), num_tasks, seed, first_identity)

    def make(p):
        return lambda x: x.reshape(len(x), -1)[:, p].reshape((len(x),) + shape)

    # Numbered from 1, as the tasks are in tables and plots.
    names = [f"permutation {t + 1}" + (" (identity)" if t == 0 and first_identity else "")
             for t in range(num_tasks)]
    return _transformed_sequence(data, num_tasks, scenario, [make(p) for p in perms],
                                 names, "permuted")


def class_splits(num_classes: int, num_tasks: int, class_order: Sequence[int] | None = None
                 ) -> list[tuple[int, ...]]:
    """Splits the classes into `num_tasks` disjoint groups that cover them all.

    Sizes differ by at most one when `num_tasks` does not divide `num_classes` (the first
    groups get the extra class).

    Args:
        num_classes: number of classes.
        num_tasks: number of groups.
        class_order: the order in which classes are dealt (default `0, 1, ...`).

    Example:

    >>> from keras_ewc.continual import class_splits
    >>> class_splits(10, 5)
    [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    """
    num_tasks = _check_tasks(num_tasks)
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(
            f"Expected class_order to be a permutation of 0..{num_classes - 1}. "
            f"Received: class_order={list(class_order)}"
        )
    if num_tasks > num_classes:
        raise ValueError(
            f"More tasks than classes allow: a split sequence needs at least one class a "
            f"task, and the dataset has {num_classes} classes. "
            f"Received: num_tasks={num_tasks}. Use num_tasks <= {num_classes}."
        )
    return [tuple(int(c) for c in part) for part in np.array_split(np.array(order), num_tasks)]


def split_sequence(data: Any = None, num_tasks: int = 5, scenario: str = "task",
                   class_order: Sequence[int] | None = None, seed: int | None = None
                   ) -> TaskSequence:
    """Builds a split sequence: each task holds a disjoint group of the classes.

    Labels: Task-IL and Class-IL keep the original class labels (Task-IL masks the classes
    of the other tasks); Domain-IL relabels each class by its position within its task.

    Args:
        data: anything `load_dataset` accepts (default: the bundled Fashion-MNIST subset).
        num_tasks: number of tasks (at most the number of classes).
        scenario: `"task"`, `"domain"` or `"class"`.
        class_order: order in which classes are dealt to tasks (default `0, 1, ...`).
        seed: when given and `class_order` is not, shuffle the class order with this seed.

    Example:

    >>> from keras_ewc.continual import split_sequence
    >>> seq = split_sequence(num_tasks=5, scenario="domain")
    >>> seq[1].classes, seq.num_outputs
    ((0, 1), 2)
    """
    data = load_dataset(data)
    scenario = normalize_scenario(scenario)
    if class_order is None and seed is not None:
        class_order = np.random.default_rng(seed).permutation(data.num_classes).tolist()
    groups = class_splits(data.num_classes, num_tasks, class_order)
    width = max(len(g) for g in groups)
    tasks = []
    for t, group in enumerate(groups):
        lookup = np.full(data.num_classes, -1, np.int64)
        if scenario == "domain":
            lookup[list(group)] = np.arange(len(group))
            classes = tuple(range(len(group)))
        else:
            lookup[list(group)] = group
            classes = group
        train = np.isin(data.y_train, group)
        test = np.isin(data.y_test, group)
        if not train.any() or not test.any():
            raise ValueError(
                f"Task {t} (classes {list(group)}) has no training or no test examples in "
                f"dataset {data.name!r}: {int(train.sum())} train, {int(test.sum())} test."
            )
        tasks.append(Task(
            index=t, name="classes " + ",".join(str(c) for c in group),
            raw_x_train=data.x_train[train], y_train=lookup[data.y_train[train]],
            raw_x_test=data.x_test[test], y_test=lookup[data.y_test[test]],
            classes=classes, scale=_scale_for(data.x_train),
        ))
    outputs = width if scenario == "domain" else data.num_classes
    return TaskSequence(tasks, scenario, outputs, kind="split", dataset_name=data.name)


def rotate_images(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotates images `(N, H, W)` or `(N, H, W, C)` counter-clockwise about their centre.

    Bilinear interpolation, zero outside the image; the output keeps the input dtype.

    Args:
        x: the images.
        angle: degrees, counter-clockwise.

    Example:

    >>> import numpy as np
    >>> from keras_ewc.continual import rotate_images
    >>> x = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    >>> bool(np.allclose(rotate_images(x, 90), np.rot90(x, 1, axes=(1, 2))))
    True
    """
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"Expected images of shape (N, H, W) or (N, H, W, C). Received: shape={x.shape}"
        )
    h, w = x.shape[1], x.shape[2]
    theta = np.deg2rad(angle)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Inverse map: the source point of each output pixel. Rows grow downwards, so a
    # counter-clockwise turn on screen is a clockwise one in (row, col) coordinates.
    c, s = np.cos(theta), np.sin(theta)
    src_x = c * (xx - cx) - s * (yy - cy) + cx
    src_y = s * (xx - cx) + c * (yy - cy) + cy
    x0, y0 = np.floor(src_x).astype(int), np.floor(src_y).astype(int)
    fx, fy = src_x - x0, src_y - y0
    xf = x.astype(np.float32)
    out = np.zeros_like(xf)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            px, py = x0 + dx, y0 + dy
            inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            weight = np.where(inside, wx * wy, 0.0).astype(np.float32)
            vals = xf[:, np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)]
            if x.ndim == 4:
                weight = weight[..., None]
            out += vals * weight
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(x.dtype)
    return out.astype(x.dtype)


def rotated_sequence(data: Any = None, num_tasks: int = 5, scenario: str = "domain",
                     max_angle: float = 180.0, angles: Sequence[float] | None = None
                     ) -> TaskSequence:
    """Builds a rotated sequence: task t rotates every image by its own angle.

    Args:
        data: anything `load_dataset` accepts (default: the bundled Fashion-MNIST subset).
        num_tasks: number of tasks (ignored when `angles` is given).
        scenario: `"domain"` (usual), `"task"` or `"class"`.
        max_angle: angles are `max_angle * t / num_tasks` for t = 0..num_tasks-1, so task 0
            is unrotated and no two tasks coincide.
        angles: explicit angles in degrees, one a task.

    Example:

    >>> from keras_ewc.continual import rotated_sequence
    >>> [t.name for t in rotated_sequence(num_tasks=3, max_angle=90)]
    ['rotation 0°', 'rotation 30°', 'rotation 60°']
    """
    data = load_dataset(data)
    scenario = normalize_scenario(scenario)
    if angles is None:
        num_tasks = _check_tasks(num_tasks)
        angles = [max_angle * t / num_tasks for t in range(num_tasks)]
    angles = [float(a) for a in angles]
    if len(data.input_shape) not in (2, 3):
        raise ValueError(
            "Rotated sequences need images (H, W) or (H, W, C). "
            f"Received: input shape {data.input_shape}"
        )
    names = [f"rotation {a:g}°" for a in angles]
    return _transformed_sequence(data, len(angles), scenario,
                                 [lambda x, a=a: rotate_images(x, a) for a in angles],
                                 names, "rotated")


def make_sequence(kind: str, data: Any = None, num_tasks: int = 5, scenario: str | None = None,
                  seed: int = 0) -> TaskSequence:
    """Builds a sequence by name: `"permuted"`, `"split"` or `"rotated"`.

    Args:
        kind: the kind of sequence.
        data: anything `load_dataset` accepts (default: the bundled subset).
        num_tasks: number of tasks.
        scenario: `"task"`, `"domain"` or `"class"` (default: `"task"` for split,
            `"domain"` otherwise).
        seed: seed for permutations (permuted) or unused.

    Example:

    >>> from keras_ewc.continual import make_sequence
    >>> make_sequence("split", num_tasks=2).scenario
    'task'
    """
    if kind not in SEQUENCES:
        raise ValueError(
            f"Unknown task sequence. Expected one of {list(SEQUENCES)}. Received: {kind!r}"
        )
    if scenario is None:
        scenario = "task" if kind == "split" else "domain"
    if kind == "permuted":
        return permuted_sequence(data, num_tasks, scenario, seed=seed)
    if kind == "split":
        return split_sequence(data, num_tasks, scenario)
    return rotated_sequence(data, num_tasks, scenario)
