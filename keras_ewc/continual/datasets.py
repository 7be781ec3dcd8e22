"""Datasets for task sequences: bundled, TensorFlow Datasets, IDX files, arrays, tf.data."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

BUNDLED = "bundled"
BUNDLED_FILE = "fashion_mnist_subset.npz"
BUNDLED_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclasses.dataclass
class ArrayDataset:
    """A labelled dataset held in memory: train and test images with integer labels.

    Args:
        x_train: training inputs, first axis the examples (e.g. uint8 images).
        y_train: integer training labels in `[0, num_classes)`.
        x_test: test inputs.
        y_test: integer test labels.
        num_classes: number of classes (default: `max(label) + 1`).
        name: a name for reports.

    Example:

    >>> import numpy as np
    >>> from keras_ewc.continual import ArrayDataset
    >>> data = ArrayDataset(np.zeros((4, 2, 2)), np.array([0, 1, 2, 1]),
    ...                     np.zeros((2, 2, 2)), np.array([2, 0]))
    >>> data.num_classes
    3
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None
    name: str = "arrays"

    def __post_init__(self):
        self.x_train = np.asarray(self.x_train)
        self.x_test = np.asarray(self.x_test)
        self.y_train = _labels(self.y_train, "y_train")
        self.y_test = _labels(self.y_test, "y_test")
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if len(x) != len(y):
                raise ValueError(
                    f"x_{part} and y_{part} differ in length. "
                    f"Received: len(x_{part})={len(x)}, len(y_{part})={len(y)}"
                )
            if len(x) == 0:
                raise ValueError(f"Expected a non-empty x_{part}. Received: 0 examples")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                "Train and test inputs differ in shape. Received: "
                f"x_train.shape[1:]={self.x_train.shape[1:]}, "
                f"x_test.shape[1:]={self.x_test.shape[1:]}"
            )
        top = int(max(self.y_train.max(), self.y_test.max())) + 1
        if self.num_classes is None:
            self.num_classes = top
        elif top > self.num_classes:
            raise ValueError(
                f"Labels exceed num_classes: the largest label is {top - 1}. "
                f"Received: num_classes={self.num_classes}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    y = y.reshape(len(y))
    if y.size and (not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y))):
        raise ValueError(f"Expected integer class labels in {name}. Received: dtype={y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"Expected labels >= 0 in {name}. Received: min label {y.min()}")
    return y


def bundled_path() -> str:
    """Returns the path of the bundled Fashion-MNIST subset."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "data", BUNDLED_FILE)


def load_bundled() -> ArrayDataset:
    """Loads the Fashion-MNIST subset bundled with the package (600 + 100 images a class).

    Example:

    >>> from keras_ewc.continual import load_bundled
    >>> data = load_bundled()
    >>> data.x_train.shape, data.num_classes
    ((6000, 28, 28), 10)
    """
    path = bundled_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"The bundled dataset is missing from the installation: {path!r}. Reinstall "
            "keras-ewc, or rebuild it with scripts/make_bundled_dataset.py."
        )
    with np.load(path) as f:
        return ArrayDataset(f["x_train"], f["y_train"], f["x_test"], f["y_test"],
                            num_classes=10, name="fashion_mnist_subset")


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> ArrayDataset:
    """Loads the `train` and `test` splits of a TensorFlow Datasets image dataset.

    Uses `tfds.load(name, split=["train", "test"], as_supervised=True)`, so the dataset
    is downloaded and prepared on first use (network needed once).

    Args:
        name: a TFDS name, e.g. `"mnist"`, `"fashion_mnist"`, `"kmnist"`.
        data_dir: where TFDS keeps its data (default: TFDS' own default).
        download: whether TFDS may download and prepare the data.

    Example:

    >>> from keras_ewc.continual import load_tfds
    >>> data = load_tfds("mnist")  # doctest: +SKIP
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"Loading the TFDS dataset {name!r} needs tensorflow-datasets: "
            "pip install 'keras-ewc[examples]'"
        ) from e
    builder_name = name.split(":")[0].split("/")[0]
    if builder_name not in tfds.list_builders():
        raise ValueError(
            f"Unknown dataset. Expected 'bundled', a directory of MNIST-format IDX files, "
            f"or a TensorFlow Datasets name such as 'mnist'. Received: dataset={name!r}"
        )
    try:
        train, test = tfds.load(name, split=["train", "test"], as_supervised=True,
                                data_dir=data_dir, download=download)
    except Exception as e:  # download, preparation and split errors come in many types
        raise RuntimeError(
            f"Could not load the TFDS dataset {name!r} (train and test splits). It is "
            "downloaded and prepared on first use, which needs network access; offline, "
            "use dataset='bundled' or a directory of IDX files. Cause: "
            f"{type(e).__name__}: {e}"
        ) from e
    # Batches of a fixed size rather than `batch_size=-1`: the latter needs the split's
    # size up front, which streamed and mocked datasets do not always report.
    x_train, y_train = _collect(train)
    x_test, y_test = _collect(test)
    info_classes = None
    features = tfds.builder(name, data_dir=data_dir).info.features
    label = features["label"] if "label" in features else None  # noqa: SIM401
    if isinstance(label, tfds.features.ClassLabel):
        info_classes = label.num_classes
    # MNIST-like images come as (28, 28, 1); drop a single channel so every source agrees.
    if x_train.ndim == 4 and x_train.shape[-1] == 1:
        x_train, x_test = x_train[..., 0], x_test[..., 0]
    return ArrayDataset(x_train, np.asarray(y_train), x_test, np.asarray(y_test),
                        num_classes=info_classes, name=name)


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in ds.batch(4096).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("The TFDS split is empty.")
    return np.concatenate(xs), np.concatenate(ys)


def load_dataset(source: Any = None, data_dir: str | None = None) -> ArrayDataset:
    """Loads a dataset for a task sequence from any supported source.

    Args:
        source: one of
            - `None` or `"bundled"`: the bundled Fashion-MNIST subset (offline);
            - a directory path, or `"idx:<directory>"`: MNIST-format IDX files
              (`train-images-idx3-ubyte[.gz]` and the three others);
            - a TensorFlow Datasets name, or `"tfds:<name>"`, e.g. `"mnist"`;
            - a tuple `((x_train, y_train), (x_test, y_test))` of numpy arrays or of
              `tf.data.Dataset`s yielding `(x, y)` (batched or not);
            - an `ArrayDataset`.
        data_dir: TFDS data directory, for TFDS names.

    Returns:
        An `ArrayDataset`.

    Example:

    >>> from keras_ewc.continual import load_dataset
    >>> load_dataset("bundled").name
    'fashion_mnist_subset'
    """
    if isinstance(source, ArrayDataset):
        return source
    if source is None or (isinstance(source, str) and source in (BUNDLED, "fashion_mnist_subset")):
        return load_bundled()
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if source.startswith("idx:"):
            return _load_idx(source[4:])
        if source.startswith("tfds:"):
            return load_tfds(source[5:], data_dir=data_dir)
        if os.path.isdir(source) or os.sep in source or source.startswith("."):
            return _load_idx(source)
        return load_tfds(source, data_dir=data_dir)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        (train, test) = source
        x_train, y_train = _to_arrays(train, "train")
        x_test, y_test = _to_arrays(test, "test")
        return ArrayDataset(x_train, y_train, x_test, y_test)
    raise ValueError(
        "Unsupported dataset. Expected 'bundled', a directory of IDX files, a TFDS name, "
        "((x_train, y_train), (x_test, y_test)) or an ArrayDataset. "
        f"Received: {type(source).__name__}"
    )


def _load_idx(directory: str) -> ArrayDataset:
    from keras_ewc.continual.idx import load_idx_dataset

    (x_train, y_train), (x_test, y_test) = load_idx_dataset(directory)
    return ArrayDataset(x_train, y_train, x_test, y_test,
                        name=os.path.basename(os.path.normpath(directory)))


def _to_arrays(part, name: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    if isinstance(part, tf.data.Dataset):
        xs, ys = [], []
        x_spec, y_spec = part.element_spec[0].shape, part.element_spec[1].shape
        # Batched when labels carry a leading axis shared with the inputs (unknown, or
        # equal); unbatched one-hot labels have a class axis the images do not share.
        batched = len(y_spec) >= 1 and len(x_spec) >= 1 and (
            y_spec[0] is None or y_spec[0] == x_spec[0])
        for x, y in part.as_numpy_iterator():
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ValueError(f"The {name} dataset is empty.")
        if batched:
            return np.concatenate(xs), np.concatenate(ys)
        return np.stack(xs), np.stack(ys)
    if isinstance(part, (tuple, list)) and len(part) == 2:
        return np.asarray(part[0]), np.asarray(part[1])
    raise ValueError(
        f"Expected the {name} part as (x, y) arrays or a tf.data.Dataset of (x, y). "
        f"Received: {type(part).__name__}"
    )
