"""The order of the components for one training run, and the run directory they write into."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig

log = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where a run reads from and writes to."""

    artifacts: Path
    tfds_data_dir: Path | None = None
    tfds_manual_dir: Path | None = None

    @property
    def runs(self) -> Path:
        return self.artifacts / "runs"

    @property
    def models(self) -> Path:
        from components.exporter import MODEL_NAME
        return self.artifacts / "models" / MODEL_NAME

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def tensorboard_dir(self, run_id: str) -> Path:
        return self.artifacts / "tensorboard" / run_id


class RunStateError(RuntimeError):
    """A named run cannot be resumed as asked (finished, or started with another config)."""


def prepare_run_dir(run_dir: Path, config: TrainConfig) -> bool:
    """Create the run dir, or check that an existing one can be resumed. True when resuming."""
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        config.to_json(run_dir / "config.json")
        return False
    if (run_dir / "metrics.json").exists():
        raise RunStateError(f"run {run_dir.name} already finished ({run_dir}); pick another "
                            f"--run-name")
    try:
        previous = TrainConfig.from_json(run_dir / "config.json").to_dict()
    except (OSError, ValueError) as e:
        raise RunStateError(f"run {run_dir.name} exists but its config.json cannot be read "
                            f"({e}); pick another --run-name") from None
    changed = {k: (previous[k], v) for k, v in config.to_dict().items() if previous[k] != v}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise RunStateError(f"run {run_dir.name} was started with another config ({diff}); "
                            f"resume it with the same flags, or pick another --run-name")
    return True


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def blessed(self) -> bool:
        return bool(self.metrics["blessed"])


def new_run_id() -> str:
    """Sorts by start time; unique for runs started in the same second (microseconds + random)."""
    now = datetime.datetime.now()
    return f"{now:%Y%m%d-%H%M%S-%f}-{secrets.token_hex(2)}"


def update_latest(runs: Path, run_id: str) -> None:
    """Point runs/latest at `run_id` atomically (a new link renamed over the old one)."""
    tmp = runs / f".latest-{run_id}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_id, tmp)
    os.replace(tmp, runs / "latest")


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def train_pipeline(config: TrainConfig, paths: Paths, *, run_id: str | None = None,
                   data: tuple[Any, Any] | None = None,
                   tf_config: dict[str, Any] | None = None) -> RunResult:
    """data -> validate -> train -> evaluate -> gate/publish -> report, for one run.

    `data` optionally supplies (train, test) Splits directly (tests, other sources); otherwise
    both come from TFDS. `tf_config`: the parsed TF_CONFIG of a multi-worker cluster; every
    worker runs every step (they train, evaluate and export together), and only the chief
    writes the run's artifacts; the others write to a temporary folder they delete.
    Raises the components' errors; the CLI maps them to exit codes.
    """
    from components import trainer

    role = trainer.cluster_role(tf_config)
    run_id = run_id or new_run_id()
    if role.is_chief:
        return _train_pipeline(config, paths, run_id, data, tf_config, role)

    scratch = Path(tempfile.mkdtemp(prefix=f"mnist-{role.task}-"))
    try:
        # Resumes from the chief's backup (read-only), so all workers restart at the same epoch
        # with the same weights; its own saves go to the scratch folder.
        return _train_pipeline(config, Paths(scratch, paths.tfds_data_dir,
                                             paths.tfds_manual_dir),
                               run_id, data, tf_config, role,
                               restore_from=paths.run_dir(run_id) / "backup")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_pipeline(config: TrainConfig, paths: Paths, run_id: str,
                    data: tuple[Any, Any] | None, tf_config: dict[str, Any] | None,
                    role: Any, restore_from: Path | None = None) -> RunResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # Imported here so that flag errors are reported before TensorFlow's start-up cost.
    from components import data as data_lib
    from components import evaluator, exporter, monitoring, report, trainer
    from components.model import build_model

    # Everything a user can get wrong (device, data) is checked before the run dir exists.
    choice, strategy = trainer.setup_device(
        config.device, deterministic=config.deterministic, seed=config.seed, tf_config=tf_config,
        mixed_precision=config.mixed_precision)
    log.info("device: %s; this process: %s%s", choice.description, role.task,
             " (chief)" if role.is_chief and tf_config else "")

    t = time.perf_counter()
    if data is None:
        expect = config.max_train_examples is None and config.max_test_examples is None
        raw_train, raw_test = (
            data_lib.load_split(name, data_dir=paths.tfds_data_dir,
                                manual_dir=paths.tfds_manual_dir, limit=limit)
            for name, limit in (("train", config.max_train_examples),
                                ("test", config.max_test_examples)))
    else:
        expect = False
        raw_train, raw_test = (split.take(limit) for split, limit in
                               zip(data, (config.max_train_examples, config.max_test_examples)))
    train_split = data_lib.validate_split(
        raw_train, expected_count=data_lib.EXPECTED_COUNTS["train"] if expect else None)
    test_split = data_lib.validate_split(
        raw_test, expected_count=data_lib.EXPECTED_COUNTS["test"] if expect else None)
    timings["data_seconds"] = time.perf_counter() - t
    log.info("data: %d train, %d test examples, validated", len(train_split), len(test_split))

    run_dir = paths.run_dir(run_id)
    if role.is_chief:
        resuming = prepare_run_dir(run_dir, config)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        resuming = False
    log.info("run %s -> %s%s", run_id, run_dir, " (resuming)" if resuming else "")

    # Validation is carved from the training split with the seed (the tuner's split); the
    # test split is read once, after training, by the evaluator. Fraction 0: no validation.
    if config.validation_fraction > 0:
        fit_split, val_split = data_lib.carve_validation(train_split, config.validation_fraction,
                                                         config.seed)
    else:
        fit_split, val_split = train_split, None
    replicas = strategy.num_replicas_in_sync
    log.info("strategy: %s, %d replica(s), global batch %d, per-replica batch %d",
             type(strategy).__name__, replicas, config.batch_size,
             max(1, config.batch_size // replicas))
    log.info("splits: %d train, %s, %d test (read after training)", len(fit_split),
             f"{len(val_split)} validation (held out of train, seed {config.seed})"
             if val_split is not None else "no validation", len(test_split))

    t = time.perf_counter()
    result = trainer.train(
        lambda: build_model(config.hidden_units, config.learning_rate, config.dropout,
                            # Keras 3.15's multi-step loop fails under
                            # MultiWorkerMirroredStrategy (in-graph has_next): one step per call.
                            steps_per_execution=config.steps_per_execution
                            if choice.kind not in ("multi_worker", "mirrored") else 1,
                            # XLA stays on one device: cross-replica collectives are not
                            # compiled on the CPU.
                            jit_compile=config.jit_compile and choice.kind in
                            ("default", "one_device")),
        lambda epoch: data_lib.make_train_dataset(fit_split, config.batch_size,
                                                  seed=config.seed, epoch=epoch),
        data_lib.make_dataset(val_split, max(config.batch_size, 1024))
        if val_split is not None else None,
        epochs=config.epochs, strategy=strategy,
        tensorboard_dir=paths.tensorboard_dir(run_id),
        backup_dir=run_dir / "backup", restore_from=restore_from,
        update_freq=config.tensorboard_update_freq,
        extra_callbacks=[monitoring.EpochImages(paths.tensorboard_dir(run_id), val_split.images,
                                                val_split.labels)]
        if val_split is not None else [])
    timings["train_seconds"] = time.perf_counter() - t
    timings["fit_seconds"] = result.fit_seconds

    t = time.perf_counter()
    evaluation = evaluator.evaluate(result.model, test_split)
    predictions = evaluator.save_predictions(run_dir / evaluator.PREDICTIONS_FILE, evaluation,
                                             test_split, train_split.take(1))
    timings["evaluate_seconds"] = time.perf_counter() - t
    metrics: dict[str, Any] = {
        **evaluation.metrics, "run_id": run_id, "device": choice.device,
        "strategy": choice.kind, "replicas": replicas,
        "epochs_trained": result.initial_epoch + len(result.epoch_seconds),
        "resumed_from_epoch": result.initial_epoch,
        "examples": {"train": len(fit_split),
                     "validation": len(val_split) if val_split is not None else 0,
                     "test": len(test_split)},
        "history": result.history, "epoch_seconds": result.epoch_seconds,
        "weights_sha256": trainer.weights_sha256(result.model),
    }
    acc = metrics["test_accuracy"]
    pred0, true0 = int(evaluation.probabilities[0].argmax()), int(evaluation.labels[0])
    print(f"Test accuracy: {acc:.4f}  (loss {metrics['test_loss']:.4f}, "
          f"{metrics['test_examples']} test images)")
    print(f"First test image: predicted {pred0}, true {true0}")

    t = time.perf_counter()
    published = exporter.publish(
        result.model, {k: metrics[k] for k in ("test_accuracy", "test_loss", "run_id")},
        paths.models, run_id=run_id, min_accuracy=config.min_accuracy,
        max_regression=config.max_regression, keep_versions=config.keep_versions)
    timings["publish_seconds"] = time.perf_counter() - t
    if not role.is_chief:
        # It exported with the chief (saving may need every worker); its copy is scratch.
        print(f"{role.task}: done; the chief publishes and reports")
        return RunResult(run_id, run_dir, {**metrics, "blessed": None, "chief": False})
    metrics.update(blessed=published.decision.blessed, gate=published.decision.to_dict(),
                   published_version=published.version,
                   published_path=str(published.path) if published.path else None)
    if published.version is not None:
        print(f"Published version {published.version}: {published.path} "
              f"({published.decision.reason})")
    else:
        print(f"NOT published: {published.decision.reason}")

    t = time.perf_counter()
    report_dir = run_dir / "report"
    report.write_report(report_dir, predictions, metrics, result.history, config.to_dict())
    monitoring.log_run_summary(paths.tensorboard_dir(run_id), run_id, config.to_dict(), metrics)
    timings["report_seconds"] = time.perf_counter() - t
    timings["pipeline_seconds"] = time.perf_counter() - started
    metrics["timings"] = timings
    write_json(run_dir / "metrics.json", metrics)
    update_latest(paths.runs, run_id)
    print(f"Run {run_id}: metrics {run_dir / 'metrics.json'}, report {report_dir}, "
          f"TensorBoard {paths.tensorboard_dir(run_id)}")
    return RunResult(run_id, run_dir, metrics)


def rebuild_report(run_dir: Path) -> list[Path]:
    """Redraw an earlier run's report from its saved evaluation outputs."""
    from components import evaluator, report

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = evaluator.load_predictions(run_dir / evaluator.PREDICTIONS_FILE)
    config = json.loads((run_dir / "config.json").read_text())
    return report.write_report(run_dir / "report", predictions, metrics, metrics.get("history"),
                               config)
