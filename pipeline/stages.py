"""The stages of a training run, TFX-style: each reads its input artifacts from the run folder,
writes its outputs atomically, and records what it did in `stages/<name>.json` (inputs, outputs,
settings, seconds). A named run that is started again skips every stage whose record and outputs
exist: a run killed after training does not train again; one that failed at publish redoes
publish.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from components import files
from components.files import save_npz, tree_sha256
from pipeline.config import ConfigError, TrainConfig, hparam_keys

log = logging.getLogger("pipeline")


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    files.write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Every file of a run folder, named once."""

    root: Path

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.json")
    records = property(lambda self: self.root / "stages")
    statistics = property(lambda self: self.root / "data" / "statistics.pb")
    model = property(lambda self: self.root / "train" / "model.keras")
    history = property(lambda self: self.root / "train" / "history.json")
    calibration = property(lambda self: self.root / "train" / "calibration.json")
    backup = property(lambda self: self.root / "backup")
    export = property(lambda self: self.root / "export")
    evaluation = property(lambda self: self.root / "evaluation")
    examples = property(lambda self: self.root / "evaluation" / "test_examples.npz")
    served = property(lambda self: self.root / "evaluation" / "candidate_probabilities.npy")
    baseline = property(lambda self: self.root / "evaluation" / "baseline_probabilities.npy")
    infra = property(lambda self: self.root / "evaluation" / "infra_validation.json")
    blessing = property(lambda self: self.root / "evaluation" / "blessing.json")
    publication = property(lambda self: self.root / "evaluation" / "published.json")
    predictions = property(lambda self: self.root / "predictions.npz")
    report = property(lambda self: self.root / "report")


@dataclasses.dataclass
class Run:
    """What the stages of one run share: settings, where things go, what is loaded."""

    config: TrainConfig
    run_id: str
    layout: RunLayout
    artifacts: Path
    tensorboard: Path
    models: Path
    is_chief: bool = True
    resuming: bool = False
    splits: dict[str, Any] = dataclasses.field(default_factory=dict)
    full_test_split: bool = True
    strategy: Any = None
    effective: Any = None
    model: Any = None
    history: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    validator: Any = None
    restore_from: Path | None = None
    tfds_data_dir: Path | None = None
    tfds_manual_dir: Path | None = None
    data_override: tuple[Any, Any] | None = None
    tf_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    redoing: bool = False
    stages_done: list[str] = dataclasses.field(default_factory=list)  # kept or run, this attempt
    lock: Any = None  # the open run-folder lock, held until the process ends
    early_figures: Any = None  # a Future: the report's figures, drawn during the validation
    photo_expected: Any = None  # a Future: the trained model on predict_image's sample
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def keras_model(self) -> Any:
        """The trained model: in memory when this process trained it, else from train/."""
        if self.model is None:
            import keras

            try:
                self.model = keras.models.load_model(self.layout.model, compile=False)
            except Exception as e:  # a truncated or garbled file: Keras raises many kinds
                raise ArtifactError(
                    f"{self.layout.model} cannot be loaded ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); delete "
                    f"{self.layout.model.parent} and {self.layout.records / 'train.json'} to "
                    f"train again, or pick another --run-name"
                ) from None
        return self.model


class ArtifactError(RuntimeError):
    """A file of a run (or of a published version) is unreadable: exit 6, naming the file."""


def read_json(path: Path) -> Any:
    """A run's JSON file, or ArtifactError naming it and what to do."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(
            f"{path} cannot be read ({e}); delete it (and the stage's record "
            f"in stages/) to redo that stage, or pick another --run-name"
        ) from None


def run_stage(
    run: Run, name: str, stage: Callable[[Run], dict[str, Any]], outputs: list[Path]
) -> None:
    """Run `stage` unless a readable record and every output exist from an earlier attempt
    and no earlier stage of this attempt was redone (a redone stage invalidates the later
    ones: their inputs changed)."""
    record_path = run.layout.records / f"{name}.json"
    record = _readable_record(record_path) if not run.redoing else None
    if record is not None and _outputs_intact(run, name, record, outputs):
        run.metrics.update(record.get("metrics", {}))
        log.info("stage %s: done earlier (%s), not redone", name, record.get("finished"))
        run.stages_done.append(name)
        return
    run.redoing = True
    if run.is_chief:
        # The records of this stage and of every later one, from any earlier attempt, go first:
        # if this attempt fails halfway, a later one must not trust what was built on the old
        # inputs (a validation that passed on a model since retrained).
        for stale in run.layout.records.glob("*.json"):
            if stale.stem not in run.stages_done:
                stale.unlink(missing_ok=True)
    started = time.perf_counter()
    settings = stage(run) or {}
    seconds = time.perf_counter() - started
    run.timings[f"{name}_seconds"] = seconds
    run.stages_done.append(name)
    if run.is_chief:
        write_record(run, name, seconds, outputs, settings)


def write_record(
    run: Run, name: str, seconds: float, outputs: list[Path], extra: dict[str, Any]
) -> None:
    """stages/<name>.json: when the stage finished, how long it took, its outputs and their
    SHA-256 (what lets a resumed run trust them), and what the stage adds (inputs, settings,
    metrics)."""
    files.folder(run.layout.records)
    write_json(
        run.layout.records / f"{name}.json",
        {
            "stage": name,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "outputs": [_output_key(run, p) for p in outputs],
            "outputs_sha256": {_output_key(run, p): tree_sha256(p) for p in outputs if p.exists()},
            **extra,
        },
    )


def _output_key(run: Run, path: Path) -> str:
    """How a stage record names an output: relative to the run folder (so that the same run
    reached as `artifacts/...`, `./artifacts/...` or by its absolute path, or its artifacts
    folder moved, finds its outputs), or its absolute path when outside it."""
    resolved, root = Path(path).resolve(), run.layout.root.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def _outputs_intact(run: Run, name: str, record: dict[str, Any], outputs: list[Path]) -> bool:
    """Every output exists and is byte for byte what the stage wrote: a staged export damaged
    after its validation must not be published (the stage and every later one are redone)."""
    recorded = record.get("outputs_sha256")
    if not isinstance(recorded, dict):
        return False  # a record from before outputs were fingerprinted: redo
    for path in outputs:
        if not path.exists():
            return False
        if recorded.get(_output_key(run, path), recorded.get(str(path))) != tree_sha256(path):
            log.warning("stage %s: %s changed since the stage finished: redoing it", name, path)
            return False
    return True


def _lock_run(run_dir: Path) -> Any:
    """One process per run folder: a second `--run-name X` while X runs is refused (exit 2)
    instead of both training into the same backup."""
    import fcntl

    try:
        handle = files.open_lock(run_dir / ".lock")
    except files.NotARegularFile as e:
        raise RunStateError(
            f"run {run_dir.name}: {e.filename} is {files.NOT_A_LOCK}: remove it"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunStateError(
            f"run {run_dir.name} is in use by another process; wait for it "
            f"to end, or pick another --run-name"
        ) from None
    return handle


def _readable_record(path: Path) -> dict[str, Any] | None:
    """A stage record, or None when it is missing or unreadable (the stage is then redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        if path.exists():
            log.warning("stage record %s is unreadable: redoing that stage", path)
        return None
    return record if isinstance(record, dict) else None


class RunStateError(RuntimeError):
    """A named run cannot be resumed as asked (finished, or started with another config)."""


def failed_validation(run_dir: Path) -> bool:
    """Whether the run ended at a failed infra validation (its metrics.json says so): such a
    run is taken up again by the same --run-name (the validation is redone, not training: a
    timeout or a model server that did not start need not be the model's fault)."""
    try:
        infra = json.loads((run_dir / "metrics.json").read_text()).get("infra_validation")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(infra, dict) and infra.get("passed") is False


def prepare_run_dir(run_dir: Path, config: TrainConfig, effective: dict[str, Any]) -> bool:
    """Create the run dir, or check that an existing one can be resumed. True when resuming.
    An empty one (a run killed before it wrote its config) is started afresh."""
    if not run_dir.exists() or _empty_folder(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_json(run_dir / "config.json", effective)
        return False
    check_resumable(run_dir, config)
    return True


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False  # (an unreadable folder: said when it is read)


def check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """RunStateError unless the existing `run_dir` can be taken up by `config`: not finished
    (or ended at a failed infra validation), started with the same settings. Reads only: the
    pipeline asks it before TensorFlow's import and the data load, so a finished run is refused
    in a moment, and again when it opens the folder."""
    if _empty_folder(run_dir):
        return  # (killed before it wrote its config: started afresh)
    if (run_dir / "metrics.json").exists() and not failed_validation(run_dir):
        raise RunStateError(
            f"run {run_dir.name} already finished ({run_dir}); pick another --run-name"
        )
    try:
        previous = TrainConfig.from_json(run_dir / "config.json").to_dict()
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise RunStateError(
            f"run {run_dir.name} exists but its config.json cannot be read "
            f"({e}); pick another --run-name"
        ) from None
    changed = {k: (previous[k], v) for k, v in config.to_dict().items() if previous[k] != v}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise RunStateError(
            f"run {run_dir.name} was started with another config ({diff}); "
            f"resume it with the same flags, or pick another --run-name"
        )


# --------------------------------------------------------------------------------------------
# The stages


def setup(run: Run) -> Any:
    """Device, strategy and the settings they allow (logged, and kept for config.json)."""
    from components.strategy import effective_settings, set_precision, setup_device

    config = run.config
    t = time.perf_counter()
    choice, run.strategy, capability = setup_device(
        config.device,
        deterministic=config.deterministic,
        seed=config.seed,
        tf_config=run.tf_config,
        cpu_devices=config.cpu_devices,
        cpu_threads=config.cpu_threads,
        step_size=config.batch_size * config.hidden_units,  # one replica: its whole batch
    )
    run.effective = effective_settings(
        choice,
        run.strategy.num_replicas_in_sync,
        batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution,
        jit_compile=config.jit_compile,
        mixed_precision=config.mixed_precision,
        dropout=config.dropout,
        compute_capability=capability,
    )
    set_precision(run.effective.mixed_precision)
    log.info(
        "device: %s; %d replica(s), global batch %d, per-replica batch %d",
        choice.description,
        run.effective.replicas,
        config.batch_size,
        run.effective.per_replica_batch,
    )
    for reason in run.effective.why:
        log.info("setting: %s", reason)
    run.timings["device_seconds"] = time.perf_counter() - t
    return choice


def ingest(run: Run) -> None:
    """Device and strategy, the splits (validated, the validation split carved with the seed),
    their statistics and the drift check; then the run folder (created or resumed)."""
    from components import data as data_lib

    choice, config = setup(run), run.config
    t = time.perf_counter()
    data = run.data_override
    train, test, from_tfds = _load(config, run.tfds_data_dir, run.tfds_manual_dir, data)
    full_count = data_lib.EXPECTED_COUNTS["test"] if data is None else len(data[1])
    run.full_test_split = len(test) == full_count
    fit, validation = _carve_validation(train, config)
    sample = data_lib.Split(train.name, train.images[:1].copy(), train.labels[:1].copy())
    run.splits = {"train": fit, "validation": validation, "test": test, "sample": sample}
    stats = _split_statistics(train, test, fit, validation)
    if from_tfds and config.max_train_examples is None and run.full_test_split:
        _check_drift(stats, run.models)
    run.timings["data_seconds"] = time.perf_counter() - t
    log.info(
        "data: %d train, %s, %d test examples "
        "(no epoch touches the test split: it is evaluated after training)",
        len(fit),
        f"{len(validation)} validation (held out of train, seed {config.seed})"
        if validation is not None
        else "no validation",
        len(test),
    )
    if not run.is_chief:
        return
    _open_run_dir(run, stats, test)
    run.metrics.update(
        run_id=run.run_id,
        device=choice.device,
        strategy=choice.kind,
        replicas=run.effective.replicas,
        examples={"train": len(fit), "validation": len(validation or ()), "test": len(test)},
        full_test_split=run.full_test_split,
    )
    run.metrics["data"] = {
        **_data_record(train, test, from_tfds),
        "examples": run.metrics["examples"],
    }
    _record_ingest(run)


def _record_ingest(run: Run) -> None:
    """The ingest stage's record, as every stage's (stages/ingest.json): what it read (the
    data's source and fingerprint), what it wrote, with which settings, and how long it took.
    Ingest runs on every attempt (its splits live in memory), so it is never skipped."""
    config = run.config
    write_record(
        run,
        "ingest",
        run.timings["data_seconds"],
        [run.layout.statistics, run.layout.examples],
        {
            "inputs": {
                "data": run.metrics["data"],
                "tfds_data_dir": str(run.tfds_data_dir) if run.tfds_data_dir else None,
                "tfds_manual_dir": str(run.tfds_manual_dir) if run.tfds_manual_dir else None,
            },
            "settings": {
                k: getattr(config, k)
                for k in ("validation_fraction", "seed", "max_train_examples", "max_test_examples")
            },
        },
    )
    run.stages_done.append("ingest")


def _carve_validation(train: Any, config: TrainConfig) -> tuple[Any, Any]:
    """(fit, validation): the validation split carved out of train with the seed, or None."""
    from components import data as data_lib

    fit, validation = train, None
    if config.validation_fraction > 0:
        try:
            fit, validation = data_lib.carve_validation(
                train, config.validation_fraction, config.seed
            )
        except data_lib.EmptyHoldOut as e:
            raise ConfigError(
                f"validation_fraction {e}; {e.advice} (or 0: no validation)"
            ) from None
        if len(fit) < config.batch_size <= len(train):  # (0.99999: epochs of one example)
            raise ConfigError(
                f"validation_fraction {config.validation_fraction:g} of {len(train)} training "
                f"examples leaves {len(fit)} for training, less than one batch "
                f"({config.batch_size}); use a smaller fraction (or 0: no validation) or a "
                f"smaller --batch-size"
            )
    return fit, validation


def _split_statistics(train: Any, test: Any, fit: Any, validation: Any) -> Any:
    """Statistics of every split the run uses."""
    from components import statistics

    # The TFDS splits as read (what the drift check compares: they do not depend on the seed
    # or the validation fraction), then the carved ones.
    return statistics.compute(
        {
            k: v
            for k, v in (
                ("train", train),
                ("test", test),
                ("train (fit)", fit if validation is not None else None),
                ("validation", validation),
            )
            if v is not None
        }
    )


def _open_run_dir(run: Run, stats: Any, test: Any) -> None:
    """The chief's run folder, created or resumed and locked, with the data's statistics and
    the test examples the validating process evaluates."""
    from components import statistics

    run.resuming = prepare_run_dir(run.layout.root, run.config, run.effective.to_dict())
    run.lock = _lock_run(run.layout.root)
    log.info("run %s -> %s%s", run.run_id, run.layout.root, " (resuming)" if run.resuming else "")
    files.folder(run.layout.statistics.parent)
    statistics.write(run.layout.statistics, stats)
    files.folder(run.layout.evaluation)
    save_npz(run.layout.examples, images=test.images, labels=test.labels)


def _load(
    config: TrainConfig,
    data_dir: Path | None,
    manual_dir: Path | None,
    data: tuple[Any, Any] | None,
) -> tuple[Any, Any, bool]:
    from components import data as data_lib

    if data is None:
        full = config.max_train_examples is None and config.max_test_examples is None
        raw = [
            data_lib.load_split(name, data_dir=data_dir, manual_dir=manual_dir, limit=limit)
            for name, limit in (
                ("train", config.max_train_examples),
                ("test", config.max_test_examples),
            )
        ]
        counts = data_lib.EXPECTED_COUNTS if full else {}
    else:
        raw = [
            split.take(limit)
            for split, limit in zip(data, (config.max_train_examples, config.max_test_examples))
        ]
        counts = {}
    train, test = (
        data_lib.validate_split(split, expected_count=counts.get(split.name)) for split in raw
    )
    return train, test, data is None


def _data_record(train: Any, test: Any, from_tfds: bool) -> dict[str, Any]:
    """Where the data came from, and a fingerprint of exactly what was read (lineage)."""
    import hashlib

    from components import data as data_lib

    digest = hashlib.sha256()
    for array in (train.images, train.labels, test.images, test.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    record: dict[str, Any] = {
        "fingerprint": digest.hexdigest()[:32],
        "source": "tfds" if from_tfds else "in-memory (tests, other sources)",
    }
    if from_tfds:
        record.update(
            tfds_name=data_lib.DATASET,
            tfds_version=data_lib.tfds_version(),
            manual_files_sha256={
                name: sha for name, (_, sha) in data_lib._registered_files().items()
            },
        )
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
    try:
        before = statistics.read(baseline)
        findings = statistics.check_drift(stats, before, f"version {latest.name}")
    except Exception as e:  # a garbled file (protobuf DecodeError, missing fields)
        log.warning(
            "the statistics of version %s are unreadable (%s): no drift check",
            latest.name,
            type(e).__name__,
        )
        return
    if findings:
        raise DataError(
            "the data drifted from what trained the published model: " + "; ".join(findings)
        )


def announce(run: Run, name: str) -> None:
    """What a person reads after a stage: the console lines of the run."""
    m = run.metrics
    if name == "validate":
        infra = m.get("infra_validation", {})
        print(
            f"Infra validation: the exported model loads as TF Serving loads it, replays "
            f"{infra.get('warmup_records_replayed')} warmup records and matches the trained "
            f"model on {m['test_examples']} test images ({infra.get('seconds', 0):.1f} s)"
        )
        print(
            f"Test accuracy: {m['test_accuracy']:.4f}  (exported model, {m['test_examples']} "
            f"test images; loss {m['test_loss']:.4f}, Keras's, as val_loss)"
        )
        u = m.get("uncertainty") or {}
        if u.get("flagged_fraction") and u.get("accuracy_flagged") is not None:
            from components.report import threshold_origin

            how = threshold_origin(u)
            unflagged = (
                f"{u['accuracy_unflagged']:.4f} not"
                if u.get("accuracy_unflagged") is not None
                else "none left unflagged"
            )
            print(
                f"Unsure: {u['flagged_fraction']:.1%} of test predictions flagged (top "
                f"probability < {u['threshold']:.3f}, {how}): accuracy "
                f"{u['accuracy_flagged']:.4f} flagged vs {unflagged}"
            )
        predictions = np.load(run.layout.served)
        print(
            f"First test image: predicted {int(predictions[0].argmax())}, true "
            f"{int(run.splits['test'].labels[0])}"
        )
    elif name == "publish":
        if m.get("published_version") is not None:
            print(
                f"Published version {m['published_version']}: {m['published_path']} "
                f"({m['gate']['reason']})"
            )
            pinned = _pinned_by_labels(run.models)
            if pinned and m["published_version"] not in pinned.values():
                said = ", ".join(f"{label} {v}" for label, v in pinned.items())
                print(
                    f"Not served yet: the labels pin TF Serving to {said}; `make models "
                    f'ARGS="promote {m["published_version"]}"` (or canary) serves this version'
                )
        else:
            print(f"NOT published: {m['gate']['reason']}")


def _pinned_by_labels(models: Path) -> dict[str, int]:
    """The labelled versions TF Serving serves (models.config's `specific` policy), if any."""
    from serving import versions

    try:
        labels = versions.read_labels(models)
    except versions.VersionError:  # `make models` says what is wrong with it
        return {}
    return {k: labels[k] for k in versions.LABELS if labels[k] is not None}


def train(run: Run) -> dict[str, Any]:
    """Fit, then save the trained model and its history; the backup stays until the stage's
    record is written too (`drop_backup`, called by the pipeline)."""
    import keras

    from components import trainer

    # Seeded again here, not only at device set-up: whatever ran in between (TFDS preparing the
    # data on a first run draws from Python's `random`, which Keras's default seeds come from)
    # must not change the initial weights.
    keras.utils.set_random_seed(run.config.seed)
    # Before the fit, not after it: a link where the model goes (a drive not mounted) must
    # stop the run before its training, not lose it at the save.
    files.folder(run.layout.model.parent)
    result = _fit(run)
    run.history = result.history
    # Later stages run on the chief alone: a model whose variables are mirrored across workers
    # would make their predictions collective (waiting forever for the others), so they read the
    # saved model instead; on one device the in-memory model is the same and saves a load.
    run.model = (
        result.model
        if run.strategy.num_replicas_in_sync == 1
        and run.effective.strategy in ("default", "one_device")
        else None
    )
    with files.replaced(run.layout.model) as tmp:
        result.model.save(tmp)
    write_json(run.layout.history, result.history)
    run.timings["fit_seconds"] = result.fit_seconds
    run.timings["fit_phases"] = result.phases
    metrics = {
        "epochs_trained": result.initial_epoch + len(result.epoch_seconds),
        "resumed_from_epoch": result.initial_epoch,
        "epoch_seconds": result.epoch_seconds,
        "weights_sha256": trainer.weights_sha256(result.model),
    }
    if run.is_chief:
        metrics["uncertainty_calibration"] = _calibrate(run)
    # The backup stays until the stage's record is written too (`drop_backup`).
    run.metrics.update(metrics)
    return {
        "inputs": {"data": str(run.layout.statistics)},
        "metrics": metrics,
        "settings": run.effective.to_dict(),
    }


def drop_backup(run: Run) -> None:
    """The backup, once the train stage is recorded: its record (with the fingerprints of
    train/model.keras and the history) is what lets a rerun skip training. Deleted earlier, a
    run stopped between the two (a full disk at the record, a kill) would train again from
    epoch 0; kept, the rerun resumes at the last epoch and trains nothing."""
    shutil.rmtree(run.layout.backup, ignore_errors=True)


def _fit(run: Run) -> Any:
    """The trainer on the run's splits: a fresh model, or the one its backup holds."""
    from components import data as data_lib
    from components import monitoring, trainer
    from components.model import build_model

    config, eff = run.config, run.effective
    fit_split, val_split = run.splits["train"], run.splits.get("validation")
    return trainer.train(
        lambda: build_model(
            config.hidden_units,
            config.learning_rate,
            config.dropout,
            steps_per_execution=eff.steps_per_execution,
            jit_compile=eff.jit_compile,
        ),
        lambda epoch, steps: data_lib.make_train_dataset(
            fit_split, config.batch_size, seed=config.seed, epoch=epoch, steps_per_element=steps
        ),
        data_lib.make_dataset(val_split, max(config.batch_size, 1024))
        if val_split is not None
        else None,
        batch_size=config.batch_size,
        epochs=config.epochs,
        strategy=run.strategy,
        # Every worker logs (a non-chief into its scratch folder): under MultiWorkerMirrored the
        # callbacks' predict passes are collective, so all workers must run them.
        tensorboard_dir=run.tensorboard,
        backup_dir=run.layout.backup,
        restore_from=run.restore_from,
        update_freq=config.tensorboard_update_freq,
        verbose=None if run.is_chief else 0,
        # Keras counts host round-trips here; start a few into epoch 2 (past tracing).
        profile=functools.partial(_profile_window, run, fit_split)
        if config.profile_executions
        else None,
        extra_callbacks=[
            monitoring.EpochImages(run.tensorboard, val_split.images, val_split.labels)
        ]
        if val_split is not None
        else [],
        # The chief's: a non-chief worker writes nothing into the shared artifacts folder.
        compile_cache=run.artifacts / "cache" / "xla" if run.is_chief else None,
    )


def _calibrate(run: Run) -> dict[str, Any]:
    """The `uncertain` threshold, from the trained model on the validation split."""
    from components import evaluator

    val = run.splits.get("validation")
    probs = (
        evaluator.predict_probabilities(run.keras_model(), val.images) if val is not None else None
    )
    calibration = evaluator.calibrate_uncertainty(probs, val.labels if val is not None else None)
    write_json(run.layout.calibration, calibration)
    return calibration


def _profile_window(run: Run, fit_split: Any, start_epoch: int) -> tuple[int, int]:
    """Keras's profile_batch counts batches as `on_train_batch_begin` sees them (one per host
    round-trip) from the start of this `fit` (a resumed run's at `start_epoch`): a few
    round-trips into its second epoch, past the first one's tracing and compiling (with one
    epoch left: into that one), to the end of training at most."""
    steps = -(-len(fit_split) // run.config.batch_size)
    per_epoch = -(-steps // run.effective.steps_per_execution)
    epochs = max(run.config.epochs - start_epoch, 1)
    first = per_epoch if epochs > 1 else 0
    start = first + min(2, per_epoch - 1) + 1
    return start, min(start + run.config.profile_executions - 1, per_epoch * epochs)


def export(run: Run) -> dict[str, Any]:
    """The staged SavedModel (signatures, warmup records) from train/model.keras."""
    from components import exporter

    # A head start for the validation, on the core the export leaves idle.
    run.photo_expected = _photo_expectation(
        run.keras_model(), run.splits["test"].images[:PHOTO_SAMPLE]
    )
    with files.replaced(run.layout.export) as tmp:
        exporter.export_saved_model(
            run.keras_model(), tmp, uncertainty=read_json(run.layout.calibration)
        )
    return {"inputs": {"model": str(run.layout.model)}}


def _check_baseline(
    baseline: Path | None, consequence: str = "the new model was not judged"
) -> None:
    """The latest published version is the gate's baseline: damaged, it can neither be compared
    with nor served, and the new model is not at fault; say which folder and what to do."""
    from components.files import damaged_files
    from components.infra_validator import BaselineDamaged
    from serving.client import damaged_message

    if baseline is None:
        return
    damaged = damaged_files(baseline)
    if damaged:
        raise BaselineDamaged(
            "the baseline (the latest published version) "
            + damaged_message(baseline, damaged)
            + f"; {consequence}"
        )


def head_starts(run: Run) -> None:
    """Work of the later stages that needs nothing from training, started before it on the
    core the trainer leaves idle (its first epoch, tracing and compiling, runs on one): the
    validating process scores the baseline on the test examples. Redone by its stage if it
    did not happen."""
    from components import exporter

    baseline = exporter.latest_version_dir(run.models)
    if not (run.layout.records / "validate.json").is_file():
        # The validate stage would refuse it after the training: refused before it instead.
        trained = (run.layout.records / "train.json").is_file()
        _check_baseline(
            baseline,
            "the new model was not judged"
            if trained
            else "checked before training: nothing was trained",
        )
    # Whether or not the validate stage will run (a resumed run may skip it): unused scores
    # cost only that idle core.
    if run.validator is not None:
        run.validator.score_baseline(baseline, run.layout.examples)


def validate(run: Run) -> dict[str, Any]:
    """Infra validation and evaluation of the *exported* model, and the baseline's, in the
    validating process; the served outputs must match the trained Keras model's."""
    from components import evaluator, exporter

    baseline = exporter.latest_version_dir(run.models)
    _check_baseline(baseline)
    test = run.splits["test"]
    # Begun during the export (else now, while the trainer only waits): the trained model on
    # the photo signature's sample.
    photo_expected = run.photo_expected or _photo_expectation(
        run.keras_model(), test.images[:PHOTO_SAMPLE]
    )
    record = run.validator.validate(
        run.layout.export,
        run.layout.examples,
        run.layout.evaluation,
        baseline=baseline,
        sample=PHOTO_SAMPLE,
        on_probabilities=lambda: _draw_figures_early(run),
    )
    served = np.load(run.layout.served)
    losses = _check_served_as_trained(run, record, served)
    _check_photo_signature(run, record, photo_expected.result(), _tolerance(run))
    calibration = read_json(run.layout.calibration)
    threshold = calibration["threshold"]
    metrics = {
        # test_loss as Keras computes val_loss (from the trained model's logits: the served
        # probabilities, equal within the tolerance, cannot express a confident mistake's loss)
        **evaluator.compute_metrics(served, test.labels, losses),
        "baseline_version": int(baseline.name) if baseline is not None else None,
        "uncertainty": {
            "threshold": threshold,
            "calibrated": bool(calibration.get("calibrated")),
            **evaluator.uncertainty_rates(served, test.labels, threshold),
        },
        "evaluated": "the exported SavedModel, as served",
        "test_loss_from": "the trained Keras model: Keras's loss, as for val_loss (its "
        "probabilities match the served ones within the tolerance above)",
        "infra_validation": {**record, "passed": True},
    }
    run.metrics.update(metrics)
    evaluator.save_predictions(run.layout.predictions, served, test, run.splits["sample"])
    return {
        "inputs": {
            "export": str(run.layout.export),
            "baseline": str(baseline) if baseline else None,
        },
        "metrics": metrics,
    }


def _tolerance(run: Run) -> float:
    """float32 on the CPU on both sides: 1e-5. A model trained on a GPU (TF32 matmuls) or in
    float16 (mixed precision, on any device: its export and the trained model round float16
    sums differently) gets a wider tolerance, and a class may flip only where the trained
    model's top two probabilities are within it."""
    float32_on_cpu = run.effective.device == "cpu" and not run.effective.mixed_precision
    return 1e-5 if float32_on_cpu else 2e-3


def _check_served_as_trained(run: Run, record: dict[str, Any], served: np.ndarray) -> Any:
    """The served probabilities of the test split must be the trained model's (within the
    tolerance); returns the trained model's per-example losses (Keras's, for test_loss)."""
    from components import evaluator
    from components.infra_validator import InfraValidationError

    test = run.splits["test"]
    trained, losses = evaluator.predict_with_loss(run.keras_model(), test.images, test.labels)
    tolerance = _tolerance(run)
    differs, gap = _disagreement(served, trained, tolerance)
    record.update(max_abs_difference_vs_trained_model=gap, tolerance=tolerance)
    if differs or gap > tolerance:
        raise InfraValidationError(
            f"the exported model disagrees with the trained model: {differs} different "
            f"classes, probabilities up to {gap:.2e} apart (tolerance {tolerance:g})",
            record,
        )
    return losses


# Test examples sent through predict_png and predict_image by the infra validation.
PHOTO_SAMPLE = 64


def _disagreement(served: np.ndarray, trained: np.ndarray, tolerance: float) -> tuple[int, float]:
    """(examples whose class differs, beyond near ties; the largest probability difference)."""
    top2 = np.sort(trained, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * tolerance
    differs = int(np.count_nonzero((served.argmax(1) != trained.argmax(1)) & ~near_tie))
    return differs, float(np.abs(served - trained).max()) if served.size else 0.0


def _photo_expectation(model: Any, images: np.ndarray) -> Any:
    """A future: the trained model's probabilities on `images` as predict_image sees them
    (PNG-encoded, normalised by components.photo.normalize_photos, the function inside that
    signature), or the refusal's text when that normalisation refuses them."""
    import tensorflow as tf

    from components import evaluator
    from components.photo import normalize_photos

    def expect() -> np.ndarray | str:
        # On the CPU, as the validating process serves it (a GPU's float rounding could move
        # a threshold of the normalisation and crop a pixel differently).
        with tf.device("/CPU:0"):
            pngs = [tf.io.encode_png(image[..., None]).numpy() for image in images]
            try:
                normalized = normalize_photos(tf.constant(pngs)).numpy()
            except tf.errors.InvalidArgumentError as e:
                return (e.message or str(e)).strip().splitlines()[0]
            return evaluator.predict_with_loss(model, normalized, None)[0]

    return _in_background(expect, "photo-check")


def _in_background(call: Callable[[], Any], name: str) -> Any:
    """`call()` on a thread of its own: its Future (a head start the caller collects later)."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def _check_photo_signature(
    run: Run, record: dict[str, Any], expected: np.ndarray | str, tolerance: float
) -> None:
    """predict_image's answers on the sample must be the trained model's on the same
    normalised images (or both refuse them): the photo path is checked against the model,
    not only for running."""
    from components.infra_validator import SIGNATURE_OUTPUTS, InfraValidationError

    checks = record.get("other_signatures", {}).get("predict_image")
    if checks is None:
        return  # a model exported without it (an older export): nothing to compare
    with np.load(run.layout.evaluation / SIGNATURE_OUTPUTS) as outputs:
        served = outputs["predict_image"] if "predict_image" in outputs.files else None
    if isinstance(expected, str) or served is None:
        if isinstance(expected, str) and served is None:
            return  # both refuse the sample (recorded in other_signatures)
        said = "refuses" if served is None else "answers"
        raise InfraValidationError(
            f"predict_image {said} the {PHOTO_SAMPLE} sample test images, which the same "
            f"normalisation in the trainer {'answers' if served is None else 'refuses'}",
            record,
        )
    differs, gap = _disagreement(served, expected, tolerance)
    checks.update(max_abs_difference_vs_trained_model=gap)
    if differs or gap > tolerance:
        raise InfraValidationError(
            f"predict_image disagrees with the trained model on the same normalised images: "
            f"{differs} of {len(served)} classes differ, probabilities up to {gap:.2e} apart "
            f"(tolerance {tolerance:g})",
            record,
        )


def gate(run: Run) -> dict[str, Any]:
    from components import exporter

    labels = run.splits["test"].labels
    correct = np.load(run.layout.served).argmax(1) == labels
    # The baseline the validating process evaluated (not whatever is latest by now: publish
    # checks that, under its lock, and gates again if another run published meanwhile).
    baseline_version = run.metrics.get("baseline_version")
    baseline_correct = (
        np.load(run.layout.baseline).argmax(1) == labels if baseline_version is not None else None
    )
    decision = exporter.gate(
        correct,
        full_test_split=run.full_test_split,
        min_accuracy=run.config.min_accuracy,
        max_regression=run.config.max_regression,
        allow_partial_test=run.config.publish_partial_test,
        baseline_correct=baseline_correct,
        baseline_version=baseline_version,
    )
    write_json(run.layout.blessing, decision.to_dict())
    metrics = {"blessed": decision.blessed, "gate": decision.to_dict()}
    run.metrics.update(metrics)
    return {"metrics": metrics}


def publish(run: Run) -> dict[str, Any]:
    """Copy the blessed staged model in as the next version; gate again if another run
    published meanwhile."""
    from components import exporter, model_card, statistics
    from serving import versions

    metrics: dict[str, Any] = {"published_version": None, "published_path": None}
    mine = exporter.version_of_run(run.models, run.run_id)
    if mine is not None:  # published before a kill, its record not yet written
        log.info("run %s was already published as version %d", run.run_id, mine)
        metrics = {"published_version": mine, "published_path": str(run.models / str(mine))}
    for _ in range(3 if mine is None else 0):
        if not run.metrics["blessed"]:
            break

        def assets(version: int) -> dict[str, str | bytes]:
            card = _model_card(run, version)
            return {
                exporter.METRICS_FILE: json.dumps(
                    {k: run.metrics[k] for k in ("test_accuracy", "test_loss", "test_examples")}
                    | {
                        "run_id": run.run_id,
                        "version": version,
                        "gate": run.metrics["gate"],
                        "uncertainty": run.metrics.get("uncertainty"),
                    },
                    indent=2,
                )
                + "\n",
                statistics.STATISTICS_FILE: run.layout.statistics.read_bytes(),
                model_card.CARD_JSON: json.dumps(card, indent=2) + "\n",
                model_card.CARD_MD: model_card.markdown(card),
            }

        try:
            result = exporter.publish_staged(
                run.layout.export,
                run.models,
                run_id=run.run_id,
                baseline_version=run.metrics["gate"]["baseline_version"],
                assets=assets,
                keep_versions=run.config.keep_versions,
                protected=lambda: versions.labelled(run.models),
                remembered=lambda: versions.remembered(run.models),
            )
        except exporter.BaselineMoved as moved:
            log.info("version %d was published meanwhile: validating against it", moved.latest)
            validate(run)
            gate(run)
            continue
        metrics = {"published_version": result.version, "published_path": str(result.path)}
        break
    if run.metrics["blessed"] and metrics["published_version"] is None:
        raise exporter.PublishError(
            "other runs kept publishing while this one was being "
            "validated (3 tries); run the same command again"
        )
    run.metrics.update(metrics)
    write_json(run.layout.publication, metrics)
    return {"metrics": metrics}


def _draw_figures_early(run: Run) -> None:
    """The report's figures, drawn on a thread from the served probabilities as soon as the
    validating process has written them, while it replays the warmup and scores the baseline:
    the one stretch of a run where the trainer only waits. `report` uses them only if they were
    drawn from exactly the predictions it reads."""
    import hashlib

    from components import evaluator
    from components import report as report_lib

    test, sample = run.splits["test"], run.splits["sample"]
    history = read_json(run.layout.history) if run.layout.history.is_file() else {}

    def draw() -> tuple[str, dict[str, bytes]]:
        served = np.load(run.layout.served)
        predictions = evaluator.report_inputs(served, test, sample)
        confusion = evaluator.compute_metrics(served, test.labels)["confusion_matrix"]
        figures = report_lib.build_figures(predictions, {"confusion_matrix": confusion}, history)
        return hashlib.sha256(served.tobytes()).hexdigest(), figures

    run.early_figures = _in_background(draw, "figures")


def _figures_drawn_from(run: Run, predictions: dict[str, np.ndarray]) -> Any:
    import hashlib

    if run.early_figures is None:
        return None
    try:
        digest, figures = run.early_figures.result()
    except Exception:  # drawn again below, where a failure is reported
        return None
    served = hashlib.sha256(predictions["probabilities"].tobytes()).hexdigest()
    return figures if digest == served else None


def report(run: Run) -> dict[str, Any]:
    from components import monitoring, statistics
    from components import report as report_lib

    predictions = report_lib.load_predictions(run.layout.predictions)
    history = read_json(run.layout.history) if run.layout.history.is_file() else {}
    config = read_json(run.layout.config)
    report_lib.write_report(
        run.layout.report,
        predictions,
        run.metrics,
        history,
        config["requested"],
        figures=_figures_drawn_from(run, predictions),
        sections=report_sections(run.layout, run.metrics),
    )
    monitoring.log_run_summary(
        run.tensorboard,
        run.run_id,
        config["requested"],
        run.metrics,
        statistics.table(statistics.read(run.layout.statistics)),
        hparam_keys(),
    )
    return {}


def report_sections(layout: RunLayout, metrics: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The report's text sections: the statistics of the data the run read, and the model card
    of the version it published (read back from that version's assets.extra, so the report
    shows what TF Serving's users get). One that cannot be read is left out, with a warning."""
    from google.protobuf.message import DecodeError

    from components import model_card, statistics

    sections = {}
    try:
        text = statistics.table(statistics.read(layout.statistics))
        sections["statistics"] = ("Data statistics (what the run read, per split)", text)
    except (OSError, DecodeError, KeyError, IndexError, ValueError) as e:  # (parsed, not ours)
        log.warning("report: the data statistics cannot be read (%s): left out", e)
    published = metrics.get("published_path")
    if published:
        card = Path(published) / "assets.extra" / model_card.CARD_MD
        try:
            title = f"Model card (version {metrics.get('published_version')})"
            sections["model-card"] = (title, card.read_text())
        except (OSError, UnicodeDecodeError) as e:
            log.warning("report: the model card cannot be read (%s): left out", e)
    return sections


def _model_card(run: Run, version: int) -> dict[str, Any]:
    from components import model_card

    predictions = np.load(run.layout.served)
    config = read_json(run.layout.config)
    return model_card.build(
        version=version,
        run_id=run.run_id,
        metrics=run.metrics,
        config=config["requested"],
        effective=config.get("effective", {}),
        probabilities=predictions,
        labels=run.splits["test"].labels,
        parameters=int(run.keras_model().count_params()),
        data=run.metrics.get("data", {}),
        code=model_card.code_version(Path(__file__).resolve().parents[1]),
        signatures=run.metrics.get("infra_validation", {}).get("signatures", []),
    )
