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
        [sys.executable, "-m", "pipeline", "train", "--epochs", "1", "--device", "cpu",
         "--artifacts-dir", str(artifacts), "--tfds-manual-dir", str(SHARED_MNIST),
         "--min-accuracy", "0.9"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
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
