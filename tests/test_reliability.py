"""Faults and bad input, done for real: kills, corrupt files, NaNs, concurrent runs, bad flags.

The slow tests run the CLI as subprocesses on a subset of the real MNIST (CI has it)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from components import exporter, files, trainer
from components.data import DataError, Split, _registered_files
from pipeline.config import small_config
from pipeline.run import Paths, train_pipeline
from tests.helpers import (
    ROOT,
    SHARED_MNIST,
    as_a_terminals_job,
    no_hang,
    requires_mnist,
    small_run_flags,
    train_cmd,
    wait_for_backup_epoch,
)

SMALL_RUN = small_run_flags(6000)


def small_train_cmd(artifacts, *flags):
    return train_cmd(artifacts, *SMALL_RUN, *flags)


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def metrics_of(artifacts, run_name):
    return json.loads((artifacts / "runs" / run_name / "metrics.json").read_text())


# ------------------------------------------------------------ 1, 2, 9: kill, resume, determinism


@pytest.mark.slow
@requires_mnist
def test_sigkill_then_resume_matches_an_uninterrupted_run_at_the_defaults(tmp_path):
    """The real defaults (5 epochs on all of MNIST, batch 32, 100 steps per execution, XLA),
    only --deterministic added; killed during epoch 2, then the same command again."""
    artifacts = tmp_path / "artifacts"
    flags = [
        "--deterministic",
        "--device",
        "cpu",
        "--min-accuracy",
        "0",
        "--max-regression",
        "1",
        "--tfds-manual-dir",
        str(SHARED_MNIST),
        "--artifacts-dir",
        str(artifacts),
    ]
    cmd = [sys.executable, "-m", "pipeline", "train", *flags]
    for name in ("straight", "straight-again"):
        r = run([*cmd, "--run-name", name])
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = metrics_of(artifacts, "straight"), metrics_of(artifacts, "straight-again")
    # determinism: identical figures and weights
    assert a["weights_sha256"] == b["weights_sha256"]
    assert (a["test_accuracy"], a["test_loss"]) == (b["test_accuracy"], b["test_loss"])

    # SIGKILL as soon as epoch 1's backup exists: the kill lands in epoch 2
    killed = [*cmd, "--run-name", "killed"]
    proc = subprocess.Popen(killed, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_backup_epoch(artifacts / "runs" / "killed", proc, epoch=1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (artifacts / "runs" / "killed" / "metrics.json").exists()
    r = run(killed)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = metrics_of(artifacts, "killed")
    assert 1 <= resumed["resumed_from_epoch"] < 5 and resumed["epochs_trained"] == 5
    assert resumed["weights_sha256"] == a["weights_sha256"]
    assert "resuming from the backup at the end of epoch" in r.stderr

    # a finished run is not silently re-run
    r = run(killed)
    assert r.returncode == 2 and "already finished" in r.stderr


@pytest.mark.slow
@requires_mnist
@pytest.mark.parametrize(
    "how, code, line",
    [
        # SIGINT to the whole group, as a terminal sends it
        ("ctrl-c", 130, "error: interrupted; the same command resumes the run where it stopped"),
        (
            "sigterm",
            143,
            "error: terminated (SIGTERM); the same command resumes the run where it stopped",
        ),
    ],
)
def test_an_interrupted_run_says_one_line_and_resumes(tmp_path, how, code, line):
    """No traceback from any process of the run (the console filter is in the same group);
    the same command then finishes the run. A version is published first, as on a user's
    usual run: the validating process is then scoring it when the signal comes."""
    artifacts = tmp_path / "artifacts"
    first = run([*small_train_cmd(artifacts, "--run-name", "first"), "--epochs", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert metrics_of(artifacts, "first")["published_version"] == 1
    cmd = [*small_train_cmd(artifacts, "--run-name", "r"), "--epochs", "3"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
        preexec_fn=as_a_terminals_job,
    )  # fmt: skip
    wait_for_backup_epoch(artifacts / "runs" / "r", proc, epoch=1)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics_of(artifacts, "r")["resumed_from_epoch"] >= 1


def test_crash_mid_epoch_then_resume_is_bit_identical_at_the_default_execution(tmp_path):
    """In a fresh process (op determinism is process-wide): 100 steps per execution and XLA
    (the defaults), 4,000 examples at batch 32 = 125 steps per epoch, a crash in the middle of
    epoch 2, the same training again from the backup: the same weights as without the crash."""
    script = textwrap.dedent(f"""
        import sys, tensorflow as tf, keras
        sys.path.insert(0, {str(ROOT)!r})
        from components import data, trainer
        from components.model import build_model
        from pipeline.config import TrainConfig
        from tests.helpers import make_digits
        tf.config.experimental.enable_op_determinism()
        defaults = TrainConfig()
        split = data.validate_split(make_digits(4000, seed=1))

        class Crash(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if self.model.optimizer.iterations.numpy() > 125:  # inside epoch 2
                    raise KeyboardInterrupt

        def fit(backup, callbacks=()):
            keras.utils.set_random_seed(0)
            return trainer.train(
                lambda: build_model(steps_per_execution=defaults.steps_per_execution,
                                    jit_compile=defaults.jit_compile),
                lambda epoch, k: data.make_train_dataset(split, 32, seed=0, epoch=epoch,
                                                       steps_per_element=k), None,
                batch_size=32, epochs=4, strategy=tf.distribute.get_strategy(),
                tensorboard_dir=None, backup_dir=backup, verbose=0,
                extra_callbacks=list(callbacks))

        straight = trainer.weights_sha256(fit({str(tmp_path / "a")!r}).model)
        try:
            fit({str(tmp_path / "b")!r}, [Crash()])
        except KeyboardInterrupt:
            pass
        resumed = fit({str(tmp_path / "b")!r})
        print(resumed.initial_epoch, straight == trainer.weights_sha256(resumed.model))
    """)
    r = run([sys.executable, "-c", script])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1", "True"]


def _backup(tmp_path, epochs_done):
    from components.model import build_model

    backup = tmp_path / "backup"
    backup.mkdir()
    model = build_model()
    for suffix, epoch in (("", epochs_done), (".bkp", epochs_done - 1)):
        model.save_weights(str(backup / f"{trainer.WEIGHTS_FILE}{suffix}.weights.h5"))
        os.rename(
            backup / f"{trainer.WEIGHTS_FILE}{suffix}.weights.h5",
            backup / f"{trainer.WEIGHTS_FILE}{suffix}",
        )
        (backup / f"{trainer.METADATA_FILE}{suffix}").write_text(json.dumps({"epoch": epoch}))
    entries = [
        {
            "weights_sha256": files.sha256(backup / f"{trainer.WEIGHTS_FILE}{suffix}"),
            "metadata_sha256": files.sha256(backup / f"{trainer.METADATA_FILE}{suffix}"),
            "epoch": epoch,
        }
        for suffix, epoch in (("", epochs_done), (".bkp", epochs_done - 1))
    ]
    checksums = {"latest": entries[0], "previous": entries[1]}
    (backup / trainer.CHECKSUMS_FILE).write_text(json.dumps(checksums))
    return backup


def test_garbled_backup_falls_back_to_the_previous_copy(tmp_path):
    backup = _backup(tmp_path, epochs_done=3)
    assert trainer.resume_epoch(backup) == 3
    (backup / trainer.WEIGHTS_FILE).write_bytes(b"garbage" * 100)
    assert trainer.resume_epoch(backup) == 2
    assert trainer.resume_epoch(backup) == 2  # the fallback was copied into place


def test_garbled_backup_without_a_good_copy_stops_with_a_clear_error(tmp_path):
    backup = _backup(tmp_path, epochs_done=3)
    (backup / trainer.METADATA_FILE).write_text("{not json")
    (backup / f"{trainer.WEIGHTS_FILE}.bkp").write_bytes(b"")
    with pytest.raises(trainer.BackupError, match="corrupt .* and has no good previous copy"):
        trainer.resume_epoch(backup)


def test_a_backup_without_its_checksums_is_not_trusted(tmp_path):
    """Its copies could hold anything (zeroed weights in a valid HDF5 file resumed and were
    published): no copy is used, and the error says what to do."""
    backup = _backup(tmp_path, epochs_done=3)
    (backup / trainer.CHECKSUMS_FILE).unlink()
    with pytest.raises(trainer.BackupError, match="has no checksums.json, so none of its"):
        trainer.resume_epoch(backup)


def test_a_first_backup_cut_short_before_its_checksums_starts_over(tmp_path, caplog):
    """Stopped between Keras saving epoch 1 and its checksums being written: that copy cannot
    be verified, so it is dropped (with a warning) and training starts over; it costs one
    epoch, and Keras does not restore the unverified copy."""
    backup = _backup(tmp_path, epochs_done=1)
    for name in (trainer.CHECKSUMS_FILE, f"{trainer.WEIGHTS_FILE}.bkp"):
        (backup / name).unlink()
    (backup / f"{trainer.METADATA_FILE}.bkp").unlink()
    assert trainer.resume_epoch(backup) == 0
    assert "holds epoch 1 without its checksums" in caplog.text
    assert not (backup / trainer.WEIGHTS_FILE).exists()


def test_a_file_where_the_backup_folder_belongs_is_an_error_not_a_fresh_start(tmp_path):
    backup = tmp_path / "backup"
    backup.write_text("x")
    with pytest.raises(trainer.BackupError, match="is not a folder"):
        trainer.resume_epoch(backup)


def test_a_worker_resumes_from_the_chiefs_backup_without_writing_to_it(tmp_path):
    chief = _backup(tmp_path, epochs_done=3)
    (chief / trainer.WEIGHTS_FILE).write_bytes(b"garbage" * 100)  # killed mid-save
    before = {p.name: p.read_bytes() for p in chief.iterdir()}
    worker = tmp_path / "worker-backup"
    assert trainer.resume_epoch(worker, restore_from=chief) == 2
    assert {p.name: p.read_bytes() for p in chief.iterdir()} == before
    assert trainer.resume_epoch(worker) == 2  # its own copy is now the readable one
    assert trainer.resume_epoch(tmp_path / "w2", restore_from=tmp_path / "no-backup") == 0


def _real_backup(tmp_path, epochs=3):
    """A backup written by the trainer itself (Keras's files plus their checksums)."""
    import tensorflow as tf

    from components import data
    from components.model import build_model
    from tests.helpers import make_digits

    split = data.validate_split(make_digits(256, seed=1))
    backup = tmp_path / "backup"
    trainer.train(
        lambda: build_model(),
        lambda e, k: data.make_train_dataset(split, 32, seed=0, epoch=e, steps_per_element=k),
        None,
        batch_size=32,
        epochs=epochs,
        strategy=tf.distribute.get_strategy(),
        tensorboard_dir=None,
        backup_dir=backup,
        verbose=0,
    )
    return backup


def test_flipped_bytes_in_a_readable_backup_fall_back_to_the_verified_copy(tmp_path, caplog):
    backup = _real_backup(tmp_path)
    assert trainer.resume_epoch(backup, epochs=6) == 3
    weights = backup / trainer.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    weights.write_bytes(bytes(raw))  # still a readable HDF5 file, with other weights
    assert trainer.resume_epoch(backup, epochs=6) == 2
    assert "does not match its checksum" in caplog.text


def test_a_folder_in_place_of_the_latest_backup_makes_way_for_the_previous_copy(tmp_path):
    """The fallback copies the previous copy over the latest: a folder (or a file that cannot
    be opened) where the latest was must not fail every later attempt."""
    backup = _real_backup(tmp_path)
    weights = backup / trainer.WEIGHTS_FILE
    weights.unlink()
    weights.mkdir()
    (weights / "x").write_text("x")
    assert trainer.resume_epoch(backup, epochs=6) == 2
    assert weights.is_file() and trainer.resume_epoch(backup, epochs=6) == 2


def test_a_backup_claiming_an_epoch_beyond_the_plan_is_not_trusted(tmp_path):
    backup = _real_backup(tmp_path)
    (backup / trainer.METADATA_FILE).write_text(json.dumps({"epoch": 7, "batch": None}))
    assert trainer.resume_epoch(backup, epochs=6) == 2  # the previous, verified copy
    for name in (trainer.METADATA_FILE, f"{trainer.METADATA_FILE}.bkp"):
        (backup / name).write_text(json.dumps({"epoch": 7, "batch": None}))
    with pytest.raises(trainer.BackupError, match="no copy matches its checksum"):
        trainer.resume_epoch(backup, epochs=6)


def test_a_run_killed_after_training_does_not_train_again(tmp_path, tiny_data, monkeypatch):
    """Publish fails (disk full) after training; the same named run again redoes the stages
    from export on, not training."""
    from components import exporter

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu", epochs=2)
    real = exporter.publish_staged

    def full(*a, **k):
        raise exporter.PublishError("could not write version 1: [Errno 28] No space left")

    monkeypatch.setattr(exporter, "publish_staged", full)
    with pytest.raises(exporter.PublishError):
        train_pipeline(config, paths, run_id="r1", data=tiny_data)
    run_dir = paths.run_dir("r1")
    model_before = (run_dir / "train" / "model.keras").stat().st_mtime_ns
    assert not (run_dir / "backup").exists()  # deleted once the model was saved
    monkeypatch.setattr(exporter, "publish_staged", real)
    fits = []
    monkeypatch.setattr(trainer, "train", lambda *a, **k: fits.append(1))
    result = train_pipeline(config, paths, run_id="r1", data=tiny_data)
    assert fits == [] and result.metrics["published_version"] == 1
    assert (run_dir / "train" / "model.keras").stat().st_mtime_ns == model_before
    assert result.metrics["epochs_trained"] == 2


@pytest.mark.parametrize("name", ["stages", "data", "evaluation", "train", "report"])
def test_a_file_where_a_runs_folder_belongs_makes_way_when_the_run_is_taken_up(
    tmp_path, tiny_data, name
):
    """A named run taken up again with one of its folders replaced by a file: its stages
    write that folder again (they failed with "[Errno 17] File exists"), and a report
    that is not the one the stage wrote is redrawn, not trusted from its record."""
    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu")
    first = train_pipeline(config, paths, run_id="r1", data=tiny_data)
    run_dir = first.run_dir
    shutil.rmtree(run_dir / name)
    (run_dir / name).write_text("in the way")
    (run_dir / "metrics.json").unlink()
    result = train_pipeline(config, paths, run_id="r1", data=tiny_data)
    assert (run_dir / name).is_dir() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "report" / "index.html").is_file()
    assert result.metrics["test_accuracy"] == first.metrics["test_accuracy"]


@pytest.mark.parametrize("kind", ["named pipe", "folder"])
def test_a_named_pipe_where_a_runs_lock_goes_is_refused_not_waited_on(tmp_path, tiny_data, kind):
    from pipeline.stages import RunStateError

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu")
    run_dir = train_pipeline(config, paths, run_id="r1", data=tiny_data).run_dir
    (run_dir / "metrics.json").unlink()
    (run_dir / ".lock").unlink()
    os.mkfifo(run_dir / ".lock") if kind == "named pipe" else (run_dir / ".lock").mkdir()
    with no_hang(60):
        with pytest.raises(RunStateError, match=r"\.lock is not a regular file.*remove it"):
            train_pipeline(config, paths, run_id="r1", data=tiny_data)


def test_no_backup_starts_at_epoch_zero(tmp_path):
    assert trainer.resume_epoch(tmp_path / "none") == 0


def test_resuming_with_another_config_is_refused(tmp_path, tiny_data):
    paths = Paths(tmp_path / "artifacts")
    (paths.runs / "r1").mkdir(parents=True)
    small_config(device="cpu", epochs=3).to_json(paths.runs / "r1" / "config.json")
    from pipeline.stages import RunStateError

    with pytest.raises(RunStateError, match="another config \\(epochs: 3 -> 1\\)"):
        train_pipeline(small_config(device="cpu"), paths, run_id="r1", data=tiny_data)


# ---------------------------------------------------------------- 3: NaN loss


@pytest.mark.slow
@requires_mnist
def test_nan_loss_stops_with_exit_5_nothing_published_logs_kept(tmp_path):
    artifacts = tmp_path / "artifacts"
    r = run(
        small_train_cmd(artifacts, "--epochs", "2", "--learning-rate", "1e30", "--run-name", "nan")
    )
    assert r.returncode == 5, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: training: loss became")
    assert "nothing was published" in r.stderr and "Traceback" not in r.stderr
    assert exporter.published_versions(artifacts / "models" / "mnist") == []
    from tensorboard.backend.event_processing import event_accumulator as ea

    # readable, with what was written before the NaN (the graph), every writer closed
    tb = artifacts / "tensorboard" / "nan"
    assert ea.EventAccumulator(str(tb / "model")).Reload().Graph().node
    for run_folder in ("steps", "train"):
        for events in (tb / run_folder).glob("events.out.tfevents.*"):
            ea.EventAccumulator(str(events)).Reload()


# ---------------------------------------------------------------- 4: kill during publish

KILLED_PUBLISH = textwrap.dedent("""
    import sys, time
    from components import exporter
    def slow_fsync(root):
        print("copied", flush=True)
        time.sleep(120)          # killed here, mid-publish
    exporter._fsync_tree = slow_fsync
    exporter.publish_staged(sys.argv[2], sys.argv[1], run_id="doomed", baseline_version=1,
                            assets={}, remembered=set)
""")


@pytest.mark.slow
def test_kill_during_publish_leaves_no_version_and_the_next_run_cleans_up(tmp_path, model):
    base = tmp_path / "models" / "mnist"
    staged = exporter.export_saved_model(model, tmp_path / "staged")
    first = exporter.publish_staged(
        staged, base, run_id="r1", baseline_version=None, assets={}, remembered=set
    )
    before = {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISH, str(base), str(staged)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout.readline().strip() == "copied"
    assert (base / ".tmp-doomed" / "saved_model.pb").exists()
    proc.kill()
    proc.wait()
    assert exporter.published_versions(base) == [1]
    assert {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()} == before
    second = exporter.publish_staged(
        staged, base, run_id="r2", baseline_version=1, assets={}, remembered=set
    )
    assert second.version == 2 and not (base / ".tmp-doomed").exists()


# ---------------------------------------------------------------- 5: two runs at once


@pytest.mark.slow
@requires_mnist
def test_two_runs_at_once_get_distinct_ids_files_and_versions(tmp_path):
    artifacts = tmp_path / "artifacts"
    procs = [
        subprocess.Popen(
            small_train_cmd(artifacts, "--epochs", "1"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outputs]
    runs = sorted(p.name for p in (artifacts / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2
    assert exporter.published_versions(artifacts / "models" / "mnist") == [1, 2]
    owners = {
        json.loads(
            (artifacts / "models" / "mnist" / v / "assets.extra" / "metrics.json").read_text()
        )["run_id"]
        for v in ("1", "2")
    }
    assert owners == set(runs)
    assert {metrics_of(artifacts, r)["published_version"] for r in runs} == {1, 2}
    assert sorted(p.name for p in (artifacts / "tensorboard").iterdir()) == runs


# ---------------------------------------------------------------- 6, 7, 8: bad data, bad flags


def test_corrupt_manual_dir_file_exits_4_naming_file_and_checksum(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    files = _registered_files()
    for name, (size, _) in files.items():
        (manual / name).write_bytes(b"\0" * size)
    first = sorted(files)[0]
    r = run(
        train_cmd(
            tmp_path / "artifacts",
            "--tfds-manual-dir",
            str(manual),
            "--tfds-data-dir",
            str(tmp_path / "tfds"),
        )
    )
    assert r.returncode == 4
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data: {manual / first} has sha256 ")
    assert last.endswith(f"expected {files[first][1]}: the file is corrupt or not the official one")
    assert "Traceback" not in r.stderr and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("bad", ["label 10", "label -1", "shape"])
def test_bad_records_stop_before_training(tmp_path, tiny_data, bad):
    train, test = tiny_data
    labels, images = train.labels.copy(), train.images
    if bad == "label 10":
        labels[7] = 10
    elif bad == "label -1":
        labels[7] = -1
    else:
        images = images[:, :, :20]
    paths = Paths(tmp_path / "artifacts")
    with pytest.raises(DataError, match="index 7" if "label" in bad else "\\(28, 20, 1\\)"):
        train_pipeline(
            small_config(device="cpu"), paths, data=(Split("train", images, labels), test)
        )
    assert not (tmp_path / "artifacts").exists()


def test_gpu_demanded_without_gpu_is_a_usage_error(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    r = run(train_cmd(tmp_path / "artifacts", "--device", "gpu"))
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --device gpu was requested but TensorFlow sees no GPU")
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "artifacts").exists()


# ---------------------------------------------------------------- 10: disk full


def _small_cli_runs(tmp_path, tiny_data, monkeypatch):
    """`python -m pipeline train` in-process, each run on tiny_data at the small config; the
    artifacts' Paths."""
    paths = Paths(tmp_path / "artifacts")
    monkeypatch.setattr(
        "pipeline.run.train_pipeline",
        lambda config, p, run_id=None, tf_config=None: train_pipeline(
            config.replace(**small_config(device="cpu").to_dict()),
            paths,
            run_id=run_id,
            data=tiny_data,
        ),
    )
    return paths


def test_a_disk_full_at_the_train_record_does_not_train_again(tmp_path, tiny_data, monkeypatch):
    """The disk fills as the train stage's record is written (the model and history are
    saved, the record is not): the backup is still there, so the rerun resumes at the last
    epoch and trains nothing, keeping the history of the epochs it trained before."""
    from pipeline import stages

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu", epochs=2)
    real_record = stages.write_record

    def full_at_train(run, name, *a, **k):
        if name == "train":
            raise OSError(28, "No space left on device")
        return real_record(run, name, *a, **k)

    monkeypatch.setattr(stages, "write_record", full_at_train)
    with pytest.raises(OSError):
        train_pipeline(config, paths, run_id="r1", data=tiny_data)
    run_dir = paths.run_dir("r1")
    assert not (run_dir / "stages" / "train.json").exists()
    assert (run_dir / "backup" / trainer.WEIGHTS_FILE).is_file()
    history = json.loads((run_dir / "train" / "history.json").read_text())
    monkeypatch.setattr(stages, "write_record", real_record)
    result = train_pipeline(config, paths, run_id="r1", data=tiny_data)
    assert result.metrics["resumed_from_epoch"] == 2 and result.metrics["epoch_seconds"] == []
    assert result.metrics["epochs_trained"] == 2 and result.metrics["published_version"] == 1
    assert json.loads((run_dir / "train" / "history.json").read_text()) == history
    assert not (run_dir / "backup").exists()  # dropped once the record was written


def test_disk_full_while_writing_the_run_is_a_clear_error(tmp_path, tiny_data, monkeypatch, capsys):
    from components import report
    from pipeline import cli
    from pipeline import run as pipeline_run

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", full)
    paths = _small_cli_runs(tmp_path, tiny_data, monkeypatch)
    ids = []
    real_new_run_id = pipeline_run.new_run_id
    monkeypatch.setattr(
        pipeline_run, "new_run_id", lambda: ids.append(real_new_run_id()) or ids[-1]
    )
    code = cli.main(["train", "--artifacts-dir", str(paths.artifacts)])
    assert code == cli.EXIT_PUBLISH == 6
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "error: could not write artifacts: [Errno 28] No space left on device (disk full"
    )
    assert f"again with --run-name {ids[0]}:" in last  # the id of the run that stopped
    assert (paths.runs / ids[0]).is_dir()
    # what was published before the failure is complete; no temporary folder is left behind
    for v in exporter.published_versions(paths.models):
        assert (paths.models / str(v) / "saved_model.pb").is_file()
    assert not [p for p in paths.models.iterdir() if p.name.startswith(exporter.TMP_PREFIX)]


@pytest.mark.parametrize(("named", "make"), [(False, False), (True, False), (False, True)])
def test_ctrl_c_says_how_to_resume_the_run(tmp_path, tiny_data, monkeypatch, capsys, named, make):
    """An interrupt after the run began names what resumes it: the generated run id for an
    unnamed run (the user never saw a --run-name), the same command for a named one; the rerun
    with it then goes on without retraining. Under `make train`, the flag goes in ARGS, beside
    the flags given there."""
    from components import report
    from pipeline import cli
    from pipeline import run as pipeline_run

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    paths = _small_cli_runs(tmp_path, tiny_data, monkeypatch)
    ids = []
    real_new_run_id = pipeline_run.new_run_id
    monkeypatch.setattr(
        pipeline_run, "new_run_id", lambda: ids.append(real_new_run_id()) or ids[-1]
    )
    with monkeypatch.context() as m:
        m.setattr(report, "write_report", ctrl_c)  # the last stage: training is done
        if make:
            m.setenv("MNIST_FLAGS_IN_ARGS", "1")  # as `make train` sets it
        name = ["--run-name", "mine"] if named else []
        code = cli.main(["train", "--artifacts-dir", str(paths.artifacts), *name])
    assert code == cli.EXIT_INTERRUPTED == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    run_id = "mine" if named else ids[0]
    flag = f"--run-name {run_id}" + (" added to ARGS" if make else "")
    again = "" if named else f" with {flag}"
    assert last == f"error: interrupted; the same command{again} resumes the run where it stopped"
    trained = (paths.runs / run_id / "train" / "model.keras").read_bytes()
    code = cli.main(["train", "--artifacts-dir", str(paths.artifacts), "--run-name", run_id])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert (paths.runs / run_id / "train" / "model.keras").read_bytes() == trained  # not retrained
    assert (paths.runs / run_id / "metrics.json").is_file()


def test_ctrl_c_before_the_run_began_is_one_word(tmp_path, monkeypatch, capsys):
    from pipeline import cli
    from pipeline import run as pipeline_run

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_run, "train_pipeline", ctrl_c)
    assert cli.main(["train", "--artifacts-dir", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"


def test_a_folder_named_latest_leaves_the_command_exit_0(
    tmp_path, tiny_data, monkeypatch, capsys, caplog
):
    """`train` with a folder where runs/latest goes: published, exit 0, one warning."""
    from pipeline import cli

    paths = _small_cli_runs(tmp_path, tiny_data, monkeypatch)
    (paths.runs / "latest").mkdir(parents=True)
    assert cli.main(["train", "--artifacts-dir", str(paths.artifacts)]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "could not point" in caplog.text and "Traceback" not in err and "error:" not in err
    assert (paths.runs / "latest").is_dir()
    assert exporter.published_versions(paths.models) == [1]


def test_a_folder_named_latest_does_not_fail_a_published_run(tmp_path, caplog):
    """runs/latest is a convenience link: a folder in its place is left alone with a warning
    (the run, already published, still ends well) and no temporary link is left behind."""
    from pipeline.run import update_latest

    runs = tmp_path / "runs"
    (runs / "latest").mkdir(parents=True)
    (runs / "r1").mkdir()
    update_latest(runs, "r1")
    assert "could not point" in caplog.text and (runs / "latest").is_dir()
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "r1"]
    (runs / "latest").rmdir()
    update_latest(runs, "r1")
    assert os.readlink(runs / "latest") == "r1"


def test_a_write_that_fills_the_disk_names_its_file_and_leaves_nothing(tmp_path):
    """A write or close that fails raises an OSError that names no file: atomic_write names
    the file it was writing, and leaves neither it nor its temporary copy."""
    import errno

    from components import files

    target = tmp_path / "predictions.npz"
    with pytest.raises(OSError) as raised:
        with files.atomic_write(target) as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(target) and raised.value.errno == errno.ENOSPC
    assert files.os_error_text(raised.value) == f"[Errno 28] No space left on device: {target}"
    assert list(tmp_path.iterdir()) == []
    files.write_text(target, "whole")
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_whatever_is_in_the_way_of_an_artifact_makes_way(tmp_path):
    """A folder where the run's file belongs (train/model.keras made a folder failed every
    later attempt with "[Errno 21] Is a directory"), and a file where its folder belongs."""
    from components import files

    target = tmp_path / "model.keras"
    (target / "inside").mkdir(parents=True)
    files.write_text(target, "whole")
    assert target.read_text() == "whole"
    folder = tmp_path / "export"
    folder.write_text("x")
    with files.replaced(folder) as tmp:
        tmp.mkdir()
        (tmp / "saved_model.pb").write_text("pb")
    assert (folder / "saved_model.pb").read_text() == "pb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model.keras"]


def test_a_link_to_a_folder_is_used_and_any_other_link_is_refused_not_removed(tmp_path):
    """A link where a run's folder belongs is someone's choice (a report folder on another
    drive): a link to a folder is written through, and a dangling one (that drive not
    mounted) or a link to a file is refused, never removed; a plain file makes way."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("kept")
    linked = tmp_path / "report"
    linked.symlink_to(elsewhere)
    assert files.folder(linked) == linked and linked.is_symlink()
    assert (elsewhere / "mine.txt").read_text() == "kept"
    for name, target in (
        ("train", tmp_path / "not-mounted" / "x"),
        ("data", elsewhere / "mine.txt"),
    ):
        link = tmp_path / name
        link.symlink_to(target)
        with pytest.raises(FileExistsError, match="a link to something that is not a folder"):
            files.folder(link)
        assert link.is_symlink()
    plain = tmp_path / "stages"
    plain.write_text("in the way")
    assert files.folder(plain).is_dir()
    assert (elsewhere / "mine.txt").read_text() == "kept"


def test_a_lock_file_is_never_waited_on_opened_as_a_device_or_taken_for_a_folder(tmp_path):
    import socket

    fifo, folder, sock, device = (tmp_path / n for n in ("fifo", "folder", "sock", "device"))
    os.mkfifo(fifo)
    folder.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    device.symlink_to("/dev/null")
    try:
        for path in (fifo, folder, sock, device):
            with no_hang(10), pytest.raises(files.NotARegularFile) as e:
                files.open_lock(path)
            assert e.value.filename == str(path), path
    finally:
        server.close()
    with files.open_lock(tmp_path / "new.lock") as handle:  # made when missing
        assert handle.fileno() >= 0
    with pytest.raises(FileNotFoundError):
        files.open_lock(tmp_path / "absent.lock", create=False)


def test_h5pys_full_disk_report_is_one_line_with_its_file():
    import errno

    from components import files

    h5py_says = OSError(
        errno.ENOSPC,
        "Can't synchronously write data (file write failed: time = Fri Nov 27 18:53:38 2026\n"
        ", filename = '/a/runs/r/backup/latest.weights.h5', file descriptor = 13, errno = 28, "
        "error message = 'No space left on device', buf = 0x55, total write size = 393128)",
    )
    assert files.os_error_text(h5py_says) == (
        "[Errno 28] No space left on device: /a/runs/r/backup/latest.weights.h5"
    )
    assert files.disk_full(h5py_says)
    assert not files.disk_full(OSError(errno.EACCES, "Permission denied"))
    assert files.os_error_text(OSError(errno.EACCES, "Permission\ndenied")) == (
        "[Errno 13] Permission denied"
    )


def test_disk_full_while_writing_the_warmup_file_is_exit_6_and_the_same_run_goes_on(
    tmp_path, tiny_data, monkeypatch, capsys
):
    """TensorFlow's TFRecord writer (the export's warmup file) fails as it does on a full disk:
    a ResourceExhaustedError, not an OSError. One line, exit 6, nothing published; the same
    --run-name then goes on from the trained model (training is not redone)."""
    import tensorflow as tf

    from pipeline import cli

    real_writer = tf.io.TFRecordWriter

    class FullDisk:
        def __init__(self, path, *a, **k):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, record):
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{self.path}; No space left on device"
            )

    paths = _small_cli_runs(tmp_path, tiny_data, monkeypatch)
    args = ["train", "--artifacts-dir", str(paths.artifacts), "--run-name", "full"]
    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    assert cli.main(args) == cli.EXIT_PUBLISH == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: could not write or read a file: ResourceExhaustedError: ")
    assert "tf_serving_warmup_requests; No space left on device" in err[-1]
    assert "run the same command again with --run-name full: it goes on" in err[-1]
    assert exporter.published_versions(paths.models) == []
    assert not (paths.runs / "full" / "export").exists()  # no half-written export in place

    monkeypatch.setattr(tf.io, "TFRecordWriter", real_writer)
    trained = (paths.runs / "full" / "train" / "model.keras").read_bytes()
    assert cli.main(args) == cli.EXIT_OK
    assert exporter.published_versions(paths.models) == [1]
    assert (paths.runs / "full" / "train" / "model.keras").read_bytes() == trained


def test_a_validation_fraction_that_leaves_no_example_is_refused_before_the_run(
    tmp_path, tiny_data
):
    from pipeline.config import ConfigError

    paths = Paths(tmp_path / "artifacts")
    with pytest.raises(ConfigError, match="leaves 0 for validation"):
        train_pipeline(small_config(device="cpu", validation_fraction=1e-6), paths, data=tiny_data)
    assert not paths.runs.exists()
    # the other side: a fraction that leaves less than one batch to train on
    config = small_config(device="cpu", validation_fraction=0.95)  # 13 of 256 left
    with pytest.raises(ConfigError, match=r"leaves \d+ for training, less than one batch \(16\)"):
        train_pipeline(config, paths, data=tiny_data)
    assert not paths.runs.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--epochs", "1", "--run-name", "x"],
        ["--epochs", "1", "--run-name=x"],
        ["--run-n", "x", "--epochs", "1"],
    ],
)
def test_cluster_takes_the_run_name_in_any_spelling(args):
    from pipeline.cli import without_run_name

    assert without_run_name(args) == ["--epochs", "1"]


def test_a_second_process_on_the_same_run_is_refused(tmp_path, tiny_data):
    import fcntl

    from pipeline.stages import RunStateError

    paths = Paths(tmp_path / "artifacts")
    run_dir = paths.run_dir("busy")
    run_dir.mkdir(parents=True)
    small_config(device="cpu").to_json(run_dir / "config.json")
    with open(run_dir / ".lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's run
        with pytest.raises(RunStateError, match="in use by another process"):
            train_pipeline(small_config(device="cpu"), paths, run_id="busy", data=tiny_data)


def _stopped_after_epoch_2(config, paths, tiny_data, monkeypatch):
    """Run "r" of `config`, interrupted (Ctrl-C) as its third epoch begins: a backup of epoch
    2 is left to resume from (the backup is the last callback of an epoch's end)."""
    import keras

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    real = trainer.train
    monkeypatch.setattr(
        trainer,
        "train",
        lambda *a, **k: real(
            *a, **{**k, "extra_callbacks": [*k.get("extra_callbacks", []), Crash()]}
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(config, paths, run_id="r", data=tiny_data)
    monkeypatch.setattr(trainer, "train", real)


def test_a_resumed_run_reports_every_epoch_and_an_unreadable_record_is_redone(
    tmp_path, tiny_data, monkeypatch
):
    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu", epochs=3)
    _stopped_after_epoch_2(config, paths, tiny_data, monkeypatch)
    result = train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert result.metrics["resumed_from_epoch"] == 2
    assert len(result.metrics["history"]["loss"]) == 3  # epochs 1-2 from the backup, 3 now
    # a garbled record: that stage and the ones after it are redone, not trusted
    (result.run_dir / "metrics.json").unlink()
    (result.run_dir / "stages" / "export.json").write_text("{trunc")
    again = train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert again.metrics["published_version"] == result.metrics["published_version"]


@pytest.mark.parametrize("damage", ["garbage{", None, '{"loss": [0.5]}'])
def test_a_damaged_backup_history_leaves_the_earlier_epochs_unknown_not_shifted(
    tmp_path, tiny_data, monkeypatch, caplog, damage
):
    """The backup's history.json garbled, deleted or cut short before the resume: epochs 1-2's
    logs are unknown (null), with a warning, and epoch 3's stay at epoch 3 (later epochs were
    copied into the earlier ones' places: a zig-zag in metrics.json and the report)."""
    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu", epochs=3)
    _stopped_after_epoch_2(config, paths, tiny_data, monkeypatch)
    saved = paths.artifacts / "runs" / "r" / "backup" / trainer.HISTORY_FILE
    if damage is None:
        saved.unlink()
    else:
        saved.write_text(damage)
    with caplog.at_level("WARNING"):
        result = train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert result.metrics["resumed_from_epoch"] == 2
    assert "recorded as unknown" in caplog.text
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    for key in ("loss", "accuracy", "val_loss"):
        assert history[key][:2] == [None, None] and isinstance(history[key][2], float), history
    assert (result.run_dir / "report" / "training_curves.png").stat().st_size > 0


def test_a_failed_redo_leaves_no_record_of_the_stages_after_it(tmp_path, tiny_data, monkeypatch):
    """Retrained after a finished validation, then failing in validation: the old validation's
    record must not let a later attempt skip validating the new model."""
    from components.infra_validator import InfraValidationError
    from pipeline import stages

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu")
    first = train_pipeline(config, paths, run_id="r", data=tiny_data)
    records = first.run_dir / "stages"
    assert (records / "validate.json").is_file()
    # The user deletes the trained model and its record (as ArtifactError advises), and the
    # finished mark, so the run is taken up again from training.
    (first.run_dir / "metrics.json").unlink()
    (records / "train.json").unlink()
    (first.run_dir / "train" / "model.keras").unlink()

    def fails(run):
        raise InfraValidationError("injected: the new model does not serve")

    monkeypatch.setattr(stages, "validate", fails)
    with pytest.raises(InfraValidationError):
        train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert sorted(p.stem for p in records.glob("*.json")) == ["export", "ingest", "train"]
    # The failed validation is recorded; the same run name takes the run up again.
    failed = json.loads((first.run_dir / "metrics.json").read_text())["infra_validation"]
    assert failed["passed"] is False and "injected" in failed["reason"]

    monkeypatch.undo()
    trained = (first.run_dir / "train" / "model.keras").read_bytes()
    again = train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert (first.run_dir / "train" / "model.keras").read_bytes() == trained  # not retrained
    assert (records / "validate.json").is_file() and again.metrics["infra_validation"]["passed"]


@pytest.mark.parametrize(
    "damaged",
    ["export/variables/variables.data-00000-of-00001", "evaluation/candidate_probabilities.npy"],
)
def test_a_staged_file_damaged_after_validation_is_rebuilt_not_published(
    tmp_path, tiny_data, monkeypatch, damaged
):
    """Killed after the validation (here: publish fails), then a byte of the staged export (or
    of what the validation wrote) flipped: the same run again must not publish what it
    validated before; that stage and every later one are redone from intact inputs."""
    from components import exporter
    from components.files import tree_sha256

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu")
    real = exporter.publish_staged
    monkeypatch.setattr(
        exporter,
        "publish_staged",
        lambda *a, **k: (_ for _ in ()).throw(exporter.PublishError("injected: disk full")),
    )
    with pytest.raises(exporter.PublishError):
        train_pipeline(config, paths, run_id="r", data=tiny_data)
    run_dir = paths.run_dir("r")
    validated = tree_sha256(run_dir / "export")
    target = run_dir / damaged
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    damaged_export = tree_sha256(run_dir / "export")

    monkeypatch.setattr(exporter, "publish_staged", real)
    result = train_pipeline(config, paths, run_id="r", data=tiny_data)
    assert result.metrics["published_version"] == 1
    assert result.metrics["infra_validation"]["passed"]
    published = paths.models / "1"
    if damaged.startswith("export"):  # exported again from the trained model
        assert damaged_export != validated != tree_sha256(run_dir / "export") != damaged_export
    records = run_dir / "stages"
    assert json.loads((records / "validate.json").read_text())["outputs_sha256"]
    for path in (run_dir / "export").rglob("*"):
        if path.is_file():
            assert (published / path.relative_to(run_dir / "export")).read_bytes() == (
                path.read_bytes()
            ), path


def test_a_damaged_published_version_is_named_everywhere(tmp_path, tiny_data, capsys):
    """A byte flipped in a published version: `models list` flags it, the client refuses it in
    one line, and the next run stops naming it as the baseline (not blaming the new model)."""
    from components.infra_validator import InfraValidationError
    from pipeline import cli
    from serving import cli as serving_cli

    paths = Paths(tmp_path / "artifacts")
    config = small_config(device="cpu")
    train_pipeline(config, paths, data=tiny_data)
    version = paths.models / "1"
    variables = next(version.glob("variables/*.data-*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))

    assert cli.main(["models", "list", "--artifacts-dir", str(paths.artifacts)]) == 0
    assert "DAMAGED: variables/variables.data-00000-of-00001" in capsys.readouterr().out
    digit = tmp_path / "digit.npy"
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 12:16] = 255  # a "1"
    np.save(digit, pixels)
    assert serving_cli.main(["predict", str(digit), "--local", str(paths.models)]) == 1
    err = capsys.readouterr().err
    assert f"{version} is damaged: variables/" in err and len(err.strip().splitlines()) == 1, err
    runs_before = set(paths.runs.iterdir())
    with pytest.raises(InfraValidationError, match=f"baseline.*{version} is damaged") as e:
        train_pipeline(config, paths, data=tiny_data)
    assert str(e.value).endswith("checked before training: nothing was trained")
    (stopped,) = set(paths.runs.iterdir()) - runs_before
    assert not (stopped / "train").exists()  # refused before the fit, not after it
    assert sorted(p.name for p in paths.models.iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("damage", ["truncated saved_model.pb", "empty saved_model.pb"])
def test_the_client_refuses_a_savedmodel_that_does_not_load_in_one_line(model, tmp_path, damage):
    """Without a manifest to check (a SavedModel from elsewhere), a load failure is one line."""
    from components import exporter
    from serving.client import LocalPredictor, ServerError

    exported = exporter.export_saved_model(model, tmp_path / "m")
    pb = exported / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: len(pb.read_bytes()) // 2] if "truncated" in damage else b"")
    with pytest.raises(ServerError, match="does not load"):
        LocalPredictor(exported)


def test_a_run_reached_by_another_spelling_of_its_folder_is_not_redone(
    tmp_path, tiny_data, monkeypatch
):
    """Started with a relative --artifacts-dir, taken up again with the absolute one (or
    after the folder moved): its finished stages are found, the model is not trained again."""
    import shutil
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    config = small_config(device="cpu")
    first = train_pipeline(config, Paths(Path("artifacts")), run_id="r", data=tiny_data)
    (tmp_path / "artifacts" / "runs" / "r" / "metrics.json").unlink()  # as if killed at the end
    (tmp_path / "artifacts" / "runs" / "r" / "stages" / "publish.json").unlink(missing_ok=True)
    shutil.move(tmp_path / "artifacts", tmp_path / "moved")
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    again = train_pipeline(config, Paths(tmp_path / "moved"), run_id="r", data=tiny_data)
    assert again.metrics["test_accuracy"] == first.metrics["test_accuracy"]


# ------------------------------------------------------- 10b: a real full disk (tmpfs)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes (a real full disk: every writer,
    h5py's and TensorFlow's native ones included, gets ENOSPC); grow(size) resizes it. Needs
    root (CI's machine runs as root); skipped where tmpfs cannot be mounted."""
    mounted = []

    def mount(size: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    def grow(point, size: int):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    mount.grow = grow
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _used_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
@requires_mnist
def test_a_really_full_disk_at_every_stage_is_one_line_exit_6_and_the_run_goes_on(small_disk):
    """The artifacts folder on a tmpfs too small for a whole run, at several sizes, so the disk
    fills in different stages (the run's data, the backup that h5py writes, the export, the
    validation's files, the publish): each ends in one `error:` line naming the file, exit 6,
    no traceback, no version folder; given space, the same --run-name goes on and publishes."""
    roomy = small_disk(256 << 20)
    first = run(small_train_cmd(roomy / "a", "--epochs", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    needed = _used_bytes(roomy / "a")
    failures = []
    for share in (0.1, 0.4, 0.7, 0.9):
        disk = small_disk(int(needed * share))
        r = run(small_train_cmd(disk / "a", "--epochs", "1"))
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 6 and "Traceback" not in r.stderr, (share, r.stderr[-3000:])
        assert len(errors) == 1 and "No space left on device" in errors[0], (share, errors)
        assert "free space and run the same command again with --run-name" in errors[0]
        models = disk / "a" / "models" / "mnist"
        assert not exporter.published_versions(models) if models.exists() else True
        failures.append((disk, errors[0]))
    named = [m.split("No space left on device")[1].split(" (disk full")[0] for _, m in failures]
    said = "\n".join(message for _, message in failures)
    assert all(name.startswith(": ") and "/" in name for name in named), said  # its file
    assert len({name.rsplit("/", 1)[1] for name in named}) > 1, said  # different files
    disk, message = failures[-1]
    run_name = message.split("--run-name ")[1].split(":")[0]
    small_disk.grow(disk, 256 << 20)
    again = run(small_train_cmd(disk / "a", "--epochs", "1", "--run-name", run_name))
    assert again.returncode == 0, again.stderr[-3000:]
    assert exporter.published_versions(disk / "a" / "models" / "mnist") == [1]
