"""Task sequences: permutations fixed by seed, splits disjoint and complete, rotations."""

import numpy as np
import pytest

from keras_ewc.continual import (
    ArrayDataset,
    class_splits,
    make_sequence,
    permutations,
    permuted_sequence,
    rotate_images,
    rotated_sequence,
    split_sequence,
)


def tiny(num_classes=6, per_class=4, shape=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class)
    x = rng.integers(0, 256, size=(len(y),) + shape, dtype=np.uint8)
    yt = np.arange(num_classes)
    xt = rng.integers(0, 256, size=(num_classes,) + shape, dtype=np.uint8)
    return ArrayDataset(x, y, xt, yt, name="tiny")


def test_permutations_fixed_by_seed_and_independent_of_length():
    a = permutations(16, 3, seed=7)
    b = permutations(16, 5, seed=7)
    c = permutations(16, 3, seed=8)
    assert np.array_equal(a[0], np.arange(16))  # first task is the identity
    for p, q in zip(a, b):
        assert np.array_equal(p, q)
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], a[2])
    for p in b:
        assert sorted(p.tolist()) == list(range(16))
    assert not np.array_equal(permutations(16, 1, first_identity=False)[0], np.arange(16))


def test_permuted_sequence_applies_its_permutation_to_pixels():
    data = tiny()
    seq = permuted_sequence(data, num_tasks=3, seed=3)
    perms = permutations(16, 3, seed=3)
    for t, task in enumerate(seq):
        flat = data.x_train.reshape(len(data.x_train), -1)
        assert np.array_equal(task.raw_x_train.reshape(len(flat), -1), flat[:, perms[t]])
        assert np.array_equal(task.y_train, data.y_train)  # Domain-IL keeps labels
    assert seq.num_outputs == 6
    assert np.allclose(seq[0].x_train, data.x_train / 255.0)


def test_permuted_task_and_class_il_give_each_task_its_own_units():
    data = tiny()
    for scenario in ("task", "class"):
        seq = permuted_sequence(data, num_tasks=3, scenario=scenario)
        assert seq.num_outputs == 18
        assert seq[2].classes == tuple(range(12, 18))
        assert np.array_equal(seq[2].y_train, data.y_train + 12)
    seq = permuted_sequence(data, num_tasks=3, scenario="task")
    assert seq.active_mask(1).tolist() == [0.0] * 6 + [1.0] * 6 + [0.0] * 6
    assert permuted_sequence(data, 3, "class").active_mask(1).tolist() == [1.0] * 18


@pytest.mark.parametrize("num_classes,num_tasks", [(10, 5), (10, 3), (6, 6), (7, 2)])
def test_class_splits_disjoint_and_complete(num_classes, num_tasks):
    groups = class_splits(num_classes, num_tasks)
    flat = [c for g in groups for c in g]
    assert sorted(flat) == list(range(num_classes))
    assert len(flat) == len(set(flat))
    assert len(groups) == num_tasks
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_class_splits_order_and_errors():
    assert class_splits(4, 2, [3, 1, 0, 2]) == [(3, 1), (0, 2)]
    with pytest.raises(ValueError, match="More tasks than classes allow.*num_tasks=11"):
        class_splits(10, 11)
    with pytest.raises(ValueError, match="permutation of 0..3"):
        class_splits(4, 2, [0, 1, 1, 2])
    with pytest.raises(ValueError, match="num_tasks >= 1"):
        class_splits(4, 0)


def test_split_sequence_labels_per_scenario():
    data = tiny(num_classes=6)
    task_il = split_sequence(data, num_tasks=3, scenario="task")
    assert [t.classes for t in task_il] == [(0, 1), (2, 3), (4, 5)]
    assert sorted(set(task_il[1].y_train)) == [2, 3]
    assert len(task_il[1].y_train) == 8 and len(task_il[1].y_test) == 2
    assert task_il.num_outputs == 6
    assert task_il.active_mask(2).tolist() == [0, 0, 0, 0, 1, 1]
    domain = split_sequence(data, num_tasks=3, scenario="domain")
    assert domain.num_outputs == 2
    assert sorted(set(domain[2].y_train)) == [0, 1]
    # Same images as Task-IL, labels relabelled by position within the task.
    assert np.array_equal(domain[2].raw_x_train, task_il[2].raw_x_train)
    assert np.array_equal(domain[2].y_train, task_il[2].y_train - 4)
    klass = split_sequence(data, num_tasks=3, scenario="Class-IL")
    assert klass.scenario == "class" and klass.active_mask(0).tolist() == [1] * 6
    # Every training example lands in exactly one task.
    assert sum(len(t.y_train) for t in task_il) == len(data.y_train)


def test_split_sequence_seed_shuffles_classes():
    seq = split_sequence(tiny(), num_tasks=3, seed=1)
    expected = np.random.default_rng(1).permutation(6).tolist()
    assert [c for t in seq for c in t.classes] == expected


def test_rotate_images_matches_rot90_and_keeps_dtype():
    x = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    assert np.array_equal(rotate_images(x, 90), np.rot90(x, 1, axes=(1, 2)))
    assert np.array_equal(rotate_images(x, 180), np.rot90(x, 2, axes=(1, 2)))
    assert rotate_images(x, 33).dtype == np.uint8
    assert np.array_equal(rotate_images(x, 0), x)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        rotate_images(np.zeros((3, 4)), 10)


def test_rotated_sequence_angles():
    seq = rotated_sequence(tiny(), num_tasks=4, max_angle=180)
    assert seq.task_names == ["rotation 0°", "rotation 45°", "rotation 90°", "rotation 135°"]
    assert np.array_equal(seq[2].raw_x_test, np.rot90(tiny().x_test, 1, axes=(1, 2)))


def test_make_sequence_defaults_and_bad_input():
    assert make_sequence("split", tiny(), 3).scenario == "task"
    assert make_sequence("rotated", tiny(), 2).scenario == "domain"
    with pytest.raises(ValueError, match="Unknown task sequence.*'shuffled'"):
        make_sequence("shuffled", tiny(), 2)
    with pytest.raises(ValueError, match="Unknown scenario.*'instance'"):
        make_sequence("split", tiny(), 2, scenario="instance")
    with pytest.raises(ValueError, match="More tasks than classes allow"):
        make_sequence("split", tiny(num_classes=6), 7)


def test_task_dataset_batches_scaled_floats():
    task = split_sequence(tiny(), num_tasks=3)[0]
    batches = list(task.dataset("test", batch_size=1))
    assert len(batches) == 2
    x, _ = batches[0]
    assert x.dtype.name == "float32" and float(x.numpy().max()) <= 1.0
    assert np.allclose(x.numpy()[0], task.raw_x_test[0] / 255.0)
    assert len(list(task.dataset("train", batch_size=3, limit=5))) == 2
    with pytest.raises(ValueError, match="'valid'"):
        task.dataset("valid")


def test_task_dataset_does_not_autotune():
    """Autotuning made the iterator's destruction at the end of an epoch stall for
    seconds; the datasets of the toolkit keep fixed buffers."""
    task = split_sequence(tiny(), num_tasks=3)[0]
    for ds in (task.dataset("train", batch_size=2), task.dataset("test", shuffle=False)):
        assert ds.options().autotune.enabled is False
