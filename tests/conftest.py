"""Shared fixtures: tiny generated MNIST-shaped data, so tests never download anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def make_digits(n: int, seed: int = 0, name: str = "train"):
    """A learnable stand-in for MNIST: class c lights a bar at row 2 + 2c on a noisy background.

    Returns a components.data.Split with TFDS's layout (uint8 [N, 28, 28, 1], int64 labels).
    """
    from components.data import Split

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    images = rng.integers(0, 60, size=(n, 28, 28, 1), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c: 4 + 2 * c, 4:24, 0] = 255
    return Split(name, images, labels)


def wait_for_backup_epoch(run_dir: Path, proc, epoch: int = 1, timeout: float = 400) -> None:
    """Block until the run's backup records `epoch` completed epochs (or `proc` ends)."""
    import json
    import time

    from components.trainer import METADATA_FILE

    meta = run_dir / "backup" / METADATA_FILE
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


@pytest.fixture
def tiny_data():
    return make_digits(512, seed=1, name="train"), make_digits(128, seed=2, name="test")


@pytest.fixture
def python_cmd():
    return [sys.executable, "-m", "pipeline"]


@pytest.fixture(scope="session")
def model():
    """The documented model with fixed random weights: export tests need equality, not skill."""
    from components.model import build_model

    m = build_model()
    rng = np.random.default_rng(0)
    m.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in m.get_weights()])
    return m


@pytest.fixture(scope="session")
def exported(model, tmp_path_factory):
    from components import exporter

    path = tmp_path_factory.mktemp("export") / "model"
    exporter.export_saved_model(model, path, {"test_accuracy": 0.5})
    return path
