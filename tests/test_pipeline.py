"""The whole run in-process on small data: every artifact of the contract, where it belongs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pipeline.config import TrainConfig, small_config
from pipeline.run import Paths, new_run_id, rebuild_report, train_pipeline
from tests.helpers import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = {
    "train_sample.png",
    "first_test.png",
    "predictions.png",
    "mistakes.png",
    "confusion_matrix.png",
    "confidence.png",
    "training_curves.png",
    "index.html",
}


def check_run_artifacts(artifacts, result, epochs):
    run = result.run_dir
    assert (artifacts / "runs" / "latest").resolve() == run.resolve()
    assert TrainConfig.from_json(run / "config.json").epochs == epochs
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert np.array(metrics["confusion_matrix"]).shape == (10, 10)
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["test_examples"]
    assert set(metrics["per_class"]) == {str(c) for c in range(10)}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["3"])
    assert metrics["device"] == "cpu" and "fit_seconds" in metrics["timings"]
    assert metrics["epochs_trained"] == epochs
    figures = {p.name for p in (run / "report").iterdir()}
    for name in figures - {"index.html"}:
        assert (run / "report" / name).read_bytes()[:8] == PNG_MAGIC
    assert list((artifacts / "tensorboard" / result.run_id / "train").glob("events.out.*"))
    assert list((artifacts / "tensorboard" / result.run_id / "validation").glob("events.out.*"))
    return metrics, figures


def test_run_on_tfds_mock_data(tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    with tfds.testing.mock_data(num_examples=64):
        result = train_pipeline(small_config(device="cpu"), Paths(artifacts))
    metrics, figures = check_run_artifacts(artifacts, result, epochs=1)
    assert {
        "first_test.png",
        "predictions.png",
        "confusion_matrix.png",
        "train_sample.png",
    } <= figures
    out = capsys.readouterr().out
    assert "Test accuracy:" in out and "First test image: predicted" in out
    # gate open (min_accuracy 0 in the small preset): version 1 published with its metrics
    assert metrics["blessed"] and metrics["published_version"] == 1
    version = artifacts / "models" / "mnist" / "1"
    assert (
        json.loads((version / "assets.extra" / "metrics.json").read_text())["test_accuracy"]
        == metrics["test_accuracy"]
    )


def test_run_on_learnable_data_publishes_a_servable_model(tmp_path, tiny_data):
    artifacts = tmp_path / "artifacts"
    config = small_config(
        device="cpu",
        epochs=2,
        learning_rate=0.01,
        max_train_examples=None,
        max_test_examples=None,
        min_accuracy=0.9,
        max_regression=0.002,
    )
    result = train_pipeline(config, Paths(artifacts), data=tiny_data)
    metrics, figures = check_run_artifacts(artifacts, result, epochs=2)
    assert figures == REPORT_FILES
    assert metrics["test_accuracy"] >= 0.9 and metrics["published_version"] == 1
    served = tf.saved_model.load(str(artifacts / "models" / "mnist" / "1"))
    test = tiny_data[1]
    out = served.signatures["serving_default"](images=tf.constant(test.images[:16, ..., 0]))
    probs = np.load(result.run_dir / "predictions.npz")["probabilities"][:16]
    np.testing.assert_array_equal(out["class_ids"].numpy(), probs.argmax(1))

    # a second run that is much worse is refused, and nothing new is published
    worse = train_pipeline(
        config.replace(epochs=1, learning_rate=1e-6, min_accuracy=0.0),
        Paths(artifacts),
        data=tiny_data,
    )
    assert not worse.blessed and worse.metrics["published_version"] is None
    assert "below version 1" in worse.metrics["gate"]["reason"]
    assert sorted(os.listdir(artifacts / "models" / "mnist")) == [
        ".highest_version",
        ".publish.lock",
        "1",
    ]


def test_rebuild_report(tmp_path, tiny_data, monkeypatch):
    """`make report` redraws the report from the run's files: the same figures, byte for byte,
    as the run drew during its validation (from the served probabilities, on a thread)."""
    from pipeline import stages

    used = []
    real = stages._figures_drawn_from
    monkeypatch.setattr(stages, "_figures_drawn_from", lambda *a: used.append(real(*a)) or used[-1])
    artifacts = tmp_path / "artifacts"
    result = train_pipeline(small_config(device="cpu"), Paths(artifacts), data=tiny_data)
    assert used and used[0] is not None  # the run's report took the figures drawn early
    drawn = {p.name: p.read_bytes() for p in (result.run_dir / "report").iterdir()}
    for p in (result.run_dir / "report").iterdir():
        p.unlink()
    written = rebuild_report(artifacts / "runs" / "latest")
    assert {p.name for p in written} == REPORT_FILES
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes() == drawn[p.name], p.name

    # `make report` as users run it: its own process, with neither TensorFlow nor Keras.
    check = (
        "import sys; from pipeline.cli import main; code = main(['report', sys.argv[1]]); "
        "sys.exit(code or 10 * any(m in sys.modules for m in ('tensorflow', 'keras')))"
    )
    redraw = subprocess.run(
        [sys.executable, "-c", check, str(result.run_dir)], cwd=ROOT, capture_output=True
    )
    assert redraw.returncode == 0, redraw.stderr[-2000:]


def test_a_report_from_emptied_statistics_and_config_says_what_it_left_out(
    tmp_path, tiny_data, caplog
):
    """An empty statistics.pb parses (an empty message) and `{}` is valid JSON: the report is
    redrawn without them, and says so, rather than showing an empty table as the data's."""
    result = train_pipeline(small_config(device="cpu"), Paths(tmp_path / "a"), data=tiny_data)
    assert 'id="statistics"' in (result.run_dir / "report" / "index.html").read_text()
    (result.run_dir / "data" / "statistics.pb").write_bytes(b"")
    (result.run_dir / "config.json").write_text("{}")
    with caplog.at_level("WARNING", logger="pipeline"):
        rebuild_report(result.run_dir)
    warned = caplog.text
    assert "statistics.pb holds no split's statistics): left out" in warned
    assert "config.json holds no run settings" in warned
    html = (result.run_dir / "report" / "index.html").read_text()
    assert 'id="statistics"' not in html and '<pre id="config">(not recorded)</pre>' in html


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "one array", "other arrays"])
def test_a_damaged_report_input_is_one_line_and_exit_4(tmp_path, damage, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "config.json").write_text("{}")
    path = run / "predictions.npz"
    rng = np.random.default_rng(0)
    good = {
        "images": rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
        "labels": np.arange(8),
        "probabilities": rng.random((8, 10), dtype=np.float32),
        "train_images": rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(4),
    }
    with open(path, "wb") as f:
        np.savez(f, **good)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "not a zip":
        path.write_text("garbage")
    elif damage == "one array":
        with open(path, "wb") as f:
            np.save(f, good["probabilities"])
    else:
        with open(path, "wb") as f:
            np.savez(f, **{**good, "probabilities": good["probabilities"][:, :9]})
    assert main(["report", str(run)]) == 4  # a corrupt input file (6 is a failed write)
    err = capsys.readouterr().err
    assert "predictions.npz" in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "report").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real run (every section of metrics.json a run writes: gate, uncertainty, infra
    validation, history), copied by each test that damages it."""
    from tests.helpers import make_digits

    data = make_digits(512, seed=1), make_digits(128, seed=2, name="test")
    artifacts = tmp_path_factory.mktemp("finished") / "artifacts"
    return train_pipeline(small_config(device="cpu"), Paths(artifacts), data=data).run_dir


def _edit_metrics(run, edit):
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))  # (NaN and Infinity as Python writes)


def _put(key, value):
    def edit(metrics):
        *parents, last = key.split(".")
        section = metrics
        for k in parents:
            section = section[k]
        section[last] = value

    return edit


BAD_METRICS = {
    "test_accuracy null": (_put("test_accuracy", None), "test_accuracy is null"),
    "test_accuracy a string": (_put("test_accuracy", "0.98"), 'test_accuracy is "0.98"'),
    "test_accuracy a bool": (_put("test_accuracy", True), "test_accuracy is true"),
    "test_accuracy NaN": (_put("test_accuracy", float("nan")), "test_accuracy is NaN"),
    "test_accuracy above 1": (_put("test_accuracy", 1.5), "test_accuracy is 1.5"),
    "test_loss Infinity": (_put("test_loss", float("inf")), "test_loss is Infinity"),
    "test_examples 0": (_put("test_examples", 0), "test_examples is 0"),
    "test_examples a bool": (_put("test_examples", True), "test_examples is true"),
    "per_class null": (_put("per_class", None), "per_class is null"),
    "f1 a string": (_put("per_class.3.f1", "x"), 'per_class.3.f1 is "x"'),
    "negative support": (_put("per_class.3.support", -1), "per_class.3.support is -1"),
    "negative count": (
        lambda m: m["confusion_matrix"][2].__setitem__(5, -1),
        "confusion_matrix[2][5] is -1",
    ),
    "history a string": (_put("history", {"loss": "x"}), 'history.loss is "x"'),
    "history with a string": (
        lambda m: m["history"]["loss"].__setitem__(0, "x"),
        'history.loss[0] is "x"',
    ),
    "history ragged": (lambda m: m["history"]["loss"].append(0.1), "history holds logs"),
    "gate a string": (_put("gate", "x"), 'gate is "x"'),
    "gate reason null": (_put("gate.reason", None), "gate.reason is null"),
    "threshold a string": (_put("uncertainty.threshold", "0.9"), 'uncertainty.threshold is "0.9"'),
    "signatures a string": (
        _put("infra_validation.signatures", "x"),
        "infra_validation.signatures",
    ),
}


@pytest.mark.parametrize("name", BAD_METRICS)
def test_a_wrong_field_in_metrics_is_one_line_and_exit_4(
    finished_run, tmp_path, name, capsys, recwarn
):
    """`make report` on a metrics.json that parses but holds a field of the wrong type or out of
    range: one line naming the file and the field, exit 4 as for a damaged file, no traceback,
    no warning, and the previous report as it was (nothing drawn from the bad value)."""
    from pipeline.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    before = {p.name: p.read_bytes() for p in (run / "report").iterdir()}
    edit, said = BAD_METRICS[name]
    _edit_metrics(run, edit)
    capsys.readouterr()
    assert main(["report", str(run)]) == 4
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{run / 'metrics.json'}: {said}" in err and ", expected " in err, err
    assert {p.name: p.read_bytes() for p in (run / "report").iterdir()} == before
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


GOOD_METRICS = {
    "as written": lambda m: None,
    "a lost epoch": lambda m: m["history"]["loss"].__setitem__(0, None),
    "optional parts null": lambda m: m.update(gate=None, uncertainty=None, history=None),
    "optional parts absent": lambda m: [m.pop(k) for k in ("gate", "examples", "macro_f1")],
}


@pytest.mark.parametrize("name", GOOD_METRICS)
def test_a_correct_metrics_json_still_rebuilds(finished_run, tmp_path, name, capsys):
    """What the report can do without (null: no baseline, a lost epoch; absent sections) is
    no error: the checks refuse only what would be drawn wrong."""
    from pipeline.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    _edit_metrics(run, GOOD_METRICS[name])
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert (run / "report" / "index.html").is_file()


def test_a_file_where_the_report_goes_is_one_line_and_exit_6(tmp_path, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "report").write_text("not a folder")
    assert main(["report", str(run)]) == 6  # the report cannot be written
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run / 'report'} is not a folder: move it away"]


def test_a_dangling_link_where_the_report_goes_is_one_line_and_kept(tmp_path, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "report").symlink_to(tmp_path / "not-mounted")
    assert main(["report", str(run)]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run / 'report'} is not a folder: move it away"]
    assert (run / "report").is_symlink()


def test_a_dangling_link_where_the_model_goes_stops_the_run_before_training(tmp_path, monkeypatch):
    """train/ linked to a drive that is not mounted: the run stops before the fit (nothing
    trained is lost at the save), and the link is kept."""
    from types import SimpleNamespace

    from pipeline import stages

    layout = stages.RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.model.parent.symlink_to(tmp_path / "not-mounted")
    fits = []
    monkeypatch.setattr(stages, "_fit", lambda run: fits.append(run))
    run = SimpleNamespace(config=SimpleNamespace(seed=0), layout=layout)
    with pytest.raises(FileExistsError, match="a link to something that is not a folder"):
        stages.train(run)
    assert fits == [] and layout.model.parent.is_symlink()


@pytest.mark.parametrize(
    "state, message",
    [("finished", "already finished"), ("other config", "was started with another config")],
)
def test_a_run_that_cannot_be_resumed_is_refused_before_the_data_load(tmp_path, state, message):
    """`--run-name` of a finished run, or of one started with other flags: refused before the
    data load (here there is no data at all: a later check would fail on that instead) and
    before the validating process starts, with nothing written."""
    from pipeline import stages

    config = small_config(epochs=1)
    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    config.to_json(run_dir / "config.json", {})
    if state == "finished":
        (run_dir / "metrics.json").write_text('{"blessed": true}')
    else:
        config = small_config(epochs=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    paths = Paths(tmp_path, tfds_data_dir=tmp_path / "no-data", tfds_manual_dir=tmp_path / "none")
    with pytest.raises(stages.RunStateError, match=message):
        train_pipeline(config, paths, run_id="done")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_run_folder_left_empty_is_started_afresh(tmp_path, tiny_data):
    """A run killed between creating its folder and writing its config (atomically: there is
    no half of one) left an empty folder: the same --run-name starts it, not "pick another"."""
    artifacts = tmp_path / "artifacts"
    (artifacts / "runs" / "empty").mkdir(parents=True)
    result = train_pipeline(
        small_config(epochs=1), Paths(artifacts), run_id="empty", data=tiny_data
    )
    assert (result.run_dir / "metrics.json").exists() and result.metrics["epochs_trained"] == 1
    assert TrainConfig.from_json(result.run_dir / "config.json").epochs == 1


def test_figures_drawn_from_other_predictions_are_not_used():
    import concurrent.futures
    import hashlib
    from types import SimpleNamespace

    from pipeline.stages import _figures_drawn_from

    served = np.random.default_rng(0).random((5, 10)).astype(np.float32)
    early: concurrent.futures.Future = concurrent.futures.Future()
    early.set_result((hashlib.sha256(served.tobytes()).hexdigest(), {"a.png": b"drawn"}))
    run = SimpleNamespace(early_figures=early)
    assert _figures_drawn_from(run, {"probabilities": served}) == {"a.png": b"drawn"}
    other = served.copy()
    other[2, 3] += 1e-6
    assert _figures_drawn_from(run, {"probabilities": other}) is None
    failed: concurrent.futures.Future = concurrent.futures.Future()
    failed.set_exception(RuntimeError("matplotlib failed"))
    assert (
        _figures_drawn_from(SimpleNamespace(early_figures=failed), {"probabilities": served})
        is None
    )


def test_run_ids_sort_by_time_and_are_unique():
    ids = [new_run_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)


def test_same_seed_same_weights_whatever_ran_before(tmp_path, tiny_data, monkeypatch):
    """A first run prepares TFDS's data (during ingest, after the device set-up seeded), which
    draws from Python's `random`, where Keras's default seeds come from: the weights must not
    depend on that."""
    import random

    from pipeline import stages

    config = small_config(device="cpu", deterministic=True, epochs=1)
    try:
        first = train_pipeline(config, Paths(tmp_path / "a"), data=tiny_data)
        ingest = stages.ingest
        monkeypatch.setattr(stages, "ingest", lambda run: (ingest(run), random.random()))
        second = train_pipeline(config, Paths(tmp_path / "b"), data=tiny_data)
    finally:  # process-wide: the later tests run as users do, without it (and with XLA)
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()  # (private: TensorFlow exports only the enable)
    assert first.metrics["weights_sha256"] == second.metrics["weights_sha256"]


def test_a_report_that_cannot_be_written_leaves_no_partial_figure(tmp_path, monkeypatch, capsys):
    import pathlib

    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    from components.evaluator import compute_metrics

    rng = np.random.default_rng(0)
    probabilities = rng.random((8, 10), dtype=np.float32)
    labels = np.arange(8) % 10
    with open(run / "predictions.npz", "wb") as f:
        np.savez(
            f,
            images=rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
            labels=labels,
            probabilities=probabilities,
            train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
            train_labels=np.arange(4),
        )
    metrics = compute_metrics(probabilities, labels)
    (run / "metrics.json").write_text(json.dumps(metrics, default=lambda a: np.asarray(a).tolist()))
    (run / "config.json").write_text("{}")
    real = pathlib.Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    assert main(["report", str(run)]) == 6
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left" in err and len(err.splitlines()) == 1
    assert [p.name for p in (run / "report").iterdir()] == []  # nothing half-written


def _check_the_uncertainty_rule(probabilities, labels):
    """The README's rule, checked by brute force over every threshold that could matter: at
    most 5% of the right answers flagged (confidence < threshold); at least 90% of the wrong
    ones whenever some threshold achieves both."""
    from components.evaluator import calibrate_uncertainty

    result = calibrate_uncertainty(probabilities, labels)
    assert result["calibrated"] and result["validation_examples"] == len(labels)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    right, wrong = confidence[correct], confidence[~correct]

    def flags(t):
        return int((right < t).sum()), int((wrong < t).sum())

    threshold = np.float32(result["threshold"])
    right_flagged, wrong_flagged = flags(threshold)
    assert right_flagged <= 0.05 * len(right)
    values = np.unique(confidence)
    candidates = [*values, *np.nextafter(values, np.float32(2)), np.float32(0)]
    fits = any(
        r <= 0.05 * len(right) and w >= 0.9 * len(wrong) for r, w in (flags(t) for t in candidates)
    )
    if fits:
        assert wrong_flagged >= 0.9 * len(wrong)
    return result, threshold


@pytest.mark.parametrize("seed", range(40))
def test_the_uncertainty_threshold_keeps_the_readme_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4000))
    logits = rng.normal(0, 1, (n, 10)) + rng.uniform(0, 12) * np.eye(10)[rng.integers(0, 10, n)]
    probabilities = tf.nn.softmax(logits).numpy().astype(np.float32)
    labels = np.where(rng.random(n) < 0.9, probabilities.argmax(1), rng.integers(0, 10, n))
    _check_the_uncertainty_rule(probabilities, labels)


@pytest.mark.parametrize("case", ["ties", "all right", "all wrong", "one", "sure and wrong"])
def test_the_uncertainty_threshold_at_the_edges(case):
    rng = np.random.default_rng(0)
    n = 200
    probabilities = np.full((n, 10), 0.05, np.float32)
    top = {"ties": 0.55, "all right": 0.55, "all wrong": 0.55, "one": 0.55, "sure and wrong": 1.0}
    probabilities[:, 0] = top[case]
    if case == "ties":  # a few distinct confidences, many answers each
        probabilities[:, 0] = rng.choice([0.4, 0.6, 0.8], n).astype(np.float32)
    labels = np.zeros(n, np.int64)
    if case in ("all wrong", "sure and wrong"):
        labels[:] = 3
    if case == "ties":
        labels[rng.random(n) < 0.3] = 5
    if case == "one":
        probabilities, labels = probabilities[:1], labels[:1]
    result, threshold = _check_the_uncertainty_rule(probabilities, labels)
    assert 0.1 <= threshold <= np.nextafter(np.float32(1), np.float32(2))


def test_the_uncertainty_threshold_is_not_on_a_value_the_graph_may_round_across():
    """The exported graph's probabilities differ from Keras's in the last bits: the threshold
    lies halfway between neighbouring confidences, so a unit in the last place either way
    flags the same answers."""
    from components.evaluator import calibrate_uncertainty

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (3000, 10)) + 6 * np.eye(10)[rng.integers(0, 10, 3000)]
    probabilities = tf.nn.softmax(logits).numpy().astype(np.float32)
    labels = probabilities.argmax(1)
    labels[:200] = (labels[:200] + 1) % 10
    threshold = np.float32(calibrate_uncertainty(probabilities, labels)["threshold"])
    confidence = probabilities.max(1)
    for nudge in (np.float32(-np.inf), np.float32(np.inf)):
        nudged = np.nextafter(confidence, nudge)
        np.testing.assert_array_equal(nudged < threshold, confidence < threshold)


def test_no_validation_split_trains_on_everything_and_says_so(tmp_path, tiny_data):
    """`--validation-fraction 0` (at the default steps_per_execution, XLA and step-scalar
    frequency): every training example trains, no validation curves or per-epoch images, and
    the `uncertain` threshold is the fixed fallback, recorded as not calibrated."""
    from components.evaluator import FALLBACK_THRESHOLD

    config = TrainConfig(device="cpu", epochs=2, validation_fraction=0.0, min_accuracy=0.0)
    artifacts = tmp_path / "artifacts"
    result = train_pipeline(config, Paths(artifacts), data=tiny_data)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["examples"]["train"] == len(tiny_data[0].labels)
    assert metrics["examples"].get("validation", 0) == 0
    assert not [key for key in metrics["history"] if key.startswith("val_")]
    calibration = metrics["uncertainty_calibration"]
    assert not calibration["calibrated"] and calibration["threshold"] == FALLBACK_THRESHOLD
    tb = artifacts / "tensorboard" / result.run_id
    assert {p.name for p in tb.iterdir() if p.is_dir()} == {"train", "steps", "model"}
    assert "no validation split" in calibration["note"]


def test_a_version_published_meanwhile_is_the_new_baseline(tmp_path, tiny_data, monkeypatch):
    """Another run publishes between this run's gate and its publish: this run validates and
    gates again against that version (re-scored in the validating process), then publishes
    the next number, with the new baseline in its gate record and model card."""
    import shutil

    from pipeline import stages

    artifacts = tmp_path / "artifacts"
    config = small_config(device="cpu", max_train_examples=None, max_test_examples=None)
    first = train_pipeline(config, Paths(artifacts), data=tiny_data)
    assert first.metrics["published_version"] == 1
    models = artifacts / "models" / "mnist"
    real_gate, gated = stages.gate, []

    def gate_then_someone_publishes(run):
        record = real_gate(run)
        gated.append(run.metrics["gate"]["baseline_version"])
        if len(gated) == 1:  # another run's publish, as its rename into place leaves it
            shutil.copytree(models / "1", models / "2")
        return record

    monkeypatch.setattr(stages, "gate", gate_then_someone_publishes)
    second = train_pipeline(config, Paths(artifacts), data=tiny_data)
    assert gated == [1, 2]
    assert second.metrics["published_version"] == 3
    assert second.metrics["gate"]["baseline_version"] == 2
    assert second.metrics["infra_validation"]["baseline"].endswith("/2")
    card = json.loads((models / "3" / "assets.extra" / "model_card.json").read_text())
    assert card["lineage"]["baseline_version"] == 2


def test_the_profile_window_counts_from_the_fits_start_resumed_or_not():
    """Keras counts round-trips from each `fit`'s start: a run resumed for its last epoch is
    profiled in that epoch (its window in the second epoch was never reached); the window ends
    with training. 57,000 examples at batch 32 and 100 steps per execution: 18 round-trips."""
    from types import SimpleNamespace

    from pipeline import stages

    def window(epochs, executions, start_epoch):
        run = SimpleNamespace(
            config=SimpleNamespace(batch_size=32, epochs=epochs, profile_executions=executions),
            effective=SimpleNamespace(steps_per_execution=100),
        )
        return stages._profile_window(run, range(57_000), start_epoch)

    assert window(5, 2, 0) == (21, 22)  # 3 round-trips into epoch 2
    assert window(5, 2, 3) == (21, 22)  # resumed at 3: into the fit's second epoch, the 5th
    assert window(2, 5, 1) == (3, 7)  # resumed for the last epoch: in it
    assert window(1, 50, 0) == (3, 18)  # to the end of training at most


@pytest.mark.slow
@pytest.mark.parametrize(("epochs", "executions"), [(2, 2), (1, 50)])
def test_profile_executions_writes_a_profile_early_in_epoch_2(tmp_path, epochs, executions):
    """`--profile-executions 2` at the default 100 steps per execution: a TensorBoard profile
    (the Profile tab's files) under the run's train/plugins/profile/; a one-epoch run is
    profiled in its epoch, up to its end (a window past it wrote nothing)."""
    from tests.helpers import make_digits

    config = TrainConfig(
        device="cpu", epochs=epochs, profile_executions=executions, min_accuracy=0.0
    )
    data = (make_digits(8000, seed=1), make_digits(256, seed=2, name="test"))
    artifacts = tmp_path / "artifacts"
    result = train_pipeline(config, Paths(artifacts), data=data)
    profile = artifacts / "tensorboard" / result.run_id / "train" / "plugins" / "profile"
    traces = list(profile.glob("*/*.xplane.pb"))
    assert traces and all(p.stat().st_size > 1000 for p in traces), list(profile.rglob("*"))
