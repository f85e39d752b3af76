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


@pytest.mark.parametrize(
    "moved, brighter, drift",
    [(19, 0.49, []), (21, 0.0, ["share moved by 0.021"]), (0, 0.51, ["mean pixel 105.1"])],
)
def test_the_drift_thresholds_are_where_the_contract_puts_them(moved, brighter, drift):
    """0.02 of a class's share and 5 of 255 in mean pixel: just under passes, just over is
    drift (1,000 examples: 19 or 21 of them relabelled, 49% or 51% of pixels 10 brighter)."""
    labels = np.repeat(np.arange(10), 100)
    images = np.full((1000, 28, 28), 100, np.uint8)
    before = statistics.compute({"train": Split("train", images, labels)})
    now_labels = labels.copy()
    now_labels[:moved] = 1  # class 0 -> class 1
    now_images = images.copy().reshape(1000, -1)
    now_images[:, : round(784 * brighter)] = 110
    now = statistics.compute(
        {"train": Split("train", now_images.reshape(1000, 28, 28), now_labels)}
    )
    findings = statistics.check_drift(now, before, "version 1")
    assert len(findings) == len(drift), findings
    assert all(said in f for said, f in zip(drift, findings)), findings
