"""The order of the components for one training run, and the run directory they write into."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import stages
from pipeline.config import ConfigError, TrainConfig
from pipeline.stages import write_json

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


def prepare_run_dir(run_dir: Path, config: TrainConfig, effective: dict[str, Any]) -> bool:
    """Create the run dir, or check that an existing one can be resumed. True when resuming."""
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        config.to_json(run_dir / "config.json", effective)
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


STAGES = ("train", "export", "validate", "gate", "publish", "report")


def train_pipeline(config: TrainConfig, paths: Paths, *, run_id: str | None = None,
                   data: tuple[Any, Any] | None = None,
                   tf_config: dict[str, Any] | None = None) -> RunResult:
    """ingest -> train -> export -> validate (as served) -> gate -> publish -> report.

    `data` optionally supplies (train, test) Splits directly (tests, other sources); otherwise
    both come from TFDS. `tf_config`: the parsed TF_CONFIG of a multi-worker cluster: every
    worker trains; only the chief writes the run's artifacts and runs the later stages.
    Raises the components' errors; the CLI maps them to exit codes.
    """
    from components import infra_validator
    from components.strategy import cluster_role

    role = cluster_role(tf_config)
    run_id = run_id or new_run_id()
    # Started first: its TensorFlow import runs on the other core beside this one's.
    validator = infra_validator.Validator() if role.is_chief else None
    t = time.perf_counter()
    import tensorflow  # noqa: F401  (timed: a fixed cost every run pays)

    import_seconds = time.perf_counter() - t
    if validator is None:
        return _train_as_worker(config, paths, run_id, data, tf_config, role.task)
    try:
        run = stages.Run(config, run_id, stages.RunLayout(paths.run_dir(run_id)),
                         paths.artifacts, paths.tensorboard_dir(run_id), paths.models,
                         validator=validator)
        run.timings["import_tensorflow_seconds"] = import_seconds
        ingest(run, paths, data, tf_config)
        outputs = {"train": [run.layout.model, run.layout.history, run.layout.calibration],
                   "export": [run.layout.export / "saved_model.pb"],
                   "validate": [run.layout.served, run.layout.predictions],
                   "gate": [run.layout.blessing], "publish": [run.layout.publication],
                   "report": []}
        for name in STAGES:
            stages.run_stage(run, name, getattr(stages, name), outputs[name])
            _print_stage_result(run, name)
    finally:
        validator.close()
    return finish(run)


def _train_as_worker(config: TrainConfig, paths: Paths, run_id: str, data: Any,
                     tf_config: dict[str, Any] | None, task: str) -> RunResult:
    """A non-chief worker trains with the chief (resuming from the chief's backup, read-only)
    and saves into a scratch folder it deletes; the chief does everything else."""
    # A fixed place per (run, task): a worker killed mid-run leaves it behind, and its next
    # start (the cluster manager's restart) removes it first.
    scratch = paths.artifacts / ".workers" / f"{run_id}-{task}"
    if scratch.exists():
        log.info("%s: removing the scratch folder a killed worker left: %s", task, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        run = stages.Run(config, run_id, stages.RunLayout(scratch / "run"), scratch,
                         scratch / "tensorboard", scratch / "models", is_chief=False,
                         restore_from=paths.run_dir(run_id) / "backup")
        ingest(run, paths, data, tf_config)
        stages.run_stage(run, "train", stages.train, [])
        print(f"{task}: done; the chief evaluates, publishes and reports")
        return RunResult(run_id, run.layout.root, {**run.metrics, "chief": False})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            scratch.parent.rmdir()  # the last worker out removes .workers
        except OSError:
            pass


def ingest(run: stages.Run, paths: Paths, data: tuple[Any, Any] | None,
           tf_config: dict[str, Any] | None) -> None:
    """Device and strategy, the splits (validated, the validation split carved with the seed),
    their statistics and the drift check; then the run folder (created or resumed)."""
    from components import data as data_lib
    from components import statistics
    from components.strategy import effective_settings, set_precision, setup_device

    config = run.config
    t = time.perf_counter()
    choice, run.strategy, capability = setup_device(
        config.device, deterministic=config.deterministic, seed=config.seed,
        tf_config=tf_config, cpu_devices=config.cpu_devices)
    run.effective = effective_settings(
        choice, run.strategy.num_replicas_in_sync, batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution, jit_compile=config.jit_compile,
        mixed_precision=config.mixed_precision, dropout=config.dropout,
        compute_capability=capability)
    set_precision(run.effective.mixed_precision)
    log.info("device: %s; %d replica(s), global batch %d, per-replica batch %d",
             choice.description, run.effective.replicas, config.batch_size,
             run.effective.per_replica_batch)
    for reason in run.effective.why:
        log.info("setting: %s", reason)
    run.timings["device_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    train, test, from_tfds = _load(config, paths, data)
    run.full_test_split = len(test) == (data_lib.EXPECTED_COUNTS["test"] if from_tfds
                                        else len(data[1]))  # type: ignore[index]
    fit, validation = train, None
    if config.validation_fraction > 0:
        fit, validation = data_lib.carve_validation(train, config.validation_fraction,
                                                    config.seed)
        if len(validation) == 0 or len(fit) == 0:
            raise ConfigError(f"validation_fraction {config.validation_fraction:g} of "
                              f"{len(train)} training examples leaves {len(validation)} for "
                              f"validation and {len(fit)} for training; use 0 or a larger "
                              f"fraction")
    run.splits = {"train": fit, "validation": validation, "test": test,
                  "sample": train.take(1)}
    stats = statistics.compute({k: v for k, v in (("train", fit), ("validation", validation),
                                                  ("test", test)) if v is not None})
    if from_tfds and config.max_train_examples is None and run.full_test_split:
        _check_drift(stats, paths.models)
    run.timings["data_seconds"] = time.perf_counter() - t
    log.info("data: %d train, %s, %d test examples (the test split is read after training)",
             len(fit), f"{len(validation)} validation (held out of train, seed {config.seed})"
             if validation is not None else "no validation", len(test))
    if not run.is_chief:
        return
    run.resuming = prepare_run_dir(run.layout.root, config, run.effective.to_dict())
    log.info("run %s -> %s%s", run.run_id, run.layout.root,
             " (resuming)" if run.resuming else "")
    run.layout.statistics.parent.mkdir(parents=True, exist_ok=True)
    statistics.write(run.layout.statistics, stats)
    run.layout.evaluation.mkdir(parents=True, exist_ok=True)
    tmp = run.layout.examples.with_name(".tmp-test_examples.npz")
    np.savez(tmp, images=test.images, labels=test.labels)
    os.replace(tmp, run.layout.examples)
    run.metrics.update(run_id=run.run_id, device=choice.device, strategy=choice.kind,
                       replicas=run.effective.replicas,
                       examples={"train": len(fit), "validation": len(validation or ()),
                                 "test": len(test)},
                       full_test_split=run.full_test_split)
    run.metrics["data"] = {**_data_record(train, test, from_tfds),
                           "examples": run.metrics["examples"]}


def _load(config: TrainConfig, paths: Paths, data: tuple[Any, Any] | None
          ) -> tuple[Any, Any, bool]:
    from components import data as data_lib

    if data is None:
        full = config.max_train_examples is None and config.max_test_examples is None
        raw = [data_lib.load_split(name, data_dir=paths.tfds_data_dir,
                                   manual_dir=paths.tfds_manual_dir, limit=limit)
               for name, limit in (("train", config.max_train_examples),
                                   ("test", config.max_test_examples))]
        counts = data_lib.EXPECTED_COUNTS if full else {}
    else:
        raw = [split.take(limit) for split, limit in
               zip(data, (config.max_train_examples, config.max_test_examples))]
        counts = {}
    train, test = (data_lib.validate_split(split, expected_count=counts.get(split.name))
                   for split in raw)
    return train, test, data is None


def _data_record(train: Any, test: Any, from_tfds: bool) -> dict[str, Any]:
    """Where the data came from, and a fingerprint of exactly what was read (lineage)."""
    import hashlib

    from components import data as data_lib

    digest = hashlib.sha256()
    for array in (train.images, train.labels, test.images, test.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    record: dict[str, Any] = {"fingerprint": digest.hexdigest()[:32],
                              "source": "tfds" if from_tfds else "in-memory (tests, other "
                                                                  "sources)"}
    if from_tfds:
        record.update(tfds_name=data_lib.DATASET, tfds_version=data_lib.tfds_version(),
                      manual_files_sha256={name: sha for name, (_, sha) in
                                           data_lib._registered_files().items()})
    return record


def _check_drift(stats: Any, models: Path) -> None:
    from components import exporter, statistics
    from components.data import DataError

    latest = exporter.latest_version_dir(models)
    if latest is None:
        return
    baseline = latest / "assets.extra" / statistics.STATISTICS_FILE
    if not baseline.is_file():
        return
    findings = statistics.check_drift(stats, statistics.read(baseline), f"version {latest.name}")
    if findings:
        raise DataError("the data drifted from what trained the published model: "
                        + "; ".join(findings))


def _print_stage_result(run: stages.Run, name: str) -> None:
    m = run.metrics
    if name == "validate":
        infra = m.get("infra_validation", {})
        print(f"Infra validation: the exported model loads as TF Serving loads it, replays "
              f"{infra.get('warmup_records_replayed')} warmup records and matches the trained "
              f"model on {m['test_examples']} test images ({infra.get('seconds', 0):.1f} s)")
        print(f"Test accuracy: {m['test_accuracy']:.4f}  (loss {m['test_loss']:.4f}, "
              f"{m['test_examples']} test images, exported model)")
        u = m["uncertainty"]
        if u["flagged_fraction"] and u["accuracy_flagged"] is not None:
            print(f"Unsure: {u['flagged_fraction']:.1%} of test predictions flagged (top "
                  f"probability < {u['threshold']:.3f}, calibrated on validation): accuracy "
                  f"{u['accuracy_flagged']:.3f} flagged vs {u['accuracy_unflagged']:.4f} not")
        predictions = np.load(run.layout.served)
        print(f"First test image: predicted {int(predictions[0].argmax())}, true "
              f"{int(run.splits['test'].labels[0])}")
    elif name == "publish":
        if m.get("published_version") is not None:
            print(f"Published version {m['published_version']}: {m['published_path']} "
                  f"({m['gate']['reason']})")
        else:
            print(f"NOT published: {m['gate']['reason']}")


def finish(run: stages.Run) -> RunResult:
    """metrics.json (the run is finished once it exists) and runs/latest."""
    history = json.loads(run.layout.history.read_text()) if run.layout.history.is_file() else {}
    run.timings["pipeline_seconds"] = time.perf_counter() - run.started
    run.metrics.update(history=history, timings=run.timings)
    write_json(run.layout.metrics, run.metrics)
    update_latest(run.layout.root.parent, run.run_id)
    print(f"Run {run.run_id}: metrics {run.layout.metrics}, report {run.layout.report}, "
          f"TensorBoard {run.tensorboard}")
    return RunResult(run.run_id, run.layout.root, run.metrics)


def rebuild_report(run_dir: Path) -> list[Path]:
    """Redraw an earlier run's report from its saved evaluation outputs."""
    from components import evaluator, report

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = evaluator.load_predictions(run_dir / evaluator.PREDICTIONS_FILE)
    config = json.loads((run_dir / "config.json").read_text())
    return report.write_report(run_dir / "report", predictions, metrics, metrics.get("history"),
                               config.get("requested", config))
