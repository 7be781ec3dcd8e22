"""Loaders: bundled data, IDX files, TFDS (mocked), arrays and tf.data."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_ewc.continual import (
    ArrayDataset,
    load_bundled,
    load_dataset,
    load_idx_dataset,
    permuted_sequence,
    read_idx,
    write_idx,
)
from keras_ewc.continual.datasets import bundled_path


def write_mnist_dir(directory, gz, n=12, m=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (m, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(m) % 10).astype(np.uint8),
    }
    os.makedirs(directory, exist_ok=True)
    for name, a in arrays.items():
        write_idx(os.path.join(directory, name + (".gz" if gz else "")), a)
    return arrays


def test_bundled_dataset_is_balanced_fashion_mnist():
    data = load_bundled()
    assert data.x_train.shape == (6000, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (1000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [600] * 10
    assert np.bincount(data.y_test).tolist() == [100] * 10
    assert os.path.getsize(bundled_path()) < 3.2e6
    licence = os.path.join(os.path.dirname(bundled_path()), "LICENSE.fashion-mnist")
    with open(licence) as f:
        assert "Zalando" in f.read()
    assert load_dataset(None).name == load_dataset("bundled").name == "fashion_mnist_subset"


def test_idx_roundtrip_gz_and_plain(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    for name in ("a-idx3", "a-idx3.gz"):
        write_idx(str(tmp_path / name), a)
        b = read_idx(str(tmp_path / name))
        assert b.dtype == np.int32 and np.array_equal(a, b)
    with open(tmp_path / "a-idx3.gz", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    # Header: magic 00 00 0C 03, then the big-endian dimensions.
    raw = (tmp_path / "a-idx3").read_bytes()
    assert raw[:16] == bytes([0, 0, 0x0C, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_directory(tmp_path, gz):
    arrays = write_mnist_dir(str(tmp_path), gz)
    (x, _), (_, yt) = load_idx_dataset(str(tmp_path))
    assert np.array_equal(x, arrays["train-images-idx3-ubyte"])
    assert np.array_equal(yt, arrays["t10k-labels-idx1-ubyte"])
    data = load_dataset(str(tmp_path))
    assert data.num_classes == 10 and len(data.y_test) == 5
    assert load_dataset("idx:" + str(tmp_path)).x_train.shape == (12, 28, 28)


def test_missing_idx_file_is_a_clear_error(tmp_path):
    write_mnist_dir(str(tmp_path), gz=True)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="Missing IDX file for 'y_test'.*t10k-labels"):
        load_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_idx_dataset(str(tmp_path / "nowhere"))


def test_corrupt_idx_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="Not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    with open(tmp_path / "short.gz", "wb") as f:
        f.write(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(ValueError, match="Truncated.*shape \\(9,\\)"):
        read_idx(str(tmp_path / "short.gz"))


def test_tfds_load_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        data = load_dataset("mnist")
        named = load_dataset("tfds:fashion_mnist")
    assert data.x_train.shape == (24, 28, 28)  # the single channel is dropped
    assert data.x_test.shape[1:] == (28, 28)
    assert data.num_classes == 10 and data.name == "mnist"
    assert named.name == "fashion_mnist" and named.num_classes == 10
    seq = permuted_sequence(data, num_tasks=2)
    assert seq.input_shape == (28, 28) and len(seq[1].y_train) == 24


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown dataset.*'not_a_dataset'"):
        load_dataset("not_a_dataset")


def test_arrays_and_tf_data_sources():
    rng = np.random.default_rng(0)
    x, y = rng.random((10, 3, 3)).astype("float32"), np.arange(10) % 4
    xt, yt = x[:4], y[:4]
    from_arrays = load_dataset(((x, y), (xt, yt)))
    assert from_arrays.num_classes == 4
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    unbatched = tf.data.Dataset.from_tensor_slices((xt, yt))
    from_ds = load_dataset((batched, unbatched))
    assert np.array_equal(from_ds.x_train, x) and np.array_equal(from_ds.y_test, yt)
    one_hot = tf.data.Dataset.from_tensor_slices((xt, np.eye(4)[yt]))
    assert np.array_equal(load_dataset((batched, one_hot)).y_test, yt)


def test_array_dataset_bad_input():
    with pytest.raises(ValueError,
                       match=r"differ in length.*len\(x_train\)=3, len\(y_train\)=2"):
        ArrayDataset(np.zeros((3, 2)), [0, 1], np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match="largest label is 5.*num_classes=3"):
        ArrayDataset(np.zeros((2, 2)), [0, 5], np.zeros((1, 2)), [0], num_classes=3)
    with pytest.raises(ValueError, match="Unsupported dataset.*int"):
        load_dataset(3)
