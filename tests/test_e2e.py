"""End to end on the real MNIST (../shared/datasets/mnist through TFDS's manual dir)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SHARED_MNIST, requires_mnist

pytestmark = [
    pytest.mark.e2e,
    requires_mnist,
]


def test_one_epoch_on_real_mnist_writes_every_artifact(tmp_path):
    artifacts = tmp_path / "artifacts"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--artifacts-dir",
            str(artifacts),
            "--tfds-manual-dir",
            str(SHARED_MNIST),
            "--min-accuracy",
            "0.9",
        ],
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
        r = subprocess.run(
            ["make", "-s", "--no-print-directory", "train", f"ARTIFACTS_DIR={artifacts}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert len(lines) <= 25, "\n".join(lines)
        for pattern in ("ran out of data", "E0000", "W0000", "cuInit", "absl", "Traceback"):
            assert not [line for line in lines if pattern in line], (attempt, pattern, lines)
    run = artifacts / "runs" / "latest"
    config = json.loads((run / "config.json").read_text())
    assert config["requested"]["validation_fraction"] > 0
    assert config["effective"]["steps_per_execution"] == 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["examples"]["validation"] > 0 and metrics["examples"]["test"] == 10_000
    steps = -(-metrics["examples"]["train"] // 32)
    assert [line.count(f"{steps} steps") for line in lines if line.startswith("epoch ")] == [1] * 5
    assert metrics["test_accuracy"] >= 0.975
    # The warm run re-scored the cold run's version, in the validating process, during training.
    assert metrics["baseline_version"] == 1
    assert metrics["infra_validation"]["baseline_scored_ahead"] is True
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
