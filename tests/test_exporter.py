"""Export contract, the publish gate and atomic versions."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from components import exporter
from components.data import preprocess
from tests.helpers import no_hang


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
    assert set(sig.structured_outputs) == {"probabilities", "class_ids", "uncertain"}
    assert sig.structured_outputs["uncertain"].dtype == tf.bool
    assert set(loaded.signatures) >= {"serving_default", "predict_png", "predict_image"}
    png = loaded.signatures["predict_png"].structured_input_signature[1]["image_bytes"]
    assert png.dtype == tf.string and png.shape.as_list() == [None]


def test_warmup_and_metrics_are_beside_the_model(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(
        tf.data.TFRecordDataset(
            str(exported / "assets.extra" / exporter.WARMUP_FILE)
        ).as_numpy_iterator()
    )
    signatures = [
        prediction_log_pb2.PredictionLog.FromString(r).predict_log.request.model_spec.signature_name
        for r in records
    ]
    assert signatures.count("serving_default") >= 2 and signatures.count("predict_png") >= 2
    assert json.loads((exported / "assets.extra" / "metrics.json").read_text()) == {
        "test_accuracy": 0.5
    }


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
    out = loaded.signatures["predict_png"](image_bytes=tf.reshape(ok, [1]))
    assert out["class_ids"].shape == [1]


def _png(pixels, mode, **options):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG", **options)
    return buf.getvalue()


def test_predict_png_refuses_transparency_and_reads_opaque_colour_as_gray(exported):
    """A canvas export (a dark digit on a transparent page, RGBA or gray+alpha) is refused by
    predict_png with what to do, not read blank with its alpha dropped; an opaque RGB(A) image
    is read by luminance, as before."""
    loaded = tf.saved_model.load(str(exported))
    digit = _images(1, seed=3)[0]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 255 - digit  # dark ink (black) where the digit is, transparent elsewhere
    gray_alpha = np.stack([np.zeros_like(digit), 255 - digit], -1)
    trns = _png(np.where(digit > 128, 255, 0).astype(np.uint8), "L", transparency=0)
    for blob in (_png(rgba, "RGBA"), _png(gray_alpha, "LA"), trns):
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="transparent pixels.*predict_image"
        ):
            loaded.signatures["predict_png"](image_bytes=tf.constant([blob]))
    opaque = np.dstack([digit, digit, digit, np.full_like(digit, 255)])
    by_png = loaded.signatures["predict_png"](
        image_bytes=tf.constant([_png(opaque, "RGBA"), _png(opaque[..., :3], "RGB")])
    )
    by_array = loaded.signatures["serving_default"](images=tf.constant(np.stack([digit] * 2)))
    np.testing.assert_allclose(by_png["probabilities"], by_array["probabilities"], rtol=1e-6)


# ---------------------------------------------------------------------------- gate and publish


@pytest.fixture
def staged(model, tmp_path):
    return exporter.export_saved_model(model, tmp_path / "staged")


def _publish(staged, base, run_id, baseline=None, **kw):
    return exporter.publish_staged(
        staged,
        base,
        run_id=run_id,
        baseline_version=baseline,
        assets={"metrics.json": f'{{"run_id": "{run_id}"}}'},
        **{"remembered": set, **kw},
    )


def _correct(n, wrong):
    out = np.ones(n, bool)
    out[list(wrong)] = False
    return out


def test_gate_floor_and_smoke_runs():
    kw = dict(min_accuracy=0.97, max_regression=0.002)
    g = exporter.gate(_correct(100, range(4)), full_test_split=True, **kw)
    assert not g.blessed and "below --min-accuracy" in g.reason
    assert exporter.gate(_correct(100, range(2)), full_test_split=True, **kw).blessed
    assert not exporter.gate(
        np.array([], bool), full_test_split=True, min_accuracy=0.0, max_regression=1
    ).blessed
    # one perfect test image is not a model to publish (nor a baseline for later gates)
    smoke = exporter.gate(np.ones(1, bool), full_test_split=False, **kw)
    assert not smoke.blessed and "never published" in smoke.reason
    forced = exporter.gate(np.ones(1, bool), full_test_split=False, allow_partial_test=True, **kw)
    assert forced.blessed and forced.forced_partial_test


def test_gate_regression_is_paired_and_must_be_significant():
    kw = dict(full_test_split=True, min_accuracy=0.9, max_regression=0.002, baseline_version=3)
    baseline = _correct(10_000, range(200))  # 0.98
    # 60 newly wrong, none newly right: a 0.006 drop, far from noise
    g = exporter.gate(_correct(10_000, range(260)), baseline_correct=baseline, **kw)
    assert not g.blessed and "version 3's 0.9800" in g.reason
    assert "0.0060 below" in g.reason and "more than --max-regression 0.0020, and significant" in (
        g.reason
    )
    assert (g.candidate_only_wrong, g.baseline_only_wrong) == (60, 0) and g.p_value < 1e-9
    # a 0.0025 drop made of 200 newly wrong and 175 newly right: within noise (p ~ 0.1)
    noisy = _correct(10_000, [*range(200, 400), *range(25)])
    g = exporter.gate(noisy, baseline_correct=baseline, **kw)
    assert g.accuracy == pytest.approx(0.9775) and g.blessed and 0.05 < g.p_value < 0.2
    assert "0.0025 below" in g.reason and "but not significant (p >= 0.05)" in g.reason
    # a significant 0.0010 drop is within the allowed regression, and says so
    g = exporter.gate(_correct(10_000, range(210)), baseline_correct=baseline, **kw)
    assert g.blessed and g.p_value < 0.01
    assert "0.0010 below version 3's" in g.reason and "within --max-regression 0.0020" in g.reason
    g = exporter.gate(baseline, baseline_correct=baseline, **kw)
    assert g.blessed and "not below version 3's 0.9800" in g.reason
    # exactly --max-regression (20 more wrong of 10,000: 0.002) is within it, whatever the
    # floats of the two accuracies make of the difference; one more is not
    for base_wrong in range(0, 970, 7):
        base = _correct(10_000, range(base_wrong))
        g = exporter.gate(_correct(10_000, range(base_wrong + 20)), baseline_correct=base, **kw)
        assert g.blessed and "within --max-regression 0.0020" in g.reason, (base_wrong, g.reason)
        g = exporter.gate(_correct(10_000, range(base_wrong + 21)), baseline_correct=base, **kw)
        assert not g.blessed, (base_wrong, g.reason)
    assert exporter.mcnemar_p(0, 0) == 1.0 and exporter.mcnemar_p(5, 0) == 1 / 32


def test_publish_versions_baseline_check_and_prune(staged, tmp_path):
    base = tmp_path / "models" / "mnist"
    assert _publish(staged, base, "r1").version == 1
    assert (base / "1" / "saved_model.pb").is_file()
    assert (base / "1" / "assets.extra" / "metrics.json").read_text() == '{"run_id": "r1"}'
    assert _publish(staged, base, "r2", baseline=1).version == 2
    with pytest.raises(exporter.BaselineMoved) as moved:  # gated against 1, but 2 is out
        _publish(staged, base, "r3", baseline=1)
    assert moved.value.latest == 2
    assert _publish(staged, base, "r3", baseline=2).version == 3
    result = _publish(staged, base, "r4", baseline=3, keep_versions=2, protected=lambda: {1})
    assert result.pruned == [2] and exporter.published_versions(base) == [1, 3, 4]
    assert not [p for p in os.listdir(base) if p.startswith(exporter.TMP_PREFIX)]


def test_versions_strictly_increase_past_gaps(staged, tmp_path):
    base = tmp_path / "m"
    (base / "7").mkdir(parents=True)
    assert _publish(staged, base, "r1", baseline=7).version == 8


def test_a_deleted_versions_number_is_never_given_to_another_model(staged, tmp_path, caplog):
    """Version 2 deleted (damaged: its error says to delete it): TF Serving may have loaded
    it, a label may point at it; the next model is 3, not a second 2. Known from the highest
    number published, else from labels.json's labels and history."""
    import json
    import shutil

    from serving import versions

    base = tmp_path / "models" / "mnist"
    remembered = {"remembered": lambda: versions.remembered(base)}  # (as the pipeline passes)
    assert _publish(staged, base, "r1", **remembered).version == 1
    assert _publish(staged, base, "r2", baseline=1, **remembered).version == 2
    shutil.rmtree(base / "2")
    assert _publish(staged, base, "r3", baseline=1, **remembered).version == 3
    shutil.rmtree(base / "3")
    (base / exporter.HIGHEST_FILE).unlink()  # (an older publish: only the labels remember)
    (base.parent / "labels.json").write_text(
        json.dumps({"stable": 3, "canary": None, "history": [1]})
    )
    assert _publish(staged, base, "r4", baseline=1, **remembered).version == 4
    shutil.rmtree(base / "4")
    (base / exporter.HIGHEST_FILE).write_bytes(b"\xff garbage")
    with caplog.at_level("WARNING"):
        assert (
            _publish(staged, base, "r5", baseline=1, **remembered).version == 4
        )  # after the label's 3
    assert f"{base / exporter.HIGHEST_FILE} is unreadable" in caplog.text
    assert (base / exporter.HIGHEST_FILE).read_text() == "4\n"


def test_a_numbered_name_that_is_not_a_version_is_never_written_onto(staged, tmp_path):
    """A file "2" where the next version would go, and a folder "007" (TF Serving would read it
    as version 7; we list only the names we write): the next version goes past both."""
    base = tmp_path / "m"
    assert _publish(staged, base, "r1").version == 1
    (base / "2").write_text("x")
    assert _publish(staged, base, "r2", baseline=1).version == 3
    (base / "007").mkdir()
    assert exporter.published_versions(base) == [1, 3]
    assert _publish(staged, base, "r3", baseline=3).version == 8


def test_a_folder_where_the_publish_lock_goes_is_a_one_line_publish_error(staged, tmp_path):
    base = tmp_path / "m"
    (base / exporter.LOCK_FILE).mkdir(parents=True)
    with pytest.raises(exporter.PublishError, match=r"\.publish\.lock: it is a folder: remove it$"):
        _publish(staged, base, "r1")
    assert exporter.published_versions(base) == []


def test_a_named_pipe_where_the_publish_lock_goes_is_refused_not_waited_on(staged, tmp_path):
    """`open` of a FIFO for writing blocks until a reader comes: the publish would hang."""
    base = tmp_path / "m"
    base.mkdir()
    os.mkfifo(base / exporter.LOCK_FILE)
    with no_hang(30):
        with pytest.raises(exporter.PublishError, match=r"\.publish\.lock: not a regular file"):
            _publish(staged, base, "r1")
    assert exporter.published_versions(base) == []


def test_leftovers_of_a_killed_export_are_removed(staged, tmp_path):
    base = tmp_path / "m"
    (base / ".tmp-dead-run" / "variables").mkdir(parents=True)
    result = _publish(staged, base, "r1")
    assert result.version == 1 and not (base / ".tmp-dead-run").exists()


def test_failed_write_publishes_nothing(staged, tmp_path, monkeypatch):
    base = tmp_path / "m"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "_fsync_tree", full_disk)
    with pytest.raises(exporter.PublishError, match="No space left on device"):
        _publish(staged, base, "r1")
    assert os.listdir(base) == [exporter.LOCK_FILE]


def test_a_copy_that_reads_back_different_publishes_nothing(staged, tmp_path, monkeypatch):
    base = tmp_path / "m"
    copytree = exporter.shutil.copytree

    def bad_copy(src, dst, *args, **kwargs):
        copytree(src, dst, *args, **kwargs)
        if Path(src) == Path(staged):
            data = next(Path(dst).glob("variables/*.data-*"))
            data.write_bytes(bytes([data.read_bytes()[0] ^ 0xFF]) + data.read_bytes()[1:])

    monkeypatch.setattr(exporter.shutil, "copytree", bad_copy)
    with pytest.raises(exporter.PublishError, match="differs"):
        _publish(staged, base, "r1")
    assert os.listdir(base) == [exporter.LOCK_FILE]


def test_a_run_published_before_a_kill_is_found_not_published_twice(staged, tmp_path):
    base = tmp_path / "m"
    _publish(staged, base, "r1")
    assert exporter.version_of_run(base, "r1") == 1
    assert exporter.version_of_run(base, "r2") is None
