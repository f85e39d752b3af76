"""Data statistics in TFDV's format (tensorflow-metadata's DatasetFeatureStatisticsList) and the
drift check against the statistics of the data that trained the latest published version.

TFDV itself does not install beside TensorFlow 2.21; its statistics proto does (it comes with
TFDS), so the files written here open in TFDV/Facets elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

from components import files

if TYPE_CHECKING:  # (components.data imports TensorFlow; `make report` reads tables without it)
    from components.data import Split

STATISTICS_FILE = "statistics.pb"

# Drift thresholds (documented in docs/CONTRACT.md): the largest change of one class's share of
# a split, and of the mean pixel intensity (0..255), between the baseline's data and this run's.
MAX_LABEL_SHARE_CHANGE = 0.02
MAX_PIXEL_MEAN_CHANGE = 5.0
DRIFT_SPLITS = ("train", "test")  # TFDS's splits as read


class DriftError(RuntimeError):
    """This run's data differs from the published model's beyond the thresholds."""


def _pixel_histogram(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Counts of the 256 pixel values, float64 [256]. TensorFlow's multi-threaded bincount
    (~5x faster than float64 mean/std over 45M pixels in NumPy) over chunks of `chunk` images:
    at once, its int32 copy of the train split alone took 180 MB that the process kept."""
    import tensorflow as tf

    histogram = np.zeros(256, np.float64)
    for start in range(0, len(images), chunk):
        pixels = tf.cast(tf.reshape(images[start : start + chunk], [-1]), tf.int32)
        histogram += tf.math.bincount(pixels, minlength=256, maxlength=256).numpy()
    return histogram


def split_statistics(split: Split, name: str) -> statistics_pb2.DatasetFeatureStatistics:
    stats = statistics_pb2.DatasetFeatureStatistics(name=name, num_examples=len(split))
    label = stats.features.add(type=statistics_pb2.FeatureNameStatistics.INT)
    label.path.step.append("label")
    from components.data import NUM_CLASSES

    counts = np.bincount(split.labels, minlength=NUM_CLASSES)
    label.num_stats.common_stats.num_non_missing = len(split)
    label.num_stats.mean = float(split.labels.mean())
    label.num_stats.std_dev = float(split.labels.std())
    label.num_stats.min, label.num_stats.max = float(split.labels.min()), float(split.labels.max())
    histogram = label.num_stats.histograms.add(type=statistics_pb2.Histogram.STANDARD)
    for c, n in enumerate(counts):
        histogram.buckets.add(low_value=c, high_value=c + 1, sample_count=int(n))
    image = stats.features.add(type=statistics_pb2.FeatureNameStatistics.INT)
    image.path.step.append("image")
    histogram_256 = _pixel_histogram(split.images)
    values = np.arange(256, dtype=np.float64)
    total = max(histogram_256.sum(), 1.0)
    mean = float((histogram_256 * values).sum() / total)
    present = np.flatnonzero(histogram_256)
    image.num_stats.common_stats.num_non_missing = len(split)
    image.num_stats.common_stats.avg_num_values = float(split.images[0].size) if len(split) else 0
    image.num_stats.mean = mean
    image.num_stats.std_dev = float(np.sqrt((histogram_256 * (values - mean) ** 2).sum() / total))
    image.num_stats.min = float(present[0]) if present.size else 0.0
    image.num_stats.max = float(present[-1]) if present.size else 0.0
    image.num_stats.num_zeros = int(histogram_256[0])
    return stats


def compute(splits: dict[str, Split]) -> statistics_pb2.DatasetFeatureStatisticsList:
    result = statistics_pb2.DatasetFeatureStatisticsList()
    for name, split in splits.items():
        result.datasets.append(split_statistics(split, name))
    return result


def write(path: Path, stats: statistics_pb2.DatasetFeatureStatisticsList) -> None:
    with files.atomic_write(path) as f:
        f.write(stats.SerializeToString())


def read(path: Path) -> statistics_pb2.DatasetFeatureStatisticsList:
    """The statistics written by `write`; ValueError for a file that parses (an empty file is
    a valid, empty message) but holds no split."""
    stats = statistics_pb2.DatasetFeatureStatisticsList.FromString(Path(path).read_bytes())
    if not stats.datasets:
        raise ValueError(f"{path} holds no split's statistics")
    return stats


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the drift check compares, per split."""

    examples: int
    label_share: np.ndarray  # [10]
    pixel_mean: float


def summarize(stats: statistics_pb2.DatasetFeatureStatisticsList) -> dict[str, Summary]:
    out = {}
    for ds in stats.datasets:
        features = {f.path.step[0]: f for f in ds.features}
        counts = np.array(
            [b.sample_count for b in features["label"].num_stats.histograms[0].buckets], np.float64
        )
        out[ds.name] = Summary(
            int(ds.num_examples),
            counts / max(counts.sum(), 1.0),
            float(features["image"].num_stats.mean),
        )
    return out


def check_drift(
    current: statistics_pb2.DatasetFeatureStatisticsList,
    baseline: statistics_pb2.DatasetFeatureStatisticsList,
    baseline_name: str,
) -> list[str]:
    """Drift findings (empty when none) between splits of the same name."""
    now, before = summarize(current), summarize(baseline)
    findings = []
    # Only the source splits: a carved validation split is a random sample whose class shares
    # move with the seed and the fraction (not drift).
    for name in sorted(set(now) & set(before) & set(DRIFT_SPLITS)):
        a, b = now[name], before[name]
        share = float(np.abs(a.label_share - b.label_share).max())
        if share > MAX_LABEL_SHARE_CHANGE:
            c = int(np.abs(a.label_share - b.label_share).argmax())
            findings.append(
                f"{name} split: class {c}'s share moved by {share:.3f} "
                f"(> {MAX_LABEL_SHARE_CHANGE}) from {baseline_name}'s data"
            )
        if abs(a.pixel_mean - b.pixel_mean) > MAX_PIXEL_MEAN_CHANGE:
            findings.append(
                f"{name} split: mean pixel {a.pixel_mean:.1f} vs {b.pixel_mean:.1f} "
                f"(> {MAX_PIXEL_MEAN_CHANGE} apart) in {baseline_name}'s data"
            )
    return findings


def table(stats: statistics_pb2.DatasetFeatureStatisticsList) -> str:
    """Markdown for TensorBoard's Text tab and the report."""
    lines = ["| split | examples | mean pixel | label shares (0..9) |", "|---|---|---|---|"]
    for name, s in summarize(stats).items():
        shares = " ".join(f"{x:.3f}" for x in s.label_share)
        lines.append(f"| {name} | {s.examples} | {s.pixel_mean:.2f} | {shares} |")
    return "\n".join(lines)
