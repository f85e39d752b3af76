"""Data: MNIST from TensorFlow Datasets (offline through its manual dir), validation, tf.data input.

The one `preprocess` below is used by the training input pipeline and by every serving signature
(components/exporter.py), so training and serving cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from components.files import sha256

log = logging.getLogger(__name__)

DATASET = "mnist"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}


class DataError(RuntimeError):
    """The data cannot be had or is not what the pipeline expects. The message says what to do."""


class DataDiskFull(DataError):
    """Preparing the data ran out of disk space: exit 6, as every other full disk."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: images uint8 [N, 28, 28], labels int64 [N]."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return Split(self.name, self.images[:n], self.labels[:n])


def preprocess(images: tf.Tensor) -> tf.Tensor:
    """uint8 pixels 0..255 -> float32 in [0, 1]. The only normalisation in the project."""
    return tf.cast(images, tf.float32) / 255.0


# --------------------------------------------------------------------------------------------
# Ingest


def _registered_files() -> dict[str, tuple[int, str]]:
    """{filename: (size, sha256)} as TFDS registers them for its mnist builder."""
    import tensorflow_datasets as tfds

    infos = tfds.builder_cls(DATASET).url_infos or {}
    return {
        info.filename or url.rsplit("/", 1)[-1]: (int(info.size), info.checksum)
        for url, info in infos.items()
    }


def tfds_version() -> str:
    """The version of TFDS's mnist builder (that the prepared files have)."""
    import tensorflow_datasets as tfds

    return str(tfds.builder_cls(DATASET).VERSION)


def verify_manual_dir(manual_dir: Path) -> None:
    """Check the four MNIST files in `manual_dir` against TFDS's registered sizes and SHA-256.

    TFDS does this too, but its NonMatchingChecksumError is long and names URLs; this names the
    file, what it is and what it should be, before anything is prepared.
    """
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise DataError(f"MNIST manual dir {manual_dir} does not exist or is not a folder")
    for name, (size, checksum) in sorted(_registered_files().items()):
        path = manual_dir / name
        if not path.is_file():
            raise DataError(
                f"MNIST manual dir {manual_dir} lacks {name}; it needs the four "
                f"official files (train/t10k images and labels, .gz)"
            )
        actual_size = path.stat().st_size
        if actual_size != size:
            raise DataError(
                f"{path} is {actual_size} bytes, expected {size} "
                f"(sha256 {checksum}): the file is truncated or not the official one"
            )
        actual = sha256(path)
        if actual != checksum:
            raise DataError(
                f"{path} has sha256 {actual}, expected {checksum}: the file is "
                f"corrupt or not the official one"
            )


def load_split(
    split: str,
    *,
    data_dir: Path | None = None,
    manual_dir: Path | None = None,
    limit: int | None = None,
) -> Split:
    """Load one MNIST split through `tfds.load(..., as_supervised=True)` into memory.

    The first call prepares the dataset into `data_dir` (TFDS's default when None), taking the
    raw files from `manual_dir` when given; later calls read the prepared files, through an
    array cache beside them (keyed by the prepared files' names, sizes and times) that loads in
    a fraction of a second. Prepared files that cannot be read (truncated, flipped, missing,
    unparsable metadata) are prepared again from `manual_dir` once; without one, the error
    names the folder to delete.
    """
    try:
        with _quiet_tfds():
            return _load(split, data_dir, manual_dir).take(limit)
    except _Unreadable as e:
        if manual_dir is None:
            raise DataError(
                f"the prepared TFDS files in {e.folder} cannot be read ({e.reason}); delete "
                f"that folder to prepare them again"
            ) from None
        log.warning(
            "the prepared TFDS files in %s cannot be read (%s): preparing them again from %s",
            e.folder,
            e.reason,
            manual_dir,
        )
        shutil.rmtree(e.folder, ignore_errors=True)
        if e.folder.exists():
            raise DataError(
                f"the prepared TFDS files in {e.folder} cannot be read ({e.reason}) and the "
                f"folder cannot be deleted; delete it to prepare them again"
            ) from None
    try:
        with _quiet_tfds():
            return _load(split, data_dir, manual_dir).take(limit)
    except _Unreadable as e:
        raise DataError(
            f"the TFDS files prepared again in {e.folder} cannot be read ({e.reason})"
        ) from None


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's own console output while it prepares: progress bars, a "Downloading and preparing
    dataset Unknown size" print and absl warnings about folders it has not written yet. Our log
    says what happens ("preparing TFDS mnist into ...") in one line. Under --verbose (absl's
    INFO lines shown) TFDS prints as it does."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    absl = logging.getLogger("absl")
    if absl.getEffectiveLevel() < logging.WARNING:
        yield
        return
    level, bars = absl.level, bool(getattr(tqdm_utils, "_active", True))
    absl.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)
        tfds.display_progress_bar(bars)


class _Unreadable(Exception):
    """Prepared TFDS files (or their metadata) that exist but cannot be read."""

    def __init__(self, folder: Path, error: BaseException):
        super().__init__(str(folder))
        self.folder = folder
        self.reason = _reason(error)


# What a damaged prepared file raises when read; any other error (permission denied, disk or
# memory exhausted) is reported as it is, and nothing is deleted.
_UNREADABLE_FILE = (
    tf.errors.DataLossError,
    tf.errors.NotFoundError,
    tf.errors.InvalidArgumentError,
    tf.errors.FailedPreconditionError,
    tf.errors.OutOfRangeError,
)


def _garbled_versions(dataset: Path) -> list[Path]:
    """Version folders of a prepared dataset whose metadata does not parse (TFDS then fails to
    build the dataset); only these are prepared again, never the others or TFDS's work folders."""
    garbled = []
    for info in sorted(dataset.glob("*/dataset_info.json")):
        try:
            json.loads(info.read_text())
        except ValueError:
            garbled.append(info.parent)
        except OSError:
            pass
    return garbled


def _reason(error: BaseException) -> str:
    """`Kind: first line`, without TensorFlow's `{{function_node ...}}` and `[Op:...]` noise."""
    noise = r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\s+name:\s*\S*\s*$"
    text = re.sub(noise, "", str(error), flags=re.MULTILINE).strip()
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0].strip()[:200]}"


def _load(split: str, data_dir: Path | None, manual_dir: Path | None) -> Split:
    import tensorflow_datasets as tfds

    root = Path(data_dir) if data_dir else Path(tfds.core.constants.DATA_DIR)
    try:
        builder = tfds.builder(DATASET, data_dir=str(root))
        prepared = builder.is_prepared()
    except Exception as e:  # TFDS reads the prepared metadata here (JSON, protobuf, IO)
        garbled = _garbled_versions(root / DATASET)
        if garbled:
            raise _Unreadable(garbled[0], e) from None
        raise DataError(_explain_load_failure(e, manual_dir)) from e
    folder = Path(builder.data_dir)
    cached = _read_cache(folder, split) if prepared else None
    if cached is not None:
        return cached
    kwargs = {}
    if not prepared:
        if manual_dir is not None:
            verify_manual_dir(Path(manual_dir))
            kwargs["download_and_prepare_kwargs"] = {
                "download_config": tfds.download.DownloadConfig(manual_dir=str(manual_dir))
            }
        log.info("preparing TFDS %s into %s (later runs read what this writes)", DATASET, folder)
    try:
        ds = tfds.load(DATASET, split=split, as_supervised=True, data_dir=str(root), **kwargs)
        images, labels = _to_numpy(ds)
    except _UNREADABLE_FILE as e:  # reading TFRecords: flipped, truncated, empty, missing
        if prepared:
            raise _Unreadable(folder, e) from None
        raise DataError(_explain_load_failure(e, manual_dir)) from e
    except Exception as e:  # TFDS raises many kinds (download, checksum, IO); all end here
        if _disk_full(e):
            _remove_partial(root)
            raise DataDiskFull(
                f"no space left on device while preparing TFDS '{DATASET}' into {root} (about "
                f"130 MB with its downloads); its partial files were removed: free space and "
                f"run again"
            ) from None
        raise DataError(_explain_load_failure(e, manual_dir)) from e
    split_data = Split(split, images, labels)
    log.info("loaded %s: %d examples", split, len(split_data))
    cache = _cache_path(folder, split)
    if cache is not None:
        _write_cache(cache, split_data)
    return split_data


def _disk_full(error: BaseException) -> bool:
    """Whether a disk-full error is behind `error` (TFDS wraps it, e.g. in an ExtractError
    that keeps only its text; TensorFlow's writers raise ResourceExhaustedError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, tf.errors.ResourceExhaustedError):
            return True
        if any(m in str(seen) for m in ("No space left on device", "Not enough disk space")):
            return True  # the second: TFDS's own check before it prepares
        seen = seen.__cause__ or seen.__context__
    return False


def _remove_partial(root: Path) -> None:
    """What an interrupted TFDS preparation leaves under its data dir: partly copied downloads
    (`*.tmp.*`), partly extracted files and unfinished datasets (`incomplete*`)."""
    leftovers = [*root.glob("downloads/**/*.tmp.*"), *root.glob("downloads/**/incomplete*")]
    leftovers += [*root.glob(f"{DATASET}/**/*incomplete*")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _read_cache(folder: Path, split: str) -> Split | None:
    cache = _cache_path(folder, split)
    if cache is None or not cache.is_file():
        return None
    try:
        with np.load(cache) as arrays:
            split_data = Split(split, arrays["images"], arrays["labels"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        log.warning("array cache %s is unreadable: reading TFDS's files instead", cache)
        return None
    log.info("loaded %s: %d examples (array cache)", split, len(split_data))
    return split_data


def _cache_path(prepared: Path, split: str) -> Path | None:
    """`arrays-<split>-<key>.npz` beside TFDS's prepared files; the key changes with them."""
    try:
        files = sorted(p for p in prepared.iterdir() if ".tfrecord" in p.name)
        key = hashlib.sha256(
            repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()
        ).hexdigest()[:16]
    except OSError:
        return None
    return prepared / f"arrays-{split}-{key}.npz" if files else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _write_cache(path: Path, split: Split) -> None:
    """Best effort: a read-only or full data dir only means no cache."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        for old in path.parent.glob(f"arrays-{split.name}-*.npz"):
            old.unlink()
        for stale in path.parent.glob(f".tmp-*-arrays-{split.name}-*.npz"):  # a killed writer's
            pid = stale.name.split("-")[1]
            if pid.isdigit() and not _process_alive(int(pid)):
                stale.unlink(missing_ok=True)
        np.savez(tmp, images=split.images, labels=split.labels)  # zip: CRC-checked on read
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.info("no array cache for %s (%s)", split.name, e)


def _to_numpy(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    # Large batches: decoding is per example inside TFDS, but the host round-trips are not.
    for x, y in ds.batch(16384).prefetch(2).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    if not images:
        return np.zeros((0, *IMAGE_SHAPE, 1), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


def _explain_load_failure(error: Exception, manual_dir: Path | None) -> str:
    kind = type(error).__name__
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if manual_dir is None:
        return (
            f"could not download or prepare TFDS '{DATASET}' ({kind}: {first_line}). "
            f"Without network access, point --tfds-manual-dir (or MNIST_MANUAL_DIR) at a "
            f"folder holding the four official MNIST .gz files, e.g. ../shared/datasets/mnist"
        )
    return f"could not prepare TFDS '{DATASET}' from manual dir {manual_dir} ({kind}: {first_line})"


# --------------------------------------------------------------------------------------------
# Validation


def validate_split(split: Split, *, expected_count: int | None = None) -> Split:
    """Check what was ingested; return the split with images squeezed to [N, 28, 28].

    Raises DataError naming the first violation: dtype, shape, label range, example count.
    """
    images, labels = np.asarray(split.images), np.asarray(split.labels)
    where = f"{split.name} split"
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images are {images.dtype}, expected uint8")
    if images.ndim != 4 or images.shape[1:] != (*IMAGE_SHAPE, 1):
        raise DataError(
            f"{where}: images have shape {tuple(images.shape[1:])} per example, "
            f"expected (28, 28, 1)"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels are {labels.dtype}, expected integers")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: {bad.size} labels outside 0..9, first at index {i} (label {int(labels[i])})"
        )
    if expected_count is not None and images.shape[0] != expected_count:
        raise DataError(f"{where}: {images.shape[0]} examples, expected {expected_count}")
    if images.shape[0] == 0:
        raise DataError(f"{where}: no examples")
    return Split(split.name, images.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64))


# --------------------------------------------------------------------------------------------
# tf.data


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return -(-len(split) // batch_size)


def epoch_order(n: int, seed: int, epoch: tf.Tensor | int) -> tf.Tensor:
    """The order of pass `epoch` over n examples: a permutation that depends only on (seed,
    epoch), so a run resumed at epoch k sees exactly the batches an uninterrupted run saw."""
    pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=pair)


def make_train_dataset(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: tf.Variable,
    steps_per_element: int = 1,
) -> tf.data.Dataset:
    """One shuffled pass over `split` per iteration: each example once, the last batch partial.

    Keras iterates the dataset afresh at every epoch (no `steps_per_epoch`), so an epoch is
    exactly one pass whatever `steps_per_execution` is; Keras's multi-step loop stops at the end
    of the data. The pass's order is read from `epoch` (an int64 variable the trainer sets at
    each epoch start) when the iterator starts. Batches are gathered from the in-memory arrays
    and normalised by the shared `preprocess`, one op per batch rather than per example.

    `steps_per_element` k > 1: each element holds the examples of k consecutive batches (the
    last element fewer), for a train step that splits it into batches of `batch_size` in the
    graph (components/trainer.py): the same batches in the same order, one `get_next` per k
    steps instead of one per step.
    """
    images, labels, n = tf.constant(split.images), tf.constant(split.labels), len(split)

    @tf.autograph.experimental.do_not_convert  # (see _gather_batch)
    def one_pass(_: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(epoch_order(n, seed, epoch.read_value()))

    ds = tf.data.Dataset.from_tensors(0).flat_map(one_pass).batch(batch_size * steps_per_element)
    ds = ds.map(
        _gather_batch(images, labels), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    # flat_map forgets the length; Keras sizes the epoch (and its progress bar) from it.
    elements = -(-n // (batch_size * steps_per_element))
    ds = ds.apply(tf.data.experimental.assert_cardinality(elements))
    return _finish(ds)


def make_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """The examples in order, batched and normalised: validation, evaluation, prediction."""
    images, labels = tf.constant(split.images), tf.constant(split.labels)
    ds = tf.data.Dataset.range(len(split)).batch(batch_size)
    ds = ds.map(
        _gather_batch(images, labels), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return _finish(ds)


def _gather_batch(
    images: tf.Tensor, labels: tf.Tensor
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """The examples at `idx`, normalised. Not converted by AutoGraph (tf.data converts every
    function it traces, ~0.1 s each here): none of the dataset functions has Python control
    flow over tensors."""

    @tf.autograph.experimental.do_not_convert
    def gather(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess(tf.gather(images, idx)), tf.gather(labels, idx)

    return gather


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class EmptyHoldOut(ValueError):
    """A validation fraction that leaves no example on one side of the split; `advice`: which
    way to change it."""

    def __init__(self, message: str, advice: str):
        super().__init__(message)
        self.advice = advice


def carve_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out `fraction` (> 0) of a split with a fixed seed: (rest, held_out); EmptyHoldOut
    when either side would be empty."""
    n = len(split)
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise EmptyHoldOut(
            f"{fraction:g} of {n} training examples leaves {n_val} for validation and "
            f"{n - n_val} for training",
            "use a larger fraction" if n_val == 0 else "use a smaller fraction",
        )
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        Split(split.name, split.images[train_idx], split.labels[train_idx]),
        Split(f"{split.name}-validation", split.images[val_idx], split.labels[val_idx]),
    )
