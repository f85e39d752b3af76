"""Export contract, the publish gate and atomic versions."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import exporter
from components.data import preprocess


def _images(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_serving_default_equals_in_memory_model(model, exported):
    loaded = tf.saved_model.load(str(exported))
    images = _images()
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = model(preprocess(images)).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["class_ids"].numpy(), expected.argmax(1))
    assert out["class_ids"].dtype == tf.int64 and out["probabilities"].dtype == tf.float32


def test_predict_png_equals_serving_default(exported):
    loaded = tf.saved_model.load(str(exported))
    images = _images(5, seed=1)
    pngs = tf.constant([tf.io.encode_png(i[..., None]).numpy() for i in images])
    by_png = loaded.signatures["predict_png"](image_bytes=pngs)
    by_array = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(by_png["probabilities"], by_array["probabilities"], rtol=1e-6)


def test_signature_names_dtypes_shapes(exported):
    loaded = tf.saved_model.load(str(exported))
    sig = loaded.signatures["serving_default"]
    (_, inputs) = sig.structured_input_signature
    assert inputs["images"].dtype == tf.uint8 and inputs["images"].shape.as_list() == [None, 28, 28]
    assert set(sig.structured_outputs) == {"probabilities", "class_ids"}
    png = loaded.signatures["predict_png"].structured_input_signature[1]["image_bytes"]
    assert png.dtype == tf.string and png.shape.as_list() == [None]


def test_warmup_and_metrics_are_beside_the_model(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(
        str(exported / "assets.extra" / exporter.WARMUP_FILE)).as_numpy_iterator())
    signatures = [prediction_log_pb2.PredictionLog.FromString(r).predict_log.request
                  .model_spec.signature_name for r in records]
    assert signatures.count("serving_default") >= 2 and signatures.count("predict_png") >= 2
    assert json.loads((exported / "assets.extra" / "metrics.json").read_text()) == \
        {"test_accuracy": 0.5}


@pytest.mark.parametrize("bad", [b"not an image", b""])
def test_undecodable_png_is_invalid_argument(exported, bad):
    loaded = tf.saved_model.load(str(exported))
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["predict_png"](image_bytes=tf.constant([bad]))


def test_wrong_size_png_is_invalid_argument(exported):
    loaded = tf.saved_model.load(str(exported))
    png = tf.io.encode_png(np.zeros((32, 32, 1), np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="28x28"):
        loaded.signatures["predict_png"](image_bytes=tf.reshape(png, [1]))
    ok = tf.io.encode_png(np.zeros((28, 28, 1), np.uint8))
    assert loaded.signatures["predict_png"](image_bytes=tf.reshape(ok, [1]))["class_ids"].shape == [1]


# ---------------------------------------------------------------------------- gate and publish

def _publish(model, base, accuracy, run_id, **kw):
    kw = {"min_accuracy": 0.97, "max_regression": 0.002, **kw}
    return exporter.publish(model, {"test_accuracy": accuracy}, base, run_id=run_id, **kw)


def test_gate_thresholds(tmp_path):
    g = exporter.gate(0.96, tmp_path, min_accuracy=0.97, max_regression=0.002)
    assert not g.blessed and "below --min-accuracy" in g.reason
    assert exporter.gate(0.975, tmp_path, min_accuracy=0.97, max_regression=0.002).blessed
    assert not exporter.gate(float("nan"), tmp_path, min_accuracy=0.0, max_regression=1).blessed


def test_publish_versions_gate_and_prune(model, tmp_path):
    base = tmp_path / "models" / "mnist"
    first = _publish(model, base, 0.980, "r1")
    assert first.version == 1 and (base / "1" / "saved_model.pb").is_file()
    better = _publish(model, base, 0.985, "r2")
    assert better.version == 2 and better.decision.baseline_version == 1
    slightly_worse = _publish(model, base, 0.9835, "r3")  # within max_regression: published
    assert slightly_worse.version == 3
    worse = _publish(model, base, 0.975, "r4")
    assert not worse.decision.blessed and worse.version is None
    assert "below version 3's 0.9835" in worse.decision.reason
    assert exporter.published_versions(base) == [1, 2, 3]
    pruned = _publish(model, base, 0.99, "r5", keep_versions=2)
    assert pruned.pruned == [1, 2, 3][:2] and exporter.published_versions(base) == [3, 4]
    assert not [p for p in os.listdir(base) if p.startswith(exporter.TMP_PREFIX)]


def test_versions_strictly_increase_past_gaps(model, tmp_path):
    base = tmp_path / "m"
    (base / "7").mkdir(parents=True)
    assert _publish(model, base, 0.99, "r1").version == 8


def test_leftovers_of_a_killed_export_are_removed(model, tmp_path):
    base = tmp_path / "m"
    (base / ".tmp-dead-run" / "variables").mkdir(parents=True)
    result = _publish(model, base, 0.99, "r1")
    assert result.version == 1 and not (base / ".tmp-dead-run").exists()


def test_failed_write_publishes_nothing(model, tmp_path, monkeypatch):
    base = tmp_path / "m"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "write_warmup", full_disk)
    with pytest.raises(exporter.PublishError, match="No space left on device"):
        _publish(model, base, 0.99, "r1")
    assert os.listdir(base) == [exporter.LOCK_FILE]
