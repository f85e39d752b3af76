"""End to end on the real MNIST (../shared/datasets/mnist through TFDS's manual dir)."""

import json
import re
import subprocess

import pytest

from components.files import sha256
from tests.helpers import ROOT, SHARED_MNIST, requires_mnist, train_cmd

pytestmark = [
    pytest.mark.e2e,
    requires_mnist,
]


def test_one_epoch_on_real_mnist_writes_every_artifact(tmp_path):
    artifacts = tmp_path / "artifacts"
    r = subprocess.run(
        train_cmd(
            artifacts,
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--tfds-manual-dir",
            str(SHARED_MNIST),
            "--min-accuracy",
            "0.9",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = artifacts / "runs" / "latest"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_examples"] == 10_000 and metrics["test_accuracy"] > 0.9
    assert metrics["published_version"] == 1
    assert "Test accuracy:" in r.stdout and "First test image: predicted" in r.stdout
    assert (run / "config.json").is_file()
    for name in ("train_sample.png", "first_test.png", "predictions.png", "confusion_matrix.png"):
        assert (run / "report" / name).stat().st_size > 2000
    version = artifacts / "models" / "mnist" / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert list((artifacts / "tensorboard").glob("*/train/events.out.tfevents.*"))


@pytest.mark.slow
def test_a_default_run_is_quiet_and_honest(tmp_path):
    """`make train` at the defaults, as a user runs it: at most 25 lines, no library noise,
    a held-out validation split, the whole test split, every epoch one pass."""
    artifacts = tmp_path / "artifacts"
    # Twice: the second run is the usual one, with the XLA programs the first one kept.
    for attempt in ("cold", "warm"):
        r = _make_train(artifacts)
        assert r.returncode == 0, r.stdout[-3000:]
        lines = r.stdout.strip().splitlines()
        assert len(lines) <= 25, "\n".join(lines)
        for pattern in ("ran out of data", "E0000", "W0000", "cuInit", "absl", "Traceback"):
            assert not [line for line in lines if pattern in line], (attempt, pattern, lines)
    run = artifacts / "runs" / "latest"
    config = json.loads((run / "config.json").read_text())
    assert config["requested"]["validation_fraction"] > 0
    assert config["effective"]["steps_per_execution"] == 100
    assert config["effective"]["cpu_threads"] == 1  # one replica on the CPU: auto -> 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["examples"]["validation"] > 0 and metrics["examples"]["test"] == 10_000
    steps = -(-metrics["examples"]["train"] // 32)
    assert [line.count(f"{steps} steps") for line in lines if line.startswith("epoch ")] == [1] * 5
    assert metrics["test_accuracy"] >= 0.975
    # The warm run re-scored the cold run's version, in the validating process, during training.
    assert metrics["baseline_version"] == 1
    assert metrics["infra_validation"]["baseline_scored_ahead"] is True
    # predict_image was compared with the trained model on the sample (not refused by both).
    photo = metrics["infra_validation"]["other_signatures"]["predict_image"]
    assert "refused" not in photo and photo["max_abs_difference_vs_trained_model"] <= 1e-5
    # test_loss is Keras's loss (val_loss's definition) on the test split, for the trained model.
    import keras
    import numpy as np

    model = keras.saving.load_model(run / "train" / "model.keras")
    with np.load(run / "evaluation" / "test_examples.npz") as test:
        keras_loss = model.evaluate(test["images"] / 255.0, test["labels"], verbose=0)[0]
    assert metrics["test_loss"] == pytest.approx(keras_loss, rel=1e-4)
    # The programs XLA compiled are kept, verified, for the next run.
    (manifest,) = (artifacts / "cache" / "xla").glob("*/manifest.json")
    assert len(json.loads(manifest.read_text())) >= 1
    _the_warm_run_says_what_the_readme_shows(lines, metrics)
    _what_the_run_wrote(artifacts, run, metrics)
    _the_served_model_flags_as_the_readme_says(artifacts)
    _corrupted_xla_programs_are_compiled_again(artifacts, manifest)
    _one_epoch_is_refused_with_exit_3_through_make(artifacts)
    _drifted_data_stops_the_run_with_exit_4(artifacts)


def _make_train(artifacts, args=""):
    """`make -s train` as a user runs it; stdout and stderr in one stream, as a terminal shows
    them."""
    return subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "train",
            f"ARTIFACTS_DIR={artifacts}",
            f"ARGS={args}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


def _the_warm_run_says_what_the_readme_shows(lines, metrics):
    """The README's 19 lines, less make's command (`make -s`), in its order."""
    expected = [
        r"\d\d:\d\d:\d\d pipeline: device: .*, global batch 32, per-replica batch ",
        r".* pipeline: setting: mixed_precision auto -> (on|off): ",
        r".* pipeline: setting: cpu_threads auto -> 1: one replica on the CPU",
        r".* components\.data: loaded train: 60000 examples \(array cache\)$",
        r".* components\.data: loaded test: 10000 examples \(array cache\)$",
        r".* pipeline: data: 57000 train, 3000 validation \(held out of train, seed 0\), "
        r"10000 test",
        r".* pipeline: run \d{8}-\d{6}-\d{6}-[0-9a-f]{4} -> ",
        *[
            rf"epoch {k}/5  loss [\d.]+  accuracy [\d.]+  \| val_loss [\d.]+  val_accuracy [\d.]+  "
            rf"\([\d.]+ s, 1782 steps\)$"
            for k in range(1, 6)
        ],
        r"Infra validation: the exported model loads as TF Serving loads it, replays 8 warmup "
        r"records and matches the trained model on 10000 test images",
        r"Test accuracy: 0\.9\d\d\d  \(exported model, 10000 test images; "
        r"loss [\d.]+, Keras's, as val_loss\)$",
        r"Unsure: [\d.]+% of test predictions flagged \(top probability < [\d.]+, calibrated on "
        r"the validation split\)",
        r"First test image: predicted \d, true \d$",
        r"Published version 2: .*models/mnist/2 \(test accuracy 0\.9\d+ >= 0\.9700, (not|[\d.]+) "
        r"below version 1's .* McNemar p=",
        r"Run \d{8}-\d{6}-\d{6}-[0-9a-f]{4}: metrics .*metrics\.json, report .*, TensorBoard ",
    ]
    assert len(lines) == len(expected) == 18, "\n".join(lines)
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (pattern, line)
    assert metrics["examples"] == {"train": 57_000, "validation": 3_000, "test": 10_000}
    calibration = metrics["uncertainty_calibration"]
    assert calibration["calibrated"] and calibration["validation_examples"] == 3_000


def _the_served_model_flags_as_the_readme_says(artifacts):
    """`uncertain` from the published model, loaded as TF Serving loads it, on the validation
    split it was calibrated on: at most 5% of the right answers flagged."""
    from components import data as data_lib
    from components.infra_validator import _Served
    from pipeline.config import TrainConfig

    defaults = TrainConfig()
    train = data_lib.load_split("train", manual_dir=SHARED_MNIST)
    _, validation = data_lib.carve_validation(train, defaults.validation_fraction, defaults.seed)
    served = _Served(artifacts / "models" / "mnist" / "2")
    try:
        out = served.run("serving_default", {"images": validation.images.reshape(-1, 28, 28)})
    finally:
        served.close()
    right = out["class_ids"] == validation.labels
    assert 0 < out["uncertain"][right].sum() <= 0.05 * right.sum()


def _what_the_run_wrote(artifacts, run, metrics):
    """The README's artifact table, at the defaults."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    gate = metrics["gate"]
    assert gate["blessed"] and gate["baseline_version"] == 1 and gate["full_test_split"]
    for key in ("p_value", "candidate_only_wrong", "baseline_only_wrong", "significance"):
        assert key in gate, key
    phases = metrics["timings"]["fit_phases"]
    assert len(phases["epochs"]) == 5
    # every phase of the train stage is timed: build, set-up, compile, steps, callbacks
    assert 0 < phases["model_build"] and 0 < phases["fit_setup"] and phases["compile_estimate"]
    timed = phases["model_build"] + phases["fit_setup"]
    timed += sum(sum(e.values()) for e in phases["epochs"])
    assert timed <= metrics["timings"]["train_seconds"]
    assert (run / "data" / "statistics.pb").stat().st_size > 0
    for stage in ("ingest", "train", "export", "validate", "gate", "publish", "report"):
        record = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert "seconds" in record, stage
    extra = artifacts / "models" / "mnist" / "2" / "assets.extra"
    for name in ("model_card.md", "model_card.json", "metrics.json", "statistics.pb"):
        assert (extra / name).stat().st_size > 0, name
    card = json.loads((extra / "model_card.json").read_text())
    data = card["model_parameters"]["data"]
    assert data["tfds_name"] == "mnist" and data["tfds_version"]
    assert sorted(data["manual_files_sha256"]) == sorted(p.name for p in SHARED_MNIST.glob("*.gz"))
    low, high = card["quantitative_analysis"]["accuracy_95ci"]
    assert low < metrics["test_accuracy"] < high
    assert re.fullmatch(r"[0-9a-f]{40}", card["lineage"]["code"]["commit"])
    # The Markdown a person reads says the same: the manual files' SHA-256, the tree's state.
    md = (extra / "model_card.md").read_text()
    assert all(f"`{n}`: `{h}`" in md for n, h in data["manual_files_sha256"].items())
    dirty = card["lineage"]["code"]["dirty"]
    assert ("(uncommitted changes in the tree)" if dirty else "(clean tree)") in md
    assert card["lineage"]["baseline_version"] == 1
    # TensorBoard, read by its own loader: one event file per run folder, step points every 100
    # steps of each 1,782-step epoch and at its end, images and epoch curves per epoch.
    tb = artifacts / "tensorboard" / metrics["run_id"]
    for folder in ("train", "validation", "steps", "images", "model"):
        assert len(list((tb / folder).glob("events.out.tfevents.*"))) == 1, folder

    def steps(folder, tag):
        acc = ea.EventAccumulator(str(tb / folder), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        return [e.step for e in acc.Tensors(tag)]

    per_epoch = [*range(100, 1782, 100), 1782]
    assert steps("steps", "step_loss") == [e * 1782 + k for e in range(5) for k in per_epoch]
    assert steps("images", "predictions") == [0, 1, 2, 3, 4]  # Keras's epoch index
    assert steps("validation", "epoch_accuracy") == [0, 1, 2, 3, 4]


def _corrupted_xla_programs_are_compiled_again(artifacts, manifest):
    """A kept program damaged on disk is dropped and compiled again: never a failed run."""
    store = manifest.parent
    for entry in store.glob("*.pb"):
        entry.write_bytes(entry.read_bytes()[:100] + b"garbage")
    r = _make_train(artifacts)
    assert r.returncode == 0, r.stdout[-3000:]
    kept = json.loads(manifest.read_text())
    assert kept and all(sha256(store / name) == digest for name, digest in kept.items())


def _one_epoch_is_refused_with_exit_3_through_make(artifacts):
    """The README's first example: one epoch is below the 0.97 gate."""
    versions = sorted(p.name for p in (artifacts / "models" / "mnist").iterdir())
    r = _make_train(artifacts, "--epochs 1")
    assert r.returncode == 2 and "Error 3" in r.stdout, r.stdout[-3000:]
    metrics = json.loads((artifacts / "runs" / "latest" / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1 and metrics["test_accuracy"] < 0.97
    assert not metrics["blessed"]
    assert sorted(p.name for p in (artifacts / "models" / "mnist").iterdir()) == versions


def _drifted_data_stops_the_run_with_exit_4(artifacts):
    """The published version was trained on data whose mean pixel differs by more than 5/255:
    the run stops before training, exit 4, naming the drift."""
    import numpy as np

    from components import data as data_lib
    from components import exporter, statistics
    from components.files import write_manifest

    latest = exporter.latest_version_dir(artifacts / "models" / "mnist")
    with np.load(artifacts / "runs" / "latest" / "evaluation" / "test_examples.npz") as test:
        images, labels = test["images"], test["labels"]
    brighter = np.minimum(images.astype(np.int32) + 40, 255).astype(np.uint8)
    splits = {
        name: data_lib.Split(name, brighter, labels) for name in ("train", "validation", "test")
    }
    statistics.write(
        latest / "assets.extra" / statistics.STATISTICS_FILE, statistics.compute(splits)
    )
    write_manifest(latest)
    runs_before = sorted((artifacts / "runs").iterdir())
    r = subprocess.run(
        train_cmd(artifacts, "--tfds-manual-dir", str(SHARED_MNIST)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 4, r.stderr[-3000:]
    assert "the data drifted from what trained the published model" in r.stderr
    assert "mean pixel" in r.stderr
    assert sorted((artifacts / "runs").iterdir()) == runs_before


@pytest.mark.slow
def test_a_default_run_on_a_terminal_shows_a_progress_bar_counting_steps(tmp_path):
    """`make train` on a terminal (a pty, as a person types it): the README's lines, with each
    epoch's one line replaced by Keras's `Epoch k/5` and a progress bar that ends at the
    epoch's train steps (1782 of 57,000 examples at batch 32), with its metrics."""
    import os
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        ["make", "-s", "--no-print-directory", "train", f"ARTIFACTS_DIR={tmp_path / 'a'}"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the pty closed: every writer has gone
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=900) == 0, out[-3000:]
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.decode())
    # What stays on the screen: each line's text after its last carriage return.
    shown = [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    shown = [line for line in shown if line.strip()]
    for pattern in ("ran out of data", "E0000", "W0000", "cuInit", "absl", "Traceback"):
        assert not [line for line in shown if pattern in line], (pattern, shown)
    epochs = [i for i, line in enumerate(shown) if re.fullmatch(r"Epoch \d/5", line)]
    assert [shown[i] for i in epochs] == [f"Epoch {k}/5" for k in range(1, 6)], shown
    for i in epochs:
        assert re.match(
            r"1782/1782 \S+ \d+s \d+(?:s|ms|us)/step - accuracy: 0\.\d+ - loss: 0\.\d+ - "
            r"val_accuracy: 0\.\d+ - val_loss: 0\.\d+$",
            shown[i + 1],
        ), shown[i + 1]
    assert len(shown) == 23, "\n".join(shown)  # the README's 19, less make's command, + 5
    assert shown[-2].startswith("Published version 1: ")


@pytest.mark.slow
def test_a_default_run_whose_reader_left_goes_on_to_publish(tmp_path):
    """`make train | head -3`: the reader leaves after three lines (the epochs'); the run goes
    on, publishes and ends with its usual exit code, and says nothing of the closed pipe."""
    artifacts = tmp_path / "a"
    r = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"make -s --no-print-directory train ARTIFACTS_DIR={artifacts} | head -3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]  # make's code, through pipefail
    assert len(r.stdout.splitlines()) == 3, r.stdout
    # stderr (the log lines, still on the terminal) says nothing of the pipe that closed.
    for said in ("Traceback", "error", "Broken pipe", "BrokenPipe", "Exception"):
        assert said not in r.stderr, r.stderr[-3000:]
    assert (artifacts / "models" / "mnist" / "1" / "saved_model.pb").is_file()
    metrics = json.loads((artifacts / "runs" / "latest" / "metrics.json").read_text())
    assert metrics["published_version"] == 1 and len(metrics["history"]["loss"]) == 5


@pytest.mark.slow
def test_mixed_precision_on_a_cpu_trains_validates_and_publishes(tmp_path):
    """`--mixed-precision on` on this CPU, at the other defaults: float16 arithmetic, whose
    export and trained model round differently (up to ~7e-5 here), passes infra validation
    within the README's float16 tolerance and publishes; no epoch shows more steps than a pass."""
    artifacts = tmp_path / "artifacts"
    r = _make_train(artifacts, "--mixed-precision on")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "--mixed-precision on, on the CPU: float16 is emulated" in r.stdout
    steps = [int(n) for n in re.findall(r"^epoch \d/5 .*, (\d+) steps\)$", r.stdout, re.M)]
    assert len(steps) == 5 and all(1770 <= n <= 1782 for n in steps), steps
    config = json.loads((artifacts / "runs" / "latest" / "config.json").read_text())
    assert config["effective"]["mixed_precision"] is True, config["effective"]
    metrics = json.loads((artifacts / "runs" / "latest" / "metrics.json").read_text())
    assert metrics["infra_validation"]["passed"] is True
    assert metrics["published_version"] == 1 and metrics["test_accuracy"] >= 0.975
