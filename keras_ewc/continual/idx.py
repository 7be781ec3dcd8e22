"""Readers for MNIST-format IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import os

import numpy as np

# IDX type codes (http://yann.lecun.com/exdb/mnist/), big-endian on disk.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Names used by MNIST, Fashion-MNIST and KMNIST; the `-ubyte` and `.` variants cover the
# renamed copies found in the wild.
SPLIT_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a numpy array.

    Args:
        path: path of the file; a `.gz` suffix, or gzip magic bytes, mean gzip.

    Returns:
        The array, in native byte order, with the shape stored in the header.

    Example:

    >>> import numpy as np
    >>> from keras_ewc.continual.idx import read_idx, write_idx
    >>> path = "labels-idx1-ubyte"
    >>> write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
    >>> read_idx(path).tolist()
    [3, 1, 4]
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"IDX file not found. Received: path={path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(
            "Not an IDX file: expected magic bytes 00 00 <type> <ndim>. "
            f"Received: first bytes {raw[:4]!r} in path={path!r}"
        )
    dtype = _DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"Truncated or corrupt IDX file: header says shape {shape} "
            f"({expected} bytes), file holds {len(raw) - header} bytes. "
            f"Received: path={path!r}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes `array` as an IDX file, gzip-compressed when `path` ends in `.gz`.

    Args:
        path: destination path.
        array: a numpy array of uint8, int8, int16, int32, float32 or float64.

    Example:

    >>> import numpy as np
    >>> from keras_ewc.continual.idx import write_idx
    >>> write_idx("x.gz", np.zeros((2, 3), np.uint8))
    """
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
    key = array.dtype.newbyteorder("=")
    if key not in codes:
        raise ValueError(
            f"Unsupported dtype for IDX. Expected one of {sorted(str(d) for d in codes)}. "
            f"Received: dtype={array.dtype}"
        )
    header = bytes([0, 0, codes[key], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    body = header + array.astype(_DTYPES[codes[key]]).tobytes()
    if path.endswith(".gz"):
        # mtime=0 keeps the output byte-identical from run to run.
        body = gzip.compress(body, mtime=0)
    with open(path, "wb") as f:
        f.write(body)


def find_idx_file(directory: str, split: str) -> str:
    """Returns the path of one of the four MNIST-format files in `directory`."""
    tried = []
    for stem in SPLIT_FILES[split]:
        for name in (stem, stem + ".gz"):
            path = os.path.join(directory, name)
            tried.append(name)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(
        f"Missing IDX file for {split!r} in directory {directory!r}. Expected one of: "
        f"{', '.join(tried)}. An MNIST-format directory holds train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
        "(each optionally .gz)."
    )


def load_idx_dataset(
    directory: str,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads an MNIST-format directory as `(x_train, y_train), (x_test, y_test)`.

    Args:
        directory: a directory with the four MNIST-format IDX files, gzipped or not.

    Returns:
        `((x_train, y_train), (x_test, y_test))` as numpy arrays, as
        `keras.datasets.mnist.load_data()` returns them.

    Example:

    >>> from keras_ewc.continual.idx import load_idx_dataset
    >>> (x, y), (xt, yt) = load_idx_dataset("path/to/fashion-mnist")  # doctest: +SKIP
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"IDX dataset directory not found. Received: directory={directory!r}"
        )
    # Find all four before reading any, so a missing file is reported first and fast.
    paths = {split: find_idx_file(directory, split) for split in SPLIT_FILES}
    arrays = {split: read_idx(path) for split, path in paths.items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if len(x) != len(y):
            raise ValueError(
                f"The {part} images and labels differ in length: {len(x)} images, "
                f"{len(y)} labels, in directory {directory!r}."
            )
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
