"""Data statistics in TFDV's proto, and the drift check."""

import numpy as np
import pytest

from components import statistics
from components.data import Split
from tests.helpers import make_digits


def test_statistics_match_numpy_and_round_trip(tmp_path):
    split = Split("train", make_digits(300, seed=1).images.reshape(-1, 28, 28),
                  make_digits(300, seed=1).labels)
    stats = statistics.compute({"train": split})
    statistics.write(tmp_path / "s.pb", stats)
    [ds] = statistics.read(tmp_path / "s.pb").datasets
    features = {f.path.step[0]: f for f in ds.features}
    pixels = split.images.astype(np.float64)
    assert ds.num_examples == 300
    assert features["image"].num_stats.mean == pytest.approx(pixels.mean())
    assert features["image"].num_stats.std_dev == pytest.approx(pixels.std())
    assert features["image"].num_stats.num_zeros == int((split.images == 0).sum())
    counts = [b.sample_count for b in features["label"].num_stats.histograms[0].buckets]
    assert counts == np.bincount(split.labels, minlength=10).tolist()


def test_drift_is_found_beyond_the_thresholds_only():
    base = make_digits(2000, seed=1)
    split = Split("train", base.images.reshape(-1, 28, 28), base.labels)
    same = statistics.compute({"train": split})
    assert statistics.check_drift(same, same, "version 1") == []
    # drop most of the 3s: class 3's share moves by more than 0.02
    keep = (split.labels != 3) | (np.arange(len(split)) % 10 == 0)
    skewed = statistics.compute({"train": Split("train", split.images[keep], split.labels[keep])})
    [finding] = statistics.check_drift(skewed, same, "version 1")
    assert "class 3's share moved" in finding
    brighter = statistics.compute({"train": Split(
        "train", np.clip(split.images.astype(int) + 20, 0, 255).astype(np.uint8), split.labels)})
    assert any("mean pixel" in f for f in statistics.check_drift(brighter, same, "version 1"))
