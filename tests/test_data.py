"""Data: TFDS loading (mock), validation, the tf.data pipeline, manual-dir checksums."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from components import data
from components.data import DataError, Split
from tests.helpers import (
    ROOT,
    SHARED_MNIST,
    make_digits,
    requires_mnist,
    small_run_flags,
    train_cmd,
)


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


@pytest.mark.parametrize(
    ("fraction", "why", "advice"),
    [
        (0.001, "leaves 0 for validation and 100", "use a larger fraction"),
        (0.999, "leaves 100 for validation and 0", "use a smaller fraction"),
    ],
)
def test_carve_validation_refuses_an_empty_side(fraction, why, advice):
    with pytest.raises(data.EmptyHoldOut, match=why) as raised:
        data.carve_validation(make_digits(100), fraction, seed=0)
    assert raised.value.advice == advice


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


# ------------------------------------------------------------ prepared TFDS files gone bad


def _prepared_copy(tmp_path):
    """A data dir with MNIST prepared from the shared manual dir, without the array cache (so
    the prepared TFRecords themselves are read)."""

    root = Path(tmp_path) / "tfds"
    data.load_split("test", data_dir=root, manual_dir=SHARED_MNIST)
    (folder,) = (root / "mnist").iterdir()
    for cache in folder.glob("arrays-*.npz"):
        cache.unlink()
    return root, folder


def _flip_middle(path):
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 4096] = bytes(b ^ 0xFF for b in blob[middle : middle + 4096])
    path.write_bytes(bytes(blob))


CORRUPTIONS = {
    "flipped": lambda folder: _flip_middle(next(folder.glob("mnist-train.tfrecord*"))),
    "truncated": lambda folder: (lambda p: p.write_bytes(p.read_bytes()[:100_000]))(
        next(folder.glob("mnist-test.tfrecord*"))
    ),
    "missing": lambda folder: next(folder.glob("mnist-test.tfrecord*")).unlink(),
    "metadata": lambda folder: (folder / "dataset_info.json").write_text('{"name": '),
}


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_prepared_files_without_a_manual_dir_name_the_folder(tmp_path, corruption):
    root, folder = _prepared_copy(tmp_path)
    CORRUPTIONS[corruption](folder)
    with pytest.raises(DataError, match="delete that folder to prepare them again") as raised:
        for split in ("train", "test"):
            data.load_split(split, data_dir=root)
    message = str(raised.value)
    assert str(root / "mnist") in message and "{{" not in message and "[Op:" not in message


@requires_mnist
@pytest.mark.slow
def test_a_run_on_corrupted_prepared_files_prepares_them_again(tmp_path):
    import subprocess
    import sys

    root, folder = _prepared_copy(tmp_path)
    _flip_middle(next(folder.glob("mnist-train.tfrecord*")))
    r = subprocess.run(
        train_cmd(
            tmp_path / "artifacts",
            "--epochs",
            "1",
            *small_run_flags(2000),
            "--tfds-data-dir",
            str(root),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "cannot be read (DataLossError: corrupted record at" in r.stderr
    assert "preparing them again from" in r.stderr
    assert "Downloading and preparing" not in r.stdout and "absl" not in r.stderr  # TFDS's noise
    # Prepared again: the same 60,000 + 10,000 official examples, readable as TFRecords.
    assert len(data.load_split("train", data_dir=root)) == 60_000

    # Without a manual dir the same corruption is one line and the data exit code.
    for cache in folder.glob("arrays-*.npz"):
        cache.unlink()
    _flip_middle(next(folder.glob("mnist-train.tfrecord*")))
    flags = small_run_flags(2000)
    del flags[flags.index("--tfds-manual-dir") : flags.index("--tfds-manual-dir") + 2]
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--epochs", "1", *flags]
        + ["--tfds-data-dir", str(root), "--artifacts-dir", str(tmp_path / "artifacts2")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MNIST_MANUAL_DIR"},
    )
    assert r.returncode == 4, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data: the prepared TFDS files in {folder} cannot be read")
    assert "Traceback" not in r.stderr


@requires_mnist
@pytest.mark.slow
def test_errors_that_are_not_damage_delete_nothing(tmp_path, monkeypatch):
    """A permission error or a full disk while reading is reported as it is: the prepared
    files are not deleted and prepared again (that would not help, and costs the data)."""
    root, folder = _prepared_copy(tmp_path)
    before = sorted(p.name for p in folder.iterdir())

    def denied(ds):
        raise tf.errors.PermissionDeniedError(None, None, "permission denied: mnist-train")

    monkeypatch.setattr(data, "_to_numpy", denied)
    with pytest.raises(DataError, match="PermissionDeniedError"):
        data.load_split("train", data_dir=root, manual_dir=SHARED_MNIST)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_full_disk_while_preparing_is_exit_6_and_leaves_no_partial_files(tmp_path, monkeypatch):
    """TFDS wraps the disk-full error (an ExtractError keeping only its text) and leaves its
    partial files; they are removed (complete extractions, which TFDS reuses, are kept) and the
    run ends as every full disk does: exit 6, one line."""
    from pipeline.cli import EXIT_PUBLISH, map_error

    root = tmp_path / "tfds"
    partial = [
        root / "downloads" / "mnist" / "train-images.gz.tmp.0af16dd4",
        root / "downloads" / "extracted" / "incomplete.ae4773f0_GZIP.t10k-images.gz",
        root / "mnist" / "3.0.1.incomplete4F2A" / "mnist-train.tfrecord-00000-of-00001",
    ]
    complete = root / "downloads" / "extracted" / "GZIP.train-labels-idx1-ubyte.gz"

    def fill_the_disk(*args, **kwargs):
        for f in [*partial, complete]:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"part")
        raise RuntimeError(f"Error while extracting to {partial[1]}; No space left on device")

    monkeypatch.setattr(tfds, "load", fill_the_disk)
    with pytest.raises(data.DataDiskFull, match="no space left on device while preparing") as e:
        data.load_split("train", data_dir=root)
    assert not any(f.exists() for f in partial) and complete.is_file()
    code, message = map_error(e.value)
    assert code == EXIT_PUBLISH and "\n" not in message
    assert message.startswith("data: no space left on device while preparing TFDS 'mnist'")


def test_a_killed_cache_writers_partial_file_is_removed_by_the_next_writer(tmp_path):
    """A run killed while writing the array cache leaves `.tmp-<pid>-arrays-...`: the next
    cache write removes it (its pid is gone), not one of a writer still alive."""
    import subprocess

    from components import data as data_lib

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-arrays-train-0123456789abcdef.npz"
    stale.write_bytes(b"partial")
    alive = tmp_path / f".tmp-{os.getpid()}-arrays-train-0123456789abcdef.npz"
    alive.write_bytes(b"being written")
    split = data_lib.Split("train", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int64))
    data_lib._write_cache(tmp_path / "arrays-train-fedcba9876543210.npz", split)
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "arrays-train-fedcba9876543210.npz").is_file()


def test_an_npz_that_cannot_be_written_whole_leaves_nothing(tmp_path, monkeypatch):
    from components.files import save_npz

    def full_disk(file, **arrays):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left on device") as raised:
        save_npz(tmp_path / "test_examples.npz", images=np.zeros(3))
    assert raised.value.filename == str(tmp_path / "test_examples.npz")  # the file is named
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [0.5, 0.999])
def test_a_corrupted_array_cache_is_not_trusted(tmp_path, where, caplog):
    """The array cache is a zip whose members are CRC-checked when read: a byte flipped in
    the pixels (mid-file, or in the last bytes read) makes it unreadable, so TFDS's own files
    are read instead, never pixels that are not MNIST's."""
    from components import data as data_lib

    rng = np.random.default_rng(0)
    split = data_lib.Split(
        "train", rng.integers(0, 256, (500, 28, 28), np.uint8), rng.integers(0, 10, 500)
    )
    (tmp_path / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"prepared")
    cache = data_lib._cache_path(tmp_path, "train")
    data_lib._write_cache(cache, split)
    loaded = data_lib._read_cache(tmp_path, "train")
    np.testing.assert_array_equal(loaded.images, split.images)
    raw = bytearray(cache.read_bytes())
    images_at = raw.index(b"images.npy")  # the member's local header; its data follows
    end = raw.index(b"labels.npy") - 30  # where the next local header begins
    offset = images_at + int((end - images_at) * where)
    raw[offset] ^= 0xFF
    cache.write_bytes(bytes(raw))
    assert data_lib._read_cache(tmp_path, "train") is None
    assert "array cache" in caplog.text and "unreadable" in caplog.text
