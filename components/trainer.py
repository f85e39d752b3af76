"""Trainer: device and tf.distribute strategy choice, Keras fit with TensorBoard and backups."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from components import files
from components.compile_cache import enable as compile_cache_enable
from components.compile_cache import promote as compile_cache_promote
from components.files import sha256

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class BackupError(RuntimeError):
    """A run's backup exists but no copy of it can be read."""


WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"


CHECKSUMS_FILE = "checksums.json"


def _recorded(backup_dir: Path) -> list[dict]:
    """The (weights, metadata, epoch) entries the checksum file vouches for; [] when it is
    missing or unreadable: then no copy is trusted (a backup whose checksums were lost could
    hold anything; the one honest case, a kill between Keras saving epoch 1 and its checksum
    being written, costs that one epoch)."""
    path = backup_dir / CHECKSUMS_FILE
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text())
        return [e for e in (value.get("latest"), value.get("previous")) if isinstance(e, dict)]
    except (OSError, ValueError, AttributeError):
        log.warning("backup checksums %s are unreadable: no copy can be verified", path)
        return []


def _write_synced(path: Path, text: str) -> None:
    """Atomically and durably (fsync): a checksum file must survive what the backup does."""
    files.write_text(path, text, sync=True)


def _verified_epoch(
    weights: Path, metadata: Path, recorded: list[dict], max_epoch: int | None
) -> int | None:
    """The epoch a (weights, metadata) pair resumes at, or None when it is unreadable, does not
    match a recorded checksum, or claims an epoch outside the run's plan."""
    import h5py

    try:
        epoch = json.loads(metadata.read_text())["epoch"]
        with h5py.File(weights, "r"):
            pass
        shas = (sha256(weights), sha256(metadata))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        return None
    if max_epoch is not None and epoch > max_epoch:
        return None
    if not any(
        (e.get("weights_sha256"), e.get("metadata_sha256"), e.get("epoch")) == (*shas, epoch)
        for e in recorded
    ):
        return None
    return epoch


def _first_save_cut_short(backup_dir: Path) -> bool:
    """Keras saved epoch 1 and the run stopped before its checksums were written: no checksum
    file, no previous copy, and the metadata of epoch 1 (or none readable). Anything else
    without checksums is not this moment, and is refused (`_readable_pair`)."""
    if not backup_dir.is_dir() or (backup_dir / CHECKSUMS_FILE).exists():
        return False
    if any((backup_dir / f"{name}.bkp").exists() for name in (WEIGHTS_FILE, METADATA_FILE)):
        return False
    try:
        epoch = json.loads((backup_dir / METADATA_FILE).read_text()).get("epoch")
    except FileNotFoundError:
        epoch = 1 if (backup_dir / WEIGHTS_FILE).exists() else None
    except (OSError, ValueError, AttributeError):
        epoch = 1  # cut short while writing it
    return epoch == 1


def _readable_pair(backup_dir: Path, max_epoch: int | None = None) -> tuple[Path, Path, int] | None:
    """The newest verified (weights, metadata, epoch) in a backup dir: the latest copy, else
    the previous one Keras keeps. None when there is no backup; BackupError when no copy
    passes its checksum and epoch checks."""
    weights, metadata = backup_dir / WEIGHTS_FILE, backup_dir / METADATA_FILE
    if backup_dir.exists() and not backup_dir.is_dir():
        raise BackupError(
            f"{backup_dir} is not a folder (the run's backup belongs there): move it away, or "
            f"pick another --run-name"
        )
    if not weights.exists() and not metadata.exists():
        return None
    if not (backup_dir / CHECKSUMS_FILE).is_file():
        raise BackupError(
            f"the backup in {backup_dir} has no {CHECKSUMS_FILE}, so none of its copies can "
            f"be verified: delete that folder to start this run over, or pick another --run-name"
        )
    recorded = _recorded(backup_dir)
    for w, m in ((weights, metadata), (Path(f"{weights}.bkp"), Path(f"{metadata}.bkp"))):
        epoch = _verified_epoch(w, m, recorded, max_epoch)
        if epoch is not None:
            return w, m, epoch
    raise BackupError(
        f"the backup in {backup_dir} is corrupt (no copy matches its checksum "
        f"and an epoch of this run) and has no good previous copy: delete that "
        f"folder to start this run over, or pick another --run-name"
    )


def resume_epoch(
    backup_dir: Path, restore_from: Path | None = None, epochs: int | None = None
) -> int:
    """The epoch a run resumes at: 0 without a backup. Every saved state carries the SHA-256 of
    its files and its epoch (`checksums.json`); a latest copy that does not match, or claims
    an epoch beyond `epochs`, is replaced by the verified previous copy (Keras keeps one), with
    a warning; when no copy verifies, BackupError: a run never silently starts over.

    `restore_from`: another worker's backup (the chief's) to resume from, read-only; its good
    copy is placed in `backup_dir`, so every worker resumes from the same epoch and weights.
    """
    backup_dir = Path(backup_dir)
    source = Path(restore_from) if restore_from is not None else backup_dir
    if _first_save_cut_short(source):
        log.warning(
            "the backup in %s holds epoch 1 without its checksums (the run was stopped while "
            "saving it), so it cannot be verified: training starts over",
            source,
        )
        if source == backup_dir:  # else Keras would restore it
            for name in (WEIGHTS_FILE, METADATA_FILE):
                (backup_dir / name).unlink(missing_ok=True)
        return 0
    found = _readable_pair(source, epochs)
    if found is None:
        return 0
    weights, metadata, epoch = found
    if weights != backup_dir / WEIGHTS_FILE:
        if weights.parent == backup_dir:
            log.warning(
                "the latest backup in %s (%s, %s) does not match its checksum or its epoch "
                "is not this run's; falling back to the previous copy (epoch %d)",
                backup_dir,
                WEIGHTS_FILE,
                METADATA_FILE,
                epoch,
            )
        backup_dir.mkdir(parents=True, exist_ok=True)
        for damaged in (backup_dir / WEIGHTS_FILE, backup_dir / METADATA_FILE):
            # Whatever is there (a folder, a file that cannot be opened) makes way for the copy.
            if damaged.is_dir() and not damaged.is_symlink():
                shutil.rmtree(damaged)
            else:
                damaged.unlink(missing_ok=True)
        shutil.copyfile(weights, backup_dir / WEIGHTS_FILE)
        shutil.copyfile(metadata, backup_dir / METADATA_FILE)
        checksums = {
            "latest": {
                "weights_sha256": sha256(weights),
                "metadata_sha256": sha256(metadata),
                "epoch": epoch,
            }
        }
        _write_synced(backup_dir / CHECKSUMS_FILE, json.dumps(checksums))
        history = source / HISTORY_FILE
        if history.is_file() and history.parent != backup_dir:
            shutil.copyfile(history, backup_dir / HISTORY_FILE)
    return epoch


HISTORY_FILE = "history.json"


def backed_up_history(backup_dir: Path, epochs: int) -> dict[str, list[float | None]]:
    """The per-epoch logs of the first `epochs` epochs, saved beside the backup (a resumed
    run's History holds only the epochs it ran itself). An epoch the file does not hold (it is
    damaged or missing, or cut short) is None in every log, with a warning: never another
    epoch's figures in its place."""
    path = Path(backup_dir) / HISTORY_FILE
    try:
        value = json.loads(files.read_regular(path))
        history = {
            str(k): [None if x is None else float(x) for x in v[:epochs]] for k, v in value.items()
        }
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        history = {}
    if epochs and (not history or any(len(v) < epochs for v in history.values())):
        log.warning(
            "%s does not hold the logs of the first %d epoch(s): they are recorded as unknown "
            "(null)",
            path,
            epochs,
        )
        return {k: [None] * epochs for k in history}
    return history


class BackupChecksums(keras.callbacks.Callback):
    """After Keras's BackupAndRestore saved an epoch: record the SHA-256 of the saved files and
    their epoch, keeping the previous entry (Keras keeps the previous copy as `.bkp`); and the
    epoch logs so far, so that a resumed run reports every epoch."""

    def __init__(self, backup_dir: Path):
        super().__init__()
        self.backup_dir = Path(backup_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        history = backed_up_history(self.backup_dir, epoch) if epoch else {}
        for key, value in (logs or {}).items():
            history.setdefault(key, [None] * epoch).append(float(value))
        _write_synced(self.backup_dir / HISTORY_FILE, json.dumps(history))
        weights, metadata = self.backup_dir / WEIGHTS_FILE, self.backup_dir / METADATA_FILE
        recorded = _recorded(self.backup_dir)
        previous = recorded[0] if recorded else None
        value = {
            "latest": {
                "weights_sha256": sha256(weights),
                "metadata_sha256": sha256(metadata),
                "epoch": epoch + 1,
            },
            "previous": previous,
        }
        _write_synced(self.backup_dir / CHECKSUMS_FILE, json.dumps(value))


class _NanGuard(keras.callbacks.Callback):
    """Stops on a NaN/inf loss with an exception, so the backup survives and nothing is exported.

    (Keras's TerminateOnNaN without raise_error stops "gracefully", which deletes the backup.)
    """

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            raise TrainingDiverged(
                f"loss became {float(loss)} by train step {step}: training "
                f"diverged (is the learning rate too large?)"
            )


class PhaseTimer(keras.callbacks.Callback):
    """Where fit's seconds go: set-up before the first epoch, and per epoch the train steps,
    the validation pass and the epoch-end callbacks (TensorBoard, images, backup). Placed
    first in the callback list, so an epoch's callbacks are timed from the end of validation
    to the start of the next epoch (or the end of training)."""

    def __init__(self) -> None:
        super().__init__()
        self.fit_start = time.perf_counter()
        self.setup = 0.0
        self.epochs: list[dict[str, float]] = []
        self._marks: dict[str, float] = {}

    @property
    def seconds(self) -> list[float]:
        return [sum(e.values()) for e in self.epochs]

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._marks = {"train_begin": time.perf_counter()}

    def _close_epoch(self) -> None:
        m, now = self._marks, time.perf_counter()
        if "epoch_begin" not in m:
            return
        train_end = m.get("test_begin", m.get("epoch_end", now))
        validation_end = m.get("test_end", train_end)
        self.epochs.append(
            {
                "train_steps": train_end - m["epoch_begin"],
                "validation": validation_end - train_end,
                "callbacks": now - validation_end,
            }
        )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if not self.epochs and "epoch_begin" not in self._marks:
            self.setup = time.perf_counter() - self.fit_start
        self._close_epoch()
        self._marks = {"epoch_begin": time.perf_counter()}

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._marks["test_begin"] = time.perf_counter()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._marks["test_end"] = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._marks["epoch_end"] = time.perf_counter()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close_epoch()
        self._marks = {}

    def summary(self) -> dict[str, Any]:
        """Seconds per phase; `compile` is the first epoch's train steps beyond the median of
        the others (tracing and XLA compilation), when there are others."""
        steps = [e["train_steps"] for e in self.epochs]
        later = sorted(steps[1:])
        compile_s = steps[0] - later[len(later) // 2] if later else None
        return {
            "fit_setup": self.setup,
            "compile_estimate": compile_s,
            "epochs": [{k: round(v, 4) for k, v in e.items()} for e in self.epochs],
        }


class PassNumber(keras.callbacks.Callback):
    """Tells the input pipeline which pass over the data an epoch is (its shuffle order)."""

    def __init__(self, epoch: tf.Variable) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.assign(epoch)


class EpochLine(keras.callbacks.Callback):
    """One console line per epoch (Keras's verbose=2 prints two, its progress bar is for a
    terminal): `epoch 2/5  loss 0.1 accuracy 0.96 | val_loss ... (1.2 s, 1688 steps)`."""

    def __init__(self, epochs: int, out: Callable[[str], None] = print) -> None:
        super().__init__()
        self.epochs, self.out = epochs, out
        self._start, self._steps = 0.0, 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._steps = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        steps = int(self.model.optimizer.iterations.numpy()) - self._steps
        train = "  ".join(f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy") if k in logs)
        val = "  ".join(f"{k} {logs[k]:.4f}" for k in ("val_loss", "val_accuracy") if k in logs)
        self.out(
            f"epoch {epoch + 1}/{self.epochs}  {train}{'  | ' + val if val else ''}  "
            f"({time.perf_counter() - self._start:.1f} s, {steps} step{'' if steps == 1 else 's'})"
        )


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float | None]]  # None: an epoch's logs lost with a damaged backup
    epoch_seconds: list[float]
    fit_seconds: float
    initial_epoch: int
    phases: dict[str, Any] = dataclasses.field(default_factory=dict)


def train(
    build_model: Callable[[], keras.Model],
    make_train_ds: Callable[[tf.Variable, int], tf.data.Dataset],
    validation_ds: tf.data.Dataset | None,
    *,
    batch_size: int,
    epochs: int,
    strategy: tf.distribute.Strategy,
    tensorboard_dir: Path | None,
    backup_dir: Path | None,
    restore_from: Path | None = None,
    update_freq: int = 100,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | None = None,
    profile: Callable[[int], tuple[int, int]] | None = None,
    compile_cache: Path | None = None,
) -> TrainResult:
    """Fit a model built by `build_model` inside `strategy`'s scope.

    `make_train_ds(epoch, k)` gives one pass over the training data, shuffled by the int64
    variable `epoch` (set here at every epoch start), each element holding k batches: Keras
    iterates it afresh at every epoch, so an epoch is one pass for any batch size and
    steps_per_execution. On one replica k is the model's steps_per_execution, the batches split
    off in the graph (`train_steps_in_graph`); on several, k is 1 (Keras's multi-step loop).
    `backup_dir`: Keras BackupAndRestore state, saved at each epoch end (never mid-epoch: a
    resumed run restarts at the epoch boundary, so no batch is trained twice), with the previous
    copy kept so a garbled latest backup falls back to it. `restore_from`: resume from that
    backup instead (a non-chief worker resumes from the chief's). `verbose`: None prints one
    line per epoch (a Keras progress bar on a terminal), 0 nothing. `compile_cache`: the folder
    keeping XLA's compiled programs across runs (components/compile_cache.py).
    """
    building = time.perf_counter()
    start_epoch = resume_epoch(backup_dir, restore_from, epochs) if backup_dir is not None else 0
    if start_epoch:
        log.info("resuming from the backup at the end of epoch %d", start_epoch)
    model, train_ds, per_element, pass_number = _model_and_data(
        build_model, make_train_ds, strategy, batch_size, start_epoch
    )
    build_seconds = time.perf_counter() - building
    # Keras counts the profile's round-trips from this fit's start: a resumed run's, not epoch 0
    window = profile(start_epoch) if profile is not None else None
    timer, callbacks = _callbacks(
        model, pass_number, backup_dir, tensorboard_dir, update_freq, window, extra_callbacks
    )

    def epoch_steps() -> int:  # for a progress bar: the one-batch dataset's (never iterated)
        return int(make_train_ds(pass_number, 1).cardinality())

    verbose = _console(callbacks, epochs, verbose, per_element, epoch_steps)
    history, fit_seconds = _fit(
        model, train_ds, validation_ds, epochs, callbacks, verbose, compile_cache
    )
    return TrainResult(
        model=model,
        history=_whole_history(history, backup_dir, start_epoch),
        epoch_seconds=timer.seconds,
        fit_seconds=fit_seconds,
        initial_epoch=start_epoch,
        phases={"model_build": build_seconds, **timer.summary()},
    )


def _model_and_data(
    build_model: Callable[[], keras.Model],
    make_train_ds: Callable[[tf.Variable, int], tf.data.Dataset],
    strategy: tf.distribute.Strategy,
    batch_size: int,
    start_epoch: int,
) -> tuple[keras.Model, tf.data.Dataset, int, tf.Variable]:
    """The model built in `strategy`'s scope, set up for its dataset elements, and the training
    dataset: (model, dataset, batches per element, the pass-number variable it reads)."""
    # Outside the strategy's scope: a plain host variable, read by the input pipeline.
    pass_number = tf.Variable(start_epoch, dtype=tf.int64, trainable=False, name="pass_number")
    with strategy.scope():
        model = build_model()
    per_element = use_steps_in_graph(model, strategy, batch_size)
    train_ds = make_train_ds(pass_number, per_element)
    _prepare_for_replicas(model, strategy, train_ds)
    return model, train_ds, per_element, pass_number


# The most examples one element may hold (float32 28x28: 3 KB each, ~50 MB here); tf.data keeps
# a few elements ready.
MAX_ELEMENT_EXAMPLES = 16_384


def steps_per_element(model: keras.Model, strategy: tf.distribute.Strategy, batch_size: int) -> int:
    """Batches per dataset element: the model's steps_per_execution on one replica, else 1
    (a distributed dataset splits each element's first dimension over the replicas). Also 1
    when so many batches would make an element larger than MAX_ELEMENT_EXAMPLES (a large
    batch: the per-step cost this saves matters less there)."""
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    steps = max(1, int(model.steps_per_execution))
    if (
        strategy.num_replicas_in_sync > 1
        or multi_worker
        or steps * batch_size > MAX_ELEMENT_EXAMPLES
    ):
        return 1
    return steps


def use_steps_in_graph(
    model: keras.Model, strategy: tf.distribute.Strategy, batch_size: int
) -> int:
    """Set `model` up for dataset elements of several batches where `steps_per_element` allows
    it (state built first, then `train_steps_in_graph`); returns the batches per element for
    `data.make_train_dataset`."""
    per_element = steps_per_element(model, strategy, batch_size)
    if per_element > 1:
        with strategy.scope():  # a OneDeviceStrategy's variables are made in its scope
            build_training_state(model)
        train_steps_in_graph(model, batch_size)
    return per_element


def build_training_state(model: keras.Model) -> None:
    """Create the optimizer's slots and the metrics' state before `fit` traces the train step.

    Without a distribution strategy Keras creates them while tracing the first train step, and
    a tf.function that created variables is traced again without them: the step was traced (and
    XLA-compiled) twice, ~0.15 s of the first epoch here. Under a strategy Keras builds them
    first itself. Public APIs only: the metrics are built on one blank example, then reset.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    blank = np.zeros((1, *model.input_shape[1:]), "float32")
    model.compute_metrics(blank, np.zeros((1,), "int64"), model(blank))
    model.reset_metrics()


def train_steps_in_graph(model: keras.Model, batch: int) -> None:
    """Keras's train step, run once per batch over a dataset element of several batches, in
    one host round-trip.

    Keras's own multi-step loop (steps_per_execution) takes every batch from the tf.data
    iterator, one `get_next` per step: about 100 us each on this CPU, a third of this model's
    step (`python -m benchmarks.steps`). Here one element holds the examples of several
    consecutive batches and a graph loop slices them into batches of `batch` (the last one
    partial), calling Keras's unchanged `train_step`, XLA-compiled as `fit` would compile it:
    the same batches, the same updates, the same metrics. Keras sees one batch per round-trip
    (its steps_per_execution becomes 1), so its callbacks are called as often as before; the
    optimizer's `iterations` still counts steps.
    """
    # Not converted by AutoGraph (~0.2 s of the first epoch): Keras's train_step has no Python
    # control flow over tensors (its optimizer and metrics build their conditionals with ops).
    one_step = tf.function(model.train_step, jit_compile=bool(model.jit_compile), autograph=False)

    def train_element(data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        size = tf.shape(y)[0]
        count = (size + batch - 1) // batch

        def step(i: tf.Tensor) -> dict[str, tf.Tensor]:
            start = i * batch
            end = tf.minimum(start + batch, size)
            return one_step((x[start:end], y[start:end]))

        first = step(tf.constant(0))
        return tf.while_loop(
            lambda i, _: i < count, lambda i, _: (i + 1, step(i)), (tf.constant(1), first)
        )[1]

    if "train_step" in vars(model):
        return  # already done for this model (a tuner may fit one model twice)
    jit_compile = model.jit_compile
    model.train_step = train_element
    model.steps_per_execution = 1
    # The loop itself runs in TensorFlow's executor (an XLA while loop is slower here); each
    # step inside it is compiled.
    model.jit_compile = False
    model.make_train_function(force=True)
    model.jit_compile = jit_compile


def _whole_history(
    history: keras.callbacks.History, backup_dir: Path | None, start_epoch: int
) -> dict[str, list[float | None]]:
    """This fit's history after the epochs a resumed run had trained before (in its backup)."""
    earlier = backed_up_history(backup_dir, start_epoch) if backup_dir and start_epoch else {}
    ran: dict[str, list[float | None]] = {
        k: [float(v) for v in vs] for k, vs in history.history.items()
    }
    unknown: list[float | None] = [None] * start_epoch
    return {k: earlier.get(k, unknown) + ran.get(k, []) for k in {*earlier, *ran}}


def _console(
    callbacks: list[keras.callbacks.Callback],
    epochs: int,
    verbose: int | None,
    steps_per_element: int = 1,
    steps_per_epoch: Callable[[], int] | None = None,
) -> int:
    """Keras's `verbose` for fit: a progress bar on a terminal (Keras's, or StepProgress when
    an element holds several steps: Keras's would count elements); elsewhere (a log, CI) one
    line per epoch from EpochLine, appended to `callbacks`."""
    if verbose is not None:
        return verbose
    if not sys.stdout.isatty():
        callbacks.append(EpochLine(epochs))
        return 0
    if steps_per_element == 1:
        return 1
    steps = steps_per_epoch() if steps_per_epoch is not None else None
    callbacks.append(StepProgress(epochs, steps if steps and steps > 0 else None))
    return 0


class StepProgress(keras.callbacks.Callback):
    """Keras's progress bar, counting train steps (the optimizer's), not dataset elements."""

    def __init__(self, epochs: int, steps_per_epoch: int | None) -> None:
        super().__init__()
        self.epochs, self.target = epochs, steps_per_epoch
        self.bar: keras.utils.Progbar | None = None
        self._start = 0

    def _seen(self) -> int:
        return int(self.model.optimizer.iterations.numpy()) - self._start

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        print(f"Epoch {epoch + 1}/{self.epochs}")
        self._start = int(self.model.optimizer.iterations.numpy())
        self.bar = keras.utils.Progbar(self.target, unit_name="step", stateless_metrics=set())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self._seen(), list((logs or {}).items()), finalize=False)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.bar is not None:
            self.target = self.bar.target = self._seen()
            self.bar.update(self.target, list((logs or {}).items()), finalize=True)


def _callbacks(
    model: keras.Model,
    pass_number: tf.Variable,
    backup_dir: Path | None,
    tensorboard_dir: Path | None,
    update_freq: int,
    profile: tuple[int, int] | None,
    extra: list[keras.callbacks.Callback] | None,
) -> tuple[PhaseTimer, list[keras.callbacks.Callback]]:
    """The phase timer (first: it times the others), and every callback of the fit."""
    timer = PhaseTimer()
    return timer, [
        timer,
        PassNumber(pass_number),
        _NanGuard(),
        *_tensorboard_callbacks(model, tensorboard_dir, update_freq, profile),
        *(extra or []),
        # Last: an epoch's backup is saved once its TensorBoard points are written, so a kill
        # after the backup never loses them (the resumed run starts after that epoch).
        *_backup_callbacks(backup_dir),
    ]


def _fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    validation_ds: tf.data.Dataset | None,
    epochs: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int,
    compile_cache: Path | None = None,
) -> tuple[keras.callbacks.History, float]:
    """Keras `fit`, with XLA's compiled programs kept in `compile_cache`: (history, seconds)."""
    store = compile_cache_enable(compile_cache) if compile_cache is not None else None
    start = time.perf_counter()
    try:
        history = model.fit(
            train_ds,
            validation_data=validation_ds,
            epochs=epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the dataset shuffles itself
        )
    except BaseException:
        # Keras closes its TensorBoard writers only on a normal end: flush them so the logs
        # stay readable up to the failure.
        for callback in callbacks:
            close = getattr(callback, "_close_writers", None) or getattr(callback, "close", None)
            if close is not None:
                close()
        raise
    seconds = time.perf_counter() - start
    compile_cache_promote(store)
    return history, seconds


def _prepare_for_replicas(
    model: keras.Model, strategy: tf.distribute.Strategy, train_ds: tf.data.Dataset
) -> None:
    """The Keras work-arounds that several replicas need (components/strategy.py)."""
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if strategy.num_replicas_in_sync == 1 and not multi_worker:
        return
    from components import strategy as policy

    per_replica = max(
        1, int(train_ds.element_spec[0].shape[0] or 32) // strategy.num_replicas_in_sync
    )
    policy.work_around_keras_distributed_build(model, strategy, per_replica)
    if multi_worker:
        policy.work_around_keras_multi_worker_reduce()


def _backup_callbacks(backup_dir: Path | None) -> list[keras.callbacks.Callback]:
    """Backups, with their checksums."""
    if backup_dir is None:
        return []
    return [
        keras.callbacks.BackupAndRestore(
            # Kept when fit ends: the caller deletes it once the train stage is recorded
            # (pipeline.stages.drop_backup), so a stop in between resumes at the last epoch
            # and trains nothing, instead of starting over.
            str(backup_dir),
            save_freq="epoch",
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        BackupChecksums(backup_dir),
    ]


def _tensorboard_callbacks(
    model: keras.Model,
    tensorboard_dir: Path | None,
    update_freq: int,
    profile: tuple[int, int] | None = None,
) -> list[keras.callbacks.Callback]:
    """TensorBoard logging."""
    callbacks: list[keras.callbacks.Callback] = []
    if tensorboard_dir is not None:
        from components.monitoring import BatchScalars, write_model_graph

        write_model_graph(tensorboard_dir, model)
        # Keras writes train/ and validation/ (epoch scalars, weight histograms); step scalars
        # go to their own run folder: TensorBoard follows only the newest event file of a
        # folder, so two writers in one folder would hide one of them from a live TensorBoard.
        callbacks.append(
            keras.callbacks.TensorBoard(
                str(tensorboard_dir),
                histogram_freq=1,
                write_graph=False,
                update_freq="epoch",
                profile_batch=profile or 0,
            )
        )
        callbacks.append(BatchScalars(tensorboard_dir, update_freq))
    return callbacks


def weights_sha256(model: keras.Model) -> str:
    """A fingerprint of the trained weights (determinism and resume checks)."""
    import hashlib

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()
