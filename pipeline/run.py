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

from components import files
from pipeline import stages
from pipeline.config import TrainConfig
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
    """Point runs/latest at `run_id` atomically (a new link renamed over the old one). A
    convenience link: when something else is in its place (a folder), that is left alone
    with a warning, and the run goes on."""
    tmp = runs / f".latest-{run_id}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_id, tmp)
    try:
        os.replace(tmp, runs / "latest")
    except OSError as e:
        tmp.unlink()
        log.warning(
            "could not point %s at this run (%s): move it away to have the link again",
            runs / "latest",
            e.strerror or e,
        )


STAGES = ("train", "export", "validate", "gate", "publish", "report")


def train_pipeline(
    config: TrainConfig,
    paths: Paths,
    *,
    run_id: str | None = None,
    data: tuple[Any, Any] | None = None,
    tf_config: dict[str, Any] | None = None,
) -> RunResult:
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
    if role.is_chief and paths.run_dir(run_id).exists():
        stages.check_resumable(paths.run_dir(run_id), config)  # before the import and the data
    # Started first: its TensorFlow import runs on the other core beside this one's.
    validator = infra_validator.Validator() if role.is_chief else None
    from components.tf_import import import_tensorflow

    import_seconds = import_tensorflow()  # (timed: a fixed cost every run pays)
    if validator is None:
        return _train_as_worker(config, paths, run_id, data, tf_config, role.task)
    run = None
    try:
        run = stages.Run(
            config,
            run_id,
            stages.RunLayout(paths.run_dir(run_id)),
            paths.artifacts,
            paths.tensorboard_dir(run_id),
            paths.models,
            validator=validator,
            tfds_data_dir=paths.tfds_data_dir,
            tfds_manual_dir=paths.tfds_manual_dir,
            data_override=data,
            tf_config=tf_config,
        )
        run.timings["import_tensorflow_seconds"] = import_seconds
        stages.ingest(run)
        stages.head_starts(run)
        _run_stages(run)
        return finish(run)
    finally:
        validator.close()
        if run is not None and run.lock is not None:
            run.lock.close()  # the run folder is free for the next attempt


def _run_stages(run: stages.Run) -> None:
    """Every stage after ingest, in order; a failed infra validation ends the run recorded."""
    from components import infra_validator

    outputs = _stage_outputs(run.layout)
    for name in STAGES:
        try:
            stages.run_stage(run, name, getattr(stages, name), outputs[name])
            if name == "train":
                stages.drop_backup(run)
        except infra_validator.InfraValidationError as e:
            if not isinstance(e, infra_validator.BaselineDamaged):
                try:
                    finish_unvalidated(run, e)
                except (OSError, stages.ArtifactError) as failed:  # the validation's error stands
                    log.warning("could not record the failed validation: %s", failed)
            raise
        stages.announce(run, name)


def _stage_outputs(layout: stages.RunLayout) -> dict[str, list[Path]]:
    """The files each stage writes: with its record, what lets a resumed run skip it."""
    return {
        "train": [layout.model, layout.history, layout.calibration],
        "export": [layout.export],
        "validate": [layout.served, layout.predictions],
        "gate": [layout.blessing],
        "publish": [layout.publication],
        "report": [layout.report],
    }


def _train_as_worker(
    config: TrainConfig,
    paths: Paths,
    run_id: str,
    data: Any,
    tf_config: dict[str, Any] | None,
    task: str,
) -> RunResult:
    """A non-chief worker trains with the chief (resuming from the chief's backup, read-only)
    and saves into a scratch folder it deletes; the chief does everything else."""
    scratch, lock = worker_scratch(paths.artifacts / ".workers", f"{run_id}-{task}")
    try:
        return _train_in_scratch(config, paths, run_id, data, tf_config, task, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        lock.close()
        try:
            scratch.parent.rmdir()  # the last worker out removes .workers
        except OSError:
            pass


def worker_scratch(workers: Path, name: str) -> tuple[Path, Any]:
    """A non-chief worker's scratch folder `workers`/`name`, and the open file whose lock
    (held until closed) says its worker is alive. Folders whose lock is free (their worker was
    killed: the kernel released it) are removed first, whatever run they belong to. Sweeping
    and creating happen under one lock, so two workers starting at once (a cluster
    restarted) never remove each other's folder."""
    import hashlib
    import tempfile

    workers.mkdir(parents=True, exist_ok=True)
    # (in the temporary folder, named after `workers`: the artifacts folder keeps no lock file;
    # the processes this serialises are on one host, as flock's locks are)
    key = hashlib.sha256(str(workers.resolve()).encode()).hexdigest()[:16]
    with files.open_lock(Path(tempfile.gettempdir()) / f"mnist-workers-{key}.lock") as sweep:
        _flock(sweep, blocking=True)
        for folder in workers.iterdir():
            if folder.name.startswith("."):
                continue  # (nothing of ours: every scratch folder is renamed into place)
            try:
                with files.open_lock(folder / ".lock", create=False) as probe:
                    if _flock(probe, blocking=False):
                        log.info("removing the scratch folder a killed worker left: %s", folder)
                        shutil.rmtree(folder, ignore_errors=True)
            except OSError:  # not a worker's folder: left alone
                continue
        # Made under a temporary name with its lock held, then renamed into place.
        fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=workers))
        lock = open(fresh / ".lock", "w")
        _flock(lock, blocking=True)
        scratch = workers / name
        shutil.rmtree(scratch, ignore_errors=True)  # the same task's, started again
        os.replace(fresh, scratch)
    return scratch, lock


def _flock(handle: Any, blocking: bool) -> bool:
    """An exclusive lock on `handle`: True when taken. Where the file system has no locks
    (ENOLCK), False: a folder whose lock cannot be taken is never taken for a dead worker's."""
    import errno
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        return False


def _train_in_scratch(
    config: TrainConfig,
    paths: Paths,
    run_id: str,
    data: tuple[Any, Any] | None,
    tf_config: dict[str, Any] | None,
    task: str,
    scratch: Path,
) -> RunResult:
    chief = stages.RunLayout(paths.run_dir(run_id))
    if (chief.records / "train.json").is_file() and chief.model.is_file():
        # The chief trained before the restart; what is left needs no other worker.
        print(f"{task}: the chief has finished training; nothing to do")
        return RunResult(run_id, chief.root, {"chief": False})
    # Only the chief's lines are news; the others' would repeat them.
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    run = stages.Run(
        config,
        run_id,
        stages.RunLayout(scratch / "run"),
        scratch,
        scratch / "tensorboard",
        scratch / "models",
        is_chief=False,
        restore_from=paths.run_dir(run_id) / "backup",
        tfds_data_dir=paths.tfds_data_dir,
        tfds_manual_dir=paths.tfds_manual_dir,
        data_override=data,
        tf_config=tf_config,
    )
    stages.ingest(run)
    stages.run_stage(run, "train", stages.train, [])
    stages.drop_backup(run)  # the scratch copy; the chief's backup is the chief's to drop
    print(f"{task}: done; the chief evaluates, publishes and reports")
    return RunResult(run_id, run.layout.root, {**run.metrics, "chief": False})


def finish(run: stages.Run) -> RunResult:
    """metrics.json (the run is finished once it exists) and runs/latest."""
    history = stages.read_json(run.layout.history) if run.layout.history.is_file() else {}
    run.timings["pipeline_seconds"] = time.perf_counter() - run.started
    run.metrics.update(history=history, timings=run.timings)
    write_json(run.layout.metrics, run.metrics)
    update_latest(run.layout.root.parent, run.run_id)
    print(
        f"Run {run.run_id}: metrics {run.layout.metrics}, report {run.layout.report}, "
        f"TensorBoard {run.tensorboard}"
    )
    return RunResult(run.run_id, run.layout.root, run.metrics)


def finish_unvalidated(run: stages.Run, error: Exception) -> None:
    """A staged model that failed its infra validation: the run ends unpublished, and its
    metrics.json says what was checked, what failed and how long it took (no report: there are
    no served predictions to report on; runs/latest keeps pointing at the last reported run).
    The same --run-name takes it up again (stages.failed_validation)."""
    run.timings["pipeline_seconds"] = time.perf_counter() - run.started
    reason = str(error)
    run.metrics.update(
        infra_validation={
            **(getattr(error, "record", None) or {}),
            "passed": False,
            "reason": reason,
        },
        blessed=False,
        published_version=None,
        gate={"blessed": False, "reason": f"not judged: the infra validation failed ({reason})"},
        history=stages.read_json(run.layout.history) if run.layout.history.is_file() else {},
        timings=run.timings,
    )
    write_json(run.layout.metrics, run.metrics)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A run's JSON file, or a ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged (not JSON: {e})") from None
    except RecursionError:  # ([[[...]]] thousands deep: JSON, but not a run's)
        raise ValueError(f"{path} is damaged (nested too deeply to be a run's)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged (not a JSON object)")
    return value


class NoReport(ValueError):
    """A finished run that has no report to redraw (its model was never served)."""


def rebuild_report(run_dir: Path) -> list[Path]:
    """Redraw an earlier run's report from its saved evaluation outputs. Every input is
    checked before anything is drawn (metrics.json field by field: it parses whatever a hand
    or a tool wrote into it): a bad one is a ValueError naming it, the old report left as is."""
    from components import report

    run_dir = Path(run_dir)
    metrics = _read_json_object(run_dir / "metrics.json")
    infra = metrics.get("infra_validation")
    if isinstance(infra, dict) and infra.get("passed") is False:
        raise NoReport(
            f"{run_dir}: its model failed the infra validation ({infra.get('reason')}): "
            f"nothing was served, so there is no report"
        )
    predictions = report.load_predictions(run_dir / report.PREDICTIONS_FILE)
    report.check_metrics(run_dir / "metrics.json", metrics)
    config = _read_json_object(run_dir / "config.json")
    settings = config.get("requested", config)
    if not isinstance(settings, dict) or "epochs" not in settings:
        log.warning("%s holds no run settings: the report shows none", run_dir / "config.json")
        settings = {}
    return report.write_report(
        run_dir / "report",
        predictions,
        metrics,
        metrics.get("history"),
        settings,
        sections=stages.report_sections(stages.RunLayout(run_dir), metrics),
    )
