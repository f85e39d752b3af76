"""Data: TFDS loading (mock), validation, the tf.data pipeline, manual-dir checksums."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from components import data
from components.data import DataError, Split
from tests.conftest import make_digits


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


def test_dataset_batches_shapes_dtypes_range():
    split = data.validate_split(make_digits(100))
    ds = data.make_dataset(split, 32, shuffle=True, seed=0)
    assert ds.cardinality().numpy() == 4 == data.steps_per_epoch(split, 32)
    batches = list(ds.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.shape == (32, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    # every example exactly once per epoch
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen) == sorted(split.labels)


def _epoch_orders(split, seed, epochs, start_epoch=0):
    ds = data.make_dataset(split, len(split), shuffle=True, seed=seed, epochs=epochs,
                           start_epoch=start_epoch)
    return [y.tolist() for _, y in ds.as_numpy_iterator()]


def test_shuffle_is_seeded_per_epoch_and_resumable():
    split = data.validate_split(make_digits(64))
    orders = _epoch_orders(split, 3, epochs=3)
    assert len(orders) == 3 and orders[0] != orders[1] != orders[2]
    assert orders == _epoch_orders(split, 3, epochs=3)
    assert orders[1:] == _epoch_orders(split, 3, epochs=3, start_epoch=1)  # resume at epoch 1
    assert orders != _epoch_orders(split, 4, epochs=3)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: Split(s.name, s.images, np.where(np.arange(len(s)) == 5, 10, s.labels)),
     "labels outside 0..9, first at index 5 \\(label 10\\)"),
    (lambda s: Split(s.name, s.images, np.where(np.arange(len(s)) == 3, -1, s.labels)),
     "first at index 3 \\(label -1\\)"),
    (lambda s: Split(s.name, s.images[:, :27], s.labels), "shape \\(27, 28, 1\\)"),
    (lambda s: Split(s.name, s.images.astype(np.float32), s.labels), "float32, expected uint8"),
    (lambda s: Split(s.name, s.images, s.labels[:-1]), "19 labels for 20 images"),
])
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
