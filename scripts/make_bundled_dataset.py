"""Build the Fashion-MNIST subset bundled in `keras_ewc/data`.

Takes the directory holding the four Fashion-MNIST IDX files (gzipped or not) and writes a
balanced, seeded subset as a compressed uint8 `.npz`, plus the upstream licence. Running it
twice on the same source gives byte-identical arrays.

Example:

```
python scripts/make_bundled_dataset.py /path/to/fashion-mnist
python scripts/make_bundled_dataset.py /path/to/fashion-mnist --train-per-class 600 \
    --test-per-class 100 --seed 0 --out keras_ewc/data
```
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from keras_ewc.continual.idx import load_idx_dataset

NAME = "fashion_mnist_subset.npz"


def balanced_subset(
    labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Returns sorted indices of `per_class` examples of each class, drawn without replacement."""
    picked = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(
                f"Class {c} has {len(pool)} examples; expected at least "
                f"per_class={per_class}."
            )
        picked.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                               "keras_ewc", "data")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_idx_dataset(args.source)
    rng = np.random.default_rng(args.seed)
    tr = balanced_subset(y_train, args.train_per_class, rng)
    te = balanced_subset(y_test, args.test_per_class, rng)
    arrays = {
        "x_train": x_train[tr].astype(np.uint8),
        "y_train": y_train[tr].astype(np.uint8),
        "x_test": x_test[te].astype(np.uint8),
        "y_test": y_test[te].astype(np.uint8),
        "train_index": tr.astype(np.int32),
        "test_index": te.astype(np.int32),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, NAME)
    np.savez_compressed(path, **arrays)
    licence = os.path.join(args.source, "LICENSE")
    if os.path.exists(licence):
        shutil.copyfile(licence, os.path.join(args.out, "LICENSE.fashion-mnist"))
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(arrays[key].tobytes())
    print(f"wrote {path}: {os.path.getsize(path)} bytes, "
          f"train {len(tr)}, test {len(te)}, arrays sha256 {digest.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
