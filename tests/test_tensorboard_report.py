"""What people look at: TensorBoard event contents, the report files and page, in a browser."""

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from pipeline.config import small_config
from pipeline.run import Paths, train_pipeline

EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.helpers import make_digits

    artifacts = tmp_path_factory.mktemp("tb") / "artifacts"
    data = (make_digits(512, seed=1), make_digits(256, seed=2, name="test"))
    config = small_config(
        device="cpu",
        epochs=EPOCHS,
        learning_rate=0.003,
        max_train_examples=None,
        max_test_examples=None,
    )
    result = train_pipeline(config, Paths(artifacts), data=data)
    return artifacts, result


def tensors(path):
    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}


def scalar_values(events):
    import tensorflow as tf

    return [float(tf.make_ndarray(e.tensor_proto)) for e in events]


def test_tensorboard_scalars_histograms_images_text_hparams(run):
    artifacts, result = run
    tb = artifacts / "tensorboard" / result.run_id
    train, val = tensors(tb / "train"), tensors(tb / "validation")
    for name in ("epoch_loss", "epoch_accuracy"):
        assert len(train[name]) == EPOCHS and len(val[name]) == EPOCHS
    for value in scalar_values(train["epoch_accuracy"]) + scalar_values(val["epoch_accuracy"]):
        assert 0.0 <= value <= 1.0
    assert scalar_values(train["epoch_learning_rate"]) == pytest.approx([0.003] * EPOCHS)
    # step-level scalars every 4 steps of each epoch (small preset) and at its last step, at
    # the real optimizer step, in their own run folder (one event file written at a time)
    per_epoch = -(-result.metrics["examples"]["train"] // 16)
    assert per_epoch % 4  # (so that the epoch's last step is a point of its own)
    expected = [
        e * per_epoch + k
        for e in range(EPOCHS)
        for k in sorted(set(range(4, per_epoch + 1, 4)) | {per_epoch})
    ]
    steps_run = tensors(tb / "steps")
    assert [e.step for e in steps_run["step_loss"]] == expected
    assert "step_learning_rate" in steps_run and "step_accuracy" in steps_run
    for folder in ("train", "validation", "steps", "images", "model"):
        assert len(list((tb / folder).glob("events.out.tfevents.*"))) == 1, folder
    assert any(tag.endswith("kernel/histogram") for tag in train)
    images = tensors(tb / "images")
    # On the epoch_* curves' and histograms' axis: Keras's epoch index.
    assert [e.step for e in images["predictions"]] == list(range(EPOCHS))
    assert [e.step for e in images["confusion_matrix"]] == list(range(EPOCHS))
    for tag, events in images.items():  # what the Images tab decodes: an RGB figure, not blank
        width, height, png = events[-1].tensor_proto.string_val
        picture = np.asarray(Image.open(io.BytesIO(png)))
        assert picture.shape == (int(height), int(width), 3) and picture.shape[0] > 300, tag
        assert picture.std() > 20 and (picture == 255).mean() > 0.3, tag  # ink on a white page
    root = tensors(tb)
    assert {
        "config",
        "final_metrics",
        "_hparams_/session_start_info",
        "hparams/test_accuracy",
    } <= set(root)
    assert scalar_values(root["hparams/test_accuracy"]) == [result.metrics["test_accuracy"]]
    from tensorboard.plugins.hparams import plugin_data_pb2

    metadata = ea.EventAccumulator(str(tb)).Reload().SummaryMetadata("_hparams_/session_start_info")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        metadata.plugin_data.content
    ).session_start_info
    assert start.hparams["learning_rate"].number_value == pytest.approx(0.003)
    assert start.hparams["hidden_units"].number_value == 128


def test_epoch_images_show_the_models_probabilities_at_that_epoch(tmp_path):
    """The images' forward pass (one traced call, not `predict`) gives what `predict` gives,
    with the weights of the moment: a pass traced once must not keep the first weights."""
    from components.model import build_model
    from components.monitoring import EpochImages
    from tests.helpers import make_digits

    split = make_digits(40, seed=3)
    model = build_model()
    images = EpochImages(tmp_path, split.images, split.labels)
    images.set_model(model)
    try:
        inputs = split.images.astype("float32") / 255.0
        first = images._probabilities()
        np.testing.assert_allclose(first, model.predict(inputs, verbose=0), atol=1e-6)
        for layer in model.layers:
            layer.set_weights([w + 0.05 for w in layer.get_weights()])
        second = images._probabilities()
        np.testing.assert_allclose(second, model.predict(inputs, verbose=0), atol=1e-6)
        assert np.abs(second - first).max() > 1e-3
    finally:
        images.close()


def test_model_graph_is_logged(run):
    """The forward pass's op graph, in the `model` run (what the Graphs tab renders; the live
    TensorBoard test fetches it through the graphs plugin)."""
    artifacts, result = run
    acc = ea.EventAccumulator(str(artifacts / "tensorboard" / result.run_id / "model")).Reload()
    names = {node.name for node in acc.Graph().node}
    assert any("hidden" in name for name in names) and any("probabilities" in n for n in names)


def test_report_figures_are_sensible_pngs(run):
    _, result = run
    report = result.run_dir / "report"
    pngs = sorted(report.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "train_sample.png",
        "first_test.png",
        "predictions.png",
        "mistakes.png",
        "confusion_matrix.png",
        "confidence.png",
        "training_curves.png",
    }
    for p in pngs:
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            w, h = img.size
            assert 150 <= w <= 2500 and 150 <= h <= 2500, (p.name, img.size)
            assert np.asarray(img.convert("L")).std() > 5, f"{p.name} looks blank"


def test_report_page_is_self_contained_and_matches_metrics(run):
    _, result = run
    page = (result.run_dir / "report" / "index.html").read_text()
    assert not re.search(r"(src|href)=[\"'](?!data:)", page), "external reference in the page"
    assert "http://" not in page and "https://" not in page
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert f'id="test-accuracy">{metrics["test_accuracy"]:.4f}<' in page
    table = page.split('id="per-class"')[1].split("</table>")[0]
    rows = re.findall(
        r"<tr><td>(\d)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>"
        r"<td>(\d+)</td></tr>",
        table,
    )
    assert len(rows) == 10
    for c, p, r, f, n in rows:
        m = metrics["per_class"][c]
        assert (float(p), float(r), float(f), int(n)) == pytest.approx(
            (m["precision"], m["recall"], m["f1"], m["support"]), abs=6e-5
        )
    assert page.count("data:image/png;base64,") == 7
    config = json.loads(html.unescape(page.split('<pre id="config">')[1].split("</pre>")[0]))
    assert config["epochs"] == EPOCHS


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    _, result = run
    url = (result.run_dir / "report" / "index.html").resolve().as_uri()
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(
        common + [f"--screenshot={shot}", "--window-size=1200,1600", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 10, "blank screenshot"
    dom = subprocess.run(
        common + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert f"{result.metrics['test_accuracy']:.4f}" in dom
    assert dom.count("<img") == 7


def test_report_shows_the_data_statistics_and_the_published_model_card(run):
    _, result = run
    page = (result.run_dir / "report" / "index.html").read_text()
    stats = html.unescape(page.split('<pre class="text" id="statistics">')[1].split("</pre>")[0])
    assert stats.startswith("| split | examples |") and "| test | " in stats
    card = html.unescape(page.split('<pre class="text" id="model-card">')[1].split("</pre>")[0])
    version = result.metrics["published_version"]
    published = Path(result.metrics["published_path"]) / "assets.extra" / "model_card.md"
    assert card == published.read_text() and f"version {version}" in page


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_the_curves_have_whole_epoch_ticks(epochs):
    from components import report

    history = {k: [0.5] * epochs for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    for ax in report.figure_curves(history).axes:
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown == list(range(1, epochs + 1)), (epochs, shown)


def test_the_report_says_where_its_curves_come_from():
    """Validation curves from examples held out of the training split, or none without them
    (the report said "none: no validation curves" beside 3,000 validation examples)."""
    from components.report import _provenance_html

    held = _provenance_html({"examples": {"train": 57000, "validation": 3000, "test": 10000}})
    assert "57000 training examples and 3000 validation examples held out" in held
    assert "no validation curves" not in held
    none = _provenance_html({"examples": {"train": 60000, "validation": 0, "test": 10000}})
    assert "60000 training examples and no validation examples" in none
    assert "no validation curves" in none


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """Stopped in epoch 2 after some of its step points and before its backup, then resumed:
    the stopped attempt's points past epoch 1 are dropped from its event files, so TensorBoard
    (its own loader, reading every file of the folder) shows each step once, the resumed
    attempt's, as an uninterrupted run would."""
    from components import monitoring
    from tests.helpers import make_digits

    artifacts = tmp_path / "artifacts"
    data = (make_digits(512, seed=1), make_digits(256, seed=2, name="test"))
    config = small_config(device="cpu", epochs=EPOCHS)
    real = monitoring.BatchScalars._write

    def stop_in_epoch_2(self, step, logs):
        real(self, step, logs)
        if self._epoch_start > 0 and step - self._epoch_start >= 12:  # 3 points into epoch 2
            raise KeyboardInterrupt

    monitoring.BatchScalars._write = stop_in_epoch_2
    try:
        with pytest.raises(KeyboardInterrupt):
            train_pipeline(config, Paths(artifacts), run_id="r", data=data)
    finally:
        monitoring.BatchScalars._write = real
    tb = artifacts / "tensorboard" / "r"
    stopped = [e.step for e in tensors(tb / "steps")["step_loss"]]
    result = train_pipeline(config, Paths(artifacts), run_id="r", data=data)
    assert result.metrics["resumed_from_epoch"] == 1
    steps = [e.step for e in tensors(tb / "steps")["step_loss"]]
    per_epoch = -(-result.metrics["examples"]["train"] // 16)
    expected = [
        e * per_epoch + k
        for e in range(EPOCHS)
        for k in sorted(set(range(4, per_epoch + 1, 4)) | {per_epoch})
    ]
    assert len(stopped) > len(expected) // 2 and max(stopped) > per_epoch  # into epoch 2
    assert steps == expected, (stopped, steps)
    assert [e.step for e in tensors(tb / "images")["predictions"]] == list(range(EPOCHS))
    assert len(list((tb / "steps").glob("events.out.tfevents.*"))) == 2  # one per attempt


def test_a_run_stopped_at_an_epochs_backup_shows_that_epoch_once(tmp_path, monkeypatch):
    """Stopped as epoch 2's backup was being saved (its step points and images written: the
    backup comes after them), resumed at epoch 2: its points and image are dropped from the
    stopped attempt's files and written again, once."""
    import keras

    from tests.helpers import make_digits

    artifacts = tmp_path / "artifacts"
    data = (make_digits(512, seed=1), make_digits(256, seed=2, name="test"))
    config = small_config(device="cpu", epochs=EPOCHS)
    real = keras.callbacks.BackupAndRestore.on_epoch_end

    def stopped_at_the_second_backup(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, logs)

    with monkeypatch.context() as m:
        m.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", stopped_at_the_second_backup)
        with pytest.raises(KeyboardInterrupt):
            train_pipeline(config, Paths(artifacts), run_id="r", data=data)
    tb = artifacts / "tensorboard" / "r"
    assert [e.step for e in tensors(tb / "images")["predictions"]] == [0, 1]  # both written
    result = train_pipeline(config, Paths(artifacts), run_id="r", data=data)
    assert result.metrics["resumed_from_epoch"] == 1
    assert [e.step for e in tensors(tb / "images")["predictions"]] == [0, 1]
    steps = [e.step for e in tensors(tb / "steps")["step_loss"]]
    assert steps == sorted(set(steps)) and max(steps) == EPOCHS * (
        -(-result.metrics["examples"]["train"] // 16)
    )


def test_pruning_drops_a_record_cut_short_and_never_fails_the_run(tmp_path, caplog):
    import tensorflow as tf

    from components import monitoring

    writer = tf.summary.create_file_writer(str(tmp_path / "steps"))
    with writer.as_default():
        for step in range(1, 11):
            tf.summary.scalar("step_loss", 1.0 / step, step=step)
    writer.close()
    (path,) = monitoring.event_files(tmp_path / "steps")
    path.write_bytes(path.read_bytes()[:-5])  # the kill cut the last record short
    assert monitoring.drop_points_from([path], 6) == 5  # steps 6..9, and 10 cut short
    assert [e.step for e in tensors(tmp_path / "steps")["step_loss"]] == [1, 2, 3, 4, 5]
    assert monitoring.drop_points_from([path], 6) == 0  # nothing left to drop: untouched
    odd = tmp_path / "steps" / "events.out.tfevents.0.odd"
    odd.mkdir()  # unreadable as a file: a warning, the run goes on
    assert monitoring.drop_points_from([odd], 0) == 0
    assert "left as it was" in caplog.text
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == sorted([path.name, odd.name])


def test_a_probability_short_of_one_is_never_shown_as_100_percent():
    from components.report import percent

    assert [percent(p) for p in (1.0, 0.99996, 0.995, 0.994, 0.5, 0.0)] == [
        "100%",
        ">99%",
        ">99%",
        "99%",
        "50%",
        "0%",
    ]
