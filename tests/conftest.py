"""Shared fixtures: tiny generated MNIST-shaped data, so tests never download anything."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.helpers import make_digits


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
