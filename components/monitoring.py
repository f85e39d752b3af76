"""TensorBoard beyond Keras's callback: per-epoch prediction grid and confusion matrix images,
the resolved config and final metrics as text, and HParams for side-by-side comparison."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from components import report
from components.evaluator import compute_metrics

GRID_EXAMPLES = 25
log = logging.getLogger(__name__)


STEPS_RUN = "steps"
GRAPH_RUN = "model"


def event_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("events.out.tfevents.*"))


def drop_points_from(files: list[Path], first_dropped: int) -> int:
    """Rewrite each event file without its summaries at step >= `first_dropped`: the points an
    attempt stopped before its next backup wrote past where the resumed run starts again, which
    the resumed run writes anew (TensorBoard would show both). Each file is replaced whole
    (written aside, then renamed: a kill leaves it as it was); a record cut short by the kill
    goes too. Returns how many records were dropped."""
    import os

    from google.protobuf.message import DecodeError

    dropped = 0
    for path in files:
        aside = path.parent / ".pruned.tmp"  # no "tfevents" in it: TensorBoard ignores it
        try:
            kept, gone = _points_before(path, first_dropped)
            if not gone:
                continue
            with tf.io.TFRecordWriter(str(aside)) as writer:
                for raw in kept:
                    writer.write(raw)
            os.replace(aside, path)
            dropped += gone
        except (OSError, tf.errors.OpError, DecodeError) as e:  # the curves, never the run
            aside.unlink(missing_ok=True)
            log.warning("TensorBoard: %s left as it was (%s): a step may show twice", path, e)
    if dropped:
        log.info("TensorBoard: dropped %d points of the stopped attempt past the resume", dropped)
    return dropped


def _points_before(path: Path, first_dropped: int) -> tuple[list[bytes], int]:
    """(the file's records to keep, how many go): summaries at step >= first_dropped go, and
    a last record cut short by a kill."""
    from tensorboard.compat.proto import event_pb2

    kept: list[bytes] = []
    gone = 0
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            raw = bytes(record.numpy())
            event = event_pb2.Event.FromString(raw)
            if event.HasField("summary") and event.step >= first_dropped:
                gone += 1
            else:
                kept.append(raw)
    except tf.errors.DataLossError:  # the last record, cut short
        gone += 1
    return kept, gone


class BatchScalars(keras.callbacks.Callback):
    """Train loss, accuracy and learning rate every `every` optimizer steps of each epoch
    (counted from the epoch's first step) and at its last step, plotted at the true step, in
    their own run folder (`steps/`), named `step_*` so that TensorBoard lists them after
    Keras's `epoch_*` curves. Keras reports batches only at the end of a host round-trip
    (`steps_per_execution` steps, fewer at an epoch's end): with `every` a multiple of
    steps_per_execution (the defaults: 100 and 100) the points are exactly `every` steps apart
    within an epoch; otherwise each comes at the first round-trip past its multiple.

    Keras's own `TensorBoard(update_freq=N)` is not used for this: it counts host round-trips
    (not steps) under steps_per_execution, and leaves `record_if(step % N == 0)` active through
    epoch end, which silently drops the epoch summaries whenever the count does not line up.
    """

    def __init__(self, log_dir: Path, every: int):
        super().__init__()
        self.every = every
        # A stopped attempt's files (a resumed run): pruned at the first epoch, once the step
        # the run resumes from is known.
        self._earlier: list[Path] | None = event_files(Path(log_dir) / STEPS_RUN)
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / STEPS_RUN))
        self._epoch_start = self._last_logged = 0
        self._unlogged: tuple[int, dict] | None = None  # the epoch's latest batch, if not logged

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = self._last_logged = int(self.model.optimizer.iterations.numpy())
        self._unlogged = None
        if self._earlier:  # the last completed epoch's last point (at this step) stays
            drop_points_from(self._earlier, self._epoch_start + 1)
        self._earlier = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        step = int(self.model.optimizer.iterations.numpy())
        since, logged = step - self._epoch_start, self._last_logged - self._epoch_start
        if since // self.every > logged // self.every:
            self._write(step, logs)
        else:
            self._unlogged = (step, dict(logs))

    def _write(self, step: int, logs: dict) -> None:
        self._last_logged, self._unlogged = step, None
        with self.writer.as_default(step=step), tf.summary.record_if(True):
            for name in ("loss", "accuracy"):
                if name in logs:
                    tf.summary.scalar(f"step_{name}", float(logs[name]))
            tf.summary.scalar(
                "step_learning_rate", float(np.asarray(self.model.optimizer.learning_rate))
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._unlogged is not None:  # the epoch's last step
            self._write(*self._unlogged)
        self.writer.flush()  # a watching TensorBoard sees each epoch's points when it ends

    def on_train_end(self, logs: dict | None = None) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()


def write_model_graph(log_dir: Path, model: keras.Model) -> None:
    """The model's inference graph for TensorBoard's Graphs tab, in its own run (`model/`).

    Keras's `write_graph` logs the whole train function, which under XLA and
    steps_per_execution the Graphs tab cannot render ("Malformed GraphDef"); the forward pass
    on the documented input is what a reader wants to see.
    """
    forward = tf.function(lambda pixels: model(pixels, training=False))
    graph = forward.get_concrete_function(
        tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="pixels")
    ).graph
    writer = tf.summary.create_file_writer(str(Path(log_dir) / GRAPH_RUN))
    with writer.as_default(step=0):
        tf.summary.graph(graph)
    writer.close()


class EpochImages(keras.callbacks.Callback):
    """At every epoch end, logs the validation prediction grid and confusion matrix as images
    (step = epoch), so their evolution can be scrubbed in TensorBoard's Images tab.

    Only the forward pass runs in the training loop; drawing the figures and writing them runs
    on one background thread (pyplot-free Matplotlib figures are thread-safe), so the next
    epoch's steps do not wait for them. The thread is joined when training ends."""

    def __init__(self, log_dir: Path, images: np.ndarray, labels: np.ndarray):
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        self.images, self.labels = images, labels
        self._earlier: list[Path] | None = event_files(Path(log_dir) / "images")
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "images"))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-images")
        self._pending: list[Any] = []
        self._inputs: tf.Tensor | None = None
        self._forward: Any = None

    def _probabilities(self) -> np.ndarray:
        """The model's probabilities for the images. One replica: one traced forward pass over
        the normalised images (kept), without `predict`'s per-call set-up (its data adapter,
        iterator and callbacks: ~70 ms an epoch here, for two batches); several replicas:
        `predict`, which places the work on them."""
        from components.data import preprocess

        if self.model.distribute_strategy.num_replicas_in_sync > 1:
            return np.asarray(
                self.model.predict(preprocess(self.images).numpy(), batch_size=2048, verbose=0)
            )
        if self._forward is None:
            self._inputs = preprocess(tf.constant(self.images))
            model = self.model
            self._forward = tf.function(lambda x: model(x, training=False), autograph=False)
        return np.asarray(self._forward(self._inputs))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._earlier:  # a resumed run: a stopped attempt's images from this epoch on go
            drop_points_from(self._earlier, epoch)
        self._earlier = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        probs = self._probabilities()
        self._pending.append(self._pool.submit(self._draw_and_write, epoch, probs))

    def _draw_and_write(self, epoch: int, probs: np.ndarray) -> None:
        confusion = compute_metrics(probs, self.labels)["confusion_matrix"]
        grid = report.rgb_pixels(
            report.figure_grid(
                self.images,
                self.labels,
                probs,
                np.arange(min(GRID_EXAMPLES, len(self.labels))),
                f"Validation predictions after epoch {epoch + 1}",
            )
        )
        matrix = report.rgb_pixels(
            report.figure_confusion(confusion, f"Confusion matrix after epoch {epoch + 1}")
        )
        # At Keras's epoch index, the step of the epoch_* curves and the histograms (0 for the
        # first epoch), so that every per-epoch tab shares one axis; the titles count from 1.
        with self.writer.as_default(step=epoch), tf.summary.record_if(True):
            tf.summary.image("predictions", grid[None])
            tf.summary.image("confusion_matrix", matrix[None])
        self.writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the images still being drawn, then close. A drawing error is logged, not
        raised: it must not hide the error that stopped training, nor fail a finished run."""
        try:
            for future in self._pending:
                try:
                    future.result()
                except Exception as e:  # logged: the run goes on
                    log.warning("TensorBoard epoch images not written: %s", e)
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)
            self.writer.close()


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of the headline and per-class metrics (TensorBoard renders markdown)."""
    lines = [
        f"**test accuracy {metrics['test_accuracy']:.4f}**, test loss "
        f"{metrics['test_loss']:.4f}, {metrics['test_examples']} test images (the test "
        f"split, read once after training, through the exported model); the epoch curves "
        f"and images are on the validation split held out of train",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for c, m in sorted(metrics["per_class"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        )
    return "\n".join(lines)


def log_run_summary(
    log_dir: Path,
    run_id: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    data_table: str,
    hparam_keys: tuple[str, ...],
) -> None:
    """Text (config, data statistics, metrics table) and HParams (the config's hyperparameter
    fields + final test metrics) for a run."""
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(str(Path(log_dir)))
    with writer.as_default(step=0):
        tf.summary.text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```")
        tf.summary.text("data_statistics", data_table)
        tf.summary.text("final_metrics", metrics_table(metrics))
        hp.hparams({k: config[k] for k in hparam_keys if k in config}, trial_id=run_id)
        for key in ("test_accuracy", "test_loss"):
            tf.summary.scalar(f"hparams/{key}", metrics[key])
    writer.close()
