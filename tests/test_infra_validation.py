"""Infra validation: the staged SavedModel is loaded in a separate process the way TF Serving
loads it; each injected fault (corrupt variables, a signature that disagrees with the trained
model, a failing warmup record, a model server that does not start) publishes nothing."""

import json
import os
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


def _nothing_published(tmp_path, run_id="r1"):
    models = tmp_path / "artifacts" / "models" / "mnist"
    assert exporter.published_versions(models) == []
    run_dir = tmp_path / "artifacts" / "runs" / run_id
    assert not (run_dir / "stages" / "validate.json").exists()
    assert not (run_dir / "metrics.json").exists()


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
    _nothing_published(tmp_path)


def test_a_signature_that_disagrees_with_the_model_publishes_nothing(
    tmp_path, tiny_data, monkeypatch
):
    # a preprocessing drift: the exported graph divides by 128 where training divided by 255
    monkeypatch.setattr(exporter, "preprocess", lambda x: tf.cast(x, tf.float32) / 128.0)
    with pytest.raises(InfraValidationError, match="disagrees with the trained model"):
        _run(tmp_path, tiny_data)
    _nothing_published(tmp_path)


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
    _nothing_published(tmp_path)


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
    _nothing_published(tmp_path)


def test_infra_validation_failure_is_exit_8():
    assert cli.map_error(InfraValidationError("x"))[0] == cli.EXIT_INFRA == 8


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
