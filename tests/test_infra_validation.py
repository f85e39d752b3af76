"""Infra validation: the staged SavedModel is loaded in a separate process the way TF Serving
loads it; each injected fault (corrupt variables, a signature that disagrees with the trained
model, a failing warmup record, a model server that does not start) publishes nothing."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from components import exporter
from components.infra_validator import InfraValidationError
from pipeline import cli
from pipeline.config import small_config
from pipeline.run import Paths, train_pipeline
from tests.helpers import ROOT


def _run(tmp_path, tiny_data, run_id="r1"):
    return train_pipeline(
        small_config(device="cpu"), Paths(tmp_path / "artifacts"), run_id=run_id, data=tiny_data
    )


def _nothing_published(tmp_path, run_id="r1", passed=()):
    """Nothing published; the run's metrics.json records the failure: its reason, the checks
    passed before it (`passed`: a prefix of each, in order) and how long it took."""
    models = tmp_path / "artifacts" / "models" / "mnist"
    assert exporter.published_versions(models) == []
    run_dir = tmp_path / "artifacts" / "runs" / run_id
    assert not (run_dir / "stages" / "validate.json").exists()
    assert (
        not (run_dir / "report").exists()
        and not (tmp_path / "artifacts" / "runs" / "latest").exists()
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    infra = metrics["infra_validation"]
    assert infra["passed"] is False and infra["reason"] and infra["seconds"] > 0
    assert len(infra.get("passed_checks", [])) == len(passed)
    assert all(c.startswith(p) for c, p in zip(infra.get("passed_checks", []), passed))
    assert metrics["blessed"] is False and metrics["published_version"] is None
    assert metrics["gate"]["reason"].startswith("not judged: the infra validation failed")
    return infra


def test_a_clean_export_is_validated_and_recorded(tmp_path, tiny_data):
    result = _run(tmp_path, tiny_data)
    infra = result.metrics["infra_validation"]
    assert infra["passed"] and infra["examples"] == len(tiny_data[1].take(128))
    assert infra["warmup_records_replayed"] >= 6
    assert {"serving_default", "predict_png"} <= set(infra["signatures"])
    assert infra["max_abs_difference_vs_trained_model"] <= 1e-5
    assert "not on PATH" in infra["model_server"]
    assert result.metrics["evaluated"] == "the exported SavedModel, as served"
    record = json.loads((result.run_dir / "evaluation" / "infra_validation.json").read_text())
    assert record["loader"].startswith("tf.compat.v1.saved_model.loader")


def _after_export(monkeypatch, damage):
    real = exporter.export_saved_model

    def export_then_damage(model, export_dir, *a, **k):
        out = real(model, export_dir, *a, **k)
        damage(out)
        return out

    monkeypatch.setattr(exporter, "export_saved_model", export_then_damage)


def test_corrupt_variables_publish_nothing(tmp_path, tiny_data, monkeypatch):
    def corrupt(export_dir):
        [data] = (export_dir / "variables").glob("variables.data-*")
        raw = bytearray(data.read_bytes())
        raw[: len(raw) // 2] = bytes(len(raw) // 2)
        data.write_bytes(bytes(raw))

    _after_export(monkeypatch, corrupt)
    with pytest.raises(InfraValidationError):
        _run(tmp_path, tiny_data)
    infra = _nothing_published(tmp_path)
    assert infra["candidate"].endswith("export") and "does not load" in infra["reason"]


def test_a_run_that_failed_validation_has_no_report_to_redraw(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {"infra_validation": {"passed": False, "reason": "the staged model does not load"}}
        )
    )
    assert cli.main(["report", str(run_dir)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "failed the infra validation (the staged model does not load)" in err[0]
    )


def test_a_signature_that_disagrees_with_the_model_publishes_nothing(
    tmp_path, tiny_data, monkeypatch
):
    # a preprocessing drift: the exported graph divides by 128 where training divided by 255
    monkeypatch.setattr(exporter, "preprocess", lambda x: tf.cast(x, tf.float32) / 128.0)
    with pytest.raises(InfraValidationError, match="disagrees with the trained model"):
        _run(tmp_path, tiny_data)
    infra = _nothing_published(
        tmp_path, passed=("load", "serving_default on all", "warmup", "the other signatures")
    )
    assert infra["max_abs_difference_vs_trained_model"] > 1e-5


def test_a_failing_warmup_record_publishes_nothing(tmp_path, tiny_data, monkeypatch):
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    def bad_warmup(export_dir):
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name="mnist", signature_name="serving_default")
        )
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 27, 27), np.uint8)))
        record = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        path = export_dir / "assets.extra" / exporter.WARMUP_FILE
        with tf.io.TFRecordWriter(str(path)) as writer:
            writer.write(record.SerializeToString())

    _after_export(monkeypatch, bad_warmup)
    with pytest.raises(InfraValidationError, match="warmup record 1 \\(serving_default\\) fails"):
        _run(tmp_path, tiny_data)
    _nothing_published(tmp_path, passed=("load", "serving_default on all"))


def _with_strokes(data):
    """tiny_data whose test images also hold a vertical stroke: ink tall enough for
    predict_image's normalisation (it refuses the bare 2-pixel bars as "no digit found")."""
    from components.data import Split

    train, test = data
    images = test.images.copy()
    images[:, 4:24, 12:15, 0] = 255
    return train, Split(test.name, images, test.labels)


def test_the_photo_signature_is_compared_with_the_trained_model(tmp_path, tiny_data):
    result = _run(tmp_path, _with_strokes(tiny_data))
    checks = result.metrics["infra_validation"]["other_signatures"]["predict_image"]
    assert "refused" not in checks and checks["examples"] == 64
    assert checks["max_abs_difference_vs_trained_model"] <= 1e-5


def test_a_photo_signature_that_disagrees_with_the_model_publishes_nothing(
    tmp_path, tiny_data, monkeypatch
):
    """predict_image is compared with the trained model on the same normalised images: a
    drift in its graph only (here its images inverted after the normalisation) is caught."""
    real = exporter.build_export_archive

    def drifted(model, threshold):
        from components import photo

        normalize = photo.normalize_photos
        monkeypatch.setattr(
            photo,
            "normalize_photos",
            tf.function(
                lambda b: 255 - normalize(b),
                input_signature=[tf.TensorSpec([None], tf.string)],
                autograph=False,
            ),
        )
        try:
            return real(model, threshold)
        finally:
            monkeypatch.setattr(photo, "normalize_photos", normalize)

    monkeypatch.setattr(exporter, "build_export_archive", drifted)
    with pytest.raises(InfraValidationError, match="predict_image disagrees with the trained"):
        _run(tmp_path, _with_strokes(tiny_data))
    _nothing_published(
        tmp_path, passed=("load", "serving_default on all", "warmup", "the other signatures")
    )


def test_a_model_server_that_does_not_start_publishes_nothing(tmp_path, tiny_data, monkeypatch):
    """With tensorflow_model_server on PATH the real server is used; a stand-in that dies on
    start-up shows the failure path (no TF Serving binary is installable here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tensorflow_model_server"
    fake.write_text("#!/bin/sh\necho 'Failed to start server: address in use' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        InfraValidationError, match="exited with code 1 before serving: Failed to start server"
    ):
        _run(tmp_path, tiny_data)
    _nothing_published(
        tmp_path, passed=("load", "serving_default on all", "warmup", "the other signatures")
    )


def test_a_validation_that_hangs_times_out_and_publishes_nothing(tmp_path, tiny_data, monkeypatch):
    """A validating process that never answers (a hung loader) is stopped at the timeout: not
    published, the timeout recorded, exit 8's error, and no process left behind."""
    from components import infra_validator

    started = []

    def hung(self):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); time.sleep(600)",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(self.proc)

    real_init = infra_validator.Validator.__init__
    monkeypatch.setattr(infra_validator.Validator, "_start", hung)
    monkeypatch.setattr(
        infra_validator.Validator, "__init__", lambda self, timeout_s=0: real_init(self, 3.0)
    )
    with pytest.raises(InfraValidationError, match="infra validation timed out after 3 s") as e:
        _run(tmp_path, tiny_data)
    assert cli.map_error(e.value)[0] == cli.EXIT_INFRA == 8
    infra = _nothing_published(tmp_path)
    assert "timed out" in infra["reason"] and infra["seconds"] >= 3
    (proc,) = started
    assert proc.poll() is not None  # stopped (SIGTERM ignored: killed), not left hanging


def _fake_docker(tmp_path, monkeypatch, image_pulled=True):
    """A `docker` on PATH whose engine answers; `run` fails as a server that cannot start
    (no Docker engine is available here); every call is logged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "docker-calls"
    fake = bin_dir / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'case "$1" in\n'
        "  info|rm) exit 0 ;;\n"
        f"  image) exit {0 if image_pulled else 1} ;;\n"
        "  run) echo 'Failed to start server: address in use' >&2; exit 1 ;;\n"
        "esac\n"
        "exit 2\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MNIST_INFRA_DOCKER", "1")
    return calls


def test_a_validation_stopped_with_sigterm_removes_its_docker_container(tmp_path):
    """The trainer stops a hung validation with SIGTERM: the validating process removes the
    container it started (a container outlives its killed `docker run` client)."""
    calls = tmp_path / "docker-calls"
    docker = tmp_path / "docker"
    docker.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = run ] && exec sleep 600\nexit 0\n'
    )
    docker.chmod(0o755)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "saved_model.pb").write_bytes(b"")
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from components import infra_validator as v\n"
        "v.stop_cleanly_on_sigterm()\n"
        f"v.validate_with_model_server(v.ModelServer(docker={str(docker)!r}), "
        f"Path({str(candidate)!r}), np.zeros((8, 28, 28), np.uint8), np.zeros((8, 10)))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (calls.exists() and "run" in calls.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(15)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()[-2000:]
    run_line, *rest = calls.read_text().splitlines()
    name = run_line.split("--name ")[1].split()[0]
    assert rest == [f"rm -f {name}"]


def test_without_the_binary_the_pinned_image_runs_in_docker(tmp_path, tiny_data, monkeypatch):
    """No tensorflow_model_server, a Docker engine with the pinned TF Serving image: the staged
    model is served in a container (here one that fails to start: nothing is published), and
    the container is removed afterwards."""
    from components.infra_validator import TF_SERVING_IMAGE

    calls = _fake_docker(tmp_path, monkeypatch)
    with pytest.raises(
        InfraValidationError,
        match=f"docker run {TF_SERVING_IMAGE} exited with code 1 before serving: Failed to start",
    ):
        _run(tmp_path, tiny_data)
    _nothing_published(
        tmp_path, passed=("load", "serving_default on all", "warmup", "the other signatures")
    )
    lines = calls.read_text().splitlines()
    (run,) = [line.split() for line in lines if line.startswith("run ")]
    assert run[-1] == TF_SERVING_IMAGE and "MODEL_NAME=mnist" in run
    assert any(a.endswith("/mnist:/models/mnist:ro") for a in run)
    name = run[run.index("--name") + 1]
    assert lines[-1] == f"rm -f {name}"  # the container is removed, whatever happened


def test_docker_is_used_only_when_asked(tmp_path, tiny_data, monkeypatch):
    calls = _fake_docker(tmp_path, monkeypatch)
    monkeypatch.delenv("MNIST_INFRA_DOCKER")
    result = _run(tmp_path, tiny_data)
    assert "MNIST_INFRA_DOCKER=1 validates in" in result.metrics["infra_validation"]["model_server"]
    assert not calls.exists()  # docker was not even asked


def test_docker_without_the_pinned_image_is_not_used(tmp_path, tiny_data, monkeypatch):
    """A Docker engine without the TF Serving image: no pull during a run (minutes, network);
    the run is validated with the graph loader and the record says how to use Docker."""
    calls = _fake_docker(tmp_path, monkeypatch, image_pulled=False)
    result = _run(tmp_path, tiny_data)
    assert (
        "is not pulled (docker pull tensorflow/serving:2.21.0"
        in (result.metrics["infra_validation"]["model_server"])
    )
    assert not [line for line in calls.read_text().splitlines() if line.startswith("run ")]


def test_a_later_run_has_its_baseline_scored_while_it_trains(tmp_path, tiny_data):
    first = _run(tmp_path, tiny_data, "r1")
    assert "baseline_scored_ahead" not in first.metrics["infra_validation"]  # no baseline
    second = _run(tmp_path, tiny_data, "r2")
    infra = second.metrics["infra_validation"]
    assert infra["baseline_scored_ahead"] is True
    assert second.metrics["baseline_version"] == 1
    served = np.load(second.run_dir / "evaluation" / "baseline_probabilities.npy")
    np.testing.assert_allclose(
        served,
        _served_probabilities(
            Path(infra["baseline"]), second.run_dir / "evaluation" / "test_examples.npz"
        ),
        **SAME_MODEL,
    )


def test_infra_validation_failure_is_exit_8_and_says_how_to_validate_again():
    from components.infra_validator import BaselineDamaged

    code, message = cli.map_error(InfraValidationError("x"), "r7")
    assert code == cli.EXIT_INFRA == 8
    assert "the same command with --run-name r7 validates again, without retraining" in message
    code, message = cli.map_error(BaselineDamaged("the baseline is damaged"), "r7")
    assert code == 8 and "validates again" not in message
    assert "the same command with --run-name r7 goes on from where this run stopped" in message


def test_every_signature_says_when_it_is_unsure(tmp_path, tiny_data):
    """`uncertain` from every signature, from the threshold calibrated at training time and
    stored in the graph (and beside it in assets.extra), equal to the report's rule."""
    result = _run(tmp_path, tiny_data)
    version = tmp_path / "artifacts" / "models" / "mnist" / "1"
    stored = json.loads((version / "assets.extra" / exporter.UNCERTAINTY_FILE).read_text())
    assert stored["threshold"] == result.metrics["uncertainty"]["threshold"] > 0
    loaded = tf.saved_model.load(str(version))
    images = tiny_data[1].images[:16, ..., 0]
    pngs = tf.constant([tf.io.encode_png(img[..., None]).numpy() for img in images])
    for name, kwargs in (
        ("serving_default", {"images": tf.constant(images)}),
        ("predict_png", {"image_bytes": pngs}),
    ):
        out = loaded.signatures[name](**kwargs)
        probs = out["probabilities"].numpy()
        np.testing.assert_array_equal(
            out["uncertain"].numpy(), probs.max(1) < np.float32(stored["threshold"])
        )
    assert "uncertain" in loaded.signatures["predict_image"].structured_outputs


def test_a_failing_early_start_on_the_probabilities_fails_nothing(tmp_path, tiny_data, monkeypatch):
    """The report's figures drawn early are a head start: if starting them fails, the
    validation still completes and the report is drawn as usual."""
    from pipeline import stages

    def fails(run):
        raise OSError("no thread for you")

    monkeypatch.setattr(stages, "_draw_figures_early", fails)
    result = _run(tmp_path, tiny_data)
    assert result.metrics["infra_validation"]["passed"]
    assert (result.run_dir / "report" / "predictions.png").is_file()


def test_the_validating_process_dies_with_the_trainer():
    """A trainer killed with SIGKILL (no clean-up runs) leaves no validating process behind."""
    code = (
        "import time; from components.infra_validator import Validator; "
        "print(Validator().proc.pid, flush=True); time.sleep(120)"
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    validator = int(trainer.stdout.readline())
    trainer.kill()
    trainer.wait()

    def alive() -> bool:  # a zombie (not yet reaped by whoever adopted it) is dead
        try:
            return Path(f"/proc/{validator}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    # Killed with the trainer by the kernel, not when it notices its stdin closed: it would still
    # be importing TensorFlow (seconds), or in the middle of a validation (tens of seconds).
    deadline = time.monotonic() + 1.5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), "the validating process outlived the trainer"


def test_the_validating_process_runs_below_the_trainers_priority():
    """Its head start (TensorFlow import, the baseline's scores) must not slow the train steps:
    the kernel gives the trainer the CPU first."""
    from components.infra_validator import VALIDATOR_NICENESS, Validator

    validator = Validator(timeout_s=120)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, validator.proc.pid) == min(
            19, mine + VALIDATOR_NICENESS
        )
        assert VALIDATOR_NICENESS > 0
    finally:
        validator.close()


# --------------------------------------------------------------------------------------------
# The baseline scored ahead (while the trainer trains), and the warmup replayed on a thread


# The baseline's probabilities from the validating process against the same SavedModel run in
# this one: the same model, but the two processes' TensorFlow thread pools differ (a run in this
# process sets one thread), so sums may round differently (2.4e-7 seen); another model's
# probabilities differ by far more.
SAME_MODEL = {"rtol": 0, "atol": 1e-6}


def _two_exports(model, tmp_path):
    """A candidate and a baseline (the same model with other weights), and test examples."""
    from tests.helpers import make_digits

    candidate = exporter.export_saved_model(model, tmp_path / "candidate")
    weights = model.get_weights()
    try:
        model.set_weights([w * 0.5 for w in weights])
        baseline = exporter.export_saved_model(model, tmp_path / "baseline")
    finally:
        model.set_weights(weights)
    digits = make_digits(64, seed=3, name="test")
    examples = tmp_path / "test_examples.npz"
    np.savez(examples, images=digits.images.reshape(-1, 28, 28), labels=digits.labels)
    return candidate, baseline, examples


def _served_probabilities(export_dir, examples):
    from components import infra_validator

    served = infra_validator._Served(export_dir)
    try:
        return infra_validator._probabilities(served, np.load(examples)["images"])
    finally:
        served.close()


def test_a_baseline_scored_ahead_is_used_only_while_it_is_unchanged(model, tmp_path, monkeypatch):
    from components import infra_validator

    candidate, baseline, examples = _two_exports(model, tmp_path)
    request = {"candidate": str(candidate), "baseline": str(baseline), "examples": str(examples)}
    expected = _served_probabilities(baseline, examples)
    infra_validator.score_baseline({"score_baseline": str(baseline), "examples": str(examples)})
    assert len(infra_validator._scored) == 1

    # Used: the validation loads no baseline of its own.
    loads = []
    real = infra_validator._Served.__init__
    monkeypatch.setattr(
        infra_validator._Served, "__init__", lambda s, d: (loads.append(Path(d)), real(s, d))[1]
    )
    infra_validator.validate({**request, "out": str(tmp_path / "out1")})
    assert loads == [candidate]
    np.testing.assert_array_equal(
        np.load(tmp_path / "out1" / "baseline_probabilities.npy"), expected
    )
    assert not infra_validator._scored  # used once

    # Not used once the baseline's files changed (a folder of that name made again).
    infra_validator.score_baseline({"score_baseline": str(baseline), "examples": str(examples)})
    import shutil

    shutil.rmtree(baseline)
    exporter.export_saved_model(model, baseline)
    loads.clear()
    infra_validator.validate({**request, "out": str(tmp_path / "out2")})
    assert loads == [candidate, baseline]
    again = np.load(tmp_path / "out2" / "baseline_probabilities.npy")
    np.testing.assert_array_equal(again, _served_probabilities(candidate, examples))
    assert np.abs(again - expected).max() > 1e-3
    infra_validator._scored.clear()


def test_the_validating_process_scores_the_baseline_ahead_without_answering(model, tmp_path):
    """The real process: a score_baseline request gets no answer line, and the validation
    after it answers as usual, with the baseline's probabilities."""
    from components.infra_validator import Validator

    candidate, baseline, examples = _two_exports(model, tmp_path)
    validator = Validator(timeout_s=120)
    try:
        validator.score_baseline(baseline, examples)
        record = validator.validate(candidate, examples, tmp_path / "out", baseline=baseline)
    finally:
        validator.close()
    assert record["examples"] == 64 and record["baseline"] == str(baseline.resolve())
    assert record["baseline_scored_ahead"] is True
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "baseline_probabilities.npy"),
        _served_probabilities(baseline, examples),
        **SAME_MODEL,
    )


@pytest.mark.parametrize("first", ["serving_default", "predict_image"])
def test_the_first_failing_warmup_record_is_named(model, tmp_path, first):
    """predict_image's records replay on a thread of their own; whichever group fails first
    in time, the error names the first failing record in the file."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from components import infra_validator

    candidate, _, examples = _two_exports(model, tmp_path)
    bad = {
        "serving_default": ("images", tf.make_tensor_proto(np.zeros((1, 27, 27), np.uint8))),
        "predict_image": ("image_bytes", tf.make_tensor_proto([b"not an image"], tf.string)),
    }
    order = [first, *(name for name in bad if name != first)]
    with tf.io.TFRecordWriter(str(candidate / infra_validator.WARMUP_PATH)) as writer:
        for name in order:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name="mnist", signature_name=name)
            )
            request.inputs[bad[name][0]].CopyFrom(bad[name][1])
            record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(record.SerializeToString())
    with pytest.raises(InfraValidationError, match=f"warmup record 1 \\({first}\\) fails"):
        infra_validator.validate(
            {"candidate": str(candidate), "examples": str(examples), "out": str(tmp_path / "o")}
        )


def test_a_validating_process_gone_before_the_validation_is_started_again(model, tmp_path):
    """Killed while the trainer trained (e.g. for memory): the model is not at fault; a fresh
    process validates it (once: a second death is the failure it reports)."""
    from components.infra_validator import Validator

    candidate, baseline, examples = _two_exports(model, tmp_path)
    validator = Validator(timeout_s=120)
    try:
        validator.score_baseline(baseline, examples)
        first = validator.proc
        first.kill()
        first.wait()
        record = validator.validate(candidate, examples, tmp_path / "out", baseline=baseline)
        assert validator.proc is not first and validator.restarted
        assert record["examples"] == 64 and record["baseline_scored_ahead"] is False
        validator.proc.kill()
        validator.proc.wait()
        with pytest.raises(InfraValidationError, match="ended early"):
            validator.validate(candidate, examples, tmp_path / "out2", baseline=baseline)
    finally:
        validator.close()


def test_a_full_disk_in_the_validating_process_is_a_full_disk_in_the_trainer(monkeypatch, capsys):
    """The validating process writes the served outputs beside the run; a full disk there is not
    the model's fault: its answer carries the errno, and the trainer raises the OSError again
    (exit 6 with the free-space hint, not exit 8 "infra validation failed")."""
    import errno
    import io

    from components import infra_validator as iv
    from pipeline.cli import EXIT_PUBLISH, map_error

    def full(request, progress):
        raise OSError(errno.ENOSPC, "No space left on device", "/a/run/evaluation/x.npz")

    monkeypatch.setattr(iv, "validate", full)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"export_dir": "/a"}\n'))
    iv.serve_requests()
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["ok"] is False and answer["errno"] == errno.ENOSPC

    validator = iv.Validator.__new__(iv.Validator)
    monkeypatch.setattr(validator, "_read_line", lambda deadline: answer, raising=False)
    with pytest.raises(OSError) as raised:
        validator._answer(0.0, None)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/a/run/evaluation/x.npz"
    code, message = map_error(raised.value, "r1")
    assert code == EXIT_PUBLISH and "No space left on device: /a/run/evaluation/x.npz" in message
    assert "free space and run the same command again with --run-name r1" in message


def test_the_served_model_must_match_the_trained_one_within_the_readme_tolerance():
    """1e-5 for a model trained in float32 on the CPU, 2e-3 on a GPU (TF32) or in float16 on
    any device; a class may differ only where the trained model's top two are within twice it."""
    from types import SimpleNamespace

    from pipeline import stages

    def tolerance(device, mixed_precision=False):
        effective = SimpleNamespace(device=device, mixed_precision=mixed_precision)
        return stages._tolerance(SimpleNamespace(effective=effective))

    assert tolerance("cpu") == 1e-5 and tolerance("gpu") == 2e-3
    assert tolerance("cpu", mixed_precision=True) == 2e-3  # `--mixed-precision on` on a CPU
    trained = np.array([[0.7, 0.3, 0.0], [0.500004, 0.499996, 0.0], [0.5001, 0.4999, 0.0]])
    same = trained.copy()
    assert stages._disagreement(same, trained, 1e-5) == (0, 0.0)
    flipped = trained[:, [1, 0, 2]]  # every row's class changes
    differs, gap = stages._disagreement(flipped, trained, 1e-5)
    assert differs == 2 and gap == pytest.approx(0.4)  # the 8e-6 tie is not counted
    assert stages._disagreement(flipped, trained, 2e-3)[0] == 1  # 2e-4 apart: a tie there
    assert stages._disagreement(np.zeros((0, 3)), np.zeros((0, 3)), 1e-5) == (0, 0.0)


def test_the_validating_process_imports_nothing_of_the_trainer_and_no_keras(model, tmp_path):
    """The README's promise about the process that validates, checked in that process after a
    whole validation (baseline included): it loaded the export as TF Serving does, building
    no Keras model (the Keras package is there: `import tensorflow` imports it) and importing
    no module of the trainer."""
    candidate, baseline, examples = _two_exports(model, tmp_path)
    request = {
        "candidate": str(candidate),
        "baseline": str(baseline),
        "examples": str(examples),
        "out": str(tmp_path / "out"),
        "sample": 8,
    }
    code = (  # every Keras layer or model built during the validation is counted
        "import json, sys, keras\n"  # (`import tensorflow` imports the package anyway)
        "built, real = [], keras.layers.Layer.__init__\n"
        "def counted(self, *a, **k):\n"
        "    built.append(type(self).__name__)\n"
        "    real(self, *a, **k)\n"
        "keras.layers.Layer.__init__ = counted\n"
        "keras.layers.Dense(3)\n"  # the count works: this one is counted
        "from components import infra_validator\n"
        "infra_validator.serve_requests()\n"
        "said = {'modules': sorted(sys.modules), 'models': built[1:], 'probe': built[:1]}\n"
        "print(json.dumps(said))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert any(a.get("ok") for a in answers), r.stdout[-3000:] + r.stderr[-3000:]
    modules, models = answers[-1]["modules"], answers[-1]["models"]
    assert answers[-1]["probe"] == ["Dense"]
    assert "tensorflow" in modules and models == []  # no Keras layer or model was built
    ours = sorted(m for m in modules if m.split(".")[0] in ("components", "pipeline", "serving"))
    # Standard library and TensorFlow only, besides the validator and its two helpers.
    assert set(ours) <= {
        "components",
        "components.files",
        "components.infra_validator",
        "components.tf_import",
    }, ours


def test_a_baseline_without_its_assets_extra_is_still_compared_with(model, tmp_path):
    """A version whose assets.extra is gone (listed as unverified) is still the gate's baseline
    (its probabilities are all the gate needs); it was refused after training, its missing
    threshold read as 0 and its `uncertain` flags called wrong. A candidate without its
    threshold is refused, naming the file."""
    from components import infra_validator

    candidate, baseline, examples = _two_exports(model, tmp_path)
    calibration = {"threshold": 0.9, "calibrated": True}
    baseline = exporter.export_saved_model(model, tmp_path / "b2", uncertainty=calibration)
    shutil.rmtree(baseline / "assets.extra")
    images = np.load(examples)["images"]
    probs = infra_validator._baseline_probabilities(str(baseline), images)
    assert probs.shape == (64, 10)
    np.testing.assert_allclose(probs, _served_probabilities(candidate, examples), atol=1e-5)
    served = infra_validator._Served(baseline)
    try:
        with pytest.raises(infra_validator.InfraValidationError) as raised:
            infra_validator._probabilities(served, images)
    finally:
        served.close()
    assert str(raised.value).startswith("assets.extra/uncertainty.json (the calibrated threshold)")
