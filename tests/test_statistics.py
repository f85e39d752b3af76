"""Data statistics in TFDV's proto, and the drift check."""

import numpy as np
import pytest

from components import statistics
from components.data import Split
from tests.helpers import make_digits


def test_statistics_match_numpy_and_round_trip(tmp_path):
    split = Split(
        "train",
        make_digits(300, seed=1).images.reshape(-1, 28, 28),
        make_digits(300, seed=1).labels,
    )
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
    brighter = statistics.compute(
        {
            "train": Split(
                "train",
                np.clip(split.images.astype(int) + 20, 0, 255).astype(np.uint8),
                split.labels,
            )
        }
    )
    assert any("mean pixel" in f for f in statistics.check_drift(brighter, same, "version 1"))


def test_a_different_seed_or_validation_fraction_is_not_drift():
    """The carved validation split moves with the seed; only the source splits are compared."""
    from components.data import carve_validation

    base = make_digits(6000, seed=1)
    train = Split("train", base.images.reshape(-1, 28, 28), base.labels)

    def stats(seed, fraction):
        fit, val = carve_validation(train, fraction, seed)
        return statistics.compute({"train": train, "train (fit)": fit, "validation": val})

    reference = stats(0, 0.05)
    for seed, fraction in ((3, 0.05), (7, 0.01), (11, 0.2)):
        assert statistics.check_drift(stats(seed, fraction), reference, "version 1") == []
