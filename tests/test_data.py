"""Data: TFDS loading (mock), validation, the tf.data pipeline, manual-dir checksums."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from components import data
from components.data import DataError, Split
from tests.helpers import make_digits


def test_load_split_through_tfds_mock():
    with tfds.testing.mock_data(num_examples=40):
        split = data.load_split("train")
    assert split.images.shape == (40, 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (40,) and split.labels.min() >= 0 and split.labels.max() <= 9
    validated = data.validate_split(split)
    assert validated.images.shape == (40, 28, 28)


def test_load_split_limit():
    with tfds.testing.mock_data(num_examples=40):
        assert len(data.load_split("test", limit=7)) == 7


def test_preprocess_range_and_dtype():
    x = data.preprocess(tf.constant([[0, 51, 255]], tf.uint8)).numpy()
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.0, 0.2, 1.0]])


def _pass(split, batch_size, seed=0, epoch=0):
    ds = data.make_train_dataset(
        split, batch_size, seed=seed, epoch=tf.Variable(epoch, dtype=tf.int64)
    )
    return ds, list(ds.as_numpy_iterator())


def test_train_dataset_is_one_pass_with_a_partial_last_batch():
    split = data.validate_split(make_digits(100))
    ds, batches = _pass(split, 32)
    assert ds.cardinality().numpy() == 4 == data.steps_per_epoch(split, 32)
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.shape == (32, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    # every example exactly once per pass: the images identify the examples
    seen = np.concatenate([x for x, _ in batches])
    expected = data.preprocess(split.images).numpy()
    assert sorted(map(bytes, seen)) == sorted(map(bytes, expected))


def test_pass_order_depends_only_on_seed_and_epoch():
    split = data.validate_split(make_digits(64))
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = data.make_train_dataset(split, 64, seed=3, epoch=epoch)
    orders = []
    for e in (0, 1, 2, 1):
        epoch.assign(e)  # what the trainer does at each epoch start
        orders.append(next(iter(ds))[1].numpy().tolist())
    assert orders[0] != orders[1] != orders[2] and orders[1] == orders[3]
    assert orders[1] == _pass(split, 64, seed=3, epoch=1)[1][0][1].tolist()  # a resumed run
    assert orders[1] != _pass(split, 64, seed=4, epoch=1)[1][0][1].tolist()
    order = data.epoch_order(64, 3, 1).numpy()
    assert orders[1] == split.labels[order].tolist()


def test_eval_dataset_keeps_the_order():
    split = data.validate_split(make_digits(50))
    ys = np.concatenate([y for _, y in data.make_dataset(split, 16).as_numpy_iterator()])
    assert ys.tolist() == split.labels.tolist()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda s: Split(s.name, s.images, np.where(np.arange(len(s)) == 5, 10, s.labels)),
            "labels outside 0..9, first at index 5 \\(label 10\\)",
        ),
        (
            lambda s: Split(s.name, s.images, np.where(np.arange(len(s)) == 3, -1, s.labels)),
            "first at index 3 \\(label -1\\)",
        ),
        (lambda s: Split(s.name, s.images[:, :27], s.labels), "shape \\(27, 28, 1\\)"),
        (lambda s: Split(s.name, s.images.astype(np.float32), s.labels), "float32, expected uint8"),
        (lambda s: Split(s.name, s.images, s.labels[:-1]), "19 labels for 20 images"),
    ],
)
def test_validation_names_the_violation(mutate, message):
    with pytest.raises(DataError, match=message):
        data.validate_split(mutate(make_digits(20)))


def test_validation_checks_the_expected_count():
    with pytest.raises(DataError, match="20 examples, expected 60000"):
        data.validate_split(make_digits(20), expected_count=60000)


def test_carve_validation_is_disjoint_and_seeded():
    split = make_digits(100)
    rest, val = data.carve_validation(split, 0.2, seed=0)
    assert (len(rest), len(val)) == (80, 20)
    rest2, val2 = data.carve_validation(split, 0.2, seed=0)
    np.testing.assert_array_equal(val.labels, val2.labels)
    both = np.concatenate([rest.images, val.images]).reshape(100, -1)
    assert len(np.unique(both, axis=0)) == 100


def test_manual_dir_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="lacks t10k-images-idx3-ubyte.gz"):
        data.verify_manual_dir(tmp_path)


def test_manual_dir_corrupt_file_is_named_with_expected_checksum(tmp_path):
    files = data._registered_files()
    for name, (size, _) in files.items():
        (tmp_path / name).write_bytes(b"\0" * size)
    name = sorted(files)[0]
    with pytest.raises(DataError, match=f"{name} has sha256 .*, expected {files[name][1]}"):
        data.verify_manual_dir(tmp_path)


def test_manual_dir_truncated_file_is_named(tmp_path):
    files = data._registered_files()
    name = sorted(files)[0]
    (tmp_path / name).write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=f"{name} is 100 bytes, expected {files[name][0]}"):
        data.verify_manual_dir(tmp_path)


def test_missing_manual_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.verify_manual_dir(tmp_path / "nope")
