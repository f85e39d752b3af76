"""Trainer: device and tf.distribute strategy choice, Keras fit with TensorBoard and backups."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not available (a usage error)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class StrategyChoice:
    """What `choose_strategy` decided, before any TensorFlow object is made."""

    kind: str  # "default" | "one_device" | "mirrored" | "multi_worker"
    device: str  # "cpu" or "gpu"
    num_gpus: int
    description: str


def parse_tf_config(raw: str | None) -> dict[str, Any] | None:
    """TF_CONFIG as a dict when it names a cluster of more than one task, else None."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeviceError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = value.get("cluster") or {}
    tasks = sum(len(v) for v in cluster.values())
    return value if tasks > 1 else None


def choose_strategy(device: str, num_gpus: int, tf_config: dict[str, Any] | None = None
                    ) -> StrategyChoice:
    """The one place that decides how training is placed and distributed.

    `device` is the user's --device (auto|cpu|gpu), `num_gpus` how many GPUs TensorFlow sees,
    `tf_config` the parsed TF_CONFIG when it names a multi-task cluster.
    """
    if device == "gpu" and num_gpus == 0:
        raise DeviceError("--device gpu was requested but TensorFlow sees no GPU "
                          "(check the driver and CUDA install, or use --device auto|cpu)")
    use_gpu = device in ("gpu", "auto") and num_gpus > 0
    used = "gpu" if use_gpu else "cpu"
    if tf_config is not None:
        return StrategyChoice("multi_worker", used, num_gpus if use_gpu else 0,
                              "MultiWorkerMirroredStrategy from TF_CONFIG")
    if use_gpu and num_gpus > 1:
        return StrategyChoice("mirrored", "gpu", num_gpus,
                              f"MirroredStrategy over {num_gpus} GPUs")
    if use_gpu:
        return StrategyChoice("one_device", "gpu", 1, "one GPU (/gpu:0)")
    return StrategyChoice("default", "cpu", 0, "CPU (default strategy)")


def make_strategy(choice: StrategyChoice) -> tf.distribute.Strategy:
    if choice.kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if choice.kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if choice.kind == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()


def setup_device(device: str, *, deterministic: bool, seed: int) -> StrategyChoice:
    """Resolve --device, hide GPUs for --device cpu, set seeds. Call before any TF op runs."""
    gpus = tf.config.list_physical_devices("GPU")
    choice = choose_strategy(device, len(gpus), parse_tf_config(os.environ.get("TF_CONFIG")))
    if choice.device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return choice


class _NanGuard(keras.callbacks.Callback):
    """Stops on a NaN/inf loss with an exception, so the backup survives and nothing is exported.

    (Keras's TerminateOnNaN without raise_error stops "gracefully", which deletes the backup.)
    """

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f"loss became {float(loss)} at batch {batch}: training "
                                   f"diverged (is the learning rate too large?)")


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    fit_seconds: float
    initial_epoch: int


def train(build_model: Callable[[], keras.Model], train_ds: tf.data.Dataset,
          validation_ds: tf.data.Dataset | None, *, epochs: int, strategy: tf.distribute.Strategy,
          tensorboard_dir: Path | None, backup_dir: Path | None, steps_per_epoch: int | None = None,
          update_freq: int = 100, extra_callbacks: list[keras.callbacks.Callback] | None = None,
          verbose: int = 2) -> TrainResult:
    """Fit a model built by `build_model` inside `strategy`'s scope.

    `backup_dir`: Keras BackupAndRestore state, saved at each epoch end (never mid-epoch: a
    resumed run restarts at the epoch boundary, so no batch is trained twice), with the previous
    copy kept so a garbled latest backup falls back to it.
    """
    with strategy.scope():
        model = build_model()
    timer = _EpochTimer()
    callbacks: list[keras.callbacks.Callback] = [_NanGuard(), timer]
    if backup_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(
            str(backup_dir), save_freq="epoch", double_checkpoint=True, delete_checkpoint=False))
    if tensorboard_dir is not None:
        from components.monitoring import BatchScalars

        callbacks.append(keras.callbacks.TensorBoard(
            str(tensorboard_dir), histogram_freq=1, write_graph=True, update_freq="epoch"))
        callbacks.append(BatchScalars(tensorboard_dir, update_freq))
    callbacks.extend(extra_callbacks or [])
    start = time.perf_counter()
    try:
        history = model.fit(train_ds, validation_data=validation_ds, epochs=epochs,
                            steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                            verbose=verbose, shuffle=False)  # the dataset shuffles itself
    except BaseException:
        # Keras closes its TensorBoard writers only on a normal end: flush them so the logs
        # stay readable up to the failure.
        for callback in callbacks:
            close = getattr(callback, "_close_writers", None) or getattr(callback, "close", None)
            if close is not None:
                close()
        raise
    fit_seconds = time.perf_counter() - start
    return TrainResult(model=model, history={k: [float(v) for v in vs]
                                             for k, vs in history.history.items()},
                       epoch_seconds=timer.seconds, fit_seconds=fit_seconds,
                       initial_epoch=int(getattr(model, "_initial_epoch", 0) or 0))
